"""What the training scripts do when something goes wrong: one signal handler for both (stop after the current
optimizer step, with a checkpoint), the NaN/inf checks and their exit, and the fault tests' switches.

    StopOnSignal        SIGTERM/SIGINT: finish this step, save, exit 0 (pretraining) or 130 (fine-tuning, as
                        Trainer users expect of Ctrl-C); a second SIGINT interrupts at once
    NonFiniteLoss       exit status EXIT_NONFINITE, with what went non-finite and the last good checkpoint
    nonfinite_state     a NaN/inf in the weights or the optimizer state, on any process (checked before each save)
    DebugHooks          MINIGPT_DEBUG_* variables: inject a NaN/inf, slow a save down, dump what each rank read
"""

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

EXIT_NONFINITE = 3  # exit status of a run stopped by NaN/inf (--skip_nonfinite's help names it)


class StopOnSignal:
    """SIGTERM or SIGINT sets `signal`, which the training loop reads after its current optimizer step: it then saves a
    checkpoint and stops. A second SIGINT raises KeyboardInterrupt at once (abort without saving). Use it as
    `with stop.installed(): ...`; the previous handlers come back afterwards."""

    def __init__(self):
        self.signal: signal.Signals | None = None

    def _handle(self, signum, frame):
        if self.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal = signal.Signals(signum)
        print(f"\nReceived {self.signal.name}: finishing this step, then saving a checkpoint (press Ctrl-C "
              "again to abort without saving).", file=sys.stderr, flush=True)  # fmt: skip

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class NonFiniteLoss(SystemExit):
    """Exit status EXIT_NONFINITE; pretraining's main() prints `message` (what went non-finite, where the last good
    state is)."""

    def __init__(self, step: int, what: str, last_good: Path | None, skippable: bool = True):
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
        fix = (
            "or pass --skip_nonfinite to skip such steps"
            if skippable
            else f"or clip with --max_grad_norm; the checkpoint of step {step} was not written"
        )
        super().__init__(EXIT_NONFINITE)
        self.message = (
            f"pretrain: error: {what} at step {step}; stopping. {where}. Resume with "
            f"--resume {last_good or '<output_dir>'} and a lower --learning_rate (and --muon_learning_rate under Muon), "
            f"{fix}."
        )


def nonfinite_state(accelerator, model, optimizer) -> str | None:
    """What holds a NaN/inf among the weights and the optimizer state ("the weights became non-finite (name)"), on
    any process, or None. One pass over every tensor: pretraining calls it before each checkpoint, not every step."""
    from minigpt.train.sharding import local

    names = {p: n for n, p in accelerator.unwrap_model(model).named_parameters()}
    # under FSDP each process checks its own shards, and the reduce below tells every process
    bad = next((f"the weights became non-finite ({n})" for p, n in names.items() if not local(p).isfinite().all()),
               None)  # fmt: skip
    for p, slots in optimizer.state.items():
        for slot, t in slots.items():
            if bad is None and torch.is_tensor(t) and not local(t).isfinite().all():
                bad = f"the optimizer state became non-finite ({slot} of {names.get(p, 'a parameter')})"
    # every process must stop together; a rank that found nothing names what another found only in its own message
    if accelerator.reduce(torch.tensor(float(bad is not None), device=accelerator.device), "sum").item() == 0:
        return None
    return bad or "the weights or optimizer state of another process became non-finite"


@dataclass(frozen=True)
class DebugHooks:
    """Test hooks for the fault tests, kept off the command line and out of --help. Each comes from an environment
    variable, MINIGPT_DEBUG_ + the field's name in capitals, read once, by pretrain's setup():

        MINIGPT_DEBUG_INJECT_NONFINITE_AT_STEP=N  make optimizer step N non-finite (0 = never), where
        MINIGPT_DEBUG_INJECT_NONFINITE_INTO=...   loss (NaN), grads (a NaN gradient under a finite loss), weights
                                                  or optimizer_state (an inf after the update) says
        MINIGPT_DEBUG_SAVE_DELAY=S                sleep S seconds between writing a checkpoint's temporary folder
                                                  and its rename (a window to SIGKILL the save in)
        MINIGPT_DEBUG_RANK_DUMPS=1                each rank writes the ids of the training blocks it consumed and a
                                                  hash of its final weights to <output_dir>/debug/rank<R>.json
    """

    inject_nonfinite_at_step: int = 0
    inject_nonfinite_into: str = "loss"
    save_delay: float = 0.0
    rank_dumps: bool = False

    INJECT_INTO = ("loss", "grads", "weights", "optimizer_state")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "DebugHooks":
        """The hooks that `environ` (default: os.environ, read now) switches on; a bad value stops the run."""
        environ, values, problems = os.environ if environ is None else environ, {}, []
        for f in fields(cls):
            name = f"MINIGPT_DEBUG_{f.name.upper()}"
            raw = environ.get(name)
            if raw is None:
                continue
            try:
                values[f.name] = value = _BOOLS[raw.lower()] if f.type is bool else f.type(raw)
            except (KeyError, ValueError):
                problems.append(f"{name}={raw!r} is not of type {f.type.__name__}.")
                continue
            if f.name == "inject_nonfinite_into" and value not in cls.INJECT_INTO:
                problems.append(f"{name}={raw!r} is not one of {cls.INJECT_INTO}.")
            elif f.type in (int, float) and not (math.isfinite(value) and value >= 0):
                problems.append(f"{name}={raw!r} must be a finite number >= 0.")
        if problems:
            raise SystemExit("pretrain: error: " + " ".join(problems))
        return cls(**values)

    def inject_at(self, step: int) -> str | None:
        """What to make non-finite at optimizer step `step` (1-based), or None."""
        return self.inject_nonfinite_into if self.inject_nonfinite_at_step == step else None


_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}


def dump_rank(accelerator, model, out: Path, consumed: list[int]) -> None:
    """<out>/debug/rank<R>.json: the training blocks this rank consumed and a hash of its final weights (the
    MINIGPT_DEBUG_RANK_DUMPS hook)."""
    digest = hashlib.sha256()
    for name, p in sorted(accelerator.unwrap_model(model).state_dict().items()):
        digest.update(name.encode() + p.detach().cpu().float().numpy().tobytes())
    folder = out / "debug"
    folder.mkdir(parents=True, exist_ok=True)
    dump = {"rank": accelerator.process_index, "blocks": consumed, "weights_sha256": digest.hexdigest()}
    (folder / f"rank{accelerator.process_index}.json").write_text(json.dumps(dump))
