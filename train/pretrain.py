"""Pretrain MiniGPT from scratch on local text with Accelerate: one script from a laptop CPU to many GPU nodes.

    python -m train.pretrain --config tiny                      # CPU demo preset, built-in Shakespeare corpus
    python train/pretrain.py --data my_texts/ --output_dir runs/mine --max_steps 2000
    accelerate launch --config_file train/configs/multi_gpu.yaml train/pretrain.py --config gpt2-124m --data ...

Arguments come from the command line, from a YAML/JSON file (`--config FILE`, or a preset name from
train/configs/), or both: the command line wins. Reading order: setup() (arguments, accelerator, data, model,
optimizer, resume), fit() (the loop), validate(), then the final save, plot and push. The arguments, their
parsing and their checks live in train/args.py; the checkpoint folders in train/checkpoints.py.

Output folder layout:
    <output_dir>/config.json, model.safetensors, tokenizer*, generation_config.json   (the final model)
    <output_dir>/checkpoints/step-<N>/   full training state (accelerate save_state) + tokenizer + config
    <output_dir>/log.jsonl, loss.png, tensorboard/

Faults: SIGTERM/SIGINT finish the current optimizer step, save a checkpoint and exit 0; checkpoints are written
to `.tmp-step-<N>` and renamed when complete; a failed save is reported and retried at the next save; a NaN/inf
loss or gradient norm stops the run (exit 3) unless --skip_nonfinite; weights or optimizer state found NaN/inf before
a checkpoint is written stop it (exit 3) always, so no checkpoint holds them.
"""

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, TorchDynamoPlugin, set_seed
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from transformers import GenerationConfig

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from train.args import EXIT_NONFINITE, TrainArguments, build_config, parse_args
from train.checkpoints import (
    check_state_files,
    install_signal_handlers,
    latest_checkpoint,
    prepare_checkpoint_root,
    restore_signal_handlers,
    save_checkpoint,
)
from train.data import DataError, prepare_data

# dense bf16 peak per device, TFLOP/s, for MFU; matched against torch.cuda.get_device_name(); --peak_tflops overrides
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


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


def flops_per_token(config: MiniGPTConfig, num_params: int) -> float:
    """6N for the matmuls (forward + backward) plus attention's 12·L·C·T (PaLM appendix B)."""
    return 6 * num_params + 12 * config.n_layer * config.n_embd * config.n_positions


def setup(argv: list[str] | None = None) -> dict:
    """Parse arguments, then build everything fit() needs: accelerator, data, model, optimizer, resume state."""
    help_text = dict(description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("Faults:") :])
    model_args, data_args, args = parse_args(argv, **help_text)
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
    ckpt_root, resume_from = prepare_checkpoint_root(accelerator, out, args.resume, args.overwrite_output_dir)

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
        check_state_files(resume_from)
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
    stop = install_signal_handlers()
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

    def save() -> Path | None:  # every process takes part; None when the save failed (reported, retried next time)
        # the loss and gradient checks cannot see an update that overflows the weights or AdamW's moments, and such
        # a checkpoint would poison every resume; skipping is too late now, so this stops even with --skip_nonfinite
        what = nonfinite_state(accelerator, model, optimizer)
        if what:
            raise NonFiniteLoss(state["step"], what, latest_checkpoint(run["ckpt_root"]), skippable=False)
        train_state = {"state": state, "args": run["run_args"], "scheduler": scheduler.state_dict()}
        root, delay = run["ckpt_root"], args.debug_save_delay
        return save_checkpoint(
            accelerator, model, run["tokenizer"], root, state["step"], train_state, args.keep_last, delay
        )

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
            inject = args.inject_nonfinite_into if args.inject_nonfinite_at_step == state["step"] + 1 else None
            loss_sum = training_step(accelerator, model, micro_batches, inject_nan=inject == "loss")
            if inject == "grads":  # a finite loss with a NaN gradient, as an overflow in backward gives
                next(model.parameters()).grad.view(-1)[0] = float("nan")
            # one all-reduce per step: the step's mean loss over every rank, and whether any rank got a signal
            flag = torch.tensor(float(stop["signal"] is not None), device=loss_sum.device)
            loss, stop_votes = accelerator.reduce(torch.stack([loss_sum, flag]), "sum").tolist()
            grad_norm = float("nan")
            if math.isfinite(loss):  # the norm is computed even without clipping (max_norm inf): it is the check
                max_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm).item()
            # a finite loss can still give inf/nan gradients; fp16's GradScaler skips those steps by itself,
            # elsewhere the update would poison the weights (and the next checkpoint)
            bad_grads = not math.isfinite(grad_norm) and accelerator.scaler is None
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
            if inject in ("weights", "optimizer_state"):  # an update that overflows, found only by save()'s check
                p = next(model.parameters())
                (p.data if inject == "weights" else optimizer.state[p]["exp_avg_sq"]).view(-1)[0] = float("inf")
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
                last_saved = save() or last_saved
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
        restore_signal_handlers(stop)
    if status == "done":
        run["final_eval"] = evaluate_and_log(run, None)
        if last_saved is None or last_saved.name != f"step-{state['step']}":
            last_saved = save()
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
            # accelerate divides by k and DDP averages over processes: undo both, the sum is already normalised
            accelerator.backward(loss * scale)
            loss_sum += loss.detach().float()
    assert accelerator.sync_gradients, "the accumulation window and accelerate's step count disagree"
    return loss_sum


def nonfinite_state(accelerator: Accelerator, model, optimizer) -> str | None:
    """What holds a NaN/inf among the weights and the optimizer state ("the weights became non-finite (name)"), on
    any process, or None. One pass over every tensor: save() calls it before each checkpoint, not every step."""
    names = {p: n for n, p in accelerator.unwrap_model(model).named_parameters()}
    bad = next((f"the weights became non-finite ({n})" for p, n in names.items() if not p.isfinite().all()), None)
    for p, slots in optimizer.state.items():
        for slot, t in slots.items():
            if bad is None and torch.is_tensor(t) and not t.isfinite().all():
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
            f"--resume latest and a lower --learning_rate, {fix}."
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


# ------------------------------------------------------------------------------------------------- the end
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
