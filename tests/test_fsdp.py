"""FSDP on two real gloo CPU ranks, launched the way users launch it: `accelerate launch` with the project's FSDP
config. accelerate cannot enable FSDP on CPU, so pretrain.py shards with torch's FSDP2 itself
(minigpt/train/sharding.py); these tests hold it to what the FSDP config promises:

- the sharding is real: each rank holds half the parameters (and so half the gradients and optimizer state);
- the trained weights equal those of one process with the same global batch;
- every saved folder (each step-N/ and the final one) is a complete MiniGPT checkpoint that loads with
  trust_remote_code in a process without the package, and generates;
- a resume from the sharded state ends bit for bit where the uninterrupted run ended;
- a sharding that cannot take effect is an error, never a silent fall back to DDP.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BLOCK_PACKAGE, assert_same_weights, free_port, make_corpus, read_log, tiny_args, write_txt

from minigpt.train.pretrain import main

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "minigpt" / "train" / "configs" / "accelerate" / "fsdp.yaml"
STEPS, BATCH = 4, 4

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def launch_fsdp(corpus: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    """Two CPU ranks through the FSDP accelerate config (float32: CPU FSDP has no mixed precision)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        "-m", "minigpt.train.pretrain",
        *tiny_args(corpus, out, "--n_layer", 2, "--max_steps", STEPS, "--batch_size", BATCH, "--save_every", 2,
                   *extra),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_fsdp_on_two_cpu_ranks_shards_matches_one_process_saves_loadable_folders_and_resumes_exactly(tmp_path):
    corpus = write_txt(tmp_path / "corpus.txt", make_corpus(60))
    out = tmp_path / "fsdp"
    proc = launch_fsdp(corpus, out)

    # sharded for real: each rank says what it holds, and the two halves make the model
    shares = [line for line in proc.stdout.splitlines() if "fsdp: rank" in line]
    assert len(shares) == 2, proc.stdout[-3000:]
    held = sorted(int(line.split(" holds ")[1].split(" of ")[0].replace(",", "")) for line in shares)
    total = int(shares[0].split(" of ")[1].split(" parameters")[0].replace(",", ""))
    assert sum(held) == total and held[0] >= 0.45 * total, shares
    assert "sharding torch-fsdp2" in proc.stdout

    # the folders: complete checkpoints (full model.safetensors) besides the sharded training state
    step2 = out / "checkpoints" / "step-2"
    for folder in (out, step2, out / "checkpoints" / "step-4"):
        files = {p.name for p in folder.iterdir()}
        assert {"model.safetensors", "config.json", "modeling_minigpt.py", "configuration_minigpt.py"} <= files
        assert not [name for name in files if name.startswith("_fsdp")], files
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModelForCausalLM"] == "modeling_minigpt.MiniGPTForCausalLM"
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (step2 / "fsdp").iterdir()}
    assert_same_weights(out, out / "checkpoints" / "step-4")

    # the same blocks per step in one process (2 ranks x 4 = 1 x 8): the same weights, to rounding
    single = tmp_path / "single"
    main(tiny_args(corpus, single, "--n_layer", 2, "--max_steps", STEPS, "--batch_size", 2 * BATCH))
    # rounding only: the reduce-scatter sums in another order, and both of the recipe's normalised updates (Muon's
    # orthogonalisation, Adam's division by the RMS of tiny bias gradients) carry that to ~1e-6 (measured: Muon
    # 1.0e-6, AdamW 5.5e-7, both on a qkv bias); a shard trained wrongly is off by ~1e-2
    assert_same_weights(out, single, atol=5e-6)
    fsdp_log, single_log = read_log(out), read_log(single)
    assert [r["loss"] for r in fsdp_log if "loss" in r] == pytest.approx(
        [r["loss"] for r in single_log if "loss" in r], rel=1e-5
    )

    # resume from the sharded state of step 2: bit for bit the uninterrupted run's end
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    proc = launch_fsdp(corpus, resumed, "--resume", resumed / "checkpoints" / "step-2")
    assert "Resumed from" in proc.stdout
    assert_same_weights(out, resumed)

    # each folder loads with trust_remote_code where the package cannot be imported, and generates
    code = BLOCK_PACKAGE + (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "for folder in sys.argv[1:]:\n"
        "    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)\n"
        "    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)\n"
        "    print(type(model).__name__, out.shape[1])\n"
    )
    check = subprocess.run([sys.executable, "-c", code, str(out), str(step2)], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)  # fmt: skip
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.split() == ["MiniGPTForCausalLM", "7"] * 2


def test_fsdp_on_one_process_is_an_error_not_a_silent_unsharded_run(tmp_path):
    corpus = write_txt(tmp_path / "corpus.txt", make_corpus(20))
    with pytest.raises(SystemExit, match="this launch has one"):
        main(tiny_args(corpus, tmp_path / "out", "--fsdp", "--max_steps", 1))


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}, "FSDP_OFFLOAD_PARAMS=true"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP_VERSION=1"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "asks for DeepSpeed"),
    ],
)
def test_an_accelerate_config_that_cannot_take_effect_is_an_error(tmp_path, monkeypatch, env, expected):
    """What `accelerate launch --config_file` sets in the environment for FSDP or DeepSpeed, on CPU."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    corpus = write_txt(tmp_path / "corpus.txt", make_corpus(20))
    with pytest.raises(SystemExit, match=expected):
        main(tiny_args(corpus, tmp_path / "out", "--max_steps", 1))


def test_fsdp1_under_muon_is_refused_before_any_work(tmp_path, monkeypatch):
    """FSDP1 flattens parameters; Muon orthogonalises whole matrices. AdamW goes on to the CPU ranks' own check."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    corpus = write_txt(tmp_path / "corpus.txt", make_corpus(20))
    with pytest.raises(SystemExit, match="FSDP_VERSION=1, which flattens parameters, and Muon orthogonalises"):
        main(tiny_args(corpus, tmp_path / "out", "--max_steps", 1))
    with pytest.raises(SystemExit, match="FSDP on CPU ranks is torch's FSDP2"):
        main(tiny_args(corpus, tmp_path / "out", "--max_steps", 1, "--optimizer", "adamw"))


SAVE_SHARDED = """
import json, os, sys, torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
torch.manual_seed(0)
model = MiniGPTForCausalLM(MiniGPTConfig(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=32))
reference = model(torch.tensor([[5, 6, 7]])).logits
for block in model.model.layers:
    fully_shard(block)
fully_shard(model)
print(type(model).__name__)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
model.save_pretrained(sys.argv[1], state_dict=full)  # as Trainer and accelerate save an FSDP model
print(type(model).__name__)
torch.save(reference, os.path.join(sys.argv[1], "reference.pt"))
dist.destroy_process_group()
"""


@pytest.mark.oldest

def test_save_pretrained_of_an_fsdp2_model_writes_minigpts_code_and_auto_map(tmp_path):
    """fully_shard makes the model an FSDPMiniGPTForCausalLM, a class torch generates. Trainer's and accelerate's
    save of an FSDP model calls save_pretrained on it, which recorded that class in auto_map and copied torch's
    _fsdp_*.py files instead of the model code, so the folder did not load."""
    folder = tmp_path / "saved"
    proc = subprocess.run([sys.executable, "-c", SAVE_SHARDED, str(folder), str(free_port())], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["FSDPMiniGPTForCausalLM"] * 2  # sharded before and after the save
    files = sorted(p.name for p in folder.iterdir())
    assert not [name for name in files if name.startswith("_fsdp")], files
    assert "modeling_minigpt.py" in files
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_minigpt.MiniGPTForCausalLM"

    code = BLOCK_PACKAGE + (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "logits = model(torch.tensor([[5, 6, 7]])).logits\n"
        "torch.testing.assert_close(logits, torch.load(sys.argv[1] + '/reference.pt'))\n"
    )
    check = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, cwd=tmp_path,
                           timeout=300)  # fmt: skip
    assert check.returncode == 0, check.stderr[-3000:]
