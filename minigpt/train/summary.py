"""training_summary.json: the one record of a training run, written by pretraining (into its output folder and every
checkpoint) and by fine-tuning, and read by the model card (minigpt/hub/model_card.py) for the facts no log holds:
the data, the base model, the hardware, the tokens read and the peak learning rate reached beside the configured one.

Keys (all optional): data, base_model ({"name", "hub", "data", "tokens", "base_model"}), learning_rate (the peak
reached), configured_learning_rate, warmup_steps, steps, batch_size, tokens (tokens_estimated: true where it is not a
count), hardware.
"""

import json
import re
from pathlib import Path

from minigpt.schedule import peak_lr, recipe_of

SUMMARY_FILE = "training_summary.json"


def write_summary(folder: str | Path, summary: dict) -> None:
    """Merge `summary` into <folder>/training_summary.json (facts written before and not given again stay)."""
    path = Path(folder) / SUMMARY_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **summary}, indent=2) + "\n")


def pretrain_summary(args: dict, step: int, tokens_seen: int, hardware: str, corpus: str | None) -> dict:
    """The record of a pretraining run at `step`, from its saved arguments ({"model", "data", "train"})."""
    data = args["data"].get("data")
    if data:  # an absolute path would publish the trainer's home folder: its file name is enough
        data = ", ".join(Path(d).name if Path(d).is_absolute() else d for d in (data if isinstance(data, list) else [data]))
    train = args["train"]
    summary = {
        "data": data or corpus,
        "learning_rate": peak_lr(step, train) or train["learning_rate"],
        "configured_learning_rate": train["learning_rate"],
        "warmup_steps": train["warmup_steps"],
        "recipe": recipe_of(train),
        "steps": step,
        "tokens": tokens_seen,
        "hardware": hardware,
    }
    return {k: v for k, v in summary.items() if v is not None}


def finetune_summary(trainer, data: str, base_model: str | None) -> dict:
    """The record of a Trainer fine-tune: `data` in words, and the model it started from."""
    from minigpt.train.monitoring import describe_hardware

    args, state = trainer.args, trainer.state
    summary = {
        "data": data,
        "learning_rate": trainer_peak_learning_rate(trainer),
        "configured_learning_rate": args.learning_rate,
        "warmup_steps": args.get_warmup_steps(state.max_steps),  # a fraction < 1 of the run becomes steps
        "steps": state.global_step,
        "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "hardware": describe_hardware(args.device, args.world_size,
                                      "bf16" if args.bf16 else "fp16" if args.fp16 else None),
    }
    if state.num_input_tokens_seen:  # --include_num_input_tokens_seen (on by default: see finetune's defaults)
        summary["tokens"] = state.num_input_tokens_seen
    elif trainer.train_dataset is not None and state.epoch:  # the epochs run times the tokens of one epoch
        tokens_per_epoch = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        summary["tokens"], summary["tokens_estimated"] = round(tokens_per_epoch * state.epoch), True
    if base_model is not None:
        summary["base_model"] = base_model_record(base_model)
    return summary


def trainer_peak_learning_rate(trainer) -> float | None:
    """The highest learning rate an optimizer step of a Trainer run used. Not --learning_rate: a warmup as long as the
    run (warmup_steps >= max_steps) stops before reaching it. Trainer's schedules are LambdaLR, a pure function of the
    step (rate = base * lambda(step), step s for the s+1-th update), so the peak is exact, resumed runs included;
    any other scheduler falls back to the largest rate in the log."""
    scheduler = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)  # unwrap accelerate's wrapper
    lambdas, bases = getattr(scheduler, "lr_lambdas", None), getattr(scheduler, "base_lrs", None)
    steps = trainer.state.global_step
    if lambdas and bases and steps > 0:
        return max(base * rate(step) for base, rate in zip(bases, lambdas) for step in range(steps))
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    return max(logged) if logged else None


def base_model_record(base: str) -> dict:
    """What the model card says of the model a fine-tune started from: a Hub id as given ({"name", "hub": true},
    the card's `base_model:` metadata); a local folder by its name, never its absolute path (the card is published),
    with its own training facts (data, tokens) read from its records by the model card's reader."""
    from minigpt.hub.model_card import read_training_info  # the card's own reader of a run's records

    folder = Path(base).expanduser()
    if not folder.is_dir():
        return {"name": base, "hub": True}
    folder = folder.resolve()
    name = folder.name
    if re.fullmatch(r"(step|checkpoint)-\d+", name):  # a checkpoint: say of which run
        run = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
        name = str(Path(run.name, folder.relative_to(run)))
    record = {"name": name, "hub": False}
    facts = read_training_info(folder)
    record.update({key: facts[key] for key in ("data", "tokens", "base_model") if facts.get(key)})
    return record
