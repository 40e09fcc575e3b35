"""Continuing a pretraining run: the checkpoint that --resume names, its train_state.json read once into a Resume
record, and the checks that refuse a resume that could not continue it exactly (another model or data, a damaged
state file, a checkpoint of another sharding), before any data work."""

import json
from dataclasses import dataclass
from pathlib import Path

from minigpt.schedule import SAVED_BEFORE_MUON, SCHEDULE_ARGUMENTS, lr_of
from minigpt.train.checkpoints import check_state_files, is_checkpoint, latest_checkpoint
from minigpt.train.sharding import SHARDED_DIR

NOT_RESUMED = ("resume", "overwrite_output_dir", "stop_at_step", "config")  # what one invocation says, never saved


class UsageError(ValueError):
    """A bad argument combination; the message names it and the fix."""


@dataclass
class Resume:
    """A step-N checkpoint folder and what its train_state.json records: the run's arguments ({"model", "data",
    "train"}) and the loop's state ({"step", "epoch", "samples_in_epoch", ...})."""

    folder: Path
    args: dict
    state: dict

    @classmethod
    def find(cls, resume: str, output_dir: str) -> "Resume":
        """The checkpoint --resume names: a step-N folder, the latest in <folder>/checkpoints (or in <folder>), or
        with 'latest' the latest of <output_dir>/checkpoints. UsageError where there is nothing to resume."""
        path = Path(output_dir if resume == "latest" else resume).expanduser().resolve()
        if not is_checkpoint(path):
            if not path.is_dir():
                raise UsageError(
                    f"--resume {resume!r} is not a checkpoint: there is no folder {path}, so nothing to resume. Pass "
                    "an output folder or a step-N folder of an earlier run, or leave --resume out to start a new one."
                )
            found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
            if found is None:
                raise UsageError(
                    f"--resume {resume!r}: there is nothing to resume in {path} (no complete checkpoints/step-N "
                    "folder with train_state.json). Check the path, or leave --resume out to start a new run."
                )
            path = found
        try:
            saved = json.loads((path / "train_state.json").read_text())
            return cls(path, dict(saved["args"]), dict(saved["state"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"--resume: {path / 'train_state.json'} is unreadable ({e!r}).") from None

    def defaults(self, known: set[str]) -> dict:
        """The arguments the run was started with, among `known`, as parser defaults (flags still override them);
        --output_dir defaults to the folder that holds checkpoints/step-N."""
        values = {k: v for group in self.args.values() for k, v in group.items() if k in known and k not in NOT_RESUMED}
        values = {**SAVED_BEFORE_MUON, **values}
        if self.folder.parent.name == "checkpoints":
            values["output_dir"] = str(self.folder.parent.parent)
        return values

    def check(self, now: dict) -> list[str]:
        """Refuse a resume that cannot continue this checkpoint (model or data changed, a damaged state file); return
        the lines to print: each argument the command line overrides, and a schedule change."""
        changed = [f"{group}.{k}: {self.args[group].get(k)!r} -> {v!r}" for group in ("model", "data")
                   for k, v in now[group].items()
                   if k not in ("data_cache_dir", "num_proc") and self.args[group].get(k) != v]  # fmt: skip
        if changed:
            raise SystemExit(
                f"pretrain: error: cannot resume from {self.folder}: the model or data arguments differ from the "
                f"checkpoint's ({'; '.join(changed)}). Pass the same values, or start a new --output_dir."
            )
        check_state_files(self.folder)
        step, before, after = self.state["step"], {**SAVED_BEFORE_MUON, **self.args["train"]}, now["train"]
        if before["optimizer"] != after["optimizer"]:
            raise SystemExit(
                f"pretrain: error: cannot resume from {self.folder} with --optimizer {after['optimizer']} (given on "
                f"the command line or by --config): it was trained with {before['optimizer']}, whose state the "
                "checkpoint holds. Resume without --optimizer or --config, or start a new --output_dir."
            )

        def same(k: str) -> bool:  # an output_dir saved relative to where that run started counts as the same folder
            return before[k] == after[k] or (k == "output_dir" and Path(before[k]).resolve() == Path(after[k]).resolve())

        notes = [f"resume: --{k} {after[k]} overrides the checkpoint's {before[k]}"
                 for k in after if k in before and k not in NOT_RESUMED and not same(k)]  # fmt: skip
        changed = [k for k in SCHEDULE_ARGUMENTS if k in before and not same(k)]
        if changed:
            lr_then, lr_now = lr_of(step, {**after, **before}), lr_of(step, after)
            notes.append(
                f"schedule: changed on resume ({', '.join(f'{k} {before[k]} -> {after[k]}' for k in changed)}): the "
                f"learning rate of step {step + 1} is {lr_now:.3g}, where the checkpoint's schedule had {lr_then:.3g}"
            )
        return notes

    def check_sharding(self, sharding: str) -> None:
        """A checkpoint of a torch-FSDP2 run holds its training state in fsdp/, one of any other run in optimizer.bin:
        resuming one kind as the other would lose AdamW's state, so it is refused."""
        sharded = (self.folder / SHARDED_DIR).is_dir()
        if sharded != (sharding == "torch-fsdp2"):
            saved_as, now = ("FSDP on CPU ranks", "without it") if sharded else ("without FSDP", "with FSDP on CPU ranks")
            raise SystemExit(
                f"pretrain: error: cannot resume from {self.folder}: it was saved {saved_as}, and this launch runs "
                f"{now}. Launch as the checkpoint's run was (the same --fsdp or accelerate config and number of "
                "processes)."
            )
