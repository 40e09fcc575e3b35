"""Learning recipe, side by side: the default (Muon for the blocks' matrices + AdamW, warmup-stable-decay) against the
recipe before it (nanoGPT's: AdamW everywhere, warmup + cosine, `--optimizer adamw`), on the `tiny` preset.

Each run is `python -m minigpt.train.pretrain --config tiny` in its own process on the built-in corpus, one intra-op
thread, with the same data and batches for every recipe of a seed; the validation loss is measured every 25 steps
over the whole split (nats per token; lower is better). Reported per recipe, as the mean over seeds: the loss curve,
the final loss, the steps and training seconds (without evaluation and saving) to reach the target loss (by default
the AdamW recipe's own 300-step loss), and the training time. Writes a dated table (.md, .json) and a loss-versus-steps
plot (.png) to benchmarks/results/.

    python -m benchmarks.bench_recipe                  # `make bench-recipe`: 3 seeds x 4 runs, one at a time, ~17 min
    python -m benchmarks.bench_recipe --seeds 1337 --runs muon:150 adamw:300 --jobs 1
"""

import argparse
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import markdown_table, train_tiny, write_tiny_results

RECIPES = {  # the flags that make each recipe from the tiny preset
    "adamw": ["--optimizer", "adamw"],
    "muon": ["--optimizer", "muon"],
}
EVAL_EVERY = 25


def train(recipe: str, steps: int, seed: int, work_dir: Path) -> dict:
    """One run in a fresh process; its validation curve {step: loss} and cumulative training seconds per log step."""
    proc, records = train_tiny(work_dir / f"{recipe}-{steps}-{seed}", seed, "--max_steps", str(steps), "--eval_every",
                               str(EVAL_EVERY), "--eval_batches", "0", "--log_every", str(EVAL_EVERY), "--cpu_threads",
                               "1", *RECIPES[recipe])  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"bench_recipe: {recipe} {steps} steps, seed {seed} failed:\n{proc.stderr[-2000:]}")
    curve = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    seconds, total, seen = {0: 0.0}, 0.0, 0
    for r in records:  # each log record's tokens/s covers the steps since the previous one (training time only)
        if "tokens_per_s" in r:
            total += (r["tokens_seen"] - seen) / r["tokens_per_s"]
            seconds[r["step"]], seen = total, r["tokens_seen"]
    schedule = next(line for line in proc.stdout.splitlines() if line.startswith("schedule:"))
    recipe_words = schedule.split("); ", 1)[1].split("; evaluation")[0]  # the optimizer and schedule, as the card has them
    return {"curve": curve, "seconds": seconds, "train_time_s": total, "schedule": recipe_words}


def first_reaching(run: dict, target: float) -> tuple[int | None, float | None]:
    """The first evaluated step at or below `target`, and the training seconds it took; (None, None) if none is."""
    step = next((s for s, loss in sorted(run["curve"].items()) if loss <= target), None)
    return (step, run["seconds"].get(step)) if step is not None else (None, None)


def run(args) -> dict:
    jobs = [(recipe, int(steps), seed) for seed in args.seeds for recipe, steps in (r.split(":") for r in args.runs)]
    with tempfile.TemporaryDirectory(prefix="minigpt-recipe-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: train(*job, Path(args.work_dir or tmp)), jobs))
    runs = {}
    for (recipe, steps, seed), result in zip(jobs, results):
        runs.setdefault(f"{recipe}:{steps}", {})[seed] = result
        print(f"{recipe} {steps} steps seed {seed}: {result['curve'][steps]:.4f}, {result['train_time_s']:.1f} s",
              flush=True)  # fmt: skip
    reference = runs.get(args.reference)
    target = args.target or (statistics.mean(r["curve"][max(r["curve"])] for r in reference.values()) if reference
                             else None)  # fmt: skip
    rows = {}
    for name, by_seed in runs.items():
        first, finals = next(iter(by_seed.values())), [r["curve"][max(r["curve"])] for r in by_seed.values()]
        reached = [first_reaching(r, target) for r in by_seed.values()] if target else []
        rows[name] = {
            "schedule": first["schedule"],
            "final": statistics.mean(finals),
            "final_stdev": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "finals": finals,
            "curve": {s: statistics.mean(r["curve"][s] for r in by_seed.values()) for s in first["curve"]},
            "train_time_s": statistics.mean(r["train_time_s"] for r in by_seed.values()),
            "steps_to_target": [s for s, _ in reached],
            "seconds_to_target": [t for _, t in reached],
        }  # fmt: skip
    return {"seeds": args.seeds, "jobs": args.jobs, "target": target, "reference": args.reference, "runs": rows}


def table(payload: dict) -> str:
    target, ref = payload["target"], payload["runs"].get(payload["reference"])
    headers = ["run", "val loss (mean ± sd)", "per seed", "@150", "@225", "steps to target", "s to target",
               "train time", "vs reference time", "recipe"]  # fmt: skip
    rows = []
    for name, r in payload["runs"].items():
        steps = ", ".join("—" if s is None else str(s) for s in r["steps_to_target"])
        secs = ", ".join("—" if t is None else f"{t:.0f}" for t in r["seconds_to_target"])
        at = lambda s: f"{r['curve'][s]:.3f}" if s in r["curve"] else ""  # noqa: E731
        ratio = f"{r['train_time_s'] / ref['train_time_s']:.2f}×" if ref else ""
        rows.append([name.replace(":", ", ") + " steps", f"{r['final']:.3f} ± {r['final_stdev']:.3f}",
                     ", ".join(f"{f:.3f}" for f in r["finals"]), at(150), at(225), steps, secs,
                     f"{r['train_time_s']:.0f} s", ratio, r["schedule"]])  # fmt: skip
    whence = "given" if payload["reference"] is None else f"the mean final loss of {payload['reference'].replace(':', ', ')} steps"
    head = (f"Seeds {payload['seeds']}, {payload['jobs']} run(s) at a time, 1 thread each. Target: {target:.3f} "
            f"nats/token ({whence}); steps and seconds to it are per seed (evaluations every 25 steps).")  # fmt: skip
    return head + "\n\n" + markdown_table(headers, rows)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in payload["runs"].items():
        steps = sorted(s for s in r["curve"] if s > 0)
        label = name.replace(":", ", ") + " steps"
        ax.plot(steps, [r["curve"][s] for s in steps], marker="o", markersize=3, label=label)
    if payload["target"]:
        target = payload["target"]
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    lowest = min(loss for r in payload["runs"].values() for loss in r["curve"].values())
    ax.set(xlabel="optimizer step", ylabel="validation loss (nats/token, mean of seeds)", ylim=(lowest - 0.1, 6.5),
           title="tiny preset: Muon + AdamW (WSD) vs AdamW (cosine)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 2, 3])
    p.add_argument("--runs", nargs="+", default=["adamw:300", "muon:300", "muon:150", "muon:120"],
                   help="recipe:steps pairs; recipes: " + ", ".join(RECIPES))  # fmt: skip
    p.add_argument("--reference", default="adamw:300", help="the run whose mean final loss is the target")
    p.add_argument("--target", type=float, default=None, help="a target loss instead of the reference's")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses one thread)")
    p.add_argument("--work_dir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    args = p.parse_args(argv)
    if args.target is not None:
        args.reference = None
    payload = run(args)
    stem = write_tiny_results("recipe", payload, table(payload), args.out)
    plot(payload, stem.with_suffix(".png"))
    with stem.with_suffix(".md").open("a") as md:
        md.write(f"\n![validation loss versus steps]({stem.name}.png)\n")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
