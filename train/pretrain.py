"""Pretrain MiniGPT from scratch on local text with Accelerate: one script from a laptop CPU to many GPU nodes.

    python -m train.pretrain --config tiny                      # CPU demo preset, built-in Shakespeare corpus
    python train/pretrain.py --data my_texts/ --output_dir runs/mine --max_steps 2000
    accelerate launch --config_file train/configs/multi_gpu.yaml train/pretrain.py --config gpt2-124m --data ...

Arguments come from the command line, from a YAML/JSON file (`--config FILE`, or a preset name from
train/configs/), or both: the command line wins. Reading order: arguments, then setup() (accelerator, data,
model, optimizer, resume), fit() (the loop), validate(), and the checkpoint helpers.

Output folder layout:
    <output_dir>/config.json, model.safetensors, tokenizer*, generation_config.json   (the final model)
    <output_dir>/checkpoints/step-<N>/   full training state (accelerate save_state) + tokenizer + config
    <output_dir>/log.jsonl, loss.png, tensorboard/

Faults: SIGTERM/SIGINT finish the current optimizer step, save a checkpoint and exit 0; checkpoints are written
to `.tmp-step-<N>` and renamed when complete; a failed save is reported and retried at the next save; a NaN/inf
loss stops the run (exit 3) unless --skip_nonfinite.
"""

import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

# Run by path (`python train/x.py`, `accelerate launch train/x.py`), Python puts train/ first on sys.path, where
# train/evaluate.py would shadow the `evaluate` library. The packages are installed, so that entry is not needed.
if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, TorchDynamoPlugin, set_seed  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import GenerationConfig, HfArgumentParser  # noqa: E402

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM  # noqa: E402
from train.data import DataArguments, DataError, check_data_arguments, prepare_data  # noqa: E402

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
EXIT_NONFINITE = 3  # exit status of a run stopped by a NaN/inf loss
# dense bf16 peak per device, TFLOP/s, for MFU; matched against torch.cuda.get_device_name(); --peak_tflops overrides
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


# ------------------------------------------------------------------------------------------------- arguments
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
        "On a NaN/inf loss, skip that optimizer step (zero grads, no update) and count it in the logs, instead "
        f"of stopping with exit status {EXIT_NONFINITE}.",
    )
    ddp_timeout: int = arg(1800, "Seconds a collective waits for the other processes before the run fails.")
    push_to_hub: bool = arg(False, "After the final save, push output_dir with hub.push.push_folder.")
    hub_model_id: str | None = arg(None, "Hub repo id (user/name) for --push_to_hub.")
    hub_private: bool = arg(False, "Create the Hub repo as private.")
    inject_nonfinite_at_step: int = arg(0, "For fault-injection tests: make the loss of optimizer step N NaN.")
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


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Command line over an optional --config file over the dataclass defaults; every problem reported at once."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, TrainArguments),
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Faults:") :],
    )
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
    if train.resume and train.resume != "latest" and not _is_checkpoint(Path(train.resume).expanduser()):
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


# ------------------------------------------------------------------------------------------------------ setup
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


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def configure_optimizer(model: torch.nn.Module, args: TrainArguments, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only; biases and norms are not decayed."""
    params = dict(model.named_parameters())  # tied weights appear once
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    assert len(decay) + len(no_decay) == len(params), "every parameter must land in exactly one group"
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")  # the fused kernel exists for both since torch 2.4
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), fused=fused)


def flops_per_token(config: MiniGPTConfig, num_params: int) -> float:
    """6N for the matmuls (forward + backward) plus attention's 12·L·C·T (PaLM appendix B)."""
    return 6 * num_params + 12 * config.n_layer * config.n_embd * config.n_positions


def setup(argv: list[str] | None = None) -> dict:
    """Parse arguments, then build everything fit() needs: accelerator, data, model, optimizer, resume state."""
    model_args, data_args, args = parse_args(argv)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    k = args.gradient_accumulation_steps
    accelerator = Accelerator(
        cpu=args.cpu or not _has_accelerator(),  # where there is none, cpu=True makes a multi-process launch gloo ranks
        mixed_precision=args.mixed_precision,
        # our windows are always k micro-batches, so accelerate syncs on its step count, never on the data's end
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=k, sync_with_dataloader=False),
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if args.compile else None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
    )
    # accelerate warns on every save that the tied lm_head is stored once; that is intended (the tie is declared)
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    out = Path(args.output_dir).expanduser().resolve()
    ckpt_root = out / "checkpoints"
    if accelerator.is_main_process:
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # read-only or full disk, a file in the way: say so before any data work
            raise SystemExit(
                f"pretrain: error: cannot create {ckpt_root}: {e}. Pass a writable --output_dir."
            ) from None
        for stale in [*ckpt_root.glob(".tmp-step-*"), *ckpt_root.glob(".old-step-*")]:
            print(f"Removing the incomplete checkpoint folder {stale} left by an interrupted save.")
            shutil.rmtree(stale, ignore_errors=True)
    earlier = latest_checkpoint(ckpt_root)
    if earlier is not None and not args.resume:
        if not args.overwrite_output_dir:
            raise SystemExit(
                f"pretrain: error: {ckpt_root} already holds checkpoints of an earlier run (latest: "
                f"{earlier.name}). Pass --resume latest to continue it, --overwrite_output_dir to delete "
                "them and start over, or another --output_dir."
            )
        if accelerator.is_main_process:
            print(f"--overwrite_output_dir: deleting the earlier run's checkpoints and log in {out}.")
            shutil.rmtree(ckpt_root)
            ckpt_root.mkdir()
            (out / "log.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    resume_from = None
    if args.resume == "latest":
        resume_from = latest_checkpoint(ckpt_root)
        if resume_from is None:
            accelerator.print(f"--resume latest: no checkpoint in {ckpt_root} yet, starting from scratch.")
    elif args.resume:
        resume_from = Path(args.resume).expanduser().resolve()

    set_seed(args.seed)
    with accelerator.local_main_process_first():  # the local main tokenizes and caches; the others load the cache
        try:
            data = prepare_data(data_args, log=accelerator.print)
        except DataError as e:
            raise SystemExit(f"pretrain: error: {e}") from None
    tokenizer = data.tokenizer
    config = build_config(model_args, data_args, vocab_size=len(tokenizer), tokenizer=tokenizer)
    model = MiniGPTForCausalLM(config)
    # sampling defaults travel with every checkpoint; transformers 5 refuses them in config.json
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        max_new_tokens=256,
        repetition_penalty=1.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    optimizer = configure_optimizer(model, args, accelerator.device)
    lr_at = partial(
        get_lr,
        max_lr=args.learning_rate,
        min_lr=args.min_learning_rate,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s) / args.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Neither prepare()d (accelerate would step it once per process under DDP) nor register_for_checkpointing()ed
    # (accelerate unpickles those with weights_only=False, so a doctored checkpoint could run code): its state is
    # plain numbers, kept in train_state.json.

    state = {"step": 0, "epoch": 0, "samples_in_epoch": 0, "skipped_steps": 0, "tokens_seen": 0}
    run_args = {"model": asdict(model_args), "data": asdict(data_args), "train": asdict(args)}
    if resume_from is not None:
        saved = json.loads((resume_from / "train_state.json").read_text())
        check_resume_compatible(saved["args"], run_args, resume_from)
        _check_state_files(resume_from)
        accelerator.load_state(str(resume_from))
        scheduler.load_state_dict(saved["scheduler"])
        accelerator.step = 0  # windows start at a boundary, whatever the old run's accumulation steps were
        state.update(saved["state"])
        accelerator.print(
            f"Resumed from {resume_from} at step {state['step']} (epoch {state['epoch']}, "
            f"{state['samples_in_epoch']} blocks into it)."
        )
    return dict(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=data,
        tokenizer=tokenizer,
        args=args,
        model_args=model_args,
        data_args=data_args,
        run_args=run_args,
        state=state,
        out=out,
        ckpt_root=ckpt_root,
        resumed=resume_from is not None,
    )


def check_resume_compatible(saved: dict, now: dict, path: Path) -> None:
    """The model and data must match the checkpoint's; training knobs (max_steps, LR, ...) may change."""
    changed = [
        f"{group}.{k}: {saved[group].get(k)!r} -> {v!r}"
        for group in ("model", "data")
        for k, v in now[group].items()
        if k not in ("data_cache_dir", "num_proc") and saved[group].get(k) != v
    ]
    if changed:
        raise SystemExit(
            f"pretrain: error: cannot resume from {path}: the model or data arguments differ from the "
            f"checkpoint's ({'; '.join(changed)}). Pass the same values, or start a new --output_dir."
        )


# --------------------------------------------------------------------------------------------------- the loop
def collate(dataset, indices: list[int]) -> dict:
    """Rows `indices` of the packed dataset as a batch; labels are the inputs (the model shifts them)."""
    input_ids = torch.as_tensor(dataset[indices]["input_ids"], dtype=torch.long)  # (B, T)
    return {"input_ids": input_ids, "labels": input_ids.clone(), "block_ids": torch.as_tensor(indices)}


def epoch_loader(accelerator: Accelerator, dataset, epoch: int, seed: int, batch_size: int, blocks_per_epoch: int):
    """This epoch's order, a fixed-seed permutation cut to whole optimizer steps, sharded across processes.

    The cut means no process ever receives a duplicated or padded batch. The loader has its own generator so that
    creating it does not draw from the global RNG (dropout stays identical across a resume).
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))[:blocks_per_epoch]
    loader = DataLoader(
        order.tolist(), batch_size=batch_size, collate_fn=partial(collate, dataset), generator=torch.Generator()
    )
    return accelerator.prepare_data_loader(loader)


def step_batches(accelerator, train, state: dict, args, steps_per_epoch: int, blocks_per_step: int):
    """Yield each optimizer step's k micro-batches, epoch after epoch, from the saved data position on."""
    k = args.gradient_accumulation_steps
    while True:
        start = state["samples_in_epoch"] // blocks_per_step  # optimizer steps already taken in this epoch
        loader = epoch_loader(
            accelerator, train, state["epoch"], args.seed, args.batch_size, steps_per_epoch * blocks_per_step
        )
        if start:
            loader = accelerator.skip_first_batches(loader, start * k)  # resume mid-epoch: no batch replayed
        it = iter(loader)
        for _ in range(start, steps_per_epoch):
            yield [next(it) for _ in range(k)]
        state["epoch"] += 1
        state["samples_in_epoch"] = 0


def fit(run: dict) -> str:
    """Train until max_steps, stop_at_step or a signal. Returns "done" or "stopped"."""
    accelerator, model, optimizer, scheduler = run["accelerator"], run["model"], run["optimizer"], run["scheduler"]
    args, state, data = run["args"], run["state"], run["data"]
    k, world = args.gradient_accumulation_steps, accelerator.num_processes
    train = data.train.with_format("numpy")
    blocks_per_step = args.batch_size * k * world
    steps_per_epoch = len(train) // blocks_per_step
    if steps_per_epoch == 0:
        raise SystemExit(
            f"pretrain: error: the training split has {len(train)} blocks, fewer than one optimizer step "
            f"needs (batch_size {args.batch_size} x accumulation {k} x processes {world} = "
            f"{blocks_per_step}). Lower --batch_size or --gradient_accumulation_steps, or add data."
        )
    block_size = run["data_args"].block_size
    tokens_per_step = blocks_per_step * block_size
    unwrapped = accelerator.unwrap_model(model)
    num_params = sum(p.numel() for p in unwrapped.parameters())
    pos_params = sum(p.numel() for n, p in unwrapped.named_parameters() if "embed_positions" in n)
    fpt = flops_per_token(unwrapped.config, num_params - pos_params)
    peak = args.peak_tflops or _lookup_peak(accelerator.device)
    info = data.info
    print0 = accelerator.print
    print0(
        f"model: {num_params / 1e6:.2f}M parameters, n_layer={unwrapped.config.n_layer} "
        f"n_embd={unwrapped.config.n_embd} n_head={unwrapped.config.n_head} vocab={unwrapped.config.vocab_size} "
        f"positions={unwrapped.config.position_embedding_type}, {fpt / 1e6:.1f} MFLOP/token"
    )
    print0(
        f"data: {len(train):,} train blocks ({info['tokens']['train']:,} tokens), {len(data.validation):,} "
        f"validation blocks of {block_size} tokens; tokenizer vocabulary {len(run['tokenizer'])}; "
        f"validation unigram perplexity {info['unigram_perplexity_validation']:.1f} (the bar to beat)"
    )
    print0(
        f"batch: {args.batch_size} sequences x {block_size} tokens x {k} accumulation x {world} processes = "
        f"{tokens_per_step:,} tokens per step; {steps_per_epoch} steps per epoch"
    )
    print0(
        f"schedule: {args.max_steps} steps = {args.max_steps * tokens_per_step / 1e6:.2f}M tokens "
        f"({args.max_steps / steps_per_epoch:.2f} epochs, {args.max_steps * tokens_per_step / num_params:.1f} "
        f"tokens/parameter); warmup {args.warmup_steps}, cosine {args.learning_rate:g} -> {args.min_learning_rate:g}"
        f"; device {accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )

    if accelerator.is_main_process:  # a fresh run starts a fresh log; a resumed one drops the crashed run's tail
        _truncate_log(run["out"] / "log.jsonl", state["step"] if run["resumed"] else -1)
    if args.report_to != "none":
        accelerator.init_trackers(
            "tensorboard",
            config={
                k_: v if isinstance(v, (int, float, str, bool)) else str(v)
                for g in run["run_args"].values()
                for k_, v in g.items()
            },
        )
    stop = _install_signal_handlers()
    from tqdm.auto import tqdm

    bar = tqdm(
        total=args.max_steps,
        initial=state["step"],
        disable=not accelerator.is_local_main_process,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    consumed: list[int] = []
    if state["step"] == 0 and args.eval_every:
        evaluate_and_log(run, bar)
    status, last_saved = "done", None
    batches = step_batches(accelerator, train, state, args, steps_per_epoch, blocks_per_step)
    train_time, steps_since = 0.0, 0
    run["train_time"], run["steps_run"] = 0.0, 0
    try:
        while state["step"] < args.max_steps:
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            micro_batches = next(batches)
            if args.debug_rank_dumps:
                consumed += [i for b in micro_batches for i in b["block_ids"].tolist()]
            inject = args.inject_nonfinite_at_step == state["step"] + 1
            loss_sum = training_step(accelerator, model, micro_batches, inject_nan=inject)
            # one all-reduce per step: the step's mean loss over every rank, and whether any rank got a signal
            flag = torch.tensor(float(stop["signal"] is not None), device=loss_sum.device)
            loss, stop_votes = accelerator.reduce(torch.stack([loss_sum, flag]), "sum").tolist()
            grad_norm = float("nan")
            if math.isfinite(loss) and args.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
            # a finite loss can still give inf/nan gradients; fp16's GradScaler skips those steps by itself,
            # elsewhere the update would poison the weights (and the next checkpoint)
            bad_grads = args.max_grad_norm > 0 and not math.isfinite(grad_norm) and accelerator.scaler is None
            if not math.isfinite(loss) or bad_grads:
                if not args.skip_nonfinite:
                    what = (
                        f"the loss became {loss}"
                        if not math.isfinite(loss)
                        else f"the gradient norm became {grad_norm}"
                    )
                    raise NonFiniteLoss(state["step"] + 1, what, latest_checkpoint(run["ckpt_root"]))
                optimizer.zero_grad(set_to_none=True)  # skip: no update from this step's gradients
                state["skipped_steps"] += 1
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            state["samples_in_epoch"] += blocks_per_step
            state["tokens_seen"] += tokens_per_step
            train_time, steps_since = train_time + time.perf_counter() - t0, steps_since + 1
            run["train_time"] += time.perf_counter() - t0
            run["steps_run"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)

            step = state["step"]
            if step % args.log_every == 0 or step == args.max_steps:
                tok_s = steps_since * tokens_per_step / train_time  # training time only: no eval, no saving
                record = {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tok_s,
                    "tokens_seen": state["tokens_seen"],
                    "skipped_steps": state["skipped_steps"],
                }
                if peak:
                    record["mfu"] = fpt * tok_s / (peak * 1e12 * world)
                log_metrics(run, record, bar)
                train_time, steps_since = 0.0, 0
            if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
                evaluate_and_log(run, bar)
            signalled = stop_votes > 0
            if signalled or step == args.stop_at_step or (args.save_every and step % args.save_every == 0):
                last_saved = save_checkpoint(run) or last_saved
            if signalled or step == args.stop_at_step:
                why = (
                    f"signal {signal.Signals(stop['signal']).name}"
                    if stop["signal"]
                    else "a signal to another process"
                    if signalled
                    else f"--stop_at_step {args.stop_at_step}"
                )
                print0(f"Stopped at step {step} on {why}; last checkpoint {last_saved}. Continue with --resume latest.")
                status = "stopped"
                break
    finally:
        bar.close()
        _restore_signal_handlers(stop)
    if status == "done":
        run["final_eval"] = evaluate_and_log(run, None)
        if last_saved is None or last_saved.name != f"step-{state['step']}":
            last_saved = save_checkpoint(run)
        if last_saved is None:
            raise SystemExit(
                f"pretrain: error: the final checkpoint could not be saved in {run['ckpt_root']} (see the error above)."
            )
    if args.debug_rank_dumps:
        _dump_rank(run, consumed)
    return status


def training_step(accelerator: Accelerator, model, micro_batches: list[dict], inject_nan: bool = False) -> torch.Tensor:
    """Forward/backward over one optimizer step's micro-batches; returns this rank's share of the mean loss.

    The loss is normalised by the number of target tokens of the whole step, across micro-batches and processes
    (transformers' num_items_in_batch), so accumulating k micro-batches equals one batch k times larger.
    """
    local = sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches)  # targets: every label after the first
    num_items = accelerator.reduce(local, "sum")
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes
    loss_sum = torch.zeros((), device=accelerator.device)
    model.train()
    for batch in micro_batches:
        with accelerator.accumulate(model):
            out = model(
                input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False, num_items_in_batch=num_items
            )
            loss = out.loss  # sum of this micro-batch's token losses / num_items
            if inject_nan:
                loss = loss * float("nan")
            # accelerate divides by k and DDP averages over processes: undo both, the sum is already normalised
            accelerator.backward(loss * scale)
            loss_sum += loss.detach().float()
    assert accelerator.sync_gradients, "the accumulation window and accelerate's step count disagree"
    return loss_sum


class NonFiniteLoss(SystemExit):
    """Exit status EXIT_NONFINITE; main() prints `message` (what went non-finite, where the last good state is)."""

    def __init__(self, step: int, what: str, last_good: Path | None):
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
        super().__init__(EXIT_NONFINITE)
        self.message = (
            f"pretrain: error: {what} at step {step}; stopping. {where}. Resume with "
            "--resume latest and a lower --learning_rate, or pass --skip_nonfinite to skip such steps."
        )


@torch.no_grad()
def validate(accelerator: Accelerator, model, dataset, batch_size: int, max_batches: int = 0) -> dict:
    """Validation loss and perplexity through the project's `evaluate` perplexity module (main process)."""
    import evaluate

    from train.metrics import metric_path

    model.eval()
    ds = dataset.with_format("numpy")
    loader = accelerator.prepare_data_loader(
        DataLoader(
            list(range(len(ds))), batch_size=batch_size, collate_fn=partial(collate, ds), generator=torch.Generator()
        )
    )
    rows = []
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V)
        targets = batch["labels"][:, 1:]  # (B, T-1): each position predicts the next token
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100, reduction="none")
        per_row = torch.stack([nll.sum(1), (targets != -100).sum(1).float()], dim=1)  # (B, 2)
        # one row per sequence, so that gather_for_metrics can drop the ones repeated to even out the last batch
        rows.append(accelerator.gather_for_metrics(per_row))  # (P*B, 2)
    model.train()
    rows = torch.cat(rows).cpu()
    if not accelerator.is_main_process:
        return {}
    metric = evaluate.load(metric_path("perplexity"), keep_in_memory=True)
    result = metric.compute(nll=rows[:, 0].tolist(), num_tokens=rows[:, 1].long().tolist())
    return {"val_loss": result["loss"], "val_perplexity": result["perplexity"]}


def evaluate_and_log(run: dict, bar) -> dict:
    a = run["args"]
    metrics = validate(run["accelerator"], run["model"], run["data"].validation, a.batch_size, a.eval_batches)
    if metrics:
        log_metrics(run, {"step": run["state"]["step"], **metrics}, bar)
    return metrics


def log_metrics(run: dict, record: dict, bar) -> None:
    """One line to the console, log.jsonl and the trackers; main process only."""
    accelerator = run["accelerator"]
    if run["args"].report_to != "none":
        try:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        except OSError as e:  # tensorboard's writer thread died (disk full) and re-raises on every call after
            print(
                f"pretrain: warning: the {run['args'].report_to} tracker failed ({e}); training goes on without "
                "it, log.jsonl keeps the record.",
                file=sys.stderr,
            )
            accelerator.trackers.clear()  # also keeps end_training() from flushing the dead writer
    if not accelerator.is_main_process:
        return
    path, line = run["out"] / "log.jsonl", (json.dumps(record) + "\n").encode()
    try:
        with open(path, "ab", buffering=0) as f:  # unbuffered: a failed write is undone here, not retried at close
            size = f.seek(0, os.SEEK_END)
            try:
                if f.write(line) != len(line):
                    raise OSError(f"wrote only part of a {len(line)}-byte line")
            except OSError:
                f.truncate(size)  # never leave half a line: resume and the loss plot parse every line
                raise
        run["log_failing"] = False
    except OSError as e:  # a full disk must not kill the run: checkpoint saves report their failures and retry
        if not run.get("log_failing"):
            print(
                f"pretrain: warning: could not append to {path}: {e}. Training goes on; log lines are missing "
                "until a write succeeds again.",
                file=sys.stderr,
            )
        run["log_failing"] = True
    parts = [f"step {record['step']}"] + [_fmt(k, v) for k, v in record.items() if k not in ("step", "tokens_seen")]
    (bar.write if bar is not None else print)(" | ".join(parts))


def _fmt(key: str, value) -> str:
    if key == "tokens_per_s":
        return f"{value:,.0f} tok/s"
    if key == "mfu":
        return f"mfu {100 * value:.1f}%"
    if key == "lr":
        return f"lr {value:.2e}"
    return f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"


# ------------------------------------------------------------------------------------------------ checkpoints
def _check_state_files(folder: Path) -> None:
    """Refuse, naming the file, a checkpoint whose state would run code or fail deep inside accelerate's load_state.

    accelerate unpickles optimizer.bin and random_states_*.pkl with weights_only=True (tensors, numbers and its
    allow-list of numpy types), but custom_checkpoint_*.pkl with weights_only=False, and it skips an unreadable RNG
    state without a word (the resume would silently not be exact). Every pickle is read once more here.
    """
    from accelerate.utils import load
    from safetensors import safe_open

    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            if path.name.startswith("custom_checkpoint_"):
                raise ValueError(
                    "this script writes no such file; accelerate would unpickle it with weights_only=False"
                )
            if path.suffix in (".bin", ".pkl", ".pt", ".pth"):
                load(path, map_location="cpu")  # weights_only=True
            elif path.suffix == ".safetensors":
                with safe_open(path, "pt"):  # reads and checks the header against the file size
                    pass
        except Exception as e:  # noqa: BLE001 (UnpicklingError, RuntimeError, OSError, SafetensorError, ...)
            lines = str(e).strip().splitlines() or [type(e).__name__]
            reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0]).split(". Please")[0]
            raise SystemExit(
                f"pretrain: error: cannot resume from {folder}: {path.name} is not an intact, safe state file "
                f"({reason.strip()}). Resume from another checkpoint (--resume <output_dir>/checkpoints/step-N), or "
                "copy this one again."
            ) from None


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "train_state.json").is_file()


def latest_checkpoint(root: Path) -> Path | None:
    """The highest complete step-N folder; temporary folders never match the pattern."""
    steps = [
        (int(m.group(1)), p)
        for p in root.glob("step-*")
        if (m := re.fullmatch(r"step-(\d+)", p.name)) and _is_checkpoint(p)
    ]
    return max(steps)[1] if steps else None


def save_checkpoint(run: dict) -> Path | None:
    """Write the full training state to checkpoints/.tmp-step-N, then rename it to step-N; keep the last K.

    Every process calls this (each saves its RNG state). On an OSError (disk full, read-only folder) the error is
    printed, the partial folder removed, earlier checkpoints left alone, and None returned: training goes on.
    """
    accelerator, root, step = run["accelerator"], run["ckpt_root"], run["state"]["step"]
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    main = accelerator.is_main_process
    error = None
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if main:
            _write_loadable_files(run, tmp)
            (tmp / "train_state.json").write_text(
                json.dumps(
                    {"state": run["state"], "args": run["run_args"], "scheduler": run["scheduler"].state_dict()},
                    indent=1,
                )
            )
    # a full disk is a RuntimeError from torch.save's C++ writer and a SafetensorError (no OSError) from safetensors
    except (OSError, RuntimeError, SafetensorError) as e:
        error = e
        print(f"[rank {accelerator.process_index}] checkpoint save to {tmp} failed: {e}", file=sys.stderr)
    # all processes agree on the outcome, so that no rank renames a checkpoint that another failed to write
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum").item() > 0
    if main and not failed:
        try:
            if run["args"].debug_save_delay:
                time.sleep(run["args"].debug_save_delay)
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
        _prune(root, run["args"].keep_last)
    accelerator.wait_for_everyone()
    return None if failed else final


def _write_loadable_files(run: dict, folder: Path) -> None:
    """Config with auto_map, the modeling code, generation config and tokenizer: the folder loads with AutoModel."""
    from transformers.dynamic_module_utils import custom_object_save

    model = run["accelerator"].unwrap_model(run["model"])
    custom_object_save(model, folder, config=model.config)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    run["tokenizer"].save_pretrained(folder)


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


def save_final(run: dict) -> None:
    """save_pretrained of the unwrapped model + tokenizer + generation config into output_dir, then the loss PNG."""
    accelerator, out = run["accelerator"], run["out"]
    state_dict = accelerator.get_state_dict(run["model"])  # every process takes part (FSDP gathers here)
    if accelerator.is_main_process:
        try:
            accelerator.unwrap_model(run["model"]).save_pretrained(
                out, state_dict=state_dict, save_function=accelerator.save
            )
            run["tokenizer"].save_pretrained(out)
            plot_losses(out / "log.jsonl", out / "loss.png")
        except (OSError, RuntimeError, SafetensorError) as e:  # a full disk is any of the three (see save_checkpoint)
            raise SystemExit(
                f"pretrain: error: could not write the final model to {out}: {e}. The last checkpoint "
                f"in {run['ckpt_root']} is intact; free space or fix permissions, then --resume latest."
            )
        accelerator.print(f"Saved the final model, tokenizer and generation config to {out}.")
    accelerator.wait_for_everyone()


def plot_losses(log_path: Path, png_path: Path) -> None:
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


def push(run: dict) -> None:
    """Publish the final model (not the checkpoints) through the project's Hub code."""
    from hub.push import push_folder  # imported here: only --push_to_hub needs the Hub client code

    a, accelerator = run["args"], run["accelerator"]
    if accelerator.is_main_process:
        try:
            url = push_folder(
                run["out"],
                a.hub_model_id,
                private=a.hub_private,
                commit_message=f"MiniGPT pretrained for {run['state']['step']} steps",
            )
        except (PermissionError, ValueError, OSError) as e:
            raise SystemExit(
                f"pretrain: error: the push to {a.hub_model_id} failed: {e} The model is saved in "
                f"{run['out']}; push it later with hub.push.push_folder."
            ) from None
        print(f"Pushed {run['out']} to {url}.")
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------- helpers
def _install_signal_handlers() -> dict:
    """SIGTERM/SIGINT set a flag that the loop reads after the current optimizer step; a second SIGINT aborts."""
    stop = {"signal": None, "previous": {}}

    def handler(signum, frame):
        if signum == signal.SIGINT and stop["signal"] is not None:
            raise KeyboardInterrupt
        if stop["signal"] is None:
            stop["signal"] = signum
            print(
                f"\nReceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                "(press Ctrl-C again to abort without saving).",
                file=sys.stderr,
                flush=True,
            )

    for sig in (signal.SIGTERM, signal.SIGINT):
        stop["previous"][sig] = signal.signal(sig, handler)
    return stop


def _restore_signal_handlers(stop: dict) -> None:
    for sig, previous in stop["previous"].items():
        signal.signal(sig, previous)


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def _lookup_peak(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_TFLOPS.items() if key in name), 0.0)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records past `step` (on resume: the crashed run's tail), so that curves don't repeat."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def _dump_rank(run: dict, consumed: list[int]) -> None:
    import hashlib

    accelerator = run["accelerator"]
    model = accelerator.unwrap_model(run["model"])
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode() + p.detach().cpu().float().numpy().tobytes())
    folder = run["out"] / "debug"
    folder.mkdir(parents=True, exist_ok=True)
    dump = {"rank": accelerator.process_index, "blocks": consumed, "weights_sha256": digest.hexdigest()}
    (folder / f"rank{accelerator.process_index}.json").write_text(json.dumps(dump))


def main(argv: list[str] | None = None) -> dict:
    """Run pretraining; returns the final metrics. Exits 0 when stopped by a signal, 3 on a NaN/inf loss."""
    start = time.perf_counter()
    run = setup(argv)
    try:
        status = fit(run)
    except NonFiniteLoss as e:
        print(e.message, file=sys.stderr)
        run["accelerator"].end_training()
        raise
    if status == "done":
        save_final(run)
        if run["args"].push_to_hub:
            push(run)
    else:
        if run["accelerator"].is_main_process:
            try:
                plot_losses(run["out"] / "log.jsonl", run["out"] / "loss.png")
            except OSError as e:  # the checkpoint is what matters here; a full disk must not turn exit 0 into a crash
                print(f"pretrain: warning: could not write {run['out'] / 'loss.png'}: {e}", file=sys.stderr)
    run["accelerator"].end_training()
    a = run["args"]
    tokens = (
        run["steps_run"]
        * a.batch_size
        * a.gradient_accumulation_steps
        * run["accelerator"].num_processes
        * (run["data_args"].block_size)
    )
    return {
        "status": status,
        "step": run["state"]["step"],
        "output_dir": str(run["out"]),
        "wall_time_s": time.perf_counter() - start,
        "train_time_s": run["train_time"],
        "tokens_per_s": tokens / max(run["train_time"], 1e-9),
        **run.get("final_eval", {}),
    }


if __name__ == "__main__":
    main()
