"""Convert between transformers' GPT2LMHeadModel and MiniGPT, in both directions, with one name table.

    python -m minigpt.hub.convert_gpt2 openai-community/gpt2 out/gpt2-minigpt        # GPT-2 (folder or Hub id) -> MiniGPT
    python -m minigpt.hub.convert_gpt2 out/my-minigpt out/my-gpt2 --reverse          # MiniGPT -> GPT2LMHeadModel

GPT-2 is MiniGPT with learned positions, gelu_new, pre-LN, biases and a tied head, so the conversion only renames
tensors, except for one detail: GPT-2's `Conv1D` stores its weight as (in, out), `nn.Linear` as (out, in), so the
four Conv1D weights of each block are transposed. GPT-2's fused `c_attn` already lays out its output as
[q | k | v], each `n_embd` wide and split into heads the same way, which is what MiniGPT's `qkv_proj` expects.

The MiniGPT folder written is a complete checkpoint: weights, config.json with `auto_map`, the modeling code,
generation_config.json and the tokenizer when the source has one (a warning says how to add one where it has none).
The GPT-2 folder that --reverse writes also carries `n_ctx` (= n_positions), which GPT-2 tools such as llama.cpp's
converter read. A source that is neither an existing folder nor an owner/name Hub id (`gpt2-folderr`) is asked of
the Hub once, and fails at once when the Hub has no such model, cannot be reached, or HF_HUB_OFFLINE is set.

Every checkpoint GPT2LMHeadModel loads converts. A few values GPT2Config lets through (with at most a warning) are
refused by MiniGPTConfig: special ids outside the vocabulary, a dropout of 1, a LayerNorm epsilon <= 0, an
initializer_range outside [0, 1]. None of them takes part in the forward as GPT-2 computes it, so they are dropped or
reset, each with a warning that names it, and the logits stay the same.
"""

import argparse
import logging
import os
import shutil
from pathlib import Path

from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedConfig

import modeling_minigpt  # noqa: F401  (registers MiniGPT, so save_pretrained writes auto_map and the code files)
from minigpt.commands import one_line_usage, run_cli
from minigpt.folders import load_pretrained
from minigpt.sources import check_local_path
from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM

logger = logging.getLogger("minigpt.hub.convert_gpt2")

# GPT-2 name -> MiniGPT name; "{}" is the layer index. The same table read right to left converts back.
WEIGHT_MAP = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.wpe.weight": "model.embed_positions.weight",
    "transformer.h.{}.ln_1.weight": "model.layers.{}.input_layernorm.weight",
    "transformer.h.{}.ln_1.bias": "model.layers.{}.input_layernorm.bias",
    "transformer.h.{}.attn.c_attn.weight": "model.layers.{}.self_attn.qkv_proj.weight",
    "transformer.h.{}.attn.c_attn.bias": "model.layers.{}.self_attn.qkv_proj.bias",
    "transformer.h.{}.attn.c_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "transformer.h.{}.attn.c_proj.bias": "model.layers.{}.self_attn.o_proj.bias",
    "transformer.h.{}.ln_2.weight": "model.layers.{}.post_attention_layernorm.weight",
    "transformer.h.{}.ln_2.bias": "model.layers.{}.post_attention_layernorm.bias",
    "transformer.h.{}.mlp.c_fc.weight": "model.layers.{}.mlp.up_proj.weight",
    "transformer.h.{}.mlp.c_fc.bias": "model.layers.{}.mlp.up_proj.bias",
    "transformer.h.{}.mlp.c_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "transformer.h.{}.mlp.c_proj.bias": "model.layers.{}.mlp.down_proj.bias",
    "transformer.ln_f.weight": "model.norm.weight",
    "transformer.ln_f.bias": "model.norm.bias",
    "lm_head.weight": "lm_head.weight",  # the tied embedding when tie_word_embeddings, its own matrix otherwise
}
# GPT-2's Conv1D weights are (in, out); nn.Linear's are (out, in).
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Config fields with the same name and meaning in GPT2Config and MiniGPTConfig.
SHARED_CONFIG_FIELDS = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "embd_pdrop", "attn_pdrop", "resid_pdrop", "initializer_range", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip
FLOAT_FIELDS = ("layer_norm_epsilon", "embd_pdrop", "attn_pdrop", "resid_pdrop", "initializer_range")
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# What MiniGPT must be set to for GPT2LMHeadModel to compute the same function.
GPT2_COMPATIBLE = {"position_embedding_type": "learned", "norm_position": "pre", "bias": True}
# GPT-2 options that MiniGPT cannot express (value MiniGPT needs).
GPT2_REQUIRED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}

# Tokenizer files copied from a local source folder as they are.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "chat_template.jinja",
)  # fmt: skip


def convert_state_dict(state: dict, n_layer: int, reverse: bool = False) -> dict:
    """Rename (and transpose where needed) every tensor of `state`; GPT-2 -> MiniGPT, or back with `reverse`.
    Every source key must be consumed: a leftover key means the checkpoint holds something MiniGPT can't."""
    state = dict(state)
    out = {}
    for gpt2_name, mini_name in WEIGHT_MAP.items():
        for i in range(n_layer) if "{}" in gpt2_name else [None]:
            src, dst = (mini_name, gpt2_name) if reverse else (gpt2_name, mini_name)
            src, dst = src.format(i), dst.format(i)
            if src not in state:
                raise KeyError(f"The source checkpoint has no tensor {src!r}; it is not a complete {_side(reverse)}.")
            tensor = state.pop(src)
            out[dst] = tensor.t().contiguous() if gpt2_name.endswith(TRANSPOSED) else tensor
    if state:
        raise ValueError(f"The source checkpoint holds tensors the conversion doesn't know: {sorted(state)[:8]}.")
    return out


def _side(reverse: bool) -> str:
    return "MiniGPT checkpoint" if reverse else "GPT2LMHeadModel checkpoint"


def config_from_gpt2(gpt2: GPT2Config) -> MiniGPTConfig:
    """The MiniGPTConfig of a GPT-2 config; a warning names each value that had to be dropped or reset."""
    for name, needed in GPT2_REQUIRED.items():
        if getattr(gpt2, name, needed) != needed:
            raise ValueError(
                f"This GPT-2 checkpoint sets {name}={getattr(gpt2, name)!r}, which MiniGPT cannot reproduce "
                f"(it needs {name}={needed!r}); such a checkpoint can't be converted."
            )
    fields = {name: getattr(gpt2, name) for name in SHARED_CONFIG_FIELDS}
    for name in FLOAT_FIELDS:  # GPT2Config allows ints (dropout 0); MiniGPTConfig's strict fields want floats
        fields[name] = float(fields[name])
    # values GPT2LMHeadModel loads (with at most a warning) but MiniGPTConfig refuses; none changes an eval forward
    changes = _drop_ids_outside_vocabulary(fields, fields["vocab_size"])
    for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
        if not 0 <= fields[name] < 1:  # nn.Dropout takes p=1 (zero every activation), MiniGPTConfig [0, 1)
            changes.append(f"{name}={fields[name]!r} is outside MiniGPT's [0, 1); set to 0.0 (dropout is off at "
                           "inference, so the logits are the same; set the dropout you train with)")
            fields[name] = 0.0
    eps = fields["layer_norm_epsilon"]
    if not eps > 0:  # 0 + 1e-12 is lost in any float32 variance that is not 0; a negative epsilon has no equal
        effect = "the logits are the same" if eps == 0 else "the logits differ by about |epsilon| / variance"
        changes.append(f"layer_norm_epsilon={eps!r} is not > 0 as MiniGPT needs; set to 1e-12 ({effect})")
        fields["layer_norm_epsilon"] = 1e-12
    if not 0 <= fields["initializer_range"] <= 1:
        changes.append(f"initializer_range={fields['initializer_range']!r} is outside MiniGPT's [0, 1]; set to "
                       "0.02 (GPT-2's), which only draws freshly initialised weights, none of the converted ones")
        fields["initializer_range"] = 0.02
    for change in changes:
        logger.warning("%s", change)
    return MiniGPTConfig(**fields, **GPT2_COMPATIBLE)


def _drop_ids_outside_vocabulary(fields: dict, vocab_size: int, prefix: str = "") -> list[str]:
    """Set each special id of `fields` outside [0, vocab_size) to None (or drop it from a list of eos ids), in place;
    returns a sentence for each change. GPT2Config defaults to 50256 for bos and eos, whatever its vocabulary."""
    changes = []
    for name in TOKEN_ID_FIELDS:
        value = fields.get(name)
        ids = value if isinstance(value, list) else [value]
        kept = [i for i in ids if i is not None and 0 <= i < vocab_size]
        kept = (kept or None) if isinstance(value, list) else (kept[0] if kept else None)
        if kept != value:
            where = "holds ids outside" if isinstance(value, list) else "is outside"
            changes.append(f"{prefix}{name}={value!r} {where} the vocabulary of {vocab_size}; dropped (set to "
                           f"{kept!r})")
            fields[name] = kept
    return changes


def config_to_gpt2(config: MiniGPTConfig) -> GPT2Config:
    for name, needed in GPT2_COMPATIBLE.items():
        if getattr(config, name) != needed:
            raise ValueError(
                f"This MiniGPT checkpoint has {name}={getattr(config, name)!r}, but GPT2LMHeadModel only has "
                f"{name}={needed!r}; only GPT-2-compatible checkpoints (position_embedding_type='learned', "
                "norm_position='pre', bias=True) convert to GPT-2."
            )
    fields = {name: getattr(config, name) for name in SHARED_CONFIG_FIELDS}
    # n_ctx: GPT2LMHeadModel ignores it, but GPT-2 tools (llama.cpp's convert_hf_to_gguf.py among them) read it
    return GPT2Config(**fields, **GPT2_REQUIRED, n_ctx=config.n_positions)


def _read_config(src: str) -> dict:
    """config.json of a local folder or a Hub repo, as a dict, with errors that say what was expected."""
    # a typo'd local path, or a bare name the Hub doesn't serve, fails now, not after a minute of Hub retries
    check_local_path(src, "folder", "src")
    if Path(src).exists() and not (Path(src) / "config.json").is_file():
        raise FileNotFoundError(
            f"{src} has no config.json; point at a folder written by save_pretrained (or a Hub model id)."
        )
    try:
        config, _ = PreTrainedConfig.get_config_dict(src)
    except OSError as error:  # transformers' words for an unreachable Hub name neither the model nor a fix
        if Path(src).exists():
            raise
        raise OSError(f"cannot read the Hub model {src}: {error}") from None
    return config


def _copy_tokenizer(src: str, dst: str) -> bool:
    """Copy the tokenizer files of a local folder, or download and save the tokenizer of a Hub repo."""
    if Path(src).is_dir():
        found = [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
        for name in found:
            shutil.copyfile(Path(src) / name, Path(dst) / name)
        return bool(found)
    try:
        AutoTokenizer.from_pretrained(src).save_pretrained(dst)
        return True
    except (OSError, ValueError):  # a Hub repo without tokenizer files
        return False


def _copy_tokenizer_or_warn(src: str, dst: str) -> None:
    """Copy the tokenizer of `src` into `dst`, or warn that `dst` has none and say how to add one."""
    if not _copy_tokenizer(src, dst):
        logger.warning(
            "%s has no tokenizer, so the converted folder %s has none either: pipelines, generate scripts and the "
            "GGUF export need one. Add the one the model was trained with: AutoTokenizer.from_pretrained(TOKENIZER)"
            ".save_pretrained(%r), with TOKENIZER its folder or Hub id (openai-community/gpt2 for OpenAI's GPT-2).",
            src, dst, str(dst),
        )


def _check_destination(src: str, dst: str):
    if Path(src).exists() and Path(dst).resolve() == Path(src).resolve():
        raise ValueError(f"The destination {dst} is the source folder; write the conversion to a new folder.")


def gpt2_to_minigpt(src: str, dst: str) -> MiniGPTForCausalLM:
    """GPT2LMHeadModel checkpoint (local folder or Hub id) -> complete MiniGPT checkpoint folder `dst`."""
    _check_destination(src, dst)
    model_type = _read_config(src).get("model_type")
    if model_type != "gpt2":
        hint = " Use --reverse to convert a MiniGPT checkpoint to GPT-2." if model_type == "minigpt" else ""
        raise ValueError(
            f"{src} is a {model_type!r} checkpoint, not GPT-2 (config.json model_type must be 'gpt2'); this "
            f"converter reads GPT2LMHeadModel checkpoints only.{hint}"
        )
    config = config_from_gpt2(GPT2Config.from_pretrained(src))  # refuse before loading any weights
    gpt2 = load_pretrained(GPT2LMHeadModel, src, dtype="auto")
    model = _load_converted(MiniGPTForCausalLM(config), convert_state_dict(gpt2.state_dict(), config.n_layer))
    model.generation_config = gpt2.generation_config  # built from the config when the source has none: same ids
    ids = {name: getattr(model.generation_config, name) for name in TOKEN_ID_FIELDS}
    for change in _drop_ids_outside_vocabulary(ids, config.vocab_size, prefix="generation_config."):
        logger.warning("%s", change)
    for name, value in ids.items():
        setattr(model.generation_config, name, value)
    model.to(gpt2.dtype).save_pretrained(dst)
    _copy_tokenizer_or_warn(src, dst)
    return model


def minigpt_to_gpt2(src: str, dst: str) -> GPT2LMHeadModel:
    """MiniGPT checkpoint with a GPT-2-compatible config -> GPT2LMHeadModel checkpoint folder `dst`."""
    _check_destination(src, dst)
    model_type = _read_config(src).get("model_type")
    if model_type != "minigpt":
        raise ValueError(
            f"{src} is a {model_type!r} checkpoint, not MiniGPT (config.json model_type must be 'minigpt'); "
            "--reverse converts MiniGPT checkpoints to GPT-2. Drop --reverse to convert GPT-2 to MiniGPT."
        )
    config = config_to_gpt2(MiniGPTConfig.from_pretrained(src))  # refuse before loading any weights
    mini = load_pretrained(MiniGPTForCausalLM, src, dtype="auto")
    model = _load_converted(GPT2LMHeadModel(config), convert_state_dict(mini.state_dict(), config.n_layer, True))
    model.generation_config = mini.generation_config
    model.to(mini.dtype).save_pretrained(dst)
    _copy_tokenizer_or_warn(src, dst)
    return model


def _load_converted(model, state: dict):
    """Load `state` into `model`, asserting the same key set and every shape (no silent strict=False)."""
    expected = model.state_dict()
    assert len(state) == len(expected), f"converted {len(state)} tensors, the model has {len(expected)}"
    for name, tensor in state.items():
        assert name in expected, f"converted tensor {name} has no place in {type(model).__name__}"
        assert tensor.shape == expected[name].shape, f"{name}: {tuple(tensor.shape)} != {tuple(expected[name].shape)}"
    model.load_state_dict(state, strict=True)
    if model.config.tie_word_embeddings:  # loading both tied names may have untied them
        model.tie_weights()
    return model.eval()


def main(argv: list[str] | None = None):
    parser = one_line_usage(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), "convert_gpt2")
    parser.add_argument("src", help="source checkpoint: a local folder or a Hub model id (e.g. openai-community/gpt2)")
    parser.add_argument("dst", help="folder to write the converted checkpoint to")
    parser.add_argument("--reverse", action="store_true", help="convert MiniGPT -> GPT2LMHeadModel instead")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s")  # the warnings of what the conversion dropped
    convert = minigpt_to_gpt2 if args.reverse else gpt2_to_minigpt
    model = convert(args.src, args.dst)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {type(model).__name__} ({n_params:,} parameters) to {os.path.abspath(args.dst)}")


def cli(argv: list[str] | None = None) -> None:
    """The `minigpt-convert-gpt2` console script. Bad input and an unreachable Hub end in one line that says what to do."""
    run_cli("convert_gpt2", main, argv, errors=(ValueError, KeyError, OSError))


if __name__ == "__main__":
    cli()
