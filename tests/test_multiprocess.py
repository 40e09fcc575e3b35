"""A real 2-process data-parallel run on CPU (gloo), launched the way users launch it: `accelerate launch`.

Both ranks must end with identical weights, only rank 0 may write checkpoints and logs (each rank adds its own
RNG state to a checkpoint), and the data must be sharded with no block seen twice.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import debug_env, free_port, make_corpus, read_log, tiny_args, weights, write_txt

from minigpt.train.pretrain import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_two_processes_agree_shard_the_data_and_only_rank0_writes(tmp_path):
    corpus = write_txt(tmp_path / "corpus.txt", make_corpus(60))
    out = tmp_path / "ddp"
    steps, batch, accumulation = 10, 4, 2
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(REPO / "minigpt" / "train" / "pretrain.py"),
        *tiny_args(corpus, out, "--max_steps", steps, "--batch_size", batch, "--gradient_accumulation_steps",
                   accumulation, "--save_every", 5, "--eval_every", 5, "--report_to", "tensorboard"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **debug_env(rank_dumps=1)}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "x 2 processes" in proc.stdout, "the launch did not start 2 ranks"

    ranks = [json.loads((out / "debug" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    blocks = [r["blocks"] for r in ranks]
    per_rank = steps * batch * accumulation
    assert len(blocks[0]) == len(blocks[1]) == per_rank
    assert not set(blocks[0]) & set(blocks[1]), "a block went to both ranks"
    assert len(set(blocks[0])) == per_rank, "a rank saw a block twice"

    # one writer: every log line once, one event file, one set of checkpoints with both ranks' RNG states
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, steps + 1))
    assert [r["step"] for r in log if "val_loss" in r] == [0, 5, 10]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert proc.stdout.count("Saved the final model") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-5"]
    files = {p.name for p in (out / "checkpoints" / "step-10").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "optimizer.bin"} <= files
    state = json.loads((out / "checkpoints" / "step-10" / "train_state.json").read_text())["state"]
    assert state["tokens_seen"] == steps * batch * accumulation * 2 * 16

    # the saved model is rank 0's weights, and it loads
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)

    # 2 ranks x 4 sequences = 1 process x 8 sequences: the same blocks per step, and the loss (normalised by the
    # target tokens of all ranks) and the update match those of the single large batch
    single = tmp_path / "single"
    argv = tiny_args(corpus, single, "--max_steps", steps, "--batch_size", 2 * batch,
                     "--gradient_accumulation_steps", accumulation, "--save_every", 5, "--eval_every", 5)  # fmt: skip
    main(argv)  # one intra-op thread: conftest's one_thread
    single_log = read_log(single)
    for a, b in zip(log, single_log, strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    ddp_weights, single_weights = weights(out), weights(single)
    for name, tensor in ddp_weights.items():
        other = single_weights[name]
        if name.endswith("qkv_proj.bias"):  # [q | k | v]: drop k, whose gradient is exactly zero (softmax ignores a
            # constant per query), so that Adam turns the rounding noise of either reduction order into full steps
            width = tensor.numel() // 3
            tensor, other = (
                torch.cat([tensor[:width], tensor[2 * width :]]),
                torch.cat([other[:width], other[2 * width :]]),
            )
        torch.testing.assert_close(tensor, other, rtol=1e-4, atol=1e-6, msg=name)
