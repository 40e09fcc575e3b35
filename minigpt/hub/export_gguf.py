"""Export a MiniGPT checkpoint folder to one GGUF file, for llama.cpp and the programs built on it.

    python -m minigpt.hub.export_gguf out/my-minigpt out/my-minigpt.gguf                 # fp32 weights
    python -m minigpt.hub.export_gguf out/my-minigpt out/my-minigpt-f16.gguf --outtype f16

llama.cpp has no MiniGPT architecture, so each checkpoint goes to the llama.cpp architecture that computes the same
function (its graphs: src/models/gpt2.cpp and src/models/gptneox.cpp in llama.cpp):

    position_embedding_type   GGUF arch   positions in the file
    learned                   gpt2        position_embd.weight = the learned table
    sinusoidal                gpt2        position_embd.weight = the fixed encoding, computed for n_positions rows
    rope                      gptneox     none: rope.freq_base = rope_theta, rope.dimension_count = head size;
                                          use_parallel_residual = false (MiniGPT's two sequential residuals)

Both archs are GPT-2's pre-LN block with tanh-GELU, biases and a fused QKV. MiniGPT's qkv_proj lays its output out as
[q | k | v], each n_embd wide and split into heads in order, which is what llama.cpp's fused attn_qkv expects (it
takes q, k and v as three contiguous views), so no tensor is permuted; every Linear weight is stored as PyTorch's
(out, in), which GGUF reads as ggml's (in, out). Post-LN blocks and other activations have no llama.cpp equivalent
and are refused. A checkpoint without biases (bias=False) gets zero biases, which llama.cpp's graphs require.

The tokenizer (the model folder's, or --tokenizer DIR) must be a byte-level BPE with GPT-2's pre-tokenizer, as
minigpt.train.tokenizer trains: its tokens, merges and special ids go in as tokenizer.ggml.model = "gpt2" and
tokenizer.ggml.pre = "gpt-2". Ids past the tokenizer, up to the padded vocab_size, become unused [PAD{id}] tokens.
"""

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from minigpt.commands import one_line_usage, run_cli
from minigpt.folders import load_minigpt

logger = logging.getLogger("minigpt.hub.export_gguf")

# MiniGPT name -> GGUF name (gguf.TENSOR_NAMES); "{}" is the layer index. None of them needs a transpose or permute.
WEIGHT_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.embed_positions.weight": "position_embd.weight",  # learned; the sinusoidal table is computed
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.input_layernorm.bias": "blk.{}.attn_norm.bias",
    "model.layers.{}.self_attn.qkv_proj.weight": "blk.{}.attn_qkv.weight",  # [q | k | v] as llama.cpp splits it
    "model.layers.{}.self_attn.qkv_proj.bias": "blk.{}.attn_qkv.bias",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.self_attn.o_proj.bias": "blk.{}.attn_output.bias",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.post_attention_layernorm.bias": "blk.{}.ffn_norm.bias",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.mlp.up_proj.bias": "blk.{}.ffn_up.bias",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
    "model.layers.{}.mlp.down_proj.bias": "blk.{}.ffn_down.bias",
    "model.norm.weight": "output_norm.weight",
    "model.norm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",  # gpt2 omits it when tied (llama.cpp reuses token_embd); gptneox needs it
}
ARCH = {"learned": "gpt2", "sinusoidal": "gpt2", "rope": "gptneox"}
# HF activation names that are GELU's tanh approximation, the only activation llama.cpp's gpt2/gptneox graphs have
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
OUTTYPES = ("f32", "f16")


def check_exportable(config) -> str:
    """The GGUF architecture of `config`; a ValueError for what llama.cpp cannot compute."""
    if config.norm_position != "pre":
        raise ValueError(
            f"norm_position={config.norm_position!r} (post-LN) has no llama.cpp equivalent: its gpt2 and gptneox "
            "graphs put the LayerNorm before each sub-block. Only pre-LN MiniGPT checkpoints export to GGUF."
        )
    if config.activation_function not in TANH_GELU:
        raise ValueError(
            f"activation_function={config.activation_function!r} has no llama.cpp equivalent: its gpt2 and gptneox "
            f"graphs compute tanh-GELU only (one of {list(TANH_GELU)}); exact GELU ('gelu') is not it."
        )
    return ARCH[config.position_embedding_type]


def gguf_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """{GGUF name: fp32 tensor} for every tensor the architecture's llama.cpp graph reads."""
    config = model.config
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    if config.position_embedding_type == "sinusoidal":
        with torch.no_grad():  # the encoding MiniGPT adds, for every position of the context
            state["model.embed_positions.weight"] = model.model.embed_positions(torch.arange(config.n_positions))
    out = {}
    for mini_name, gguf_name in WEIGHT_MAP.items():
        for i in range(config.n_layer) if "{}" in mini_name else [None]:
            src, dst = mini_name.format(i), gguf_name.format(i)
            if src in state:
                out[dst] = state.pop(src)
            elif src.endswith(".bias"):  # bias=False: llama.cpp's graphs require every bias, zero is the same
                out[dst] = torch.zeros(out[dst.removesuffix(".bias") + ".weight"].shape[0])
    if arch == "gpt2" and config.tie_word_embeddings:
        del out["output.weight"]  # llama.cpp reuses token_embd.weight, as the tied head does
    expected_absent = {"model.embed_positions.weight"} if arch == "gptneox" else set()
    assert set(state) <= expected_absent, f"tensors without a GGUF name: {sorted(set(state) - expected_absent)}"
    return out


def tokenizer_metadata(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> dict:
    """tokens, token types, merges, special ids and add_bos/add_eos of a byte-level BPE, as llama.cpp's gpt2 vocab
    reads them; the list is padded with unused tokens up to the model's vocab_size."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; GGUF export needs its tokenizer.json.")
    spec = json.loads(backend.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec["model"]
    if (
        model["type"] != "BPE"
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or pre.get("add_prefix_space")
        or spec.get("normalizer") is not None
    ):
        raise ValueError(
            f"The tokenizer is a {model['type']} with pre-tokenizer {pre or None} and normalizer "
            f"{spec.get('normalizer')}; the GGUF export writes llama.cpp's 'gpt-2' pre-tokenizer, so it needs a "
            "byte-level BPE with GPT-2's split and no prefix space or normalizer (what minigpt.train.tokenizer trains)."
        )
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model embeds {vocab_size}; pass the "
            "tokenizer the model was trained with (--tokenizer DIR)."
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        i = added["id"]
        tokens[i] = added["content"]
        types[i] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]  # tokenizers >= 0.20 writes pairs
    probe = tokenizer.encode("a")  # what the tokenizer adds around plain text
    return dict(
        tokens=tokens, types=types, merges=merges,
        bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
        add_bos=tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        add_eos=tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
    )  # fmt: skip


def load_tokenizer(model_dir: Path, tokenizer_dir: str | Path | None) -> PreTrainedTokenizerBase:
    folder = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no tokenizer.json, and a GGUF file carries its tokenizer; pass the one the model was "
            "trained with (--tokenizer DIR), or save it next to the weights "
            f"(tokenizer.save_pretrained({str(folder)!r}))."
        )
    return AutoTokenizer.from_pretrained(folder)


def export(
    model_dir: str | Path, out_file: str | Path, outtype: str = "f32", tokenizer_dir: str | Path | None = None
) -> dict:
    """Write `out_file` (GGUF) from a MiniGPT checkpoint folder; returns {"arch", "tensors", "seconds"}."""
    try:
        import gguf  # optional: the dev extra (pip install -e '.[dev]') or pip install gguf
    except ImportError as error:
        raise ImportError(f"{error}; install it with pip install gguf==0.19.0") from None

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r} is unknown; use one of {list(OUTTYPES)}.")
    start = time.perf_counter()
    model = load_minigpt(model_dir)
    config = model.config
    arch = check_exportable(config)  # refuse before reading the tokenizer or writing anything
    vocab = tokenizer_metadata(load_tokenizer(Path(model_dir), tokenizer_dir), config.vocab_size)
    tensors = gguf_tensors(model, arch)

    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(Path(model_dir).resolve().name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    if arch == "gptneox":
        writer.add_rope_dimension_count(config.head_dim)  # every channel of a head rotates
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_parallel_residual(False)  # x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))

    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for a byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, which tokenizers' ByteLevel(use_regex=True) applies
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for name in ("bos", "eos", "pad"):
        if vocab[name] is not None:
            getattr(writer, f"add_{name}_token_id")(vocab[name])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])

    for name, tensor in tensors.items():
        # 1-D tensors (norms, biases) stay fp32, as llama.cpp's converter keeps them
        dtype = np.float16 if outtype == "f16" and tensor.ndim > 1 else np.float32
        writer.add_tensor(name, tensor.numpy().astype(dtype))  # (out, in) as stored: ggml's ne = (in, out)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"arch": arch, "tensors": len(tensors), "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m minigpt.hub.export_gguf", description=__doc__.split("\n\n")[0])
    one_line_usage(parser, "export_gguf")
    parser.add_argument("model_dir", help="a MiniGPT checkpoint folder (config.json + model.safetensors + tokenizer)")
    parser.add_argument("out_file", help="the .gguf file to write (its folder is created if missing)")
    parser.add_argument(
        "--outtype",
        choices=OUTTYPES,
        default="f32",
        help="dtype of the matrices; norms and biases stay f32 (default %(default)s)",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="folder of the tokenizer the model was trained with (default: model_dir)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    result = export(args.model_dir, args.out_file, args.outtype, args.tokenizer)
    logger.info(
        "wrote %s (arch %s, %d tensors) in %.1f s", args.out_file, result["arch"], result["tensors"], result["seconds"]
    )
    return result


def cli(argv: list[str] | None = None) -> None:
    """The `minigpt-export-gguf` console script: a bad folder, a model llama.cpp can't run or a missing package is
    one line, exit status 2."""
    run_cli("export_gguf", main, argv, errors=(FileNotFoundError, ValueError, ImportError), status=2)


if __name__ == "__main__":
    cli()
