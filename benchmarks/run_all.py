"""Run the benchmarks one after the other and gather their tables into one dated summary.

Stages: train (bench_train), generate (bench_generate), ablations (bench_train, eager, with each MiniGPT
technique switched off in turn) and scaling (bench_scaling). Each runs in its own process (a clean CUDA context,
compile caches and allocator for each), optionally under a time cap, so a slow or failing stage still leaves the
others' results (every stage writes its JSON as it goes).

    python -m benchmarks.run_all --device cpu                        # what `make bench` runs: a few minutes
    python -m benchmarks.run_all --device cuda --out "$OUT" --budget 450

Extra arguments after `--` go to every stage, e.g. `-- --threads 1`.
"""

import argparse
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR

# ablations: bench_train in eager mode with each MiniGPT technique switched off in turn (benchmarks/bench_train.py)
STAGES = ("train", "generate", "ablations", "scaling")


def stage_command(stage: str, args, extra: list[str]) -> list[str]:
    script = "train" if stage == "ablations" else stage
    cmd = [sys.executable, "-m", f"benchmarks.bench_{script}", "--device", args.device, "--size", args.size,
           "--out", str(args.out)]
    if stage == "train" and args.train_modes:
        cmd += ["--modes", args.train_modes]
    if stage == "ablations":
        cmd += ["--modes", "eager", "--models", "minigpt", "--ablations", "--tag", "ablations"]
    return cmd + extra


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", default=None, help="small (default on cpu) or gpt2-124m (default on cuda)")
    parser.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    parser.add_argument("--train-modes", default=None, help="passed to bench_train --modes")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run; each stage gets a share and scaling only what is left")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    args.size = args.size or ("small" if args.device == "cpu" else "gpt2-124m")
    args.out = Path(args.out) if args.out else RESULTS_DIR
    args.out.mkdir(parents=True, exist_ok=True)
    stages = [s for s in args.stages.split(",") if s]
    if set(stages) - set(STAGES):
        raise SystemExit(f"--stages {stages} is not valid; pick from {list(STAGES)}.")

    # with a budget: train, generate and ablations get at most 38%, 55% and 12% of it, scaling what is left;
    # a stage with under 30 s left is skipped
    shares = {"train": 0.38, "generate": 0.55, "ablations": 0.12, "scaling": 1.0}
    start = time.monotonic()
    status = {}
    for stage in stages:
        timeout = None
        if args.budget:
            left = args.budget - (time.monotonic() - start)
            timeout = min(left, shares[stage] * args.budget)
            if timeout < 30:
                status[stage] = f"skipped ({left:.0f} s of the budget left)"
                print(f"[run_all] {stage}: {status[stage]}", flush=True)
                continue
        cmd = stage_command(stage, args, extra)
        print(f"[run_all] {stage}: {' '.join(cmd)}" + (f" (cap {timeout:.0f} s)" if timeout else ""), flush=True)
        began = time.monotonic()
        # a session of its own, so that a stage stopped at its cap takes its compile workers along
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            status[stage] = "ok" if code == 0 else f"exit code {code}"
        except subprocess.TimeoutExpired:
            stop(proc)
            status[stage] = f"stopped at its {timeout:.0f} s cap (partial results kept)"
        print(f"[run_all] {stage}: {status[stage]} after {time.monotonic() - began:.0f} s", flush=True)

    summary = write_summary(args, status)
    print(f"\n[run_all] summary: {summary}", flush=True)
    return 0 if all(v == "ok" for v in status.values()) else 1


def stop(proc: subprocess.Popen):
    """SIGTERM the stage's process group, then SIGKILL what is still there after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def write_summary(args, status: dict) -> Path:
    """Concatenate today's tables for this device and size into one markdown file."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    parts = [f"## Benchmarks: {args.size} on {args.device}, {date}\n"]
    parts += [f"- {stage}: {state}" for stage, state in status.items()]
    for stage in STAGES:
        name = f"{date}-train-{args.device}-{args.size}-ablations" if stage == "ablations" else \
            f"{date}-{stage}-{args.device}-{args.size}"
        table = args.out / f"{name}.md"
        if table.exists():
            parts.append("\n" + table.read_text())
        png = table.with_suffix(".png")
        if png.exists():
            parts.append(f"![{stage}]({png.name})\n")
    summary = args.out / f"{date}-summary-{args.device}-{args.size}.md"
    summary.write_text("\n".join(parts) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
