"""The pretraining learning-rate schedule, a pure function of the optimizer step: the loop sets each step's rate from
it, and the model card works out from a run's saved arguments the peak rate the run reached."""

import math

# get_lr's arguments, by the names pretraining's arguments (and its train_state.json) give them
SCHEDULE_ARGUMENTS = {"learning_rate": "max_lr", "min_learning_rate": "min_lr", "warmup_steps": "warmup_steps",
                      "max_steps": "max_steps"}  # fmt: skip


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def lr_of(step: int, args: dict) -> float:
    """get_lr at `step` for arguments named as pretraining names them (a dict, e.g. asdict(TrainArguments))."""
    return get_lr(step, **{ours: args[name] for name, ours in SCHEDULE_ARGUMENTS.items()})


def peak_lr(steps: int, args: dict) -> float | None:
    """The highest rate the schedule gave any of the `steps` steps run; None without steps or with incomplete
    arguments. Below --learning_rate when the run ended inside the warmup (warmup_steps >= max_steps, a stop)."""
    if not steps or any(args.get(name) is None for name in SCHEDULE_ARGUMENTS):
        return None
    return max(lr_of(step, args) for step in range(steps))
