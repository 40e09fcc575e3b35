"""What a pretraining run reports: the log (log.jsonl, the accelerate tracker, the console), the loss plot, and the
hardware it ran on in words. (FLOPs and MFU are minigpt/flops.py's, shared with benchmarks/.)
"""

import json
import os
import sys
from pathlib import Path

import torch


def describe_hardware(device: torch.device, processes: int, mixed_precision: str | None = None) -> str:
    """What trained a model, for its card: "CPU (x86_64, 2 cores), 2 processes x 1 torch thread",
    "8 x NVIDIA H200, bf16 mixed precision", ..."""
    import platform

    from minigpt.train.threads import available_cores

    if device.type == "cuda":
        hardware = f"{processes} x {torch.cuda.get_device_name(device)}"
    elif device.type == "cpu":
        threads = torch.get_num_threads()
        hardware = (f"CPU ({platform.machine() or 'unknown'}, {available_cores()} cores), {processes} "
                    f"process{'es' if processes > 1 else ''} x {threads} torch thread{'s' if threads > 1 else ''}")
    else:  # mps, xpu, npu, ...
        hardware = f"{processes} x {device.type.upper()} device"
    return hardware + (f", {mixed_precision} mixed precision" if mixed_precision not in (None, "no") else "")


class RunLog:
    """One record per event: a line in <out>/log.jsonl and one on the console (main process), and the same numbers
    to the accelerate tracker. A full disk or a dead tracker warns and never stops the run."""

    def __init__(self, accelerator, out: Path, report_to: str):
        self.accelerator, self.path, self.report_to = accelerator, out / "log.jsonl", report_to
        self.bar = None  # fit()'s progress bar, set while it runs: lines print above it
        self.failing = False

    def start(self, keep_up_to_step: int, hparams: dict) -> None:
        """Drop records past `keep_up_to_step` (-1: a fresh run starts a fresh log; a resume drops the crashed run's
        tail, so that curves don't repeat), and start the tracker with the run's arguments as hyperparameters."""
        if self.accelerator.is_main_process and self.path.exists():
            lines = self.path.read_text().splitlines()
            self.path.write_text("".join(f"{x}\n" for x in lines if x and json.loads(x)["step"] <= keep_up_to_step))
        if self.report_to != "none":
            flat = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for g in hparams.values()
                for k, v in g.items()
            }
            self.accelerator.init_trackers("tensorboard", config=flat)

    def write(self, record: dict) -> None:
        if self.report_to != "none":
            try:
                self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            except OSError as e:  # tensorboard's writer thread died (disk full) and re-raises on every call after
                print(
                    f"pretrain: warning: the {self.report_to} tracker failed ({e}); training goes on without "
                    "it, log.jsonl keeps the record.",
                    file=sys.stderr,
                )
                self.accelerator.trackers.clear()  # also keeps end_training() from flushing the dead writer
        if not self.accelerator.is_main_process:
            return
        self._append(record)
        (self.bar.write if self.bar is not None else print)(format_record(record))

    def _append(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        try:
            with open(self.path, "ab", buffering=0) as f:  # unbuffered: a failed write is undone here, not at close
                size = f.seek(0, os.SEEK_END)
                try:
                    if f.write(line) != len(line):
                        raise OSError(f"wrote only part of a {len(line)}-byte line")
                except OSError:
                    f.truncate(size)  # never leave half a line: resume and the loss plot parse every line
                    raise
            self.failing = False
        except OSError as e:  # a full disk must not kill the run: checkpoint saves report their failures and retry
            if not self.failing:
                print(
                    f"pretrain: warning: could not append to {self.path}: {e}. Training goes on; log lines are "
                    "missing until a write succeeds again.",
                    file=sys.stderr,
                )
            self.failing = True


def format_record(record: dict) -> str:
    """A log record as one console line: `step 100 | loss 3.2100 | lr 6.00e-04 | 25,000 tok/s | mfu 41.0%`."""
    parts = [f"step {record['step']}"]
    for key, value in record.items():
        if key in ("step", "tokens_seen", "val_split_blocks"):
            continue
        if key == "tokens_per_s":
            parts.append(f"{value:,.0f} tok/s")
        elif key == "mfu":
            parts.append(f"mfu {100 * value:.1f}%")
        elif key in ("lr", "muon_lr"):
            parts.append(f"{key} {value:.2e}")
        elif key == "val_blocks":
            total = record.get("val_split_blocks", value)
            parts.append(f"{value} of {total} validation blocks" + (" (a sample)" if value < total else ""))
        else:
            parts.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def plot_losses(log_path: Path, png_path: Path) -> None:
    """The train and validation loss curves of log.jsonl as a PNG."""
    try:
        import matplotlib
    except ImportError:  # a declared dependency; still, a missing plot must not fail a finished run
        print(f"matplotlib is not installed, so no {png_path.name}: `pip install matplotlib` to plot {log_path}.")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"MiniGPT pretraining: {png_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
