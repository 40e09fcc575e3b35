"""Faults during pretraining, with real processes, real signals and real filesystems.

Each test runs `minigpt/train/pretrain.py` on a ~9k-parameter model (16-token blocks, vocabulary 300) and breaks it the way
a rented GPU node breaks a days-long run:
- SIGINT, then SIGTERM after a resume: a checkpoint, exit 0, and the resumed run follows the uninterrupted losses;
- SIGKILL while a checkpoint is being written: the previous checkpoint stays intact and is the one resumed;
- a disk that fills up mid-run (a real tmpfs), and a read-only checkpoint folder: clear errors, earlier checkpoints
  untouched, the run goes on, and the state is saved once space or permission returns;
- a loss or gradient that becomes NaN/inf: skipped and counted with --skip_nonfinite, otherwise a stop with exit
  status 3; weights or optimizer state that become NaN/inf: exit 3 before any checkpoint holds them;
- 2 ranks, one SIGKILLed, then one hung (SIGSTOP): the other exits with an error by itself within --ddp_timeout,
  and a resume from the last checkpoint continues the same losses.

Subprocesses write their output to files (a full pipe would block them) and run with one intra-op thread. Injected
faults and the save delay come from minigpt.train.faults.DebugHooks, switched on through MINIGPT_DEBUG_* environment variables.
"""

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, debug_env, free_port, losses, read_log, tiny_args, weights

from minigpt.train.faults import EXIT_NONFINITE
from minigpt.train.checkpoints import latest_checkpoint
from minigpt.train.pretrain import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
WAIT_S = 180  # upper bound for any single wait on a subprocess: a timeout means a hang, never a slow machine




def launch(processes: list, argv: list[str], log: Path, **env) -> subprocess.Popen:
    """Start `python -m minigpt.train.pretrain argv` with stdout+stderr in the file `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minigpt.train.pretrain", *argv], cwd=log.parent, stdout=f, stderr=subprocess.STDOUT, env=env
        )
    proc.log = log
    processes.append(proc)
    return proc


def output(proc) -> str:
    return proc.log.read_text(errors="replace")


def wait_until(condition, proc, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}:\n{output(proc)[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s:\n{output(proc)[-4000:]}")
        time.sleep(0.02)


def logged(proc, step: int):
    """A condition for wait_until: this process has printed its log line of `step`."""
    return lambda: f"step {step} | loss" in output(proc)


def stopped_step(text: str) -> int:
    return int(text.split("Stopped at step ")[1].split()[0])


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------------------ signals
def test_sigint_and_sigterm_save_exit_0_and_resume_follows_the_uninterrupted_run(corpus, tmp_path, processes):
    """Interrupted twice (SIGINT, then SIGTERM after a resume), the run logs the same losses and ends with the same
    weights as one that was never interrupted: dropout is on, so the RNG state must travel with the checkpoint too."""
    out, ckpts = tmp_path / "interrupted", tmp_path / "interrupted" / "checkpoints"
    common = ("--max_steps", 3000, "--dropout", 0.1, "--seed", 11)
    stops = [0]
    for sig, extra in ((signal.SIGINT, ()), (signal.SIGTERM, ("--resume", "latest"))):
        proc = launch(processes, tiny_args(corpus, out, *common, *extra), tmp_path / f"{sig.name}.log")
        wait_until(logged(proc, stops[-1] + 3), proc, "3 logged steps")
        proc.send_signal(sig)
        assert proc.wait(WAIT_S) == 0, output(proc)[-4000:]
        text = output(proc)
        assert f"Received {sig.name}" in text and "Traceback" not in text
        if stops[-1]:
            assert f"Resumed from {ckpts / f'step-{stops[-1]}'} at step {stops[-1]}" in text
        stops.append(stopped_step(text))
        assert stops[-1] >= stops[-2] + 3
        state = json.loads((ckpts / f"step-{stops[-1]}" / "train_state.json").read_text())["state"]
        assert state["step"] == stops[-1]
        assert not (out / "model.safetensors").exists(), "an interrupted run exports no final model"

    reference = tmp_path / "reference"
    main(tiny_args(corpus, reference, *common, "--stop_at_step", stops[-1]))
    resumed, uninterrupted = losses(out), losses(reference)
    assert sorted(resumed) == list(range(1, stops[-1] + 1))
    assert resumed == uninterrupted  # bit-identical on CPU: same seed, same data order, same RNG after each resume
    assert_same_weights(ckpts / f"step-{stops[-1]}", reference / "checkpoints" / f"step-{stops[-1]}")


# ------------------------------------------------------------------------------------------------- SIGKILL
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one_and_resume_uses_it(
    corpus, tmp_path, processes, capsys
):
    """Killed while step 6's checkpoint sits complete in its temporary folder, just before the rename: the folder
    looks like a checkpoint (it even has train_state.json) but must never be taken for one."""
    out, ckpts = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    common = ("--max_steps", 3000, "--save_every", 3, "--seed", 5)
    proc = launch(processes, tiny_args(corpus, out, *common), tmp_path / "killed.log", **debug_env(save_delay=2))
    wait_until(lambda: (ckpts / "step-3" / "train_state.json").is_file(), proc, "checkpoint step-3")
    before = digest(ckpts / "step-3")  # complete: it appears by rename only
    partial = ckpts / ".tmp-step-6"
    wait_until(lambda: (partial / "train_state.json").is_file(), proc, "the temporary folder of step 6")
    proc.kill()
    assert proc.wait(WAIT_S) == -signal.SIGKILL

    assert partial.is_dir() and not (ckpts / "step-6").exists()
    assert digest(ckpts / "step-3") == before
    assert latest_checkpoint(ckpts) == ckpts / "step-3"
    killed = losses(out)
    assert {4, 5, 6} <= killed.keys()

    result = main(tiny_args(corpus, out, *common, "--resume", "latest", "--stop_at_step", 6))
    printed = capsys.readouterr().out
    assert f"Removing the incomplete checkpoint folder {partial}" in printed
    assert f"Resumed from {ckpts / 'step-3'} at step 3" in printed
    assert result["step"] == 6 and not partial.exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-3", "step-6"]
    resumed = losses(out)
    assert [resumed[s] for s in (4, 5, 6)] == [killed[s] for s in (4, 5, 6)]  # resumed from step 3, exactly


# ------------------------------------------------------------------------------------- full or read-only disk
def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs (a real disk that fills up); skipped where this user may not mount."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk))
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({getattr(e, 'stderr', e)}); run as root to test a full disk")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write zeros into `disk` until the filesystem reports ENOSPC; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC
    return filler


def test_full_disk_is_reported_retried_and_loses_nothing(corpus, tmp_path, processes, tmpfs):
    """The output folder's disk fills up after the first checkpoint (another job's file). Saves fail with a message,
    the log and the TensorBoard writer give up quietly, training goes on, and once space is freed the state of the
    ongoing run is saved: no step was lost and the earlier checkpoint was never touched."""
    out, ckpts = tmpfs / "run", tmpfs / "run" / "checkpoints"
    # 100 steps between saves: ~17 kB of log lines, so the log too meets the full disk before the next save
    argv = tiny_args(corpus, out, "--max_steps", 100000, "--save_every", 100, "--keep_last", 5,
                     "--report_to", "tensorboard")  # fmt: skip
    proc = launch(processes, argv, tmp_path / "full.log")
    wait_until(lambda: (ckpts / "step-100" / "train_state.json").is_file(), proc, "checkpoint step-100")
    before = digest(ckpts / "step-100")
    filler = fill(tmpfs)

    failed = lambda: output(proc).count("pretrain: error: could not save the checkpoint of step") >= 2  # noqa: E731
    wait_until(failed, proc, "2 failed saves")
    text = output(proc)
    assert "No space left on device" in text and "Earlier checkpoints are untouched" in text
    assert "pretrain: warning: could not append to" in text  # the log, full too: a warning, not a crash
    assert proc.poll() is None, "the run must go on"
    # the only tracebacks are TensorBoard's writer thread dying (printed by threading), never the training loop's
    assert text.count("Traceback") == text.count("Exception in thread")
    assert digest(ckpts / "step-100") == before
    assert latest_checkpoint(ckpts) == ckpts / "step-100"
    assert not any(p.name.startswith("step-") and p.name != "step-100" for p in ckpts.iterdir())

    filler.unlink()  # space is back: the next save, or the one on SIGTERM, succeeds
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT_S) == 0, output(proc)[-4000:]
    stop = stopped_step(output(proc))
    saved = ckpts / f"step-{stop}"
    assert latest_checkpoint(ckpts) == saved
    assert json.loads((saved / "train_state.json").read_text())["state"]["step"] == stop
    assert all(torch.isfinite(t).all() for t in weights(saved).values())
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # no half-written line
    assert records[-1]["step"] == stop


@pytest.fixture
def read_only(tmp_path):
    """Make a folder unwritable for this process: chmod for a normal user; root ignores file modes, so for root a
    read-only bind mount of the folder onto itself. Yields (make_read_only, make_writable)."""
    mounted = []

    def make_read_only(folder: Path):
        if os.geteuid() != 0:
            folder.chmod(0o555)
        else:
            try:
                mount("--bind", str(folder), str(folder))
                mounted.append(folder)
                mount("-o", "remount,bind,ro", str(folder))
            except (OSError, subprocess.CalledProcessError) as e:
                pytest.skip(f"root, and cannot bind-mount read-only here ({getattr(e, 'stderr', e)})")
        with pytest.raises(OSError):  # the test proves nothing unless writes really fail
            (folder / "probe").write_text("x")

    def make_writable(folder: Path):
        if folder in mounted:
            mounted.remove(folder)
            subprocess.run(["umount", str(folder)], check=True)
        folder.chmod(0o755)

    yield make_read_only, make_writable
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_read_only_checkpoint_folder_fails_clearly_and_keeps_the_state_for_a_retry(
    corpus, tmp_path, capsys, read_only
):
    make_read_only, make_writable = read_only
    out, ckpts = tmp_path / "ro", tmp_path / "ro" / "checkpoints"
    common = ("--max_steps", 6, "--save_every", 2)
    main(tiny_args(corpus, out, *common, "--stop_at_step", 2))
    capsys.readouterr()
    before = digest(ckpts / "step-2")
    make_read_only(ckpts)

    with pytest.raises(SystemExit) as e:
        main(tiny_args(corpus, out, *common, "--resume", "latest"))
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    for step in (4, 6):
        assert f"could not save the checkpoint of step {step} in {ckpts}" in err
    assert "Read-only file system" in err or "Permission denied" in err
    assert "GiB free there" in err  # torch's own message for a failed write can be cryptic; the free space is not
    assert "the final checkpoint could not be saved" in str(e.value.code)
    assert max(losses(out)) == 6, "training went on past the failed save"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2"], "no partial folder left"
    assert digest(ckpts / "step-2") == before

    # an output folder that cannot be created is refused up front, naming it
    with pytest.raises(SystemExit) as e:
        main(tiny_args(corpus, ckpts / "nested", *common))
    assert f"{ckpts / 'nested'}" in str(e.value.code) and "writable" in str(e.value.code)

    make_writable(ckpts)  # the retry: permissions fixed, the run continues from the last good checkpoint
    result = main(tiny_args(corpus, out, *common, "--resume", "latest"))
    assert f"Resumed from {ckpts / 'step-2'}" in capsys.readouterr().out
    assert result["status"] == "done" and result["step"] == 6


# --------------------------------------------------------------------------------------------------- NaN / inf
def assert_finite_checkpoint(folder: Path) -> None:
    """Every tensor of the weights and of AdamW's state (exp_avg, exp_avg_sq, step) is finite."""
    for name, t in weights(folder).items():
        assert torch.isfinite(t).all(), f"{folder.name}: weight {name}"
    for key, slots in torch.load(folder / "optimizer.bin", weights_only=True)["state"].items():
        for slot, t in slots.items():
            assert torch.isfinite(t).all(), f"{folder.name}: optimizer state {slot} of parameter {key}"


def stopped_at(err: str) -> tuple[str, int]:
    """What the exit-3 message says became non-finite, and at which step."""
    pattern = r"pretrain: error: the (loss|gradient norm|weights|optimizer state) became .*? at step (\d+);"
    match = re.search(pattern, err)
    assert match, err
    return match.group(1), int(match.group(2))


def test_a_diverging_run_stops_with_exit_3_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys):
    """A real divergence, not an injected one: learning rate 1e4 and no clipping. Which check fires first (the loss,
    the gradient norm, or the weights before a save) and at which step differs between CPUs; what may not differ is
    that no checkpoint holds a NaN/inf and that the one named as the last good is the latest."""
    out, ckpts = tmp_path / "diverge", tmp_path / "diverge" / "checkpoints"
    argv = tiny_args(corpus, out, "--max_steps", 50, "--save_every", 1, "--keep_last", 50, "--learning_rate", 1e4,
                     "--min_learning_rate", 0, "--warmup_steps", 0, "--max_grad_norm", 0)  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == EXIT_NONFINITE
    err = capsys.readouterr().err
    _, bad = stopped_at(err)
    last_good = latest_checkpoint(ckpts)
    assert last_good is not None and f"the last good checkpoint is {last_good}." in err
    assert last_good == ckpts / f"step-{bad - 1}" and not (ckpts / f"step-{bad}").exists()
    for folder in ckpts.iterdir():
        assert_finite_checkpoint(folder)


def test_a_nan_loss_stops_with_exit_3_a_message_and_the_last_checkpoint(corpus, tmp_path, capsys, debug_hooks):
    debug_hooks(inject_nonfinite_at_step=5)  # into the loss
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        main(tiny_args(corpus, out, "--max_steps", 10, "--save_every", 2))
    assert e.value.code == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "the loss became nan at step 5" in err and "step-4" in err and "--skip_nonfinite" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert_finite_checkpoint(out / "checkpoints" / "step-4")
    assert max(losses(out)) == 4  # nothing logged for the bad step


def test_nonfinite_gradients_under_a_finite_loss_stop_or_skip_without_clipping(corpus, tmp_path, capsys, debug_hooks):
    """--max_grad_norm 0 turns clipping off, not the check: the norm is still computed, and a NaN gradient behind a
    finite loss stops the run (exit 3) or, with --skip_nonfinite, is skipped like a NaN loss."""
    out, ckpts = tmp_path / "grads", tmp_path / "grads" / "checkpoints"
    debug_hooks(inject_nonfinite_at_step=3, inject_nonfinite_into="grads")
    extra = ("--max_steps", 5, "--save_every", 1, "--keep_last", 5, "--max_grad_norm", 0)
    with pytest.raises(SystemExit) as e:
        main(tiny_args(corpus, out, *extra))
    assert e.value.code == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert f"the gradient norm became nan at step 3; stopping. the last good checkpoint is {ckpts / 'step-2'}." in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1", "step-2"]
    assert_finite_checkpoint(ckpts / "step-2")
    assert all(math.isfinite(r["grad_norm"]) for r in read_log(out) if "loss" in r), "computed without clipping too"

    skipped = tmp_path / "grads-skipped"
    assert main(tiny_args(corpus, skipped, *extra, "--skip_nonfinite"))["status"] == "done"
    log = {r["step"]: r for r in read_log(skipped) if "loss" in r}
    assert math.isfinite(log[3]["loss"]) and math.isnan(log[3]["grad_norm"]) and log[3]["skipped_steps"] == 1
    assert_same_weights(skipped / "checkpoints" / "step-2", skipped / "checkpoints" / "step-3")
    assert_finite_checkpoint(skipped / "checkpoints" / "step-5")


@pytest.mark.parametrize(
    "into, save_every, what",
    [
        ("weights", 1, "the weights became non-finite ("),  # found before a periodic save
        # found before the final save: a NaN/inf in AdamW's moments poisons no loss; only the save-time check sees it
        ("optimizer_state", 2, "the optimizer state became non-finite (exp_avg_sq of "),
    ],
)
def test_nonfinite_weights_or_optimizer_state_are_never_checkpointed_even_with_skip_nonfinite(
    corpus, tmp_path, capsys, debug_hooks, into, save_every, what
):
    out, ckpts = tmp_path / into, tmp_path / into / "checkpoints"
    debug_hooks(inject_nonfinite_at_step=3, inject_nonfinite_into=into)
    argv = tiny_args(corpus, out, "--max_steps", 3, "--save_every", save_every, "--keep_last", 5, "--skip_nonfinite")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == EXIT_NONFINITE  # a poisoned update cannot be skipped after the fact
    err = capsys.readouterr().err
    assert f"pretrain: error: {what}" in err and stopped_at(err) == (into.replace("_", " "), 3)
    assert f"stopping. the last good checkpoint is {ckpts / 'step-2'}." in err
    assert "the checkpoint of step 3 was not written" in err
    assert latest_checkpoint(ckpts) == ckpts / "step-2" and not (ckpts / "step-3").exists()
    assert not (out / "model.safetensors").exists(), "no final model either"
    assert_finite_checkpoint(ckpts / "step-2")
    assert max(losses(out)) == 3  # the step itself looked fine: a finite loss and gradient norm


def test_skip_nonfinite_skips_the_update_and_counts_it(corpus, tmp_path, debug_hooks):
    debug_hooks(inject_nonfinite_at_step=3)  # a NaN loss
    out, ckpts = tmp_path / "skip", tmp_path / "skip" / "checkpoints"
    argv = tiny_args(corpus, out, "--max_steps", 4, "--save_every", 1, "--keep_last", 4, "--skip_nonfinite")
    assert main(argv)["status"] == "done"
    # the skipped step 3 changed neither the weights nor AdamW's moments and step count; step 4 trained again
    assert_same_weights(ckpts / "step-2", ckpts / "step-3")
    opt = [torch.load(ckpts / f"step-{s}" / "optimizer.bin", weights_only=True)["state"] for s in (2, 3)]
    for key in opt[0]:
        for name in opt[0][key]:
            assert torch.equal(opt[0][key][name], opt[1][key][name]), (key, name)
    w3, w4 = weights(ckpts / "step-3"), weights(ckpts / "step-4")
    assert any(not torch.equal(w3[name], w4[name]) for name in w3)
    state = json.loads((ckpts / "step-4" / "train_state.json").read_text())["state"]
    assert state["skipped_steps"] == 1
    log = {r["step"]: r for r in read_log(out) if "loss" in r}
    assert log[3]["loss"] != log[3]["loss"] and log[3]["skipped_steps"] == 1  # NaN, counted
    assert log[4]["skipped_steps"] == 1 and torch.isfinite(torch.tensor(log[4]["loss"]))
    assert all(torch.isfinite(t).all() for t in weights(out).values()), "the final model is finite"


# ------------------------------------------------------------------------------------------------ 2 processes
def launch_ranks(processes: list, argv: list[str], folder: Path, name: str, world: int = 2) -> list:
    """The ranks of one job, started the way torchrun (or srun on a cluster) starts them: one process each, told its
    rank by the environment, with no supervising agent, so that a survivor's fate is its own doing."""
    port = str(free_port())
    return [
        launch(processes, argv, folder / f"{name}-rank{rank}.log", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
               RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
        for rank in range(world)
    ]


def test_two_ranks_one_killed_then_one_hung_the_other_fails_in_bounded_time_and_resume_works(
    corpus, tmp_path, processes
):
    out, ckpts = tmp_path / "ddp", tmp_path / "ddp" / "checkpoints"
    timeout = 5
    argv = tiny_args(corpus, out, "--max_steps", 100000, "--save_every", 20, "--ddp_timeout", timeout, "--seed", 3)

    # 1. rank 1 is SIGKILLed mid-run, a few steps after a checkpoint: rank 0 must notice and exit with an error
    rank0, rank1 = launch_ranks(processes, argv, tmp_path, "killed")
    wait_until(logged(rank0, 23), rank0, "step 23")
    assert "x 2 processes" in output(rank0) and (ckpts / "step-20").is_dir()
    rank1.kill()
    start = time.monotonic()
    code = rank0.wait(120)  # a TimeoutExpired here is the hang this test exists to catch
    assert code > 0, f"rank 0 should fail by itself, got {code}:\n{output(rank0)[-3000:]}"
    print(f"rank 0 exited {time.monotonic() - start:.1f} s after rank 1 was killed")
    resumed_from = latest_checkpoint(ckpts)
    step = int(resumed_from.name.split("-")[1])
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in resumed_from.iterdir()}
    before = losses(out)

    # 2. resume on 2 ranks: the same losses again; then rank 1 hangs (SIGSTOP, like a node that vanished without
    #    closing its sockets), and rank 0 gives up after --ddp_timeout instead of waiting forever
    rank0, rank1 = launch_ranks(processes, [*argv, "--resume", "latest"], tmp_path, "resumed")
    wait_until(logged(rank0, step + 3), rank0, "3 steps after the resume")
    assert f"Resumed from {resumed_from} at step {step}" in output(rank0)
    again = losses(out)
    common = [s for s in before if s > step and s in again]
    assert common and all(again[s] == before[s] for s in common), "the resumed run left the killed run's path"
    rank1.send_signal(signal.SIGSTOP)
    start = time.monotonic()
    code = rank0.wait(120)
    assert code > 0, f"rank 0 should fail by itself, got {code}:\n{output(rank0)[-3000:]}"
    assert "timed out" in output(rank0).lower()  # the collective's own timeout ended it, not a lost connection
    print(f"rank 0 exited {time.monotonic() - start:.1f} s after rank 1 hung (--ddp_timeout {timeout})")
    rank1.kill()
    rank1.wait(30)
