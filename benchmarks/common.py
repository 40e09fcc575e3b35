"""What the benchmark scripts share: the size presets, the two models at identical shapes, timing, MFU and output.
MFU counts FLOPs and looks peaks up exactly as training does: the formula and the peak table live in
minigpt/flops.py.

The reference is transformers' own `GPT2LMHeadModel` with `attn_implementation="sdpa"`, built from a `GPT2Config`
with exactly MiniGPT's shape (layers, heads, width, context, vocabulary) and the same dropout (none), so the two
differ only in their code. Both are created in the same process, on the same device, in the same precision.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt.flops import lookup_peak_tflops
from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from modeling_minigpt.modeling_minigpt import CACHE_NAME

# The GPT-2 124M shape with the vocabulary padded to a multiple of 64, and a shape that runs in seconds on a CPU.
SIZES = {
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50304),
    "small": dict(n_layer=6, n_head=6, n_embd=384, n_positions=256, vocab_size=50304),
}

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# the KV-cache argument's name in the installed transformers (`cache` from 5.24, `past_key_values` before), which
# GPT-2 takes without a deprecation warning; MiniGPT takes both
CACHE_KWARG = CACHE_NAME


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every benchmark takes. From here on, each long flag added to `parser` answers to both spellings."""
    accept_both_spellings(parser)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="shape preset (default: small on cpu, gpt2-124m on cuda)")
    parser.add_argument("--models", default="minigpt,gpt2", help="comma-separated subset of: minigpt, gpt2")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per setting (the median is reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs before timing each setting")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default on CPU: 1, which neighbours disturb least; 0: torch's choice)")
    parser.add_argument("--out", default=None, help="directory for the JSON (default: benchmarks/results)")
    parser.add_argument("--tag", default="", help="suffix for the output file name")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device bf16 peak in TFLOP/s, for MFU")
    return parser


def accept_both_spellings(parser: argparse.ArgumentParser) -> None:
    """Make every long flag added to `parser` from now on answer to both --peak_tflops and --peak-tflops, as the train/
    scripts (HfArgumentParser) do, so that one spelling, the underscore one, works across the project's CLIs. The
    other spelling is an alias; argparse names the value after the first one either way (args.peak_tflops)."""
    add_argument = parser.add_argument

    def add_with_alias(*names, **kwargs):
        long = [n for n in names if n.startswith("--")]
        other = ["--" + n[2:].translate(str.maketrans("-_", "_-")) for n in long if "-" in n[2:] or "_" in n[2:]]
        return add_argument(*names, *[n for n in other if n not in names], **kwargs)

    parser.add_argument = add_with_alias


def resolve_common_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check the arguments once, with errors that say what to change."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device; use --device cpu.")
    if args.size is None:
        args.size = "gpt2-124m" if args.device == "cuda" else "small"
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODEL_BUILDERS))
    if unknown or not args.models:
        raise SystemExit(f"--models {unknown or args.models} is not valid; pick from {sorted(MODEL_BUILDERS)}.")
    if args.threads is None and args.device == "cpu":
        # one thread: on a shared machine, multi-threaded kernels stall whenever a neighbour takes a core, which
        # makes timings swing several-fold; both models get the same thread anyway
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


# ---------------------------------------------------------------------------------------------------------------
# The two models
# ---------------------------------------------------------------------------------------------------------------


def build_minigpt(shape: dict, **overrides) -> MiniGPTForCausalLM:
    config = MiniGPTConfig(**{**shape, **overrides}, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "sdpa"
    return MiniGPTForCausalLM(config)


def build_gpt2(shape: dict, **overrides) -> GPT2LMHeadModel:
    fields = {**shape, **overrides}
    config = GPT2Config(
        **fields,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


MODEL_BUILDERS: dict[str, Callable] = {"minigpt": build_minigpt, "gpt2": build_gpt2}


def build_model(name: str, shape: dict, device: str, **overrides) -> torch.nn.Module:
    """One benchmark model, seeded so that both runs of a comparison see the same kind of weights."""
    torch.manual_seed(0)
    model = MODEL_BUILDERS[name](shape, **overrides).to(device)
    # nothing should stop generation early: every run produces exactly max_new_tokens
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def device_peak_flops(device: str, override_tflops: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s or None, how it was found) from --peak_tflops, else from minigpt.flops.PEAK_TFLOPS."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (given)"
    if device != "cuda":
        return None, "n/a (no peak for CPUs; pass --peak_tflops)"
    tflops, key = lookup_peak_tflops(device)
    if tflops:
        return tflops * 1e12, f"{tflops:g} TFLOP/s ({key} bf16 dense)"
    return None, f"n/a (no peak known for {key!r}; pass --peak_tflops)"


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_runs(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> list[float]:
    """Seconds per call for `repeats` calls of fn, after `warmup` untimed calls (compilation, caches, autotuning)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def reset_peak_memory(device: str):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    """Peak allocated GPU memory since the last reset; None on CPU, where torch keeps no such counter."""
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def median(values: list[float]) -> float:
    return statistics.median(values)


def time_ratio(row: dict, reference: dict) -> float:
    """How long `row`'s runs take relative to `reference`'s. Runs timed interleaved (on CPU the models alternate
    run by run; rows with the same `rounds` key were timed in the same rounds) are compared round by round and
    the median taken, which a neighbour's burst of load barely moves; otherwise, the ratio of the medians."""
    mine, theirs = row["times_s"], reference["times_s"]
    if row.get("rounds") is not None and row.get("rounds") == reference.get("rounds") and len(mine) == len(theirs):
        return median([a / b for a, b in zip(mine, theirs)])
    return median(mine) / median(theirs)


def free_memory(device: str):
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def environment(device: str) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
    }


def fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(kind: str, args: argparse.Namespace, payload: dict, table: str, final: bool = True) -> Path:
    """Write `<date>-<kind>-<device>-<size>[-tag].json` and `.md` side by side (and print the table when
    `final`; partial writes keep what was measured if a run is cut short). Returns the JSON path."""
    out = Path(args.out) if args.out else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    stem = f"{env['date'][:10]}-{kind}-{args.device}-{args.size}" + (f"-{args.tag}" if args.tag else "")
    payload = {"benchmark": kind, "size": args.size, "shape": SIZES[args.size], **env, **payload}
    _write_atomically(out / f"{stem}.json", json.dumps(payload, indent=2) + "\n")
    header = (
        f"### {kind}{f' ({args.tag})' if args.tag else ''}: {args.size} on {env['device']} ({args.device})\n\n"
        f"{env['date']}, torch {env['torch']}, transformers {env['transformers']}, {env['cpu_threads']} CPU threads\n\n"
    )
    _write_atomically(out / f"{stem}.md", header + table + "\n")
    if final:
        print("\n" + header + table + "\n", flush=True)
    return out / f"{stem}.json"


def train_tiny(out: Path, seed: int, *flags: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """One run of `minigpt-pretrain --config tiny` in a fresh process on one thread, on the built-in corpus, with
    `flags` added: the finished process and its log.jsonl records ([] when it failed)."""
    argv = [sys.executable, "-m", "minigpt.train.pretrain", "--config", "tiny", "--output_dir", str(out), "--cpu",
            "--overwrite_output_dir", "--report_to", "none", "--save_every", "0", "--seed", str(seed), *flags]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        return proc, []
    return proc, [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def write_tiny_results(kind: str, payload: dict, table: str, out: str | None) -> Path:
    """The learning benchmarks' output (runs of the tiny preset on CPU): `<date>-<kind>-cpu-tiny.json` and `.md`,
    and the table printed. Returns the path without suffix, for files of the benchmark's own beside them."""
    folder = Path(out) if out else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    env = environment("cpu")
    stem = folder / f"{env['date'][:10]}-{kind}-cpu-tiny"
    _write_atomically(stem.with_suffix(".json"), json.dumps({"benchmark": kind, **env, **payload}, indent=2) + "\n")
    text = (f"### {kind}: tiny preset on {env['device']} (cpu)\n\n{env['date']}, torch {env['torch']}, transformers "
            f"{env['transformers']}\n\n{table}\n")  # fmt: skip
    _write_atomically(stem.with_suffix(".md"), text)
    print("\n" + text, flush=True)
    return stem


def _write_atomically(path: Path, text: str):
    """A run stopped at its time cap must not leave half a JSON file behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def set_cpu_env():
    """Tokenizers and the Hub are never needed here; keep everything offline and quiet."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()
