"""MiniGPT configuration: the shape of the model and nothing else.

Optimizer, data and logging knobs live in `train/`. The defaults are GPT-2 124M (12 layers, 12 heads,
768 wide, 1024 positions), with the vocabulary padded from 50257 up to 50304, a multiple of 64, so
that the embedding and LM-head matmuls hit the fast kernel sizes.
"""

import functools
import math

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

AUTO_MAP = {
    "AutoConfig": "configuration_minigpt.MiniGPTConfig",
    "AutoModel": "modeling_minigpt.MiniGPTModel",
    "AutoModelForCausalLM": "modeling_minigpt.MiniGPTForCausalLM",
    "AutoModelForSequenceClassification": "modeling_minigpt.MiniGPTForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_minigpt.MiniGPTForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_minigpt.MiniGPTForQuestionAnswering",
}
POSITION_EMBEDDING_TYPES = ("learned", "sinusoidal", "rope")
NORM_POSITIONS = ("pre", "post")
FLOAT_FIELDS = ("rope_theta", "layer_norm_epsilon", "embd_pdrop", "attn_pdrop", "resid_pdrop", "initializer_range")


def _value_errors(cls):
    """`@strict` reports a wrong type (a string for an int, None, ...) as its own StrictDataclassError, which is
    not a ValueError; re-raise it as one, so that every bad config value gives the same exception type."""
    strict_init = cls.__init__

    @functools.wraps(strict_init)
    def __init__(self, *args, **kwargs):
        try:
            strict_init(self, *args, **kwargs)
        except StrictDataclassError as err:
            raise ValueError(f"Invalid MiniGPTConfig: {err}") from err

    cls.__init__ = __init__
    return cls


@_value_errors
@strict
class MiniGPTConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size: number of token ids the embedding and the LM head cover.
        n_positions: the longest sequence the model accepts (`max_position_embeddings`).
        n_embd: width of the residual stream (`hidden_size`).
        n_layer: number of Transformer blocks (`num_hidden_layers`).
        n_head: attention heads per block (`num_attention_heads`); `n_embd` must divide by it.
        n_inner: inner width of the feed-forward network (`intermediate_size`); `None` (the default) means
            `4 * n_embd`, worked out when read, so that it follows `n_embd` (`hidden_size`) set later.
        activation_function: any name in `transformers.activations.ACT2FN` (relu, gelu, gelu_new, silu, ...).
            `gelu_new` (GPT-2's tanh approximation of GELU) runs as `gelu_pytorch_tanh`, PyTorch's fused kernel for
            the same function (equal to 1 ulp), which is faster and keeps one tensor for backward instead of eight.
        position_embedding_type: `learned` (GPT-2), `sinusoidal` (the original Transformer) or `rope` (rotary).
        rope_theta: base of the rotary frequencies, used with `rope` only.
        sinusoidal_scale: factor on the `sinusoidal` encoding. `None` (the default) puts it on the token
            embeddings' initial scale, `initializer_range * sqrt(2)`; at 1.0 (the paper's encoding, and what
            checkpoints saved before this field computed) its norm sqrt(n_embd / 2) drowns the embeddings'
            `initializer_range * sqrt(n_embd)`, and the loss stays at the unigram level for hundreds of steps.
        norm_position: `pre` (GPT-2: LayerNorm before each sub-block, plus a final one) or
            `post` (original Transformer: LayerNorm after each residual sum).
        layer_norm_epsilon: epsilon of every LayerNorm.
        embd_pdrop, attn_pdrop, resid_pdrop: dropout on embeddings, attention weights and residual branches.
        bias: whether the linear layers and LayerNorms carry a bias (GPT-2 does).
        initializer_range: std of the normal init; residual projections get `/ sqrt(2 * n_layer)` on top.

    Example:
    ```python
    >>> from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
    >>> model = MiniGPTForCausalLM(MiniGPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=1000))
    ```
    """

    model_type = "minigpt"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # Tensor parallelism of MiniGPTModel, as read by vLLM's Transformers backend. The fused `qkv_proj` is left out on
    # purpose: its output is [q | k | v], so "colwise" would hand rank 0 of 2 all of q and half of k, not half of
    # each. vLLM recognises it instead by the three-way split in MiniGPTAttention.forward and swaps in a
    # QKVParallelLinear, which gives each rank the same heads of q, k and v; o_proj then sums the ranks' heads
    # (rowwise), and the MLP is the usual colwise/rowwise pair. transformers' own `tp_plan="auto"` has no style
    # that shards a 3-way packed projection by heads (`packed_colwise` splits 2-way), so it would leave qkv_proj
    # whole while o_proj expects a shard: MiniGPT is not prepared for it. (Phi-3's `colwise_gather_output` and
    # `rowwise_split_input` would suit it, but vLLM reads those as "replicate", which breaks its head-sharded path.)
    # The token embeddings are sharded on the vocabulary (as transformers >= 5.25 adds by itself to any base plan): the
    # LM head is tied to them and is sharded the same way (MiniGPTForCausalLM._tp_plan), since a tied pair must be
    # sharded both or neither. No base_model_pp_plan either: the learned and sinusoidal positions are added inside
    # MiniGPTModel.forward after the embeddings, so a later pipeline stage would add them a second time.
    base_model_tp_plan = {
        "embed_tokens": "embedding_rowwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = 50304
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    position_embedding_type: str = "learned"
    rope_theta: float | int = 10000.0  # ints are accepted (JSON and YAML write 0 for 0.0) and stored as floats
    sinusoidal_scale: float | int | None = None
    norm_position: str = "pre"
    layer_norm_epsilon: float | int = 1e-5
    embd_pdrop: float | int = 0.0
    attn_pdrop: float | int = 0.0
    resid_pdrop: float | int = 0.0
    bias: bool = True
    initializer_range: float | int = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        # the parent sets the aliased fields (hidden_size=, num_attention_heads=, ...) from kwargs, and an alias
        # skips @strict's type check, so derive and check only after it
        super().__post_init__(**kwargs)
        # every class this file and modeling_minigpt.py define, so that a checkpoint written by any head loads through
        # every Auto class with trust_remote_code, as it does with the package installed (save_pretrained adds the
        # saving class to this map and keeps the rest)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if _is_int(value):
                try:
                    setattr(self, name, float(value))
                except OverflowError:
                    raise ValueError(f"MiniGPTConfig.{name}={value} is too large for a float.") from None
        self._check()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # a sinusoidal checkpoint saved before `sinusoidal_scale` existed used the encoding at full strength: it
        # keeps computing exactly what it computed
        if config_dict.get("position_embedding_type") == "sinusoidal" and "sinusoidal_scale" not in config_dict:
            config_dict = {**config_dict, "sinusoidal_scale": 1.0}
        return super().from_dict(config_dict, **kwargs)

    def _check(self):
        """Raise a ValueError that names the bad field, its value and what is allowed."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            value = getattr(self, name)
            if name == "n_inner" and value is None:  # 4 * n_embd, see intermediate_size
                continue
            if not _is_int(value) or value <= 0:
                alias = next((f" ({a})" for a, field in self.attribute_map.items() if field == name), "")
                raise ValueError(f"MiniGPTConfig.{name}{alias} must be a positive integer, got {value!r}.")
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, float) or not math.isfinite(value):
                raise ValueError(f"MiniGPTConfig.{name} must be a finite number, got {value!r}.")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"MiniGPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"pick n_head among the divisors of {self.n_embd}, e.g. {_divisors(self.n_embd)}."
            )
        if self.activation_function not in ACT2FN:
            raise ValueError(
                f"MiniGPTConfig.activation_function={self.activation_function!r} is unknown; "
                f"use one of {sorted(ACT2FN)}."
            )
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"MiniGPTConfig.position_embedding_type={self.position_embedding_type!r} is unknown; "
                f"use one of {list(POSITION_EMBEDDING_TYPES)}."
            )
        if self.position_embedding_type == "rope" and (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(
                f"Rotary embeddings need an even head size, but n_embd / n_head = {self.n_embd // self.n_head}; "
                "change n_embd or n_head, or use position_embedding_type='learned'."
            )
        if self.position_embedding_type == "sinusoidal" and self.n_embd % 2 != 0:  # sin and cos pair up channels
            raise ValueError(
                f"Sinusoidal position embeddings need an even n_embd, got {self.n_embd}; "
                "change n_embd, or use position_embedding_type='learned'."
            )
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(
                f"MiniGPTConfig.norm_position={self.norm_position!r} is unknown; use one of {list(NORM_POSITIONS)}."
            )
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"MiniGPTConfig.{name} must lie in [0, 1), got {value!r}.")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"MiniGPTConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}.")
        if self.sinusoidal_scale is not None and not (
            isinstance(self.sinusoidal_scale, (int, float)) and math.isfinite(self.sinusoidal_scale)
        ):
            raise ValueError(
                f"MiniGPTConfig.sinusoidal_scale must be a finite number or None, got {self.sinusoidal_scale!r}."
            )
        if not self.rope_theta > 0:
            raise ValueError(f"MiniGPTConfig.rope_theta must be > 0, got {self.rope_theta!r}.")
        if not 0 <= self.initializer_range <= 1:  # beyond 1 the logits overflow to inf and the loss to NaN
            raise ValueError(
                f"MiniGPTConfig.initializer_range must lie in [0, 1] (GPT-2 uses 0.02), got {self.initializer_range!r}."
            )
        # an id outside the vocabulary crashes the embedding, or (eos) is never produced, so generation never stops
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            for token_id in value if isinstance(value, list) else [value]:
                if token_id is not None and not (_is_int(token_id) and 0 <= token_id < self.vocab_size):
                    raise ValueError(
                        f"MiniGPTConfig.{name}={value!r} is outside the vocabulary [0, vocab_size={self.vocab_size}); "
                        "use the tokenizer's ids (e.g. tokenizer.eos_token_id) or None, and a vocab_size that covers "
                        "them (>= len(tokenizer))."
                    )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        """The feed-forward width: `n_inner`, or `4 * n_embd` while `n_inner` is None. Worked out on every read
        rather than stored, so it follows `n_embd` when that changes after the config was made."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @intermediate_size.setter
    def intermediate_size(self, value: int | None):
        self.n_inner = value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


__all__ = ["MiniGPTConfig"]
