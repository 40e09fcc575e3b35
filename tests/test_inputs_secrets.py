"""The Hub token: a `pretrain --push_to_hub` run and a `python -m minigpt.hub.push`, against tests/hub_server.py, print it
nowhere and write it into no file.
"""

import subprocess
import sys

from conftest import tiny_args


def test_no_output_and_no_written_file_holds_the_hub_token(corpus, tmp_path):
    """A `pretrain --push_to_hub` run and a `python -m minigpt.hub.push`, against the local Hub server, with the token in
    HF_TOKEN: stdout, stderr, every file they wrote (output folder, checkpoints, model card, log, TensorBoard events,
    their HF_HOME and TMPDIR) and every file they pushed are searched for it, as bytes."""
    from hub_server import WRITE_TOKEN, hub_env, running_hub

    secret = WRITE_TOKEN.encode()
    home, tmp, out = tmp_path / "hf_home", tmp_path / "tmpdir", tmp_path / "run"
    tmp.mkdir()
    with running_hub() as hub:
        env = hub_env(hub, HF_HOME=str(home), TMPDIR=str(tmp))
        argv = tiny_args(corpus, out, "--max_steps", 4, "--save_every", 2, "--eval_every", 2, "--report_to",
                         "tensorboard", "--push_to_hub", "--hub_model_id", "alice/secret-test")  # fmt: skip
        train = [sys.executable, "-m", "minigpt.train.pretrain", *argv]
        push = [sys.executable, "-m", "minigpt.hub.push", str(out), "alice/secret-test-cli"]
        runs = [subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=600) for cmd in (train, push)]
        for run in runs:
            assert run.returncode == 0, run.stderr.decode(errors="replace")[-3000:]
            assert secret not in run.stdout and secret not in run.stderr, "the token was printed"
        assert b"Pushed" in runs[0].stdout and b"pushed" in runs[1].stdout
        pushed = {**hub.files("alice/secret-test"), **hub.files("alice/secret-test-cli")}
        assert "README.md" in pushed and "model.safetensors" in pushed
        for name, content in pushed.items():
            assert secret not in content, f"the token was pushed in {name}"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.match("*/checkpoints/step-2/optimizer.bin") for p in written)
    assert any("tfevents" in p.name for p in written) and (out / "README.md").is_file()
    leaks = [str(p) for p in written if secret in p.read_bytes()]
    assert not leaks, f"the token was written to {leaks}"
