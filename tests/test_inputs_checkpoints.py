"""Checkpoint folders to resume from are someone else's files: every pickle in them is unpickled with
weights_only=True (plain tensors and numbers) or refused with an error naming the file, a poisoned pickle never
runs, and a half-copied state file stops the resume instead of resuming with fresh RNG or optimizer state.
"""

from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from minigpt.train.pretrain import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class Plant:
    """Unpickling this runs `exec`, which writes a marker file: the proof that a pickle executed code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


RUN = ("--max_steps", 4, "--dropout", 0.1)  # dropout: the RNG state matters to an exact resume


@pytest.fixture
def checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    main(tiny_args(corpus, out, *RUN, "--stop_at_step", 2))
    return out


def test_a_checkpoint_holds_no_pickle_that_needs_more_than_weights_only(checkpoint):
    """Every pickled file in a checkpoint loads with weights_only=True (accelerate's numpy allow-list included), so
    refusing anything else costs no legitimate checkpoint."""
    from accelerate.utils import load

    folder = checkpoint / "checkpoints" / "step-2"
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pkl", ".pt", ".pth"))
    assert "optimizer.bin" in pickled and "random_states_0.pkl" in pickled
    for name in pickled:
        load(folder / name, map_location="cpu")  # raises UnpicklingError on anything but tensors and numbers


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_a_poisoned_pickle_in_a_checkpoint_never_runs(corpus, checkpoint, tmp_path, capsys, name):
    """Resume from a folder whose `name` carries code: nothing runs, and the resume stops naming the file.
    custom_checkpoint_0.pkl is where accelerate stores objects registered with register_for_checkpointing, which
    it loads with weights_only=False."""
    folder = checkpoint / "checkpoints" / "step-2"
    marker = tmp_path / "pwned"
    torch.save({"state": {0: Plant(marker)}, "param_groups": []}, folder / name)
    with pytest.raises(SystemExit) as e:
        main(tiny_args(corpus, checkpoint, *RUN, "--resume", str(folder)))
    assert not marker.exists(), f"unpickling {name} ran code"
    message = str(e.value.code) + capsys.readouterr().err
    assert name in message and "cannot resume" in message


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "model.safetensors"])
def test_a_truncated_state_file_stops_the_resume_naming_it(corpus, checkpoint, capsys, name):
    """A half-copied checkpoint must not resume silently with fresh RNG or optimizer state, nor crash deep inside."""
    folder = checkpoint / "checkpoints" / "step-2"
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SystemExit) as e:
        main(tiny_args(corpus, checkpoint, *RUN, "--resume", "latest"))
    message = str(e.value.code) + capsys.readouterr().err
    assert name in message and "cannot resume" in message
