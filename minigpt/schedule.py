"""The pretraining learning-rate schedule, a pure function of the optimizer step: the loop sets each step's rate from
it, and the model card works out from a run's saved arguments the peak rate the run reached and the recipe in words."""

import math

# get_lr's arguments, by the names pretraining's arguments (and its train_state.json) give them
SCHEDULE_ARGUMENTS = {"learning_rate": "max_lr", "min_learning_rate": "min_lr", "warmup_steps": "warmup_steps",
                      "max_steps": "max_steps", "lr_scheduler_type": "kind", "decay_ratio": "decay_ratio"}  # fmt: skip
# the recipe of records saved before --optimizer and --lr_scheduler_type existed: AdamW with the cosine schedule
SAVED_BEFORE_MUON = {"optimizer": "adamw", "lr_scheduler_type": "cosine"}
OPTIONAL = ("lr_scheduler_type", "decay_ratio")  # absent from such records: get_lr's defaults are their schedule


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int, kind: str = "cosine",
           decay_ratio: float = 0.0) -> float:  # fmt: skip
    """Learning rate at optimizer step `step` (0-based): linear warmup, then either a cosine decay to min_lr
    ("cosine"), or the peak until the last `decay_ratio` of max_steps and a linear decay to min_lr over those
    ("warmup_stable_decay")."""
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    if step >= max_steps:
        return min_lr
    if kind == "warmup_stable_decay":
        decay_start = max(warmup_steps, max_steps - round(decay_ratio * max_steps))
        progress = (step - decay_start) / max(1, max_steps - decay_start) if step >= decay_start else 0.0  # 0 -> 1
        return max_lr - progress * (max_lr - min_lr)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def lr_of(step: int, args: dict) -> float:
    """get_lr at `step` for arguments named as pretraining names them (a dict, e.g. asdict(TrainArguments))."""
    return get_lr(step, **{ours: args[name] for name, ours in SCHEDULE_ARGUMENTS.items() if name in args})


def peak_lr(steps: int, args: dict) -> float | None:
    """The highest rate the schedule gave any of the `steps` steps run; None without steps or with incomplete
    arguments. Below --learning_rate when the run ended inside the warmup (warmup_steps >= max_steps, a stop)."""
    if not steps or any(args.get(name) is None for name in SCHEDULE_ARGUMENTS if name not in OPTIONAL):
        return None
    return max(lr_of(step, args) for step in range(steps))


def recipe_of(args: dict) -> str | None:
    """The optimizer and schedule of pretraining arguments (named as in lr_of) in words: the summary before the first
    step prints it, and the model card records it. Records saved before --optimizer existed trained with AdamW."""
    args = {**SAVED_BEFORE_MUON, **args}
    optimizer, kind = args["optimizer"], args["lr_scheduler_type"]
    needed = ("learning_rate", "min_learning_rate", "warmup_steps") + (
        ("muon_learning_rate", "muon_momentum") if optimizer == "muon" else ())
    if any(args.get(name) is None for name in needed):
        return None  # an incomplete record: the card says what it knows
    rates = f"AdamW {args['learning_rate']:g} -> {args['min_learning_rate']:g}"
    if optimizer == "muon":
        rates = (f"Muon {args['muon_learning_rate']:g} (momentum {args['muon_momentum']:g}) for the blocks' weight "
                 f"matrices, {rates} for embeddings, norms and biases")  # fmt: skip
    decay = ("cosine decay" if kind == "cosine" else
             f"stable, then linear decay over the last {args.get('decay_ratio', 0):.0%} of the steps")  # fmt: skip
    return f"{rates}; warmup {args['warmup_steps']} steps, {decay}"
