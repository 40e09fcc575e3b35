"""Learning quality of every model variant: each combination of positions x LayerNorm x activation trained with
the default recipe at the `tiny` preset, side by side with the baseline (learned positions, pre-LN, GELU).

Each run is `python -m minigpt.train.pretrain --config tiny` in its own process, on the built-in corpus, with only the
variant's flags changed; the figure is the final validation loss over the whole split (nats per token; lower is
better), read from the run's log.jsonl. The bar: within 5% of the baseline's loss (its mean over
--baseline_seeds seeds), and below the unigram model's loss on the same split.

    python -m benchmarks.bench_variants                    # what `make bench-variants` runs: 12 runs + 2 seeds, ~25 min
    python -m benchmarks.bench_variants --positions rope --norms post --activations relu --max_steps 50
"""

import argparse
import math
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import markdown_table, train_tiny, write_tiny_results

BASELINE = ("learned", "pre", "gelu_new")
BAR = 0.05  # relative to the baseline's loss


def train_variant(position: str, norm: str, activation: str, seed: int, args) -> dict:
    """Train one variant in a fresh process; returns its final (whole-split) evaluation and the recipe it used."""
    flags = ["--position_embedding_type", position, "--norm_position", norm, "--activation_function", activation]
    if args.max_steps:
        flags += ["--max_steps", str(args.max_steps)]
    proc, records = train_tiny(Path(args.work_dir) / f"{position}-{norm}-{activation}-{seed}", seed, *flags)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    final = [r for r in records if "val_loss" in r and r.get("val_blocks") == r.get("val_split_blocks")][-1]
    summary = next(line for line in proc.stdout.splitlines() if "validation unigram perplexity" in line)
    unigram_ppl = float(summary.split("validation unigram perplexity ")[1].split()[0])
    recipe = next((line for line in proc.stdout.splitlines() if line.startswith("recipe:")), "")
    return {"val_loss": final["val_loss"], "unigram_loss": math.log(unigram_ppl), "recipe": recipe}


def run(args) -> dict:
    variants = [(p, n, a) for p in args.positions for n in args.norms for a in args.activations]
    others = [v for v in variants if v != BASELINE]
    jobs = [(*BASELINE, seed) for seed in args.baseline_seeds] + [(*v, args.baseline_seeds[0]) for v in others]
    with ThreadPoolExecutor(args.jobs) as pool:  # each run is a process of one thread
        results = dict(zip(jobs, pool.map(lambda job: train_variant(*job, args), jobs)))
    baseline_runs = [results[(*BASELINE, seed)] for seed in args.baseline_seeds]
    for r, seed in zip(baseline_runs, args.baseline_seeds):
        print(f"baseline {'/'.join(BASELINE)} seed {seed}: {r.get('val_loss', r.get('error'))}", flush=True)
    base_losses = [r["val_loss"] for r in baseline_runs if "val_loss" in r]
    if not base_losses:
        raise SystemExit(f"bench_variants: the baseline did not train: {baseline_runs[0]['error']}")
    base = statistics.mean(base_losses)
    rows = []
    for variant in variants:
        result = results[(*variant, args.baseline_seeds[0])]
        row = {"position": variant[0], "norm": variant[1], "activation": variant[2], "seed": args.baseline_seeds[0],
               **result}  # fmt: skip
        if "val_loss" in result:
            row["vs_baseline"] = result["val_loss"] / base
            row["within_bar"] = row["vs_baseline"] <= 1 + BAR and result["val_loss"] < result["unigram_loss"]
        rows.append(row)
        print(f"{'/'.join(variant)}: {result.get('val_loss', result.get('error'))}", flush=True)
    return {"baseline": {"variant": "/".join(BASELINE), "seeds": args.baseline_seeds, "val_losses": base_losses,
                         "mean": base, "stdev": statistics.stdev(base_losses) if len(base_losses) > 1 else 0.0},
            "bar": BAR, "max_steps": args.max_steps or "preset", "results": rows}  # fmt: skip


def table(payload: dict) -> str:
    base = payload["baseline"]
    seeds = ", ".join(f"{loss:.3f}" for loss in base["val_losses"])
    lines = [f"Baseline {base['variant']}: {base['mean']:.3f} ± {base['stdev']:.3f} nats/token over seeds "
             f"{base['seeds']} ({seeds}); bar: within {payload['bar']:.0%} of it.", ""]  # fmt: skip
    rows = []
    for r in payload["results"]:
        if "error" in r:
            rows.append([r["position"], r["norm"], r["activation"], "error", "", "", r["error"]])
            continue
        recipe = r["recipe"].removeprefix("recipe: ").split(" (")[0]
        rows.append([r["position"], r["norm"], r["activation"], f"{r['val_loss']:.3f}", f"{r['vs_baseline']:.3f}",
                     "yes" if r["within_bar"] else "**no**", recipe])  # fmt: skip
    headers = ["positions", "norm", "activation", "val loss", "vs baseline", "within bar", "recipe change"]
    unigram = payload["results"][0].get("unigram_loss")
    note = f"\n\nUnigram model on the same split: {unigram:.3f} nats/token." if unigram else ""
    return "\n".join(lines) + "\n" + markdown_table(headers, rows) + note


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--positions", default="learned,sinusoidal,rope", help="comma-separated position types")
    p.add_argument("--norms", default="pre,post", help="comma-separated: pre, post")
    p.add_argument("--activations", default="relu,gelu_new", help="comma-separated ACT2FN names")
    p.add_argument("--baseline_seeds", default="1337,2,3",
                   help="seeds of the baseline runs; the first one also seeds every other variant")
    p.add_argument("--max_steps", type=int, default=0, help="steps per run (default: the tiny preset's 300)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses one thread)")
    p.add_argument("--work_dir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    args = p.parse_args(argv)
    for name in ("positions", "norms", "activations"):
        setattr(args, name, getattr(args, name).split(","))
    args.baseline_seeds = [int(s) for s in args.baseline_seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="minigpt-variants-") as tmp:
        args.work_dir = args.work_dir or tmp
        payload = run(args)
    write_tiny_results("variants", payload, table(payload), args.out)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
