"""The order pretraining reads its blocks in: each epoch a fixed-seed permutation, cut to whole optimizer steps and
sharded across processes, resumable at any step without replaying a batch; or, with --streaming, each process's
stream in its own order (minigpt/train/streaming.py)."""

from functools import partial

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader


def steps_per_epoch(blocks: int, batch_size: int, accumulation: int, processes: int) -> int:
    """Whole optimizer steps in an epoch of `blocks` training blocks; an error where not even one fits."""
    blocks_per_step = batch_size * accumulation * processes
    if blocks < blocks_per_step:
        raise SystemExit(
            f"pretrain: error: the training split has {blocks} blocks, fewer than one optimizer step needs "
            f"(batch_size {batch_size} x accumulation {accumulation} x processes {processes} = {blocks_per_step}). "
            "Lower --batch_size or --gradient_accumulation_steps, or add data."
        )
    return blocks // blocks_per_step


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


def step_batches(accelerator: Accelerator, dataset, state, seed: int, batch_size: int, accumulation: int,
                 steps_in_epoch: int):  # fmt: skip
    """Yield each optimizer step's `accumulation` micro-batches, epoch after epoch, from the data position of `state`
    (its epoch and samples_in_epoch, which the loop advances) on."""
    dataset = dataset.with_format("numpy")
    blocks_per_step = batch_size * accumulation * accelerator.num_processes
    while True:
        start = state.samples_in_epoch // blocks_per_step  # optimizer steps already taken in this epoch
        loader = epoch_loader(accelerator, dataset, state.epoch, seed, batch_size, steps_in_epoch * blocks_per_step)
        if start:
            loader = accelerator.skip_first_batches(loader, start * accumulation)  # resume mid-epoch: none replayed
        it = iter(loader)
        for _ in range(start, steps_in_epoch):
            yield [next(it) for _ in range(accumulation)]
        state.epoch += 1
        state.samples_in_epoch = 0


def stream_batches(stream, state, batch_size: int, accumulation: int):
    """Yield each optimizer step's `accumulation` micro-batches from this process's stream (StreamBlocks), which
    carries its own position; a new pass over the stream starts a new epoch of `state`."""
    blocks = stream.blocks()
    while True:
        micro_batches = []
        for _ in range(accumulation):
            input_ids = torch.as_tensor(np.stack([next(blocks) for _ in range(batch_size)]), dtype=torch.long)
            micro_batches.append({"input_ids": input_ids, "labels": input_ids.clone(),
                                  "block_ids": torch.full((batch_size,), -1)})  # fmt: skip
        if stream.epoch > state.epoch:
            state.epoch, state.samples_in_epoch = stream.epoch, 0
        yield micro_batches
