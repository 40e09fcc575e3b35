"""Checkpoints from outside: weights come from safetensors, a damaged weight file is refused with an error that names
it, nothing is ever unpickled beyond plain tensors, and CPU training is bit-for-bit reproducible.

A truncated file is what a save killed halfway, a full disk or an interrupted copy leaves behind. safetensors
refuses it, but its message ("incomplete metadata, file not fully covered") names no file, so the loader every
script and hub/ use (`minigpt.train.checkpoints.load_pretrained`) checks each weight file's header first. The model class
itself stays transformers' own: no from_pretrained override ships inside checkpoints.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import BLOCK_PACKAGE  # makes `import modeling_minigpt` fail in a child process
from huggingface_hub import constants
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from minigpt.folders import load_pretrained
from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM

CONFIG = dict(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)


def save_tiny(folder: Path, seed: int = 0, **save_kwargs) -> MiniGPTForCausalLM:
    torch.manual_seed(seed)
    model = MiniGPTForCausalLM(MiniGPTConfig(**CONFIG)).eval()
    model.save_pretrained(folder, **save_kwargs)
    return model


def header_length(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")  # safetensors: an 8-byte little-endian length, then a JSON header


# Each takes the file's bytes and returns the damaged bytes.
DAMAGE = {
    "cut in half": lambda data: data[: len(data) // 2],
    "last byte missing": lambda data: data[:-1],
    "empty": lambda data: b"",
    "cut inside the header": lambda data: data[: 8 + header_length(data) // 2],
    "header overwritten": lambda data: data[:8] + b"\xff" * 16 + data[24:],
    "header length garbage": lambda data: (10**12).to_bytes(8, "little") + data[8:],
    "bytes appended": lambda data: data + b"\0" * 64,
}


@pytest.mark.oldest
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_weight_file_is_refused_with_an_error_naming_it(tmp_path, damage):
    save_tiny(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(DAMAGE[damage](weights.read_bytes()))
    for model_class in (MiniGPTForCausalLM, AutoModelForCausalLM):
        with pytest.raises(OSError, match=re.escape(str(weights)) + ".*truncated or corrupted"):
            load_pretrained(model_class, tmp_path)


def test_the_check_works_with_trust_remote_code_where_the_package_is_absent(tmp_path):
    """Where the package is absent, trust_remote_code loads the modeling file copied into the checkpoint; the
    scripts' loader names the damaged file all the same."""
    save_tiny(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    child = BLOCK_PACKAGE + textwrap.dedent(
        f"""
        from transformers import AutoModelForCausalLM
        from minigpt.folders import load_pretrained
        try:
            load_pretrained(AutoModelForCausalLM, {str(tmp_path)!r}, trust_remote_code=True)
        except OSError as error:
            print("OSError:", error)
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert f"OSError: {weights} is truncated or corrupted" in result.stdout, result.stdout + result.stderr


@pytest.mark.oldest
def test_a_damaged_shard_is_named_among_several(tmp_path):
    save_tiny(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2, shards
    damaged = tmp_path / shards[-1]
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(OSError, match=re.escape(str(damaged))):
        load_pretrained(MiniGPTForCausalLM, tmp_path)
    # the intact shards load alone: only the damaged one is blamed
    for shard in shards[:-1]:
        assert load_file(tmp_path / shard)
    index_file = tmp_path / "model.safetensors.index.json"
    index_file.write_text(index_file.read_text()[:40])
    with pytest.raises(OSError, match=re.escape(str(index_file)) + ".*truncated or corrupted"):
        load_pretrained(MiniGPTForCausalLM, tmp_path)


@pytest.mark.oldest
def test_a_damaged_file_in_the_hub_cache_names_the_repository(tmp_path):
    """A model loaded by repository id reads from the Hub cache (offline here). Its weight file lives under a
    hashed snapshot folder, so the error names the repository and says how to fetch a fresh copy."""
    commit = "0" * 40
    repo = Path(constants.HF_HUB_CACHE) / "models--minigpt-tests--damaged"
    snapshot = repo / "snapshots" / commit
    save_tiny(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)  # HF_HOME may be kept between runs (MINIGPT_TEST_HF_HOME)
    (repo / "refs" / "main").write_text(commit)
    MiniGPTForCausalLM.from_pretrained("minigpt-tests/damaged")  # intact: loads from the cache
    weights = snapshot / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(OSError, match="minigpt-tests/damaged.*truncated or corrupted.*force_download=True"):
        load_pretrained(MiniGPTForCausalLM, "minigpt-tests/damaged")


def test_save_pretrained_writes_safetensors_and_no_pickle(tmp_path):
    model = save_tiny(tmp_path)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert "model.safetensors" in names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], names
    stored = load_file(tmp_path / "model.safetensors")
    # the tied head is stored once, under the embedding's name
    assert set(stored) | {"lm_head.weight"} == set(model.state_dict())
    for name, tensor in stored.items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_weights_are_read_from_safetensors_even_when_a_pickle_sits_beside_them(tmp_path):
    model = save_tiny(tmp_path)
    decoy = {name: torch.full_like(tensor, 7.0) for name, tensor in model.state_dict().items()}
    torch.save(decoy, tmp_path / "pytorch_model.bin")
    loaded = MiniGPTForCausalLM.from_pretrained(tmp_path)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


class _Payload:
    """A pickle that runs a command when unpickled: what a malicious pytorch_model.bin would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_in_it_is_refused_and_never_run(tmp_path):
    """With no safetensors file, transformers falls back to pytorch_model.bin, through torch.load(weights_only=True),
    which unpickles tensors and plain containers only."""
    save_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        MiniGPTForCausalLM.from_pretrained(tmp_path)
    assert not marker.exists(), "unpickling the weight file ran the code inside it"


# ---------------------------------------------------------------- determinism

TRAIN = textwrap.dedent(
    """
    import sys
    import torch
    from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM

    seed, steps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(seed)
    config = MiniGPTConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                           embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)  # dropout: the RNG matters every step
    model = MiniGPTForCausalLM(config).train()
    model.save_pretrained(out + "/initial")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    data = torch.randint(0, 64, (steps, 4, 24), generator=torch.Generator().manual_seed(1234))
    for step in range(steps):
        loss = model(data[step], labels=data[step]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(out + "/final")
    print(f"loss {loss.item():.6f}")
    """
)
STEPS = 8


def test_same_seed_data_and_config_give_bit_identical_weights_on_cpu(tmp_path):
    """Two training runs in separate processes (fresh RNG, allocator and thread pools), side by side."""
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TRAIN, "0", str(STEPS), str(run)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for run in runs
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output

    a, b = (load_file(run / "final" / "model.safetensors") for run in runs)
    assert a.keys() == b.keys()
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"weights differ after {STEPS} steps: {differing}"
    # the runs did train: every weight moved away from its initial value
    initial = load_file(runs[0] / "initial" / "model.safetensors")
    assert all(not torch.equal(initial[name], a[name]) for name in a if not name.endswith("bias"))
    assert [line for line in outputs[0].splitlines() if line.startswith("loss")] == [
        line for line in outputs[1].splitlines() if line.startswith("loss")
    ]
