"""Pretrain MiniGPT from scratch on local text with Accelerate: one script from a laptop CPU to many GPU nodes.

    minigpt-pretrain --config tiny                                   # CPU demo preset, built-in Shakespeare corpus
    minigpt-pretrain --data my_texts/ --output_dir runs/mine --max_steps 2000     # = python -m minigpt.train.pretrain
    minigpt-pretrain --resume runs/mine [--max_steps 4000]           # continue, with the saved arguments
    accelerate launch --config_file minigpt/train/configs/accelerate/multi_gpu.yaml -m minigpt.train.pretrain ...

Arguments come from the command line, from a YAML/JSON file (`--config FILE`, or a preset name from
minigpt/train/configs/presets/), or both: the command line wins. Reading order: setup() (arguments, accelerator, data,
model, optimizer, resume, and the derived numbers, printed), fit() (the loop), take_step() (one optimizer step),
validate(), then the final save and push. The arguments live in minigpt/train/args.py, the checkpoint folders in
minigpt/train/checkpoints.py, and the log, loss plot and MFU in minigpt/train/monitoring.py.

Output folder layout:
    <output_dir>/config.json, model.safetensors, tokenizer*, generation_config.json   (the final model)
    <output_dir>/checkpoints/step-<N>/   full training state (accelerate save_state; under FSDP on CPU ranks also
                                         fsdp/, the sharded model and AdamW) + model, tokenizer and config
    <output_dir>/log.jsonl, loss.png, tensorboard/

Faults: SIGTERM/SIGINT finish the current optimizer step, save a checkpoint and exit 0; checkpoints are written
to `.tmp-step-<N>` and renamed when complete; a failed save is reported and retried at the next save; a NaN/inf
loss or gradient norm stops the run (exit 3) unless --skip_nonfinite; weights or optimizer state found NaN/inf before
a checkpoint is written stop it (exit 3) always, so no checkpoint holds them.
"""

import contextlib
import json
import logging
import math
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, TorchDynamoPlugin, set_seed
from safetensors import SafetensorError
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader
from transformers import GenerationConfig

from minigpt.commands import command
from minigpt.train.args import (
    EXIT_NONFINITE,
    NOT_RESUMED,
    DebugHooks,
    TrainArguments,
    adapt_recipe,
    build_config,
    parse_args,
)
from minigpt.train.checkpoints import (
    check_state_files,
    install_signal_handlers,
    latest_checkpoint,
    prepare_checkpoint_root,
    restore_signal_handlers,
    save_checkpoint,
    write_model_code,
)
from minigpt.train.data import DataError, PreparedData, prepare_data
from minigpt.train.monitoring import (
    RunLog,
    count_params,
    describe_hardware,
    dump_rank,
    flops_per_token,
    lookup_peak_tflops,
    mfu,
    plot_losses,
)
from minigpt.train.sharding import (
    SHARDED_DIR,
    check_deepspeed_request,
    choose_sharding,
    full_state_dict,
    full_value,
    load_sharded,
    local,
    local_share,
    save_full_model,
    save_sharded,
    shard,
)
from minigpt.train.threads import set_threads
from minigpt.train.tokenizer import special_token_ids
from modeling_minigpt import MiniGPTForCausalLM


# ------------------------------------------------------------------------------------------------------ setup
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


@dataclass
class LoopState:
    """Where the loop stands; every checkpoint's train_state.json holds it and a resume starts from it. `step` is the
    one step counter: the learning rate, logging, evaluation, saving and stopping all read it."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    samples_in_epoch: int = 0  # blocks of this epoch already trained on, all processes together
    skipped_steps: int = 0  # non-finite steps skipped under --skip_nonfinite
    tokens_seen: int = 0


@dataclass
class Run:
    """What setup() builds for fit(): the prepared objects, the arguments and the numbers derived from them."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: PreparedData
    args: TrainArguments
    sharding: str  # "none" (DDP or one process), "torch-fsdp2" (CPU ranks) or "accelerate-fsdp"; see train/sharding.py
    saved_args: dict  # {"model": ..., "data": ..., "train": ...}, as every checkpoint records them
    out: Path
    ckpt_root: Path
    state: LoopState
    log: RunLog
    debug: DebugHooks
    blocks_per_step: int  # sequences per optimizer step, all processes together
    tokens_per_step: int
    steps_per_epoch: int
    flops_per_token: float  # at the trained sequence length (--block_size), for MFU
    peak_tflops: float  # of one device; 0 = unknown, no MFU


def setup(argv: list[str] | None = None) -> Run:
    """Parse arguments, then build everything fit() needs: accelerator, data, model, optimizer, resume state and the
    derived numbers, which it prints before the first step."""
    help_text = dict(description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("Faults:") :])
    model_args, data_args, args = parse_args(argv, **help_text)
    recipe_note = adapt_recipe(model_args, args)  # before saved_args: a resume derives the same schedule
    saved_args = {"model": asdict(model_args), "data": asdict(data_args), "train": asdict(args)}
    resume_notes = check_resume(Path(args.resume), saved_args) if args.resume else []  # before any data work
    debug = DebugHooks.from_env()
    on_cpu = args.cpu or not _has_accelerator()
    threads = set_threads(args.cpu_threads, on_cpu=on_cpu)  # the choice finetune, evaluation and generate make
    check_deepspeed_request(on_cpu)
    accelerator = Accelerator(
        cpu=on_cpu,  # where there is no accelerator, cpu=True makes a multi-process launch gloo ranks
        mixed_precision=args.mixed_precision,
        # accelerate's own accumulation stays at 1 (its step counter never decides a sync): training_step() owns the
        # window of --gradient_accumulation_steps micro-batches
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if args.compile else None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
    )
    # accelerate warns on every save that the tied lm_head is stored once; that is intended (the tie is declared)
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    out = Path(args.output_dir).expanduser().resolve()
    ckpt_root, resume_from = prepare_checkpoint_root(accelerator, out, args.resume, args.overwrite_output_dir)

    accelerator.print(f"threads: {threads} intra-op CPU thread(s) per process (--threads)")
    for note in [recipe_note, *resume_notes, warmup_warning(args)]:
        if note:
            accelerator.print(note)
    set_seed(args.seed)
    with accelerator.local_main_process_first():  # the local main tokenizes and caches; the others load the cache
        try:
            data = prepare_data(data_args, log=accelerator.print)
        except DataError as e:
            raise SystemExit(f"pretrain: error: {e}") from None
    config = build_config(model_args, data_args, vocab_size=len(data.tokenizer), tokenizer=data.tokenizer)
    model = MiniGPTForCausalLM(config)
    # sampling defaults travel with every checkpoint; transformers 5 refuses them in config.json
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        max_new_tokens=256,
        repetition_penalty=1.1,
        use_cache=True,  # transformers' export recipes (torch.export, ExecuTorch) refuse a checkpoint without it
        **special_token_ids(data.tokenizer),
    )
    sharding = choose_sharding(accelerator, args.fsdp, accelerator.mixed_precision, args.compile)
    if sharding == "torch-fsdp2":  # accelerate would wrap the model in DDP: shard it here, and prepare nothing of it
        shard(model)
        optimizer = configure_optimizer(model, args, accelerator.device)  # over the sharded parameters
        held, total = local_share(model)
        print(f"fsdp: rank {accelerator.process_index} holds {held:,} of {total:,} parameters ({held / total:.1%}) "
              "and their gradients and AdamW state", flush=True)  # fmt: skip
    else:
        optimizer = configure_optimizer(model, args, accelerator.device)
        model, optimizer = accelerator.prepare(model, optimizer)

    state = LoopState()
    if resume_from is not None:
        check_resume_sharding(resume_from, sharding)
        saved = json.loads((resume_from / "train_state.json").read_text())
        accelerator.load_state(str(resume_from))  # the RNG states; the model and AdamW too unless torch-fsdp2
        if sharding == "torch-fsdp2":
            load_sharded(model, optimizer, resume_from / SHARDED_DIR)
        state = LoopState(**saved["state"])  # the LR is get_lr(step): an older file's "scheduler" entry goes unread

    blocks_per_step = args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    if len(data.train) < blocks_per_step:
        raise SystemExit(
            f"pretrain: error: the training split has {len(data.train)} blocks, fewer than one optimizer step "
            f"needs (batch_size {args.batch_size} x accumulation {args.gradient_accumulation_steps} x processes "
            f"{accelerator.num_processes} = {blocks_per_step}). Lower --batch_size or --gradient_accumulation_steps, "
            "or add data."
        )
    if resume_from is not None:
        blocks_per_epoch = len(data.train) // blocks_per_step * blocks_per_step
        accelerator.print(
            f"Resumed from {resume_from} at step {state.step} of {args.max_steps}: epoch {state.epoch + 1} continues "
            f"after {state.samples_in_epoch:,} of its {blocks_per_epoch:,} blocks."
        )
        if state.step >= args.max_steps:
            accelerator.print(
                f"resume: the checkpoint has all {args.max_steps} steps already; nothing is trained, the final model "
                "is evaluated and saved again. Raise --max_steps to train longer."
            )
    n_params = count_params(accelerator.unwrap_model(model))
    run = Run(
        accelerator, model, optimizer, data, args, sharding, saved_args, out, ckpt_root, state,
        log=RunLog(accelerator, out, args.report_to),
        debug=debug,
        blocks_per_step=blocks_per_step,
        tokens_per_step=blocks_per_step * data_args.block_size,
        steps_per_epoch=len(data.train) // blocks_per_step,
        flops_per_token=flops_per_token(n_params, config.n_layer, config.n_embd, data_args.block_size),
        peak_tflops=args.peak_tflops or lookup_peak_tflops(accelerator.device)[0],
    )  # fmt: skip
    print_summary(run, data_args.block_size)
    return run


# get_lr's arguments, by their TrainArguments names
SCHEDULE = {"learning_rate": "max_lr", "min_learning_rate": "min_lr", "warmup_steps": "warmup_steps",
            "max_steps": "max_steps"}  # fmt: skip


def check_resume(checkpoint: Path, now: dict) -> list[str]:
    """Refuse a resume that cannot continue `checkpoint` (model or data changed, a damaged state file), before any
    data work; return the lines to print: each argument the command line overrides, and a schedule change."""
    saved = json.loads((checkpoint / "train_state.json").read_text())
    check_resume_compatible(saved["args"], now, checkpoint)
    check_state_files(checkpoint)
    step, before, after = saved["state"]["step"], saved["args"]["train"], now["train"]

    def same(k: str) -> bool:  # an output_dir saved relative to where that run started counts as the same folder
        return before[k] == after[k] or (k == "output_dir" and Path(before[k]).resolve() == Path(after[k]).resolve())

    notes = [
        f"resume: --{k} {after[k]} overrides the checkpoint's {before[k]}"
        for k in after
        if k in before and k not in NOT_RESUMED and not same(k)
    ]
    changed = [k for k in SCHEDULE if k in before and not same(k)]
    if changed:
        lr_then = get_lr(step, **{SCHEDULE[k]: before.get(k, after[k]) for k in SCHEDULE})
        lr_now = get_lr(step, **{SCHEDULE[k]: after[k] for k in SCHEDULE})
        notes.append(
            f"schedule: changed on resume ({', '.join(f'{k} {before[k]} -> {after[k]}' for k in changed)}): the "
            f"learning rate of step {step + 1} is {lr_now:.3g}, where the checkpoint's schedule had {lr_then:.3g}"
        )
    return notes


def check_resume_sharding(checkpoint: Path, sharding: str) -> None:
    """A checkpoint of a torch-FSDP2 run holds its training state in fsdp/, one of any other run in optimizer.bin:
    resuming one kind as the other would lose AdamW's state, so it is refused."""
    sharded = (checkpoint / SHARDED_DIR).is_dir()
    if sharded != (sharding == "torch-fsdp2"):
        saved_as, now = ("FSDP on CPU ranks", "without it") if sharded else ("without FSDP", "with FSDP on CPU ranks")
        raise SystemExit(
            f"pretrain: error: cannot resume from {checkpoint}: it was saved {saved_as}, and this launch runs {now}. "
            "Launch as the checkpoint's run was (the same --fsdp or accelerate config and number of processes)."
        )


def warmup_warning(args: TrainArguments) -> str | None:
    """A line to print where the warmup covers the whole run: the LR then only rises, and never decays."""
    if args.warmup_steps < args.max_steps:
        return None
    last_lr = get_lr(args.max_steps - 1, args.learning_rate, args.min_learning_rate, args.warmup_steps, args.max_steps)
    return (
        f"warning: --warmup_steps {args.warmup_steps} >= --max_steps {args.max_steps}: the learning rate rises the "
        f"whole run, to {last_lr:.3g} at the last step, and never reaches --learning_rate {args.learning_rate:g} or "
        "decays. Lower --warmup_steps or raise --max_steps."
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


def print_summary(run: Run, block_size: int) -> None:
    """Every derived number, before the first step: model and FLOPs, data, batch, schedule, device."""
    a, info, print0 = run.args, run.data.info, run.accelerator.print
    model = run.accelerator.unwrap_model(run.model)
    config, num_params = model.config, sum(p.numel() for p in model.parameters())
    k, world = a.gradient_accumulation_steps, run.accelerator.num_processes
    total_tokens, n_val = a.max_steps * run.tokens_per_step, len(run.data.validation)
    sampled = min(n_val, a.eval_batches * a.batch_size * world) if a.eval_batches else n_val
    peak = f"MFU against {run.peak_tflops:g} TFLOP/s per device" if run.peak_tflops else "no MFU (--peak_tflops)"
    print0(
        f"model: {num_params / 1e6:.2f}M parameters, n_layer={config.n_layer} n_embd={config.n_embd} "
        f"n_head={config.n_head} vocab={config.vocab_size} positions={config.position_embedding_type}, "
        f"{run.flops_per_token / 1e6:.1f} MFLOP/token at {block_size} tokens; {peak}"
    )
    print0(
        f"data: {len(run.data.train):,} train blocks ({info['tokens']['train']:,} tokens), {n_val:,} "
        f"validation blocks of {block_size} tokens; tokenizer vocabulary {len(run.data.tokenizer)}; "
        f"validation unigram perplexity {info['unigram_perplexity_validation']:.1f} (the bar to beat)"
    )
    print0(
        f"batch: {a.batch_size} sequences x {block_size} tokens x {k} accumulation x {world} processes = "
        f"{run.tokens_per_step:,} tokens per step; {run.steps_per_epoch} steps per epoch"
    )
    print0(
        f"schedule: {a.max_steps} steps = {total_tokens / 1e6:.2f}M tokens ({a.max_steps / run.steps_per_epoch:.2f} "
        f"epochs, {total_tokens / num_params:.1f} tokens/parameter); warmup {a.warmup_steps}, cosine "
        f"{a.learning_rate:g} -> {a.min_learning_rate:g}; evaluation every {a.eval_every or a.max_steps} steps on the "
        f"first {sampled} of the {n_val} validation blocks, the final one on all; device {run.accelerator.device}, "
        f"mixed precision {run.accelerator.mixed_precision}, sharding {run.sharding}"
    )


# --------------------------------------------------------------------------------------------------- the loop
def fit(run: Run) -> dict:
    """Train from run.state.step to max_steps, stop_at_step or a signal, evaluating, logging and saving on the way.

    Returns {"status": "done" | "stopped", "steps_run", "train_time_s"} and, when done, the final evaluation's
    val_loss, val_perplexity and val_blocks (every block of the validation split).
    """
    a, state, accelerator = run.args, run.state, run.accelerator
    run.log.start(keep_up_to_step=state.step or -1, hparams=run.saved_args)  # a resume drops the crashed run's tail
    stop = install_signal_handlers()
    from tqdm.auto import tqdm

    bar = tqdm(
        total=a.max_steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="train",
        unit="step", dynamic_ncols=True,
    )  # fmt: skip
    run.log.bar = bar
    if state.step == 0 and a.eval_every:
        evaluate(run, whole_split=False)
    batches, consumed = step_batches(run), []
    status, last_saved, steps_run, train_time = "done", None, 0, 0.0
    window_steps, window_time = 0, 0.0  # since the last log line, for tokens/s: training time only, no eval or save
    try:
        while state.step < a.max_steps:
            t0 = time.perf_counter()
            micro_batches = next(batches)
            if run.debug.rank_dumps:
                consumed += [i for b in micro_batches for i in b["block_ids"].tolist()]
            stats, signalled = take_step(run, micro_batches, stop)
            seconds = time.perf_counter() - t0
            steps_run, train_time, window_steps, window_time = (
                steps_run + 1, train_time + seconds, window_steps + 1, window_time + seconds
            )  # fmt: skip
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}", refresh=False)

            step = state.step
            if step % a.log_every == 0 or step == a.max_steps:
                tokens_per_s = window_steps * run.tokens_per_step / window_time
                record = {"step": step, **stats, "tokens_per_s": tokens_per_s, "tokens_seen": state.tokens_seen,
                          "skipped_steps": state.skipped_steps}  # fmt: skip
                if run.peak_tflops:
                    record["mfu"] = mfu(tokens_per_s, run.flops_per_token, run.peak_tflops, accelerator.num_processes)
                run.log.write(record)
                window_steps, window_time = 0, 0.0
            if a.eval_every and step % a.eval_every == 0 and step < a.max_steps:
                evaluate(run, whole_split=False)
            if signalled or step == a.stop_at_step or (a.save_every and step % a.save_every == 0):
                last_saved = save(run) or last_saved
            if signalled or step == a.stop_at_step:
                why = (
                    f"signal {signal.Signals(stop['signal']).name}" if stop["signal"]
                    else "a signal to another process" if signalled
                    else f"--stop_at_step {a.stop_at_step}"
                )  # fmt: skip
                accelerator.print(
                    f"\nStopped at step {step} on {why}; last checkpoint {last_saved}. Continue with: "
                    f"{command('minigpt.train.pretrain')} --resume {shlex.quote(str(run.out))}"
                )
                status = "stopped"
                break
    finally:
        bar.close()
        run.log.bar = None
        restore_signal_handlers(stop)
    final_eval = {}
    if status == "done":
        final_eval = evaluate(run, whole_split=True)  # the figure the README and the model card quote
        if last_saved is None or last_saved.name != f"step-{state.step}":
            last_saved = save(run)
        if last_saved is None:
            raise SystemExit(
                f"pretrain: error: the final checkpoint could not be saved in {run.ckpt_root} (see the error above)."
            )
    if run.debug.rank_dumps:
        dump_rank(accelerator, run.model, run.out, consumed)
    return {"status": status, "steps_run": steps_run, "train_time_s": train_time, **final_eval}


def take_step(run: Run, micro_batches: list[dict], stop: dict) -> tuple[dict, bool]:
    """Optimizer step run.state.step + 1: set the LR from get_lr, forward/backward the micro-batches, check for
    NaN/inf, clip, then update (or skip, under --skip_nonfinite). Returns ({"loss", "lr", "grad_norm"}, whether any
    process got a signal)."""
    a, state, model, optimizer, accelerator = run.args, run.state, run.model, run.optimizer, run.accelerator
    lr = get_lr(state.step, a.learning_rate, a.min_learning_rate, a.warmup_steps, a.max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    debug = run.debug
    inject = debug.inject_nonfinite_into if debug.inject_nonfinite_at_step == state.step + 1 else None
    loss_sum = training_step(accelerator, model, micro_batches, inject_nan=inject == "loss")
    if inject == "grads":  # a finite loss with a NaN gradient, as an overflow in backward gives
        local(next(model.parameters()).grad).view(-1)[0] = float("nan")
    # one all-reduce per step: the step's mean loss over every rank, and whether any rank got a signal
    flag = torch.tensor(float(stop["signal"] is not None), device=loss_sum.device)
    loss, stop_votes = accelerator.reduce(torch.stack([loss_sum, flag]), "sum").tolist()
    grad_norm = float("nan")
    if math.isfinite(loss):  # the norm is computed even without clipping (max_norm inf): it is the check
        max_norm = a.max_grad_norm if a.max_grad_norm > 0 else math.inf
        grad_norm = full_value(accelerator.clip_grad_norm_(model.parameters(), max_norm)).item()
    # a finite loss can still give inf/nan gradients; fp16's GradScaler skips those steps by itself, elsewhere the
    # update would poison the weights (and the next checkpoint)
    bad_grads = not math.isfinite(grad_norm) and accelerator.scaler is None
    if not math.isfinite(loss) or bad_grads:
        if not a.skip_nonfinite:
            what = f"the loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {grad_norm}"
            raise NonFiniteLoss(state.step + 1, what, latest_checkpoint(run.ckpt_root))
        state.skipped_steps += 1  # no update from this step's gradients
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if inject in ("weights", "optimizer_state"):  # an update that overflows, found only by save()'s check
        p = next(model.parameters())
        local(p.data if inject == "weights" else optimizer.state[p]["exp_avg_sq"]).view(-1)[0] = float("inf")
    state.step += 1
    state.samples_in_epoch += run.blocks_per_step
    state.tokens_seen += run.tokens_per_step
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm}, stop_votes > 0


def training_step(accelerator: Accelerator, model, micro_batches: list[dict], inject_nan: bool = False) -> torch.Tensor:
    """Forward/backward over one optimizer step's micro-batches; returns this rank's share of the mean loss.

    The loss is normalised by the number of target tokens of the whole step, across micro-batches and processes
    (transformers' num_items_in_batch), so accumulating k micro-batches equals one batch k times larger. Gradients
    are reduced across processes once, in the last micro-batch's backward (no_sync before it).
    """
    local = sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches)  # targets: every label after the first
    num_items = accelerator.reduce(local, "sum")
    loss_sum = torch.zeros((), device=accelerator.device)
    model.train()
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if isinstance(model, FSDPModule):  # FSDP2 has no no_sync(): reduce-scatter in the last backward only
            model.set_requires_gradient_sync(last)
        with contextlib.nullcontext() if last or isinstance(model, FSDPModule) else accelerator.no_sync(model):
            # skip_logits: the chunked LM head + cross-entropy, the same loss and gradients without [B, T, V] logits
            out = model(
                input_ids=batch["input_ids"],
                labels=batch["labels"],
                use_cache=False,
                num_items_in_batch=num_items,
                skip_logits=True,
            )
            loss = out.loss  # sum of this micro-batch's token losses / num_items
            if inject_nan:
                loss = loss * float("nan")
            # DDP averages gradients over processes: undo it, the sum is already normalised by num_items
            accelerator.backward(loss * accelerator.num_processes)
        loss_sum += loss.detach().float()
    return loss_sum


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


def step_batches(run: Run):
    """Yield each optimizer step's k micro-batches, epoch after epoch, from the saved data position on."""
    a, state, train = run.args, run.state, run.data.train.with_format("numpy")
    k = a.gradient_accumulation_steps
    while True:
        start = state.samples_in_epoch // run.blocks_per_step  # optimizer steps already taken in this epoch
        blocks = run.steps_per_epoch * run.blocks_per_step
        loader = epoch_loader(run.accelerator, train, state.epoch, a.seed, a.batch_size, blocks)
        if start:
            loader = run.accelerator.skip_first_batches(loader, start * k)  # resume mid-epoch: no batch replayed
        it = iter(loader)
        for _ in range(start, run.steps_per_epoch):
            yield [next(it) for _ in range(k)]
        state.epoch += 1
        state.samples_in_epoch = 0


def save(run: Run) -> Path | None:
    """Checkpoint this step (every process takes part); None when the save failed (reported, retried next time)."""
    # the loss and gradient checks cannot see an update that overflows the weights or AdamW's moments, and such a
    # checkpoint would poison every resume; skipping is too late now, so this stops even with --skip_nonfinite
    what = nonfinite_state(run.accelerator, run.model, run.optimizer)
    if what:
        raise NonFiniteLoss(run.state.step, what, latest_checkpoint(run.ckpt_root), skippable=False)
    a = run.accelerator
    corpus = run.data.info.get("corpus", "user")  # without --data, the card names the built-in corpus from here
    train_state = {"state": asdict(run.state), "args": run.saved_args,
                   "hardware": describe_hardware(a.device, a.num_processes, a.mixed_precision),
                   "corpus": None if corpus == "user" else f"the built-in corpus {corpus}"}  # fmt: skip
    return save_checkpoint(
        run.accelerator, partial(write_checkpoint, run, train_state), run.ckpt_root, run.state.step,
        run.args.keep_last, run.debug.save_delay,
    )  # fmt: skip


def write_checkpoint(run: Run, train_state: dict, folder: Path) -> None:
    """Every process: the training state into `folder` (accelerate's save_state: the model and AdamW unless
    torch-FSDP2 shards them, which DCP writes to fsdp/, and each rank's RNG state); then the main process adds a
    loadable model folder (config with auto_map, code, generation config, tokenizer) and train_state.json."""
    accelerator, model = run.accelerator, run.model
    accelerator.save_state(str(folder))
    if run.sharding == "torch-fsdp2":
        save_sharded(model, run.optimizer, folder / SHARDED_DIR)
    # accelerate's save_state writes model.safetensors itself, except under FSDP (sharded files only)
    state_dict = full_state_dict(accelerator, model, run.sharding) if run.sharding != "none" else None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if state_dict is not None:
            save_full_model(unwrapped, state_dict, folder)
        write_model_code(unwrapped.config, folder)
        unwrapped.generation_config.save_pretrained(folder)
        run.data.tokenizer.save_pretrained(folder)
        (folder / "train_state.json").write_text(json.dumps(train_state, indent=1))


def nonfinite_state(accelerator: Accelerator, model, optimizer) -> str | None:
    """What holds a NaN/inf among the weights and the optimizer state ("the weights became non-finite (name)"), on
    any process, or None. One pass over every tensor: save() calls it before each checkpoint, not every step."""
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


class NonFiniteLoss(SystemExit):
    """Exit status EXIT_NONFINITE; main() prints `message` (what went non-finite, where the last good state is)."""

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
            f"--resume {last_good or '<output_dir>'} and a lower --learning_rate, {fix}."
        )


# ------------------------------------------------------------------------------------------------ validation
def evaluate(run: Run, whole_split: bool) -> dict:
    """validate() at this step, logged: on every validation block, or on the first --eval_batches batches of each
    process (a sample, and the log line says so: "400 of 860 validation blocks (a sample)")."""
    max_batches = 0 if whole_split else run.args.eval_batches
    metrics = validate(run.model, run.data.validation, run.args.batch_size, max_batches, run.accelerator)
    if metrics:
        run.log.write({"step": run.state.step, **metrics, "val_split_blocks": len(run.data.validation)})
    return metrics


@torch.no_grad()
def validate(model, blocks, batch_size: int, max_batches: int = 0, accelerator: Accelerator | None = None) -> dict:
    """Loss and perplexity of `model` on the packed `blocks`, through the project's `evaluate` perplexity module.

    Every block, or with max_batches the first max_batches batches of each process, which are the first
    max_batches x batch_size x processes blocks whatever the number of processes: process r takes blocks r, r+P, ...
    A process left one block short runs a fully masked one, so that all run the same forwards (FSDP gathers weights
    in each). The loss is training's lean path (skip_logits, summed with num_items_in_batch=1): no [B, T, V] logits.
    Returns {"val_loss", "val_perplexity", "val_blocks"} on the main process (or without an accelerator, as
    minigpt.train.demo calls it on a plain model), {} on the others.
    """
    from minigpt.train.metrics import load_metric

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else model.device
    rows = list(range(rank, len(blocks), world))
    per_process = -(-len(blocks) // world)
    real = torch.arange(per_process) < len(rows)  # (per_process,): False for the masked filler block
    rows += [0] * (per_process - len(rows))
    if max_batches:
        rows, real = rows[: max_batches * batch_size], real[: max_batches * batch_size]
    ds = blocks.with_format("numpy")
    totals = torch.zeros(3, dtype=torch.float64)  # summed NLL, predicted tokens, blocks
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        ids = torch.as_tensor(ds[rows[start : start + batch_size]]["input_ids"], dtype=torch.long, device=device)
        keep = real[start : start + batch_size].to(device)  # (B,)
        labels = ids.masked_fill(~keep[:, None], -100)  # (B, T); the model shifts them
        out = model(input_ids=ids, labels=labels, use_cache=False, skip_logits=True, num_items_in_batch=1)
        # .item() syncs with the device once per batch: fine for an evaluation, and exact in float64
        totals += torch.tensor(
            [out.loss.item(), (labels[:, 1:] != -100).sum().item(), keep.sum().item()], dtype=torch.float64
        )
    model.train(was_training)
    if world > 1:
        totals = accelerator.reduce(totals.to(accelerator.device), "sum").cpu()
    if accelerator is not None and not accelerator.is_main_process:
        return {}
    result = load_metric("perplexity", keep_in_memory=True).compute(nll=[totals[0].item()], num_tokens=[int(totals[1])])
    return {"val_loss": result["loss"], "val_perplexity": result["perplexity"], "val_blocks": int(totals[2])}


# ------------------------------------------------------------------------------------------------- the end
def save_final(run: Run) -> None:
    """save_pretrained of the unwrapped model + tokenizer + generation config into output_dir, then the loss PNG."""
    accelerator, out = run.accelerator, run.out
    state_dict = full_state_dict(accelerator, run.model, run.sharding)  # every process takes part (FSDP gathers)
    if accelerator.is_main_process:
        try:
            save_full_model(accelerator.unwrap_model(run.model), state_dict, out)
            run.data.tokenizer.save_pretrained(out)
            plot_losses(out / "log.jsonl", out / "loss.png")
        except (OSError, RuntimeError, SafetensorError) as e:  # a full disk is any of the three (see save_checkpoint)
            raise SystemExit(
                f"pretrain: error: could not write the final model to {out}: {e}. The last checkpoint "
                f"in {run.ckpt_root} is intact; free space or fix permissions, then --resume {out}."
            )
        accelerator.print(f"Saved the final model, tokenizer and generation config to {out}.")
    accelerator.wait_for_everyone()


def push(run: Run) -> None:
    """Publish the final model (not the checkpoints) through the project's Hub code."""
    from minigpt.hub.push import push_folder  # imported here: only --push_to_hub needs the Hub client code

    a, accelerator = run.args, run.accelerator
    if accelerator.is_main_process:
        try:
            url = push_folder(
                run.out,
                a.hub_model_id,
                private=a.hub_private,
                commit_message=f"MiniGPT pretrained for {run.state.step} steps",
            )
        except (PermissionError, ValueError, OSError) as e:
            raise SystemExit(
                f"pretrain: error: the push to {a.hub_model_id} failed: {e} The model is saved in "
                f"{run.out}; push it later with: {command('minigpt.hub.push')} {shlex.quote(str(run.out))} "
                f"{a.hub_model_id}"
            ) from None
        print(f"Pushed {run.out} to {url}.")
    accelerator.wait_for_everyone()


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def main(argv: list[str] | None = None) -> dict:
    """Run pretraining; returns the final metrics. Exits 0 when stopped by a signal, 3 on a NaN/inf loss."""
    start = time.perf_counter()
    run = setup(argv)
    try:
        result = fit(run)
    except NonFiniteLoss as e:
        print(e.message, file=sys.stderr)
        run.accelerator.end_training()
        raise
    if result["status"] == "done":
        save_final(run)
        if run.args.push_to_hub:
            push(run)
    elif run.accelerator.is_main_process:
        try:
            plot_losses(run.out / "log.jsonl", run.out / "loss.png")
        except OSError as e:  # the checkpoint is what matters here; a full disk must not turn exit 0 into a crash
            print(f"pretrain: warning: could not write {run.out / 'loss.png'}: {e}", file=sys.stderr)
    run.accelerator.end_training()
    tokens_per_s = result.pop("steps_run") * run.tokens_per_step / max(result["train_time_s"], 1e-9)
    return {
        "step": run.state.step,
        "output_dir": str(run.out),
        "wall_time_s": time.perf_counter() - start,
        "tokens_per_s": tokens_per_s,
        **result,
    }


def cli() -> None:
    """The `minigpt-pretrain` console script: main(), whose return value would otherwise become the exit status."""
    main()


if __name__ == "__main__":
    cli()
