"""How cost grows with the context: per-token generation latency (with and without the KV cache) and the training
step time, for GPT-2, MiniGPT, and MiniGPT with rotary or sinusoidal positions past the learned-position limit.

    with cache   one new token against a KV cache already holding L - 1 tokens: attention reads L keys, the rest
                 of the step is constant, so the cost grows slowly and linearly;
    no cache     the whole L-token sequence recomputed to get the next token: the cost of generate(use_cache=False)
                 at that length, growing at least linearly (quadratically in attention);
    training     forward + backward on one row of L tokens (the optimizer step does not depend on L).

It writes JSON, a markdown table, and a PNG plot (matplotlib; when it is missing, draw the plot later on another
machine with `--plot-from results/<file>.json`).

    python -m benchmarks.bench_scaling --device cpu --size small
    python -m benchmarks.bench_scaling --plot-from benchmarks/results/2026-11-28-scaling-cuda-gpt2-124m.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

from benchmarks import common

# model name -> (builder, overrides); rope and sinusoidal have no length limit, so they also run past n_positions
VARIANTS = {
    "gpt2": ("gpt2", {}),
    "minigpt": ("minigpt", {}),
    "minigpt-rope": ("minigpt", {"position_embedding_type": "rope"}),
    "minigpt-sinusoidal": ("minigpt", {"position_embedding_type": "sinusoidal"}),
}
UNLIMITED = {"minigpt-rope", "minigpt-sinusoidal"}


def build(name: str, shape: dict, device: str, max_len: int):
    base, overrides = VARIANTS[name]
    if name in UNLIMITED:
        overrides = {**overrides, "n_positions": max(shape["n_positions"], max_len)}
    return common.build_model(base, shape, device, **overrides)


def decode_with_cache(model, length: int, device: str, ids: torch.Tensor):
    """One new token against a cache of length - 1 tokens; the cache is cropped back after each call."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, : length - 1], use_cache=True, logits_to_keep=1, **{common.CACHE_KWARG: cache})
    token = ids[:, length - 1 : length]

    @torch.no_grad()
    def step():
        model(input_ids=token, use_cache=True, logits_to_keep=1, **{common.CACHE_KWARG: cache})
        cache.crop(-1)  # negative: drop that many tokens (5.17 and 5.24 agree on this form)

    return step


def decode_without_cache(model, length: int, ids: torch.Tensor):
    @torch.no_grad()
    def step():
        model(input_ids=ids[:, :length], use_cache=False, logits_to_keep=1)

    return step


def train_step(model, length: int, device: str, ids: torch.Tensor):
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    kwargs = {"skip_logits": True} if "MiniGPT" in type(model).__name__ else {}

    def step():
        with autocast:
            loss = model(input_ids=ids[:, :length], labels=ids[:, :length], use_cache=False, **kwargs).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def run(args) -> dict:
    shape = common.SIZES[args.size]
    limit = shape["n_positions"]
    lengths = sorted(set(args.lengths))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    ids = torch.randint(3, 50257, (1, max(lengths)), generator=torch.Generator().manual_seed(0)).to(args.device)
    rows = []
    payload = {"dtype": str(dtype).removeprefix("torch."), "batch": 1, "repeats": args.repeats, "warmup": args.warmup,
               "n_positions": limit, "results": rows}
    for name in args.variants:
        top = max(lengths) if name in UNLIMITED else limit
        model = build(name, shape, args.device, top)
        for length in [n for n in lengths if n <= top]:
            row = {"model": name, "context": length}
            model.eval().to(dtype)
            for metric, make in (("cache_ms", lambda: decode_with_cache(model, length, args.device, ids)),
                                 ("no_cache_ms", lambda: decode_without_cache(model, length, ids))):
                times = common.time_runs(make(), args.device, args.warmup, args.repeats)
                row[metric] = 1000 * common.median(times)
            if "train" in args.measure:
                model.train().float()  # fp32 master weights; autocast does bf16 on GPU
                times = common.time_runs(train_step(model, length, args.device, ids), args.device, args.warmup,
                                         args.repeats)
                row["train_ms"] = 1000 * common.median(times)
                model.zero_grad(set_to_none=True)
            rows.append(row)
            print(f"[scaling] {name} L={length}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()
                                                                 if k.endswith("_ms")), flush=True)
            common.write_results("scaling", args, payload, table(rows), final=False)
        del model
        common.free_memory(args.device)
    path = common.write_results("scaling", args, payload, table(rows))
    plot(path)
    return payload


def table(rows: list[dict]) -> str:
    out = [[r["model"], r["context"], common.fmt(r.get("cache_ms"), ".2f"), common.fmt(r.get("no_cache_ms"), ".2f"),
            common.fmt(r.get("no_cache_ms") and r["no_cache_ms"] / r["cache_ms"], ".1f", "x"),
            common.fmt(r.get("train_ms"), ".1f")] for r in rows]
    headers = ["model", "context", "ms/token, KV cache", "ms/token, no cache", "no cache / cache", "train ms/step"]
    return common.markdown_table(headers, out)


def plot(json_path: Path) -> Path | None:
    """Two panels from a scaling JSON: per-token latency (solid: KV cache, dashed: none) and training step time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[scaling] matplotlib is not installed: no plot. Draw it with --plot-from {json_path}", flush=True)
        return None
    data = json.loads(Path(json_path).read_text())
    rows, limit = data["results"], data["n_positions"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["context"])
        x = [r["context"] for r in mine]
        color = f"C{i}"
        left.plot(x, [r["cache_ms"] for r in mine], "-o", color=color, label=f"{name}, KV cache")
        left.plot(x, [r["no_cache_ms"] for r in mine], "--s", color=color, label=f"{name}, no cache")
        if all("train_ms" in r for r in mine):
            right.plot(x, [r["train_ms"] for r in mine], "-o", color=color, label=name)
    for ax, title, ylabel in ((left, "Generation: cost of one new token", "ms per token"),
                              (right, "Training: forward + backward, batch 1", "ms per step")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axvline(limit, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel(f"context length (dotted: n_positions = {limit})")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{data['size']} on {data['device']} ({data['dtype']}), {data['date']}", fontsize=9)
    fig.tight_layout()
    png = Path(json_path).with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"[scaling] plot: {png}", flush=True)
    return png


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--lengths", default=None,
                        help="comma-separated context lengths (default: 32..256 then 512,1024 for small; "
                             "128..1024 then 2048,4096 for gpt2-124m); those past n_positions run for rope and "
                             "sinusoidal only")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--measure", default="generate,train", help="generate (always) and optionally train")
    parser.add_argument("--plot-from", default=None, help="only draw the PNG from an existing scaling JSON")
    argv = sys.argv[1:] if argv is None else argv
    if "--plot-from" in argv:
        return parser.parse_args(argv)
    args = common.resolve_common_args(parser.parse_args(argv))
    default = "32,64,128,256,512,1024" if args.size == "small" else "128,256,512,1024,2048,4096"
    args.lengths = [int(n) for n in (args.lengths or default).split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    if set(args.variants) - set(VARIANTS):
        raise SystemExit(f"--variants {args.variants} is not valid; pick from {list(VARIANTS)}.")
    args.measure = args.measure.split(",")
    args.repeats = args.repeats or (5 if args.device == "cuda" else 3)
    args.warmup = args.warmup if args.warmup is not None else 1
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.plot_from:
        plot(Path(args.plot_from))
        return
    common.set_cpu_env()
    run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
