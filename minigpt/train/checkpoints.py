"""Checkpoint folders of pretraining (minigpt/train/pretrain.py): where they live, how they are written, found, checked
and pruned. (Model folders in general are minigpt/folders.py's.)

    <output_dir>/checkpoints/step-<N>/   accelerate save_state + train_state.json + config, code and tokenizer
    <output_dir>/checkpoints/.tmp-step-<N>/, .old-step-<N>/   an interrupted save's leftovers, removed at the start

--overwrite_output_dir moves an earlier run's outputs (RUN_OUTPUTS, final weights first) into <output_dir>/.overwritten
and deletes it there; a leftover of a crash halfway is deleted at the next start.

A save writes `.tmp-step-N` and renames it to `step-N` only once every process has written its part, so a folder
named step-N is always complete.
"""

import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from minigpt.folders import check_weight_file

# What a run writes into <output_dir>, weights first: --overwrite_output_dir moves these out of the way in this order
# (each a rename), so that a crash halfway leaves no earlier run's final weights beside a new run's files.
RUN_OUTPUTS = ("model*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json", "*.py",
               "tokenizer*.json", "special_tokens_map.json", "checkpoints", "log.jsonl", "loss.png", "tensorboard",
               "debug")  # fmt: skip


def prepare_checkpoint_root(
    accelerator: Accelerator, out: Path, resume: str | None, overwrite: bool
) -> tuple[Path, Path | None]:
    """Create <out>/checkpoints, clear an interrupted save's leftovers and refuse to mix two runs there: an earlier
    run's checkpoints or final model are refused, or with `overwrite` removed, final model first.

    `resume` is the step-N folder to continue (minigpt.train.args resolves --resume to it), or None for a fresh start;
    returns the checkpoint folder and that step-N folder.
    """
    ckpt_root, trash = out / "checkpoints", out / ".overwritten"
    earlier = latest_checkpoint(ckpt_root)
    final_model = next((p for p in (out / "model.safetensors", out / "config.json") if p.is_file()), None)
    accelerator.wait_for_everyone()  # every process has looked before the main one clears anything
    if (earlier or final_model) and not resume:
        if not overwrite:
            what = (
                f"checkpoints of an earlier run (latest: {earlier.name})" if earlier
                else f"the final model ({final_model.name}) of an earlier run"
            )  # fmt: skip
            resume_hint = f"--resume {out} to continue it, " if earlier else ""
            raise SystemExit(
                f"pretrain: error: {out if not earlier else ckpt_root} already holds {what}. Pass {resume_hint}"
                "--overwrite_output_dir to delete it and start over, or another --output_dir."
            )
        if accelerator.is_main_process:
            print(f"--overwrite_output_dir: deleting the earlier run's final model, checkpoints and log in {out}.")
            trash.mkdir(exist_ok=True)
            for pattern in RUN_OUTPUTS:
                for path in sorted(out.glob(pattern)):
                    os.rename(path, trash / path.name)
    if accelerator.is_main_process:
        shutil.rmtree(trash, ignore_errors=True)  # this run's, or one a crash left halfway
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # read-only or full disk, a file in the way: say so before any data work
            raise SystemExit(
                f"pretrain: error: cannot create {ckpt_root}: {e}. Pass a writable --output_dir."
            ) from None
        for stale in [*ckpt_root.glob(".tmp-step-*"), *ckpt_root.glob(".old-step-*")]:
            print(f"Removing the incomplete checkpoint folder {stale} left by an interrupted save.")
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return ckpt_root, Path(resume).expanduser().resolve() if resume else None


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "train_state.json").is_file()


def latest_checkpoint(root: Path) -> Path | None:
    """The highest complete step-N folder; temporary folders never match the pattern."""
    steps = [
        (int(m.group(1)), p)
        for p in root.glob("step-*")
        if (m := re.fullmatch(r"step-(\d+)", p.name)) and is_checkpoint(p)
    ]
    return max(steps)[1] if steps else None


def check_state_files(folder: Path) -> None:
    """Refuse, naming the file, a checkpoint whose state would run code or fail deep inside accelerate's load_state.

    accelerate unpickles optimizer.bin and random_states_*.pkl with weights_only=True (tensors, numbers and its
    allow-list of numpy types), but custom_checkpoint_*.pkl with weights_only=False, and it skips an unreadable RNG
    state without a word (the resume would silently not be exact). Every pickle is read once more here.
    """
    from accelerate.utils import load

    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            if path.name.startswith("custom_checkpoint_"):
                raise ValueError(
                    "this script writes no such file; accelerate would unpickle it with weights_only=False"
                )
            if path.suffix in (".bin", ".pkl", ".pt", ".pth"):
                load(path, map_location="cpu")  # weights_only=True
            elif path.suffix == ".safetensors":
                check_weight_file(path)
        except Exception as e:  # noqa: BLE001 (UnpicklingError, RuntimeError, OSError, SafetensorError, ...)
            lines = str(e).strip().splitlines() or [type(e).__name__]
            reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0]).split(". Please")[0]
            raise SystemExit(
                f"pretrain: error: cannot resume from {folder}: {path.name} is not an intact, safe state file "
                f"({reason.strip()}). Resume from another checkpoint (--resume <output_dir>/checkpoints/step-N), or "
                "copy this one again."
            ) from None


def save_checkpoint(
    accelerator: Accelerator,
    write_files: Callable[[Path], None],
    root: Path,
    step: int,
    keep_last: int,
    save_delay: float = 0.0,
) -> Path | None:
    """Write the full training state to root/.tmp-step-N, then rename it to step-N; keep the last `keep_last`.

    Every process calls this, and `write_files(folder)` (every process: each saves its RNG state, and its shards
    under FSDP) writes the files into the temporary folder. On an OSError (disk full, read-only folder) the error
    is printed, the partial folder removed, earlier checkpoints left alone, and None returned: training goes on.
    `save_delay` (seconds before the rename) is for the fault tests (MINIGPT_DEBUG_SAVE_DELAY, see
    minigpt.train.args.DebugHooks).
    """
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    main = accelerator.is_main_process
    error = None
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        write_files(tmp)
    # a full disk is a RuntimeError from torch.save's C++ writer and a SafetensorError (no OSError) from safetensors
    except (OSError, RuntimeError, SafetensorError) as e:
        error = e
        print(f"[rank {accelerator.process_index}] checkpoint save to {tmp} failed: {e}", file=sys.stderr)
    # all processes agree on the outcome, so that no rank renames a checkpoint that another failed to write
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum").item() > 0
    if main and not failed:
        try:
            if save_delay:
                time.sleep(save_delay)
            if final.exists():  # re-saving a step: move the old one aside first, so one complete copy always exists
                old = root / f".old-step-{step}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old)
            else:
                os.rename(tmp, final)
            _fsync_dir(root)
        except OSError as e:
            error, failed = e, True
    if main and failed:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free / 2**30
        print(
            f"pretrain: error: could not save the checkpoint of step {step} in {root}: "
            f"{error or 'another process failed'} ({free:.2f} GiB free there). Earlier checkpoints are untouched; "
            "training continues and the next save retries.",
            file=sys.stderr,
        )
    if main and not failed:
        _prune(root, keep_last)
    accelerator.wait_for_everyone()
    return None if failed else final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.glob("step-*") if (m := re.fullmatch(r"step-(\d+)", p.name)))
    for _, path in steps[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
