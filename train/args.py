"""The arguments of train/pretrain.py: the dataclasses, parsing (command line over a YAML/JSON file or preset over
the defaults) and validation that reports every bad value at once, before any work starts.

DataArguments lives with the data pipeline in train/data.py; build_config turns the arguments into a MiniGPTConfig
(check_args builds one too, so that a bad shape is a usage error, not a crash after the data is tokenized).
"""

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from modeling_minigpt import MiniGPTConfig
from train.checkpoints import is_checkpoint
from train.data import DataArguments, DataError, check_data_arguments

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
EXIT_NONFINITE = 3  # exit status of a run stopped by NaN/inf (here: --skip_nonfinite's help names it)


def arg(default, help: str, **metadata):
    """A dataclass field whose help text shows in --help (HfArgumentParser reads `metadata`)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class ModelArguments:
    n_layer: int = arg(12, "Transformer blocks.")
    n_head: int = arg(12, "Attention heads per block; must divide n_embd.")
    n_embd: int = arg(768, "Width of the residual stream, in features.")
    n_inner: int | None = arg(None, "Feed-forward width, in features. Default: 4 * n_embd.")
    n_positions: int | None = arg(None, "Longest sequence the model accepts, in tokens. Default: --block_size.")
    position_embedding_type: str = arg(
        "learned", "learned | sinusoidal | rope.", choices=["learned", "sinusoidal", "rope"]
    )
    norm_position: str = arg("pre", "pre | post LayerNorm.", choices=["pre", "post"])
    activation_function: str = arg("gelu_new", "Any name in transformers' ACT2FN.")
    dropout: float = arg(0.0, "Dropout on embeddings, attention and residuals, in [0, 1).")
    bias: bool = arg(True, "Biases in linear layers and LayerNorms (--no_bias to drop them).")


@dataclass
class TrainArguments:
    config: str | None = arg(
        None, "YAML/JSON file of arguments, or a preset in train/configs/ (tiny, gpt2-124m); flags override it."
    )
    output_dir: str = arg("runs/pretrain", "Folder for the final model, checkpoints/ and logs.")
    max_steps: int = arg(1000, "Optimizer steps to train for (the schedule's length).")
    batch_size: int = arg(16, "Sequences per micro-batch, per process.")
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step.")
    learning_rate: float = arg(6e-4, "Peak learning rate, reached after warmup.")
    min_learning_rate: float = arg(6e-5, "Learning rate at the end of the cosine decay.")
    warmup_steps: int = arg(100, "Optimizer steps of linear warmup.")
    weight_decay: float = arg(0.1, "AdamW weight decay, on 2-D weights only.")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.95, "AdamW beta2.")
    max_grad_norm: float = arg(1.0, "Clip the global gradient norm to this; 0 = no clipping.")
    mixed_precision: str | None = arg(
        None, "no | bf16 | fp16. Default: the accelerate config's, else no.", choices=["no", "bf16", "fp16"]
    )
    compile: bool = arg(False, "torch.compile the model (inductor).")
    seed: int = arg(1337, "Seed for the weights, the data order and dropout.")
    cpu: bool = arg(False, "Train on CPU even where an accelerator exists.")
    cpu_threads: int = arg(
        0,
        "Intra-op CPU threads per process (torch.set_num_threads); 0 = torch's default, one per core. Small models "
        "gain little from more, and lose much when other processes share the cores.",
    )
    eval_every: int = arg(250, "Optimizer steps between evaluations; 0 = only at the end.")
    eval_batches: int = arg(0, "Validation batches per evaluation; 0 = the whole split.")
    log_every: int = arg(10, "Optimizer steps between log lines.")
    save_every: int = arg(500, "Optimizer steps between checkpoints; 0 = only at the end and on a signal.")
    keep_last: int = arg(3, "Checkpoints to keep in <output_dir>/checkpoints (>= 1).")
    resume: str | None = arg(
        None,
        "'latest' (the highest complete <output_dir>/checkpoints/step-N; starts fresh if there is none) or the "
        "path of a step-N folder. Continues with the same data order, RNG and schedule.",
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
    push_to_hub: bool = arg(False, "After the final save, push output_dir with hub.push.push_folder.")
    hub_model_id: str | None = arg(None, "Hub repo id (user/name) for --push_to_hub.")
    hub_private: bool = arg(False, "Create the Hub repo as private.")
    inject_nonfinite_at_step: int = arg(
        0, "For fault-injection tests: make optimizer step N non-finite where --inject_nonfinite_into says."
    )
    inject_nonfinite_into: str = arg(
        "loss",
        "For fault-injection tests: loss (NaN), grads (a NaN gradient under a finite loss), weights or "
        "optimizer_state (an inf after the update).",
        choices=["loss", "grads", "weights", "optimizer_state"],
    )
    debug_save_delay: float = arg(
        0.0,
        "For fault-injection tests: seconds to sleep after a checkpoint's temporary folder is written and "
        "before its rename.",
    )
    debug_rank_dumps: bool = arg(
        False,
        "For tests: each rank writes the ids of the training blocks it consumed and a hash of its final weights "
        "to <output_dir>/debug/rank<R>.json.",
    )


class UsageError(ValueError):
    """A bad argument combination; the message names it and the fix."""


def parse_args(
    argv: list[str] | None = None, description: str | None = None, epilog: str | None = None
) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Command line over an optional --config file over the dataclass defaults; every problem reported at once.

    `description` and `epilog` frame --help; train/pretrain.py passes the parts of its own docstring.
    """
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments), description=description, epilog=epilog)
    argv = list(sys.argv[1:] if argv is None else argv)
    config = _peek_config(argv)
    if config:
        values = _load_config(config)
        known = {f for dc in (ModelArguments, DataArguments, TrainArguments) for f in dc.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"unknown keys {unknown} in {config}; valid keys are the --flags of --help.")
        # as if typed before the command line: argparse checks the types, choices and lists (set_defaults would not,
        # so `max_steps: null` or `data: a.txt` broke deep inside), and the command line still wins
        argv = _config_argv(values) + argv
    try:
        model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # stray tokens: HfArgumentParser raises where argparse would report a usage error
        parser.error(f"{e}; each flag takes one value (--data takes several).")
    try:
        check_args(model_args, data_args, train_args)
    except (UsageError, DataError) as e:
        parser.error(str(e))
    return model_args, data_args, train_args


def _config_argv(values: dict) -> list[str]:
    """A config file's mapping as command-line tokens; null means the default."""
    tokens = []
    for key, value in values.items():
        if value is None or key == "config":
            continue
        if isinstance(value, list):
            tokens += [f"--{key}", *map(str, value)]
        else:
            tokens.append(f"--{key}={value}")
    return tokens


def _peek_config(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _load_config(name: str) -> dict:
    path = Path(name).expanduser()
    if not path.is_file():
        path = CONFIGS_DIR / f"{name}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml") if not p.stem.endswith(("_gpu", "fsdp", "node")))
        raise SystemExit(f"pretrain: error: --config {name!r} is neither a file nor a preset; presets: {presets}.")
    values = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text()) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"pretrain: error: {path} must hold a mapping of argument names to values.")
    return values


def check_args(model: ModelArguments, data: DataArguments, train: TrainArguments) -> None:
    """Raise UsageError naming every bad value and its fix (litgpt's validate_args)."""
    problems = []
    positive = dict(
        max_steps=train.max_steps,
        batch_size=train.batch_size,
        keep_last=train.keep_last,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        log_every=train.log_every,
        ddp_timeout=train.ddp_timeout,
    )
    problems += [f"--{k} must be >= 1, got {v}." for k, v in positive.items() if v < 1]
    non_negative = dict(
        cpu_threads=train.cpu_threads,
        warmup_steps=train.warmup_steps,
        eval_every=train.eval_every,
        save_every=train.save_every,
        eval_batches=train.eval_batches,
        max_grad_norm=train.max_grad_norm,
        stop_at_step=train.stop_at_step,
        debug_save_delay=train.debug_save_delay,
        weight_decay=train.weight_decay,
        peak_tflops=train.peak_tflops,
        inject_nonfinite_at_step=train.inject_nonfinite_at_step,
    )
    problems += [f"--{k} must be >= 0, got {v}." for k, v in non_negative.items() if v < 0]
    problems += _check_more_args(model, train)
    if not 0 < train.learning_rate or not 0 <= train.min_learning_rate <= train.learning_rate:
        problems.append(
            f"Need 0 < --learning_rate and 0 <= --min_learning_rate <= --learning_rate, got "
            f"{train.learning_rate} and {train.min_learning_rate}."
        )
    n_positions = model.n_positions or data.block_size
    if data.block_size > n_positions:
        problems.append(
            f"--block_size {data.block_size} is larger than the model's n_positions {n_positions}: "
            "lower --block_size or raise --n_positions."
        )
    if train.push_to_hub and not train.hub_model_id:
        problems.append("--push_to_hub needs --hub_model_id user/name.")
    if train.resume and train.resume != "latest" and not is_checkpoint(Path(train.resume).expanduser()):
        problems.append(
            f"--resume {train.resume!r} is not a checkpoint (a step-N folder with train_state.json "
            f"written by this script). Use --resume latest or a path like <output_dir>/checkpoints/step-500."
        )
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


def _check_more_args(model: ModelArguments, train: TrainArguments) -> list[str]:
    """What the range checks above let through and would fail (or silently misbehave) only later in the run."""
    from accelerate.utils import LoggerType
    from huggingface_hub.utils import validate_repo_id

    problems = []
    floats = dict(
        learning_rate=train.learning_rate,
        min_learning_rate=train.min_learning_rate,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        peak_tflops=train.peak_tflops,
        debug_save_delay=train.debug_save_delay,
    )  # NaN passes every comparison, and inf is no learning rate, decay, norm or delay
    problems += [f"--{k} must be a finite number, got {v}." for k, v in floats.items() if not math.isfinite(v)]
    betas = dict(adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2)
    problems += [f"--{k} must lie in [0, 1), got {v}." for k, v in betas.items() if not 0 <= v < 1]
    if not 0 <= train.seed < 2**32:
        problems.append(f"--seed must lie in [0, 2**32) (numpy's seed range), got {train.seed}.")
    if model.n_positions is not None and model.n_positions < 1:
        problems.append(f"--n_positions must be >= 1, got {model.n_positions}; leave it out to use --block_size.")
    trackers = sorted({t.value for t in LoggerType} | {"none"})
    if train.report_to not in trackers:
        problems.append(f"--report_to {train.report_to!r} is not an accelerate tracker; use one of {trackers}.")
    if train.push_to_hub and train.hub_model_id:
        try:
            validate_repo_id(train.hub_model_id)
        except ValueError as e:  # HFValidationError; caught now, not after the whole run
            problems.append(f"--hub_model_id {train.hub_model_id!r} is not a Hub repo id ({e}). Use user/name.")
    return problems


def build_config(model: ModelArguments, data: DataArguments, vocab_size: int, tokenizer=None) -> MiniGPTConfig:
    ids = {}
    if tokenizer is not None:
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return MiniGPTConfig(
        vocab_size=(vocab_size + 63) // 64 * 64,  # padded to a multiple of 64 for fast matmuls; extra ids unused
        n_positions=model.n_positions or data.block_size,
        n_embd=model.n_embd,
        n_layer=model.n_layer,
        n_head=model.n_head,
        n_inner=model.n_inner,
        position_embedding_type=model.position_embedding_type,
        norm_position=model.norm_position,
        activation_function=model.activation_function,
        embd_pdrop=model.dropout,
        attn_pdrop=model.dropout,
        resid_pdrop=model.dropout,
        bias=model.bias,
        **ids,
    )
