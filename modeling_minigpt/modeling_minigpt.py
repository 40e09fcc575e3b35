"""MiniGPT: a decoder-only Transformer (GPT family) written the way transformers' Llama is.

Reading order, one class per concept:
    token embeddings (nn.Embedding)  ->  position encoding (MiniGPTLearnedPositions | MiniGPTSinusoidalPositions
    added to the embeddings, or MiniGPTRotaryEmbedding applied to q and k)  ->  n_layer x MiniGPTBlock
    [MiniGPTAttention (causal, multi-head, one fused QKV projection, scores / sqrt(head_dim)) and MiniGPTMLP
    (Linear -> activation -> Linear), each inside a residual with LayerNorm]  ->  final LayerNorm (pre-LN only)
    ->  LM head tied to the token embeddings  ->  softmax / sampling in `generate`.

Shape legend: B batch, T query length, S key length (cached + new), C n_embd, nh n_head, hs head size (C / nh),
V vocab_size.

The file imports only transformers and its own siblings (relatively), so `save_pretrained` can copy it next to
the weights and `trust_remote_code=True` loads it without this package installed. It supports transformers
5.17 to 5.x: the KV cache argument is called `past_key_values` up to 5.23 and `cache` from 5.24, and both are
accepted (see `accepts_both_cache_names`).
"""

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import capture_outputs

from .chunked_loss import computes_plain_linear, fused_linear_cross_entropy
from .configuration_minigpt import MiniGPTConfig
from .input_checks import check_inputs
from .transformers_compat import CACHE_NAME, accepts_both_cache_names, add_to_transformers_name_tables

logger = logging.get_logger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Position encodings. Learned and sinusoidal ones are added to the token embeddings; rotary ones turn q and k.
# ---------------------------------------------------------------------------------------------------------------


class MiniGPTLearnedPositions(nn.Embedding):
    """GPT-2's learned absolute positions: one trained vector per position, up to `n_positions`."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__(config.n_positions, config.n_embd)


class MiniGPTSinusoidalPositions(nn.Module):
    """The fixed encoding of 'Attention Is All You Need' (section 3.5), times a scale:
    PE(pos, 2i) = sin(pos / 10000^(2i/C)), PE(pos, 2i+1) = cos(pos / 10000^(2i/C)).
    Computed from the positions on the fly, so it has no parameters and no length limit.

    Each (sin, cos) pair has norm 1, so the vector has norm sqrt(C/2), while a token embedding starts at
    initializer_range * sqrt(C) (0.23 at C=128 against 8.0). The paper scales the embeddings up by sqrt(C); here the
    encoding is scaled down instead, by `config.sinusoidal_scale` (default initializer_range * sqrt(2): the two
    start with the same norm), which trained to the learned-position baseline where the other did not."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__()
        self.n_embd = config.n_embd
        scale = config.sinusoidal_scale
        self.scale = config.initializer_range * math.sqrt(2) if scale is None else float(scale)

    def forward(self, position_ids: torch.LongTensor) -> torch.Tensor:
        # the frequencies are made here in fp32, not kept in a buffer: `model.to(torch.bfloat16)` would round a
        # buffer too, and the rounding moves position 1000 by whole radians
        half = torch.arange(0, self.n_embd, 2, device=position_ids.device, dtype=torch.float) / self.n_embd
        angles = position_ids[..., None].float() / (10000.0**half)  # (B, T, C/2)
        # interleave so that even channels hold sin and odd ones cos, as in the paper
        return self.scale * torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (B, T, C)


class MiniGPTRotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, arXiv:2104.09864) in the rotate-half layout that Llama uses.
    Returns (cos, sin) for the given positions; attention applies them to q and k."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__()
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 frequencies made here rather than a buffer that `model.to(torch.bfloat16)` would round (see above)
        exponents = torch.arange(0, self.head_dim, 2, device=position_ids.device, dtype=torch.float) / self.head_dim
        freqs = position_ids[..., None].float() / (self.rope_theta**exponents)  # (B, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ---------------------------------------------------------------------------------------------------------------
# Attention and feed-forward
# ---------------------------------------------------------------------------------------------------------------

# GPT-2's `gelu_new` is the tanh GELU written as 8 elementwise ops, each saving a tensor for backward; PyTorch's
# fused kernel computes the same function (to 1 ulp) in one, which makes eager training faster and leaner.
_FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path, written out: softmax(q k^T / sqrt(hs) + mask) v.

    `attention_mask` comes from `create_causal_mask` and already holds the causal triangle and the padding:
    a boolean mask (True = attend) or an additive float mask. Masked scores become -inf, or the dtype's minimum
    for an additive mask; either way their softmax weight is exactly 0."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nan_to_num(weights)  # a row with every key masked (a padding query) gives 0, not NaN
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value)  # (B, nh, T, hs)
    return output.transpose(1, 2).contiguous(), weights  # (B, T, nh, hs)


class MiniGPTAttention(nn.Module):
    """Causal multi-head self-attention with one fused QKV projection.

    The backend (sdpa by default, eager, flash_attention_2, flex_attention) comes from transformers'
    attention-function registry, chosen by `config._attn_implementation`; `eager_attention_forward` above is
    the fallback and the reference."""

    def __init__(self, config: MiniGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attn_pdrop
        self.is_causal = True
        self.num_key_value_groups = 1  # plain multi-head attention; read by transformers' attention backends
        # the widths of q, k and v in the fused projection's output, which holds all of q, then all of k, then all of v
        # (heads in order within each). forward splits by them with a literal 3-tuple: that three-way `.split` of
        # `qkv_proj`'s output is how vLLM's Transformers backend recognises a fused QKV, which it then shards by heads
        # (see base_model_tp_plan in configuration_minigpt.py)
        self.q_size = self.kv_size = config.n_head * self.head_dim
        self.qkv_proj = nn.Linear(config.n_embd, self.q_size + 2 * self.kv_size, bias=config.bias)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.o_proj.is_residual_projection = True  # scaled init, see MiniGPTPreTrainedModel._init_weights
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = hidden_states.shape
        q, k, v = self.qkv_proj(hidden_states).split((self.q_size, self.kv_size, self.kv_size), dim=-1)  # 3 x (B, T, C)
        # -1, not n_head: under tensor parallelism a rank holds only its share of the heads
        query = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        key = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        value = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

        if position_embeddings is not None:  # rotary
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            if isinstance(cache, Cache) or "read_index" not in inspect.signature(cache.update).parameters:
                # the keyword arguments go along, as transformers' Llama passes them: continuous batching's
                # PagedAttentionCache reads this batch's read and write indices from them and fills in, in place, what
                # the attention function then needs (each sequence's key lengths, the block table); others ignore them
                key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)  # (B, nh, S, hs)
            else:
                # continuous batching before that (transformers 5.17): the paged attention functions (paged|sdpa, ...)
                # update the PagedAttentionCache themselves, with the indices only they pass it, and take it from their
                # keyword arguments, where Llama there leaves it
                kwargs["cache"] = cache

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )  # (B, T, nh, hs)
        attn_output = attn_output.reshape(B, T, -1)  # (B, T, C), or (B, T, C / tp) on one tensor-parallel rank
        return self.resid_dropout(self.o_proj(attn_output)), attn_weights


class MiniGPTMLP(nn.Module):
    """The position-wise feed-forward network: Linear -> activation -> Linear."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.act_fn = ACT2FN[_FUSED_ACTIVATIONS.get(config.activation_function, config.activation_function)]
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.down_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(self.act_fn(self.up_proj(x))))  # (B, T, C) -> (B, T, inner) -> (B, T, C)


class MiniGPTBlock(GradientCheckpointingLayer):
    """One Transformer block. `norm_position` picks where the LayerNorms sit:

        pre  (GPT-2):               post (original Transformer):
          x = x + attn(ln_1(x))       x = ln_1(x + attn(x))
          x = x + mlp(ln_2(x))        x = ln_2(x + mlp(x))
    """

    def __init__(self, config: MiniGPTConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.input_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.self_attn = MiniGPTAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MiniGPTMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        def attn(x):
            return self.self_attn(
                x, attention_mask=attention_mask, position_embeddings=position_embeddings, cache=cache, **kwargs
            )[0]

        if self.pre_norm:
            hidden_states = hidden_states + attn(self.input_layernorm(hidden_states))
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        else:
            hidden_states = self.input_layernorm(hidden_states + attn(hidden_states))
            hidden_states = self.post_attention_layernorm(hidden_states + self.mlp(hidden_states))
        return hidden_states


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


class MiniGPTPreTrainedModel(PreTrainedModel):
    config_class = MiniGPTConfig
    config: MiniGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniGPTBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": MiniGPTBlock, "attentions": MiniGPTAttention}

    def _init_weights(self, module: nn.Module):
        """GPT-2's init: N(0, initializer_range) for linear and embedding weights, zero biases, unit LayerNorms,
        and the two residual output projections of each block scaled down by 1/sqrt(2 * n_layer), because each
        block adds two branches to the residual stream ('Language Models are Unsupervised Multitask Learners',
        section 2.3). transformers calls this once per module that holds parameters, so the residual projections
        carry a flag rather than being found from their parent."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if getattr(module, "is_residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, also of a model sharded by torch's FSDP2 (given the gathered `state_dict`, as
        Trainer and accelerate pass it). fully_shard swaps in a class torch generates (FSDPMiniGPTForCausalLM), which
        transformers would record in auto_map, copying torch's files as the model code: the save runs as the MiniGPT
        class underneath instead, and the FSDP class is put back afterwards."""
        sharded_class = type(self)
        self.__class__ = _unsharded_class(self)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = sharded_class


def _unsharded_class(model: nn.Module) -> type:
    """The model's own class: the first of its MRO that is not FSDP2's (under FSDP2, the base of FSDP<Name>)."""
    if not torch.distributed.is_available():  # some torch builds ship without it
        return type(model)
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


class MiniGPTModel(MiniGPTPreTrainedModel):
    """The Transformer without a head: returns the final hidden states (and the cache)."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        # the position encoding is picked once: added to the embeddings (learned, sinusoidal) or rotary in attention
        self.embed_positions = None
        self.rotary_emb = None
        if config.position_embedding_type == "learned":
            self.embed_positions = MiniGPTLearnedPositions(config)
        elif config.position_embedding_type == "sinusoidal":
            self.embed_positions = MiniGPTSinusoidalPositions(config)
        else:
            self.rotary_emb = MiniGPTRotaryEmbedding(config)
        self.dropout = nn.Dropout(config.embd_pdrop)
        self.layers = nn.ModuleList([MiniGPTBlock(config, i) for i in range(config.n_layer)])
        # post-LN blocks end in a LayerNorm already; pre-LN needs one more before the head
        self.norm = (
            nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
            if config.norm_position == "pre"
            else nn.Identity()
        )
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    @capture_outputs
    @accepts_both_cache_names
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if use_cache is None:  # a cache is for generation: training forwards don't build one by default
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and (use_cache or cache is not None):
            # backward recomputes each block, which would write its keys and values into the cache a second time
            logger.warning_once("Caching is incompatible with gradient checkpointing; using use_cache=False.")
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        B, T = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        # The cache is asked its length only where that is used: to derive positions, and for the checks. Continuous
        # batching (generate_batch, `transformers serve --continuous-batching`) passes a PagedAttentionCache, which
        # packs sequences of different lengths into one row (B = 1) and so has no get_seq_length(); it always passes
        # each token's position, and the checks take its batch as new input (every id and position checked each step).
        past_length = None
        if position_ids is None:
            past_length = cache.get_seq_length() if cache is not None else 0
            position_ids = self._default_position_ids(attention_mask, B, T, past_length)
        # checks sync with the device: a compiled graph skips them, and so does a CUDA graph being captured (by
        # continuous batching), where a sync is an error
        may_sync = not torch.compiler.is_compiling() and not (
            torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        )
        if may_sync:
            if past_length is None:
                past_length = cache.get_seq_length() if isinstance(cache, Cache) else 0
            check_inputs(self.config, input_ids, attention_mask, position_ids, B, T, past_length)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)
        hidden_states = inputs_embeds
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(position_ids).to(hidden_states.dtype)
        hidden_states = self.dropout(hidden_states)
        position_embeddings = self.rotary_emb(hidden_states, position_ids) if self.rotary_emb is not None else None

        # one mask for all layers: None when sdpa's is_causal path applies (no padding), else 4-D (B, 1, T, S)
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)

        for layer in self.layers:
            # only hidden_states goes by position (reentrant checkpointing needs it so); the rest by keyword, where
            # GradientCheckpointingLayer can see them
            hidden_states = layer(
                hidden_states, attention_mask=causal_mask, position_embeddings=position_embeddings, cache=cache, **kwargs
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: cache})

    @staticmethod
    def _default_position_ids(attention_mask, B, T, past_length) -> torch.LongTensor:
        """Positions count real tokens only, so a left-padded row gets the same positions as when run alone."""
        if attention_mask is not None and attention_mask.ndim == 2:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
            return positions[:, -T:]
        device = attention_mask.device if attention_mask is not None else None
        return (torch.arange(T, device=device) + past_length).unsqueeze(0).expand(B, T)


# ---------------------------------------------------------------------------------------------------------------
# LM head
# ---------------------------------------------------------------------------------------------------------------

class MiniGPTForCausalLM(MiniGPTPreTrainedModel, GenerationMixin):
    """MiniGPTModel plus the LM head (tied to the token embeddings unless `tie_word_embeddings=False`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # sharded on the vocabulary like the embeddings it is tied to (base_model_tp_plan), each rank's logits gathered
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: MiniGPTConfig):
        super().__init__(config)
        self.model = MiniGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.lm_head = new_embeddings

    @can_return_tuple
    @accepts_both_cache_names
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        labels: token ids to predict, aligned with `input_ids` (the shift happens inside the loss); -100 is ignored.
        logits_to_keep: if an int > 0, compute logits for the last that many positions only (generation needs 1);
            if a 1-D tensor, the positions to keep. 0 keeps all.
        skip_logits: with `labels`, return the loss and `logits=None`. Where the head is a plain Linear, the loss is
            computed from the hidden states chunk by chunk (`fused_linear_cross_entropy`): the same loss and gradients
            without holding [B, T, V] logits, which makes training faster and leaner. A head that is more than its
            weight (LoRA, modules_to_save, offload hooks, quantized weights) is called as usual instead, so the loss
            and gradients are those of the plain path there too. The name is the one Trainer passes.
        """
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True computes only the loss, so it needs labels; pass labels or drop it.")
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, C)
        if skip_logits and computes_plain_linear(self.lm_head):
            loss = fused_linear_cross_entropy(hidden_states, self.lm_head.weight, labels, **kwargs)
            logits = None
        else:
            # a head that is more than its weight (LoRA, offload hooks, quantized) is called; skip_logits then falls
            # back to this plain path, over every position, and only drops the logits afterwards
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            if skip_logits:  # the loss needs every position
                keep = slice(None)
            logits = self.lm_head(hidden_states[:, keep, :])  # (B, T_keep, V)
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if skip_logits:
                logits = None

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )


# ---------------------------------------------------------------------------------------------------------------
# Task heads: transformers' generic ones (as Llama has), on the same MiniGPTModel. The generic __init__ builds the
# body through AutoModel, which a checkpoint loaded with trust_remote_code has not registered, so each head builds
# MiniGPTModel itself and keeps the generic forward: last-token pooling that skips left or right padding (the
# rightmost token that is not pad_token_id), start/end logits, per-token labels.
# ---------------------------------------------------------------------------------------------------------------


class MiniGPTForSequenceClassification(GenericForSequenceClassification, MiniGPTPreTrainedModel):
    def __init__(self, config: MiniGPTConfig):
        MiniGPTPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = MiniGPTModel(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.post_init()


class MiniGPTForTokenClassification(GenericForTokenClassification, MiniGPTPreTrainedModel):
    def __init__(self, config: MiniGPTConfig):
        MiniGPTPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = MiniGPTModel(config)
        dropout = getattr(config, "classifier_dropout", None)  # the generic head's default: 0.1
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.n_embd, config.num_labels)
        self.post_init()


class MiniGPTForQuestionAnswering(GenericForQuestionAnswering, MiniGPTPreTrainedModel):
    def __init__(self, config: MiniGPTConfig):
        MiniGPTPreTrainedModel.__init__(self, config)
        self.model = MiniGPTModel(config)
        self.qa_outputs = nn.Linear(config.n_embd, 2)
        self.post_init()


# transformers decides some behaviour by a model's class *name* in its built-in tables (see transformers_compat.py)
add_to_transformers_name_tables(
    MiniGPTConfig.model_type,
    {
        "MODEL_MAPPING_NAMES": MiniGPTModel,
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": MiniGPTForCausalLM,
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": MiniGPTForSequenceClassification,
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": MiniGPTForTokenClassification,
        "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": MiniGPTForQuestionAnswering,
    },
)

__all__ = [
    "MiniGPTPreTrainedModel",
    "MiniGPTModel",
    "MiniGPTForCausalLM",
    "MiniGPTForSequenceClassification",
    "MiniGPTForTokenClassification",
    "MiniGPTForQuestionAnswering",
]
