"""Export a MiniGPT checkpoint folder to ONNX, with a KV cache, and decode greedily with onnxruntime.

    python -m minigpt.hub.export_onnx out/my-minigpt out/my-minigpt-onnx            # writes model.onnx + model_with_past.onnx
    python -m minigpt.hub.export_onnx out/my-minigpt out/my-minigpt-onnx --opset 18

Two graphs, both exported with `torch.onnx.export(..., dynamo=True)`, batch and lengths dynamic:

    model.onnx (prefill, the prompt)                 model_with_past.onnx (decode, one new token per row)
    in   input_ids          int64 (B, T)             in   input_ids           int64 (B, 1)
         attention_mask     int64 (B, T)                  attention_mask      int64 (B, P + 1)
                                                          past.{i}.key        float (B, nh, P, hs)   i = 0 .. L-1
                                                          past.{i}.value      float (B, nh, P, hs)
    out  logits             float (B, T, V)          out  logits              float (B, 1, V)
         present.{i}.key    float (B, nh, T, hs)          present.{i}.key     float (B, nh, P + 1, hs)
         present.{i}.value  float (B, nh, T, hs)          present.{i}.value   float (B, nh, P + 1, hs)

B batch, T prompt length, P cached length, V vocabulary, L n_layer, nh n_head, hs head size (n_embd / n_head).
attention_mask is 1 for real tokens and 0 for padding; pad on the left, as generate() expects. Positions come from
the mask (they count real tokens), so a left-padded row gives the same logits as when run alone, for all three
position types (learned, sinusoidal, rope).

The graph boundary holds plain tensors only: `CachedLM` rebuilds a transformers DynamicCache from the flat past
tensors, calls the model and flattens the updated cache again. `greedy_onnx` runs the two graphs in a loop and
gives the same tokens as `model.generate(do_sample=False)`.
"""

import argparse
import importlib.util
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from minigpt.commands import one_line_usage, run_cli
from minigpt.folders import load_minigpt
from modeling_minigpt.modeling_minigpt import CACHE_NAME

logger = logging.getLogger("minigpt.hub.export_onnx")

PREFILL_FILE = "model.onnx"
DECODE_FILE = "model_with_past.onnx"
DEFAULT_OPSET = 18
INSTALL = "install them with pip install onnx onnxscript onnxruntime (or the dev extra: pip install 'minigpt[dev]')"


def require(*modules: str) -> None:
    """The optional packages of the export (not in a plain wheel install): an ImportError that says how to install
    them, before any work, instead of a ModuleNotFoundError deep inside torch.onnx.export."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"the ONNX export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          f"not installed; {INSTALL}")


def past_names(n_layer: int, prefix: str) -> list[str]:
    """["{prefix}.0.key", "{prefix}.0.value", "{prefix}.1.key", ...]: one key/value pair per layer."""
    return [f"{prefix}.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


class CachedLM(nn.Module):
    """The causal LM with its KV cache as flat tensors: forward(input_ids, attention_mask, *past) returns
    (logits, *present), past and present ordered as past_names(). With no past it is the prefill."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        cache = DynamicCache(config=self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)  # (B, nh, P, hs) each
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{CACHE_NAME: cache})
        cache = getattr(out, CACHE_NAME)
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]  # (B, nh, P + T, hs) each
        return (out.logits, *present)  # logits (B, T, V)


def export(model_dir: str | Path, out_dir: str | Path, opset: int = DEFAULT_OPSET) -> dict[str, float]:
    """Write out_dir/model.onnx (prefill) and out_dir/model_with_past.onnx (decode); returns seconds per file."""
    require("onnx", "onnxscript")  # torch.onnx.export(dynamo=True) imports both
    model = load_minigpt(model_dir)
    config = model.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapper = CachedLM(model).eval()
    with warnings.catch_warnings():
        # noise from the exporter: each named axis "will not be used" when the same Dim is on several inputs, and
        # torch's own pytree deprecation
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning)
        return _export_both(wrapper, config, out, opset)


def _export_both(wrapper: CachedLM, config, out: Path, opset: int) -> dict[str, float]:
    """The two torch.onnx.export calls; seconds per file."""
    # protobuf stops at 2 GiB: weights beyond ~1.5 GB go to a side file (model.onnx.data) next to the graph
    external = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > 1.5e9
    seconds = {}
    nh, hs, L = config.n_head, config.n_embd // config.n_head, config.n_layer
    batch, length, past_length = torch.export.Dim("batch"), torch.export.Dim("length"), torch.export.Dim("past")
    present = past_names(L, "present")

    # example inputs of sizes > 1, so that no dimension is specialised to 0 or 1 while tracing
    ids = torch.randint(3, config.vocab_size, (2, 3))
    mask = torch.ones(2, 3, dtype=torch.long)
    start = time.perf_counter()
    torch.onnx.export(
        wrapper, (ids, mask), out / PREFILL_FILE, dynamo=True, opset_version=opset, external_data=external, verbose=False,
        input_names=["input_ids", "attention_mask"], output_names=["logits", *present],
        dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}),
    )  # fmt: skip
    seconds[PREFILL_FILE] = time.perf_counter() - start

    past = [torch.randn(2, nh, 3, hs) for _ in range(2 * L)]
    start = time.perf_counter()
    torch.onnx.export(
        wrapper, (ids[:, :1], torch.ones(2, 4, dtype=torch.long), *past), out / DECODE_FILE, dynamo=True,
        opset_version=opset, external_data=external, verbose=False,
        input_names=["input_ids", "attention_mask", *past_names(L, "past")], output_names=["logits", *present],
        dynamic_shapes=({0: batch}, {0: batch, 1: past_length + 1}, ({0: batch, 2: past_length},) * (2 * L)),
    )  # fmt: skip
    seconds[DECODE_FILE] = time.perf_counter() - start
    return seconds


def load_sessions(onnx_dir: str | Path):
    """(prefill, decode) onnxruntime InferenceSessions from a folder that export() wrote."""
    require("onnxruntime")
    import onnxruntime as ort  # optional: only the export's users need it

    folder = Path(onnx_dir)
    missing = [f for f in (PREFILL_FILE, DECODE_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}; write them with "
                                f"python -m minigpt.hub.export_onnx MODEL_DIR {folder}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return tuple(ort.InferenceSession(str(folder / f), options, providers=["CPUExecutionProvider"])
                 for f in (PREFILL_FILE, DECODE_FILE))


def greedy_onnx(sessions, input_ids, attention_mask=None, max_new_tokens: int = 20, eos_token_id: int | None = None,
                pad_token_id: int | None = None) -> np.ndarray:
    """Greedy decoding over the two onnxruntime sessions (prefill, decode), as generate(do_sample=False) does it.

    input_ids, attention_mask: (B, T) int arrays or tensors, left-padded. Returns (B, T + n) int64 ids, the prompt
    followed by n <= max_new_tokens new tokens: a row that has produced eos_token_id continues with pad_token_id, and
    the loop stops early once every row has."""
    prefill, decode = sessions
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    n_past = len([i for i in decode.get_inputs() if i.name.startswith("past.")])
    if eos_token_id is not None and pad_token_id is None:
        raise ValueError("eos_token_id needs pad_token_id, the id that fills a row after its EOS; pass both.")
    unfinished = np.ones(len(ids), dtype=bool)
    outputs = prefill.run(None, {"input_ids": ids, "attention_mask": mask})
    for _ in range(max_new_tokens):
        logits, present = outputs[0], outputs[1:]  # (B, T, V), (B, nh, S, hs) each
        next_ids = logits[:, -1].argmax(-1)  # (B,)
        if eos_token_id is not None:
            next_ids = np.where(unfinished, next_ids, pad_token_id)
            unfinished &= next_ids != eos_token_id
        ids = np.concatenate([ids, next_ids[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
        if not unfinished.any():
            break
        feed = {"input_ids": next_ids[:, None].astype(np.int64), "attention_mask": mask}
        feed.update(zip(past_names(n_past // 2, "past"), present))
        outputs = decode.run(None, feed)
    return ids


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m minigpt.hub.export_onnx", description=__doc__.split("\n\n")[0])
    one_line_usage(parser, "export_onnx")
    parser.add_argument("model_dir", help="a MiniGPT checkpoint folder (config.json + model.safetensors)")
    parser.add_argument("out_dir", help=f"where to write {PREFILL_FILE} and {DECODE_FILE} (created if missing)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version (default %(default)s)")
    args = parser.parse_args(argv)
    # INFO for this module only: onnxscript's optimizer logs every pass at INFO
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    # the exporter lists every torchvision op it skips when torchvision is absent, which MiniGPT never uses
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    seconds = export(args.model_dir, args.out_dir, args.opset)
    for name, s in seconds.items():
        logger.info("wrote %s in %.1f s", Path(args.out_dir) / name, s)
    return seconds


def cli(argv: list[str] | None = None) -> None:
    """The `minigpt-export-onnx` console script: a bad folder or a missing package is one line, exit status 2."""
    run_cli("export_onnx", main, argv, errors=(FileNotFoundError, ValueError, ImportError), status=2)


if __name__ == "__main__":
    cli()
