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
                                         fsdp/, the sharded model and optimizer) + model, tokenizer and config
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
from transformers import GenerationConfig

from minigpt.commands import command, run_cli
from minigpt.flops import count_params, flops_per_token, lookup_peak_tflops, mfu
from minigpt.folders import write_model_code
from minigpt.schedule import lr_of, recipe_of
from minigpt.train.args import TrainArguments, adapt_recipe, build_config, parse_run, warmup_warning
from minigpt.train.checkpoints import latest_checkpoint, prepare_checkpoint_root, save_checkpoint
from minigpt.train.data import DataError, prepare_data
from minigpt.train.tokens import PreparedData
from minigpt.train.faults import DebugHooks, NonFiniteLoss, StopOnSignal, dump_rank, nonfinite_state
from minigpt.train.loader import step_batches, steps_per_epoch, stream_batches
from minigpt.train.optim import apply_arguments, configure_optimizer, set_rates
from minigpt.train.monitoring import RunLog, describe_hardware, plot_losses
from minigpt.train.streaming import StreamBlocks
from minigpt.train.sharding import (
    SHARDED_DIR,
    check_sharding_request,
    full_state_dict,
    full_value,
    load_sharded,
    local,
    prepare,
    save_full_model,
    save_sharded,
)
from minigpt.train.summary import pretrain_summary, write_summary
from minigpt.train.threads import set_threads
from minigpt.train.tokenizer import special_token_ids
from modeling_minigpt import MiniGPTForCausalLM


# ------------------------------------------------------------------------------------------------------ setup
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
    stream: StreamBlocks | None  # this process's training stream, with --streaming
    blocks_per_step: int  # sequences per optimizer step, all processes together
    tokens_per_step: int
    steps_per_epoch: int  # 0 when streaming: a stream's length is unknown until it is read
    flops_per_token: float  # at the trained sequence length (--block_size), for MFU
    peak_tflops: float  # of one device; 0 = unknown, no MFU


def setup(argv: list[str] | None = None) -> Run:
    """Parse arguments, then build everything fit() needs: accelerator, data, model, optimizer, resume state and the
    derived numbers, which it prints before the first step."""
    help_text = dict(description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("Faults:") :])
    model_args, data_args, args, resume = parse_run(argv, **help_text)
    recipe_note = adapt_recipe(model_args, args)  # before saved_args: a resume derives the same schedule
    saved_args = {"model": asdict(model_args), "data": asdict(data_args), "train": asdict(args)}
    resume_notes = resume.check(saved_args) if resume else []  # before any data work
    debug = DebugHooks.from_env()
    on_cpu = args.cpu or not _has_accelerator()
    threads = set_threads(args.cpu_threads, on_cpu=on_cpu)  # the choice finetune, evaluation and generate make
    check_sharding_request(on_cpu, args.optimizer)
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
    ckpt_root, _ = prepare_checkpoint_root(accelerator, out, args.resume, args.overwrite_output_dir)

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
    model.generation_config = sampling_defaults(data.tokenizer, config.n_positions)
    make_optimizer = partial(configure_optimizer, args=args, device=accelerator.device)
    model, optimizer, sharding = prepare(accelerator, model, make_optimizer, args.fsdp, args.compile)

    state = LoopState()
    if resume is not None:
        resume.check_sharding(sharding)
        accelerator.load_state(str(resume.folder))  # the RNG states; the model and optimizer too unless torch-fsdp2
        if sharding == "torch-fsdp2":
            load_sharded(model, optimizer, resume.folder / SHARDED_DIR)
        apply_arguments(optimizer, args)  # the loaded groups hold the checkpoint's settings
        state = LoopState(**resume.state)  # the LR is lr_of(step): an older file's "scheduler" entry goes unread
    k, world = args.gradient_accumulation_steps, accelerator.num_processes
    blocks_per_step = args.batch_size * k * world
    n_params = count_params(accelerator.unwrap_model(model))
    stream = None
    if data_args.streaming:  # this process's share of the stream, at the checkpoint's position on a resume
        stream = data.train.shard(accelerator.process_index, world, resume and resume.folder)
    run = Run(
        accelerator, model, optimizer, data, args, sharding, saved_args, out, ckpt_root, state,
        log=RunLog(accelerator, out, args.report_to),
        debug=debug,
        stream=stream,
        blocks_per_step=blocks_per_step,
        tokens_per_step=blocks_per_step * data_args.block_size,
        steps_per_epoch=0 if stream else steps_per_epoch(len(data.train), args.batch_size, k, world),
        flops_per_token=flops_per_token(n_params, config.n_layer, config.n_embd, data_args.block_size),
        peak_tflops=args.peak_tflops or lookup_peak_tflops(accelerator.device)[0],
    )  # fmt: skip
    print_summary(run, data_args.block_size, resumed_from=resume and resume.folder)
    return run


def sampling_defaults(tokenizer, n_positions: int) -> GenerationConfig:
    """The generation config every checkpoint carries (transformers 5 refuses sampling defaults in config.json). A
    call that names no length (a server request without max_tokens) writes at most half the context."""
    return GenerationConfig(
        do_sample=True,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        max_new_tokens=min(256, n_positions // 2),
        repetition_penalty=1.1,
        use_cache=True,  # transformers' export recipes (torch.export, ExecuTorch) refuse a checkpoint without it
        **special_token_ids(tokenizer),
    )


def print_summary(run: Run, block_size: int, resumed_from: Path | None = None) -> None:
    """Every derived number, before the first step: where a resume continues, model and FLOPs, data, batch, schedule,
    device."""
    a, info, print0, state = run.args, run.data.info, run.accelerator.print, run.state
    if resumed_from is not None:
        where = (f"the stream continues where it stopped (epoch {state.epoch + 1})" if run.stream else
                 f"epoch {state.epoch + 1} continues after {state.samples_in_epoch:,} of its "
                 f"{run.steps_per_epoch * run.blocks_per_step:,} blocks")  # fmt: skip
        print0(f"Resumed from {resumed_from} at step {state.step} of {a.max_steps}: {where}.")
        if state.step >= a.max_steps:
            print0(f"resume: the checkpoint has all {a.max_steps} steps already; nothing is trained, the final model "
                   "is evaluated and saved again. Raise --max_steps to train longer.")  # fmt: skip
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
    train = (f"a stream of {', '.join(info['files'])}" if run.stream else
             f"{len(run.data.train):,} train blocks ({info['tokens']['train']:,} tokens)")  # fmt: skip
    print0(
        f"data: {train}, {n_val:,} validation blocks of {block_size} tokens; tokenizer vocabulary "
        f"{len(run.data.tokenizer)}; validation unigram perplexity {info['unigram_perplexity_validation']:.1f} (the "
        "bar to beat)"
    )
    per_epoch = f"{run.steps_per_epoch} steps per epoch" if run.steps_per_epoch else "a stream: epochs unknown"
    epochs = f"{a.max_steps / run.steps_per_epoch:.2f} epochs, " if run.steps_per_epoch else ""
    print0(
        f"batch: {a.batch_size} sequences x {block_size} tokens x {k} accumulation x {world} processes = "
        f"{run.tokens_per_step:,} tokens per step; {per_epoch}"
    )
    print0(
        f"schedule: {a.max_steps} steps = {total_tokens / 1e6:.2f}M tokens ({epochs}"
        f"{total_tokens / num_params:.1f} tokens/parameter); {recipe_of(vars(a))}; evaluation every "
        f"{a.eval_every or a.max_steps} steps on the "
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
    from tqdm.auto import tqdm

    bar = tqdm(
        total=a.max_steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="train",
        unit="step", dynamic_ncols=True,
    )  # fmt: skip
    run.log.bar = bar
    if state.step == 0 and a.eval_every:
        evaluate(run, whole_split=False)
    if run.stream is not None:
        batches = stream_batches(run.stream, state, a.batch_size, a.gradient_accumulation_steps)
    else:
        batches = step_batches(accelerator, run.data.train, state, a.seed, a.batch_size, a.gradient_accumulation_steps,
                               run.steps_per_epoch)  # fmt: skip
    status, last_saved, steps_run, train_time, consumed = "done", None, 0, 0.0, []
    window_steps, window_time = 0, 0.0  # since the last log line, for tokens/s: training time only, no eval or save
    stop = StopOnSignal()
    try:
        with stop.installed():
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
                    log_step(run, stats, tokens_per_s=window_steps * run.tokens_per_step / window_time)
                    window_steps, window_time = 0, 0.0
                if a.eval_every and step % a.eval_every == 0 and step < a.max_steps:
                    evaluate(run, whole_split=False)
                if signalled or step == a.stop_at_step or (a.save_every and step % a.save_every == 0):
                    last_saved = save(run) or last_saved
                if signalled or step == a.stop_at_step:
                    why = (f"signal {stop.signal.name}" if stop.signal else "a signal to another process" if signalled
                           else f"--stop_at_step {a.stop_at_step}")  # fmt: skip
                    accelerator.print(f"\nStopped at step {step} on {why}; last checkpoint {last_saved}. Continue "
                                      f"with: {command('minigpt.train.pretrain')} --resume {shlex.quote(str(run.out))}")
                    status = "stopped"
                    break
    finally:
        bar.close()
        run.log.bar = None
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


def log_step(run: Run, stats: dict, tokens_per_s: float) -> None:
    """One log record of the step just taken: its loss, LR and gradient norm, throughput and MFU, and the counters."""
    state = run.state
    record = {"step": state.step, **stats, "tokens_per_s": tokens_per_s, "tokens_seen": state.tokens_seen,
              "skipped_steps": state.skipped_steps}  # fmt: skip
    if run.peak_tflops:
        record["mfu"] = mfu(tokens_per_s, run.flops_per_token, run.peak_tflops, run.accelerator.num_processes)
    run.log.write(record)


def take_step(run: Run, micro_batches: list[dict], stop: StopOnSignal) -> tuple[dict, bool]:
    """Optimizer step run.state.step + 1: set the rates from the schedule, forward/backward the micro-batches, check for
    NaN/inf, clip, then update (or skip, under --skip_nonfinite). Returns ({"loss", "lr", "muon_lr" under Muon,
    "grad_norm"}, whether any process got a signal)."""
    a, state, model, optimizer, accelerator = run.args, run.state, run.model, run.optimizer, run.accelerator
    rates = set_rates(optimizer, lr_of(state.step, vars(a)), a)  # AdamW's rate; Muon's follows it at its own scale
    inject = run.debug.inject_at(state.step + 1)
    loss_sum = training_step(accelerator, model, micro_batches, inject_nan=inject == "loss")
    if inject == "grads":  # a finite loss with a NaN gradient, as an overflow in backward gives
        local(next(model.parameters()).grad).view(-1)[0] = float("nan")
    # one all-reduce per step: the step's mean loss over every rank, and whether any rank got a signal
    flag = torch.tensor(float(stop.signal is not None), device=loss_sum.device)
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
    return {"loss": loss, **rates, "grad_norm": grad_norm}, stop_votes > 0


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


def save(run: Run) -> Path | None:
    """Checkpoint this step (every process takes part); None when the save failed (reported, retried next time)."""
    # the loss and gradient checks cannot see an update that overflows the weights or the optimizer's state, and such a
    # checkpoint would poison every resume; skipping is too late now, so this stops even with --skip_nonfinite
    what = nonfinite_state(run.accelerator, run.model, run.optimizer)
    if what:
        raise NonFiniteLoss(run.state.step, what, latest_checkpoint(run.ckpt_root), skippable=False)
    return save_checkpoint(
        run.accelerator, partial(write_checkpoint, run), run.ckpt_root, run.state.step, run.args.keep_last,
        run.debug.save_delay,
    )  # fmt: skip


def summary_of(run: Run) -> dict:
    """The run record (training_summary.json) at this step."""
    a = run.accelerator
    corpus = run.data.info.get("corpus", "user")  # without --data, the card names the built-in corpus from here
    return pretrain_summary(run.saved_args, run.state.step, run.state.tokens_seen,
                            describe_hardware(a.device, a.num_processes, a.mixed_precision),
                            None if corpus == "user" else f"the built-in corpus {corpus}")  # fmt: skip


def write_checkpoint(run: Run, folder: Path) -> None:
    """Every process: the training state into `folder` (accelerate's save_state: the model and optimizer unless
    torch-FSDP2 shards them, which DCP writes to fsdp/, and each rank's RNG state); then the main process adds a
    loadable model folder (config with auto_map, code, generation config, tokenizer), the resume state
    (train_state.json: the loop's state and the arguments) and the run record (training_summary.json)."""
    accelerator, model = run.accelerator, run.model
    accelerator.save_state(str(folder))
    if run.stream is not None:  # each process's position in its stream
        (folder / f"stream-rank{accelerator.process_index}.json").write_text(json.dumps(run.stream.state()))
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
        summary = summary_of(run)
        train_state = {"state": asdict(run.state), "args": run.saved_args, "hardware": summary["hardware"],
                       "corpus": None if run.saved_args["data"].get("data") else summary.get("data")}  # fmt: skip
        (folder / "train_state.json").write_text(json.dumps(train_state, indent=1))
        write_summary(folder, summary)


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
            write_summary(out, summary_of(run))
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


def cli(argv: list[str] | None = None) -> None:
    """The `minigpt-pretrain` console script."""
    run_cli("pretrain", main, argv)


if __name__ == "__main__":
    cli()
