"""The arguments of pretraining (minigpt/train/pretrain.py): the dataclasses, parsing (command line over a YAML/JSON
file or preset over the defaults) and validation that reports every bad value at once, before any work starts; and
`read_arguments`, which minigpt/train/finetune.py uses too, so that both scripts read config files the same way.

DataArguments lives with the data pipeline in minigpt/train/data.py; the model's defaults and choices come from
MiniGPTConfig. build_config turns the arguments into a MiniGPTConfig (check_args builds one too, so that a bad
shape is a usage error, not a crash after the data is tokenized). A --resume reads its checkpoint's record once
(minigpt/train/resume.py).
"""

import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from minigpt.commands import one_line_usage
from minigpt.schedule import lr_of
from minigpt.train.data import DataArguments, DataError, check_data_arguments
from minigpt.train.faults import EXIT_NONFINITE
from minigpt.train.resume import Resume, UsageError
from minigpt.train.tokenizer import special_token_ids
from modeling_minigpt import MiniGPTConfig
from modeling_minigpt.configuration_minigpt import NORM_POSITIONS, POSITION_EMBEDDING_TYPES

PRESETS_DIR = Path(__file__).resolve().parent / "configs" / "presets"  # argument presets (accelerate's: ../accelerate)


def arg(default, help: str, **metadata):
    """A dataclass field whose help text shows in --help (HfArgumentParser reads `metadata`)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class ModelArguments:
    """The model's shape; defaults and choices are MiniGPTConfig's (GPT-2 124M), except n_positions."""

    n_layer: int = arg(MiniGPTConfig.n_layer, "Transformer blocks.")
    n_head: int = arg(MiniGPTConfig.n_head, "Attention heads per block; must divide n_embd.")
    n_embd: int = arg(MiniGPTConfig.n_embd, "Width of the residual stream, in features.")
    n_inner: int | None = arg(MiniGPTConfig.n_inner, "Feed-forward width, in features. Default: 4 * n_embd.")
    n_positions: int | None = arg(None, "Longest sequence the model accepts, in tokens. Default: --block_size.")
    position_embedding_type: str = arg(
        MiniGPTConfig.position_embedding_type,
        " | ".join(POSITION_EMBEDDING_TYPES) + ".",
        choices=list(POSITION_EMBEDDING_TYPES),
    )
    norm_position: str = arg(
        MiniGPTConfig.norm_position, " | ".join(NORM_POSITIONS) + " LayerNorm.", choices=list(NORM_POSITIONS)
    )
    activation_function: str = arg(MiniGPTConfig.activation_function, "Any name in transformers' ACT2FN.")
    dropout: float = arg(MiniGPTConfig.resid_pdrop, "Dropout on embeddings, attention and residuals, in [0, 1).")
    bias: bool = arg(MiniGPTConfig.bias, "Biases in linear layers and LayerNorms (--no_bias to drop them).")


@dataclass
class TrainArguments:
    config: str | None = arg(
        None,
        "YAML/JSON file of arguments, or a preset in minigpt/train/configs/presets/ (tiny, gpt2-124m); flags "
        "override it.",
    )
    output_dir: str = arg("runs/pretrain", "Folder for the final model, checkpoints/ and logs.")
    max_steps: int = arg(1000, "Optimizer steps to train for (the schedule's length).")
    batch_size: int = arg(16, "Sequences per micro-batch, per process.")
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step.")
    optimizer: str = arg(
        "muon",
        "muon: Muon for the blocks' weight matrices, AdamW for embeddings, biases and norms (minigpt/train/optim.py); "
        "adamw: AdamW for everything (nanoGPT's recipe). A resume keeps the checkpoint's.",
        choices=["muon", "adamw"],
    )
    learning_rate: float = arg(6e-4, "Peak AdamW learning rate, reached after warmup.")
    min_learning_rate: float = arg(
        6e-5, "AdamW learning rate at the end of the decay; Muon's ends at the same fraction of its peak."
    )
    muon_learning_rate: float = arg(0.02, "Peak Muon learning rate (--optimizer muon).")
    muon_momentum: float = arg(0.95, "Muon's Nesterov momentum (--optimizer muon).")
    lr_scheduler_type: str | None = arg(
        None,
        "cosine: warmup, then cosine decay to --min_learning_rate; warmup_stable_decay: warmup, the peak rate, then a "
        "linear decay over the last --decay_ratio of the steps. Default: the optimizer's, warmup_stable_decay for "
        "muon and cosine for adamw.",
        choices=["cosine", "warmup_stable_decay"],
    )
    decay_ratio: float = arg(0.4, "With warmup_stable_decay: the fraction of --max_steps spent decaying.")
    warmup_steps: int = arg(100, "Optimizer steps of linear warmup.")
    post_ln_warmup_fraction: float = arg(
        2 / 3,
        "With --norm_position post and --optimizer adamw: warm up over at least this fraction of --max_steps. Post-LN "
        "under AdamW needs a long warmup: on the tiny preset a warmup of 30 of 300 steps left it at the unigram level "
        "(validation loss 6.09), one of 200 reached 4.88-5.03, against 4.86 for pre-LN. Under Muon a short warmup is "
        "better (10 steps: 4.08; 200: 4.18), so it keeps --warmup_steps. 0 keeps --warmup_steps.",
    )
    weight_decay: float = arg(0.1, "Weight decay of AdamW's and Muon's 2-D weights (never biases or norms).")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.95, "AdamW beta2.")
    max_grad_norm: float = arg(1.0, "Clip the global gradient norm to this; 0 = no clipping.")
    mixed_precision: str | None = arg(
        None, "no | bf16 | fp16. Default: the accelerate config's, else no.", choices=["no", "bf16", "fp16"]
    )
    compile: bool = arg(False, "torch.compile the model (inductor).")
    seed: int = arg(1337, "Seed for the weights, the data order and dropout.")
    cpu: bool = arg(False, "Train on CPU even where an accelerator exists.")
    fsdp: bool = arg(
        False,
        "Shard parameters, gradients and AdamW state across the processes with torch's FSDP2 (one unit per block), "
        "on CPU ranks, where accelerate cannot enable FSDP; launching with an FSDP accelerate config sets it. On "
        "GPUs use that config (minigpt/train/configs/accelerate/fsdp.yaml) instead. See minigpt/train/sharding.py.",
    )
    cpu_threads: int | None = arg(
        None,
        "Intra-op CPU threads per process (torch.set_num_threads), the same choice as finetune's, evaluation's and "
        "generate's --threads (also accepted here). Default on CPU: $OMP_NUM_THREADS if set, else half the "
        "available cores, between 1 and 4; on an accelerator torch's own. 0 = torch's default, one per core.",
        aliases=["--threads"],
    )
    eval_every: int = arg(250, "Optimizer steps between evaluations; 0 = only at the end.")
    eval_batches: int = arg(
        0,
        "Validation batches per process in the periodic evaluations, which then read the first ones only (a sample, "
        "and the log says so); 0 = the whole split. The final evaluation always reads the whole split.",
    )
    log_every: int = arg(10, "Optimizer steps between log lines.")
    save_every: int = arg(500, "Optimizer steps between checkpoints; 0 = only at the end and on a signal.")
    keep_last: int = arg(3, "Checkpoints to keep in <output_dir>/checkpoints (>= 1).")
    resume: str | None = arg(
        None,
        "An output folder (its latest complete checkpoints/step-N), the path of a step-N folder, or 'latest' (that "
        "of --output_dir). Alone it continues the run with the checkpoint's arguments, the same data order, RNG and "
        "schedule; flags given with it override the saved values (each override is printed; model and data ones "
        "are refused). An error where there is nothing to resume.",
    )
    stop_at_step: int = arg(
        0,
        "Stop at this optimizer step with a checkpoint, as on SIGTERM, while the schedule still runs to "
        "--max_steps (for time-sliced jobs); 0 = off.",
    )
    overwrite_output_dir: bool = arg(
        False,
        "Without --resume, delete the checkpoints and log of an earlier run in --output_dir (otherwise such a "
        "folder is refused, so that 'latest' never mixes two runs).",
    )
    report_to: str = arg("tensorboard", "Accelerate tracker: tensorboard, wandb, ..., all, or none.")
    peak_tflops: float = arg(0.0, "Peak TFLOP/s of one device, for MFU. 0 = look the GPU up; unknown = no MFU.")
    skip_nonfinite: bool = arg(
        False,
        "On a NaN/inf loss or gradient norm, skip that optimizer step (zero grads, no update) and count it in the "
        f"logs, instead of stopping with exit status {EXIT_NONFINITE}.",
    )
    ddp_timeout: int = arg(1800, "Seconds a collective waits for the other processes before the run fails.")
    push_to_hub: bool = arg(False, "After the final save, push output_dir with minigpt.hub.push.push_folder.")
    hub_model_id: str | None = arg(None, "Hub repo id (user/name) for --push_to_hub.")
    hub_private: bool = arg(False, "Create the Hub repo as private.")


# the schedule each optimizer's recipe uses unless --lr_scheduler_type names one
SCHEDULE_OF = {"muon": "warmup_stable_decay", "adamw": "cosine"}


class ConfigError(ValueError):
    """A config file that is not a mapping of known argument names to values."""


def read_arguments(
    parser: HfArgumentParser, argv: list[str], config: str | Path | None = None, given: set[str] | None = None
) -> tuple:
    """The parser's dataclasses from `argv` over the values of the YAML/JSON file `config` over the defaults: the one
    way minigpt/train/pretrain.py and minigpt/train/finetune.py read a config file.

    The file's values go in as if typed before the command line, so argparse checks their types, choices and lists
    (parser.set_defaults would not: `max_steps: null` or `data: a.txt` broke deep inside), and the command line
    wins. null means the default. A `recipes:` mapping holds the values that one --optimizer choice takes instead of
    the file's (a preset's two recipes). Raises FileNotFoundError for a missing file, ConfigError for unknown keys, and
    ValueError for tokens that belong to no flag. A `given` set receives the names the file or the command line set,
    whatever their value (`logging_steps: 500` in a file is a choice, not the default).
    """
    if config is not None:
        path = Path(config).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        values = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of argument names to values.")
        known = {f.name for dc in parser.dataclass_types for f in fields(dc)}
        recipes = (values.pop("recipes", None) or {}) if "optimizer" in known else {}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown arguments {unknown}; the valid keys are the flags of --help.")
        _check_recipes(path, recipes, known)
        if recipes:  # the chosen optimizer's own values replace the file's (the command line still wins)
            chosen = next(g.optimizer for g in parser.parse_args_into_dataclasses(args=_config_argv(values) + argv)
                          if hasattr(g, "optimizer"))  # fmt: skip
            values = {**values, **recipes.get(chosen, {})}
        argv = _config_argv(values) + list(argv)
    groups = parser.parse_args_into_dataclasses(args=argv)  # first: --help prints the real defaults and exits
    if given is not None:
        given |= _named_in(parser, argv)
    return groups


def _check_recipes(path: Path, recipes, known: set[str]) -> None:
    """A config's `recipes:` block: a mapping from --optimizer choices to non-empty mappings of other flags."""
    choices = [f.metadata["choices"] for f in fields(TrainArguments) if f.name == "optimizer"][0]
    if not isinstance(recipes, dict):
        raise ConfigError(f"{path}: `recipes:` must map an --optimizer choice ({', '.join(choices)}) to arguments.")
    for name, values in recipes.items():
        if name not in choices:
            raise ConfigError(f"{path}: `recipes:` names {name!r}, which is no --optimizer choice "
                              f"({', '.join(choices)}).")  # fmt: skip
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"{path}: `recipes: {name}:` must be a non-empty mapping of argument names to values.")
        unknown = sorted(set(values) - (known - {"optimizer", "config"}))
        if unknown:
            raise ConfigError(f"{path}: `recipes: {name}:` has unknown arguments {unknown}; the valid keys are the "
                              "flags of --help other than --optimizer and --config.")  # fmt: skip


def _named_in(parser: HfArgumentParser, argv: list[str]) -> set[str]:
    """The fields `argv` sets, whatever their value: parsed once more over a default that no flag gives (on a parser of
    its own, since set_defaults changes a parser)."""
    probe, unset = HfArgumentParser(parser.dataclass_types), object()
    probe.set_defaults(**{f.name: unset for dc in parser.dataclass_types for f in fields(dc)})
    namespace, _ = probe.parse_known_args(argv)
    return {name for name, value in vars(namespace).items() if value is not unset}


def _config_argv(values: dict) -> list[str]:
    """A config file's mapping as command-line tokens; null means the default."""
    tokens = []
    for key, value in values.items():
        if value is None or key == "config":
            continue
        if isinstance(value, list):
            tokens += [f"--{key}", *map(str, value)]
        else:  # a mapping (TrainingArguments' fsdp_config, ...) as the JSON string its flag takes
            tokens.append(f"--{key}={json.dumps(value) if isinstance(value, dict) else value}")
    return tokens


def parse_args(
    argv: list[str] | None = None, description: str | None = None, epilog: str | None = None
) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Command line over an optional --config file or preset over the defaults; every problem reported at once."""
    return parse_run(argv, description, epilog)[:3]


def parse_run(
    argv: list[str] | None = None, description: str | None = None, epilog: str | None = None
) -> tuple[ModelArguments, DataArguments, TrainArguments, Resume | None]:
    """parse_args, and with --resume the checkpoint's record (read once), whose arguments are the defaults that the
    command line overrides. `description` and `epilog` frame --help; minigpt/train/pretrain.py passes the parts of its
    own docstring."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments), description=description, epilog=epilog)
    one_line_usage(parser, "pretrain")
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = None
    try:
        model_args, data_args, train_args = read_arguments(parser, argv, _config_path(parser, argv))
        if train_args.resume:  # again, over the checkpoint's arguments instead of the defaults
            resume = Resume.find(train_args.resume, train_args.output_dir)
            parser.set_defaults(**resume.defaults({f.name for dc in parser.dataclass_types for f in fields(dc)}))
            model_args, data_args, train_args = read_arguments(parser, argv, _config_path(parser, argv))
            train_args.resume = str(resume.folder)
    except UsageError as e:
        parser.error(str(e))
    except ConfigError as e:
        parser.error(str(e))
    except ValueError as e:  # stray tokens: HfArgumentParser raises where argparse would report a usage error
        parser.error(f"{e}; each flag takes one value (--data takes several).")
    train_args.lr_scheduler_type = train_args.lr_scheduler_type or SCHEDULE_OF[train_args.optimizer]
    try:
        check_args(model_args, data_args, train_args)
    except (UsageError, DataError) as e:
        parser.error(str(e))
    return model_args, data_args, train_args, resume


def _config_path(parser: HfArgumentParser, argv: list[str]) -> Path | None:
    """The file --config names: a path, or a preset's name (minigpt/train/configs/presets/<name>.yaml). Given twice,
    the last one counts, as for every other flag (argparse keeps the last value)."""
    names = [a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1]
             for i, a in enumerate(argv) if a.startswith("--config=") or (a == "--config" and i + 1 < len(argv))]
    name = names[-1] if names else None
    if not name:
        return None
    for path in (Path(name).expanduser(), PRESETS_DIR / f"{name}.yaml"):
        if path.is_file():
            return path
    presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    parser.error(f"--config {name!r} is neither a file nor a preset; presets: {presets}.")


def check_args(model: ModelArguments, data: DataArguments, train: TrainArguments) -> None:
    """Raise UsageError naming every bad value and its fix (litgpt's validate_args)."""
    at_least_1 = ("max_steps", "batch_size", "keep_last", "gradient_accumulation_steps", "log_every", "ddp_timeout")
    problems = [f"--{k} must be >= 1, got {getattr(train, k)}." for k in at_least_1 if getattr(train, k) < 1]
    at_least_0 = ("cpu_threads", "warmup_steps", "eval_every", "save_every", "eval_batches", "max_grad_norm",
                  "stop_at_step", "weight_decay", "peak_tflops")  # fmt: skip
    problems += [f"--{k} must be >= 0, got {getattr(train, k)}." for k in at_least_0
                 if getattr(train, k) is not None and getattr(train, k) < 0]  # fmt: skip
    # NaN passes every comparison, and inf is no learning rate, decay, norm or peak
    finite = ("learning_rate", "min_learning_rate", "weight_decay", "max_grad_norm", "peak_tflops")
    problems += [f"--{k} must be a finite number, got {getattr(train, k)}." for k in finite
                 if not math.isfinite(getattr(train, k))]  # fmt: skip
    problems += [f"--{k} must lie in [0, 1), got {getattr(train, k)}." for k in ("adam_beta1", "adam_beta2")
                 if not 0 <= getattr(train, k) < 1]  # fmt: skip
    if not 0 <= train.decay_ratio <= 1:
        problems.append(f"--decay_ratio must lie in [0, 1], got {train.decay_ratio}.")
    if not 0 < train.muon_learning_rate < math.inf or not 0 <= train.muon_momentum < 1:
        problems.append(f"Need 0 < --muon_learning_rate and 0 <= --muon_momentum < 1, got {train.muon_learning_rate} "
                        f"and {train.muon_momentum}.")  # fmt: skip
    if not 0 <= train.post_ln_warmup_fraction <= 1:  # NaN fails this too
        problems.append(f"--post_ln_warmup_fraction must lie in [0, 1], got {train.post_ln_warmup_fraction}.")
    if not 0 <= train.seed < 2**32:
        problems.append(f"--seed must lie in [0, 2**32) (numpy's seed range), got {train.seed}.")
    if not 0 < train.learning_rate or not 0 <= train.min_learning_rate <= train.learning_rate:
        problems.append(
            f"Need 0 < --learning_rate and 0 <= --min_learning_rate <= --learning_rate, got "
            f"{train.learning_rate} and {train.min_learning_rate}."
        )
    problems += _check_model_and_outputs(model, data, train)
    try:
        check_data_arguments(data)
    except DataError as e:
        problems.append(str(e))
    try:
        build_config(model, data, vocab_size=data.vocab_size)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise UsageError(" ".join(problems))


def _check_model_and_outputs(model: ModelArguments, data: DataArguments, train: TrainArguments) -> list[str]:
    """What the range checks let through and would fail (or silently misbehave) only later in the run."""
    from accelerate.utils import LoggerType

    problems = []
    if model.n_positions is not None and model.n_positions < 1:
        problems.append(f"--n_positions must be >= 1, got {model.n_positions}; leave it out to use --block_size.")
    elif data.block_size > (model.n_positions or data.block_size):
        problems.append(
            f"--block_size {data.block_size} is larger than the model's n_positions {model.n_positions}: "
            "lower --block_size or raise --n_positions."
        )
    trackers = sorted({t.value for t in LoggerType} | {"none"})
    if train.report_to not in trackers:
        problems.append(f"--report_to {train.report_to!r} is not an accelerate tracker; use one of {trackers}.")
    if train.push_to_hub:
        from minigpt.sources import push_problem  # what the push would refuse after the run, now

        problem = push_problem(train.hub_model_id)
        problems += [problem] if problem else []
    return problems


def adapt_recipe(model: ModelArguments, train: TrainArguments) -> str | None:
    """Where the model variant needs another recipe than the one given, change `train` to it and return the line
    that says so (the script prints it before the first step); None where nothing changes."""
    if model.norm_position != "post" or not train.post_ln_warmup_fraction or train.optimizer != "adamw":
        return None  # Muon trains post-LN best with the short warmup (docs/learning-quality.md)
    warmup = max(train.warmup_steps, round(train.post_ln_warmup_fraction * train.max_steps))
    if warmup == train.warmup_steps:
        return None
    note = (
        f"recipe: post-LN warms up over {warmup} of {train.max_steps} steps instead of {train.warmup_steps} "
        f"(--post_ln_warmup_fraction {train.post_ln_warmup_fraction:.3g}; 0 keeps --warmup_steps): with a short "
        "warmup post-LN stays at the unigram level"
    )
    train.warmup_steps = warmup
    return note


def warmup_warning(args: TrainArguments) -> str | None:
    """A line to print where the warmup covers the whole run: the LR then only rises, and never decays."""
    if args.warmup_steps < args.max_steps:
        return None
    last_lr = lr_of(args.max_steps - 1, asdict(args))
    return (
        f"warning: --warmup_steps {args.warmup_steps} >= --max_steps {args.max_steps}: the learning rate rises the "
        f"whole run, to {last_lr:.3g} at the last step, and never reaches --learning_rate {args.learning_rate:g} or "
        "decays. Lower --warmup_steps or raise --max_steps."
    )


def build_config(model: ModelArguments, data: DataArguments, vocab_size: int, tokenizer=None) -> MiniGPTConfig:
    """The MiniGPTConfig of these arguments: ModelArguments' fields are MiniGPTConfig's own, except n_positions
    (default: the block size) and dropout (one rate for embeddings, attention and residuals)."""
    shape = {k: v for k, v in asdict(model).items() if k not in ("n_positions", "dropout")}
    ids = {} if tokenizer is None else special_token_ids(tokenizer)
    return MiniGPTConfig(
        vocab_size=(vocab_size + 63) // 64 * 64,  # padded to a multiple of 64 for fast matmuls; extra ids unused
        n_positions=model.n_positions or data.block_size,
        **dict.fromkeys(("embd_pdrop", "attn_pdrop", "resid_pdrop"), model.dropout),
        **shape,
        **ids,
    )
