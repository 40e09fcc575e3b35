"""`python -m minigpt.train.demo` interrupted with Ctrl-C (a real SIGINT to a real process): it says so, reports nothing it did
not measure, names a command that continues it, and a new demo never reports an earlier run's model.

The demo trains on the built-in corpus (tokenized once, then cached under the tests' HF_HOME); the passthrough flags
shrink the model to one 16-wide layer, so that a step takes milliseconds and the demo's report a few seconds.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ctrl_c_reaches_it

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 300  # the first run tokenizes the built-in corpus (about 35 s on 2 cores); a timeout means a hang
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--log_every", "1", "--eval_every", "0",
        "--save_every", "0", "--report_to", "none"]  # fmt: skip
MEASURED = ("validation perplexity", "unigram perplexity", "PASS", "FAIL", "sample ---", "tokens/s on")


def test_help_names_every_pretrain_flag_the_demo_passes_through(capsys):
    from transformers import HfArgumentParser

    from minigpt.train import demo as demo_module
    from minigpt.train.args import DataArguments, ModelArguments, TrainArguments

    with pytest.raises(SystemExit) as done:
        demo_module.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog to the terminal width
    assert text.startswith("usage: python -m minigpt.train.demo [-h] [--output_dir OUTPUT_DIR] [--resume] "
                           "[minigpt.train.pretrain flags ...]")  # fmt: skip
    assert "Every other flag goes to minigpt.train.pretrain, after the demo's own `--config tiny --cpu " \
           "--overwrite_output_dir --output_dir OUTPUT_DIR`" in text  # fmt: skip
    assert "`python -m minigpt.train.pretrain --help` explains each one with its units." in text
    listed = text.split("They are: ", 1)[1].split()
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))  # pretrain's own parser
    expected = [a.option_strings[0] for a in parser._actions if a.dest not in ("help", "output_dir", "resume")]
    assert listed == expected and {"--max_steps", "--n_layer", "--learning_rate", "--data"} <= set(listed)


def test_a_config_given_to_the_demo_replaces_the_tiny_preset():
    from minigpt.train.demo import pretrain_argv

    assert pretrain_argv("out", ["--max_steps", "5"]) == ["--config", "tiny", "--cpu", "--overwrite_output_dir",
                                                          "--output_dir", "out", "--max_steps", "5"]  # fmt: skip
    # the user's --config replaces the preset
    assert pretrain_argv("out", ["--config=mine.yaml"]) == ["--cpu", "--overwrite_output_dir", "--output_dir", "out",
                                                            "--config=mine.yaml"]  # fmt: skip


def demo(processes: list, log: Path, *argv: str, command: list[str] | None = None) -> subprocess.Popen:
    """Start `python -m minigpt.train.demo argv` (or `command argv`) from the repo root, in a shell where this
    interpreter's folder is not on PATH (a .venv not activated); stdout and stderr in the file `log`."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != bin_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PATH": path}
    command = command or [sys.executable, "-m", "minigpt.train.demo"]
    with open(log, "w") as f:
        proc = subprocess.Popen([*command, *argv], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=ctrl_c_reaches_it)
    proc.log = log
    processes.append(proc)
    return proc


def interrupt_after_step(proc, step: int) -> str:
    """SIGINT once the run has logged `step`; the demo's whole output once it has exited."""
    deadline = time.monotonic() + WAIT_S
    while f"step {step} | loss" not in proc.log.read_text(errors="replace"):
        assert proc.poll() is None, proc.log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, f"no step {step} after {WAIT_S} s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(WAIT_S)
    return proc.log.read_text(errors="replace")


def assert_interrupted(text: str, proc) -> None:
    assert proc.returncode == 130, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert "MiniGPT demo: interrupted before training finished" in text
    report = text[text.index("MiniGPT demo: interrupted") :]
    assert not [word for word in MEASURED if word in report], report


def test_an_interrupted_demo_says_so_and_continues_and_a_new_one_never_reports_the_old_model(tmp_path, processes):
    out = tmp_path / "demo"
    # 1. a first demo, interrupted: no traceback, no numbers, and a command that continues it
    proc = demo(processes, tmp_path / "first.log", "--output_dir", str(out), "--max_steps", "3000", *TINY)
    text = interrupt_after_step(proc, 3)
    assert_interrupted(text, proc)
    stopped = int(text.split("Stopped at step ")[1].split()[0])
    continue_line = next(line for line in text.splitlines() if line.startswith("continue:"))
    hint = shlex.split(continue_line.split(maxsplit=1)[1])
    assert hint[-3:] == ["--output_dir", str(out), "--resume"], continue_line
    assert not (out / "model.safetensors").exists()
    record = json.loads((out / "checkpoints" / f"step-{stopped}" / "train_state.json").read_text())
    assert record["corpus"].startswith("the built-in corpus "), record  # the model card's data, without --data

    # 2. that very command, run from a shell where .venv is not activated (PATH without this interpreter's folder),
    # continues it (here to a nearer end): the report is of the model trained to that step
    end = stopped + 2
    proc = demo(processes, tmp_path / "continued.log", "--max_steps", str(end), command=hint)
    proc.wait(WAIT_S)
    text = proc.log.read_text(errors="replace")
    assert proc.returncode in (0, 1), text[-4000:]  # 1: a model this small and short fails the ratio, honestly
    assert f"Resumed from {out / 'checkpoints' / f'step-{stopped}'} at step {stopped}" in text
    assert f"resume: --max_steps {end} overrides the checkpoint's 3000" in text
    assert f"{end} steps on" in text and "validation perplexity" in text
    assert (out / "model.safetensors").is_file()

    # 3. a new demo in the same folder, interrupted: the earlier run's final model is gone, nothing is reported
    proc = demo(processes, tmp_path / "second.log", "--output_dir", str(out), "--max_steps", "3000", *TINY)
    text = interrupt_after_step(proc, 3)
    assert_interrupted(text, proc)
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert f"--output_dir {out} --resume" in text
