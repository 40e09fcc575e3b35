"""Convert between transformers' GPT2LMHeadModel and MiniGPT, in both directions, with one name table.

    python -m hub.convert_gpt2 openai-community/gpt2 out/gpt2-minigpt        # GPT-2 (folder or Hub id) -> MiniGPT
    python -m hub.convert_gpt2 out/my-minigpt out/my-gpt2 --reverse          # MiniGPT -> GPT2LMHeadModel

GPT-2 is MiniGPT with learned positions, gelu_new, pre-LN, biases and a tied head, so the conversion only renames
tensors, except for one detail: GPT-2's `Conv1D` stores its weight as (in, out), `nn.Linear` as (out, in), so the
four Conv1D weights of each block are transposed. GPT-2's fused `c_attn` already lays out its output as
[q | k | v], each `n_embd` wide and split into heads the same way, which is what MiniGPT's `qkv_proj` expects.

The MiniGPT folder written is a complete checkpoint: weights, config.json with `auto_map`, the modeling code,
generation_config.json and the tokenizer when the source has one.
"""

import argparse
import os
import shutil
from pathlib import Path

from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedConfig

import modeling_minigpt  # noqa: F401  (registers MiniGPT, so save_pretrained writes auto_map and the code files)
from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM

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
    for name, needed in GPT2_REQUIRED.items():
        if getattr(gpt2, name, needed) != needed:
            raise ValueError(
                f"This GPT-2 checkpoint sets {name}={getattr(gpt2, name)!r}, which MiniGPT cannot reproduce "
                f"(it needs {name}={needed!r}); such a checkpoint can't be converted."
            )
    fields = {name: getattr(gpt2, name) for name in SHARED_CONFIG_FIELDS}
    for name in FLOAT_FIELDS:  # GPT2Config allows ints (dropout 0); MiniGPTConfig's strict fields want floats
        fields[name] = float(fields[name])
    return MiniGPTConfig(**fields, **GPT2_COMPATIBLE)


def config_to_gpt2(config: MiniGPTConfig) -> GPT2Config:
    for name, needed in GPT2_COMPATIBLE.items():
        if getattr(config, name) != needed:
            raise ValueError(
                f"This MiniGPT checkpoint has {name}={getattr(config, name)!r}, but GPT2LMHeadModel only has "
                f"{name}={needed!r}; only GPT-2-compatible checkpoints (position_embedding_type='learned', "
                "norm_position='pre', bias=True) convert to GPT-2."
            )
    fields = {name: getattr(config, name) for name in SHARED_CONFIG_FIELDS}
    return GPT2Config(**fields, **GPT2_REQUIRED)


def _read_config(src: str) -> dict:
    """config.json of a local folder or a Hub repo, as a dict, with errors that say what was expected."""
    if Path(src).exists() and not (Path(src) / "config.json").is_file():
        raise FileNotFoundError(
            f"{src} has no config.json; point at a folder written by save_pretrained (or a Hub model id)."
        )
    config, _ = PreTrainedConfig.get_config_dict(src)
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
    gpt2 = GPT2LMHeadModel.from_pretrained(src, dtype="auto")
    model = _load_converted(MiniGPTForCausalLM(config), convert_state_dict(gpt2.state_dict(), config.n_layer))
    model.generation_config = gpt2.generation_config
    model.to(gpt2.dtype).save_pretrained(dst)
    _copy_tokenizer(src, dst)
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
    mini = MiniGPTForCausalLM.from_pretrained(src, dtype="auto")
    model = _load_converted(GPT2LMHeadModel(config), convert_state_dict(mini.state_dict(), config.n_layer, True))
    model.generation_config = mini.generation_config
    model.to(mini.dtype).save_pretrained(dst)
    _copy_tokenizer(src, dst)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="source checkpoint: a local folder or a Hub model id (e.g. openai-community/gpt2)")
    parser.add_argument("dst", help="folder to write the converted checkpoint to")
    parser.add_argument("--reverse", action="store_true", help="convert MiniGPT -> GPT2LMHeadModel instead")
    args = parser.parse_args(argv)
    convert = minigpt_to_gpt2 if args.reverse else gpt2_to_minigpt
    try:
        model = convert(args.src, args.dst)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {type(model).__name__} ({n_params:,} parameters) to {os.path.abspath(args.dst)}")


if __name__ == "__main__":
    main()
