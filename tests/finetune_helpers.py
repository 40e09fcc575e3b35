"""What the fine-tuning, evaluation and LoRA tests share: the example files, a tiny checkpoint, and minigpt.train.finetune
run in this process. Not a test module (pytest collects test_*.py only); the tests import from it."""

import json
import os
import sys
from pathlib import Path

import torch
from conftest import tiny_config
from safetensors.torch import load_file

from minigpt.train import finetune
from minigpt.train.tokenizer import train_tokenizer
from modeling_minigpt import MiniGPTForCausalLM

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "minigpt" / "train" / "examples"
EN_FR = EXAMPLES / "en_fr.jsonl"
QA = EXAMPLES / "qa.jsonl"
PYTHON = sys.executable


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def example_texts() -> list[str]:
    return [v for path in (EN_FR, QA) for row in read_jsonl(path) for v in row.values()]


def make_checkpoint(folder: Path, tokenizer=None, seed: int = 0, **config) -> Path:
    """A tiny MiniGPT with a BPE trained on the example files, saved as a complete checkpoint folder."""
    tokenizer = tokenizer or train_tokenizer(example_texts(), vocab_size=512, min_frequency=1)
    torch.manual_seed(seed)
    fields = dict(vocab_size=len(tokenizer), n_embd=64, n_positions=64)
    fields.update(config)
    MiniGPTForCausalLM(tiny_config(**fields)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def qa_text_file(path: Path, rows: list[dict]) -> Path:
    """The question/answer pairs as plain text, one paragraph each, for causal mode."""
    path.write_text("\n\n".join(f"Q: {r['question']}\nA: {r['answer']}" for r in rows) + "\n", encoding="utf-8")
    return path


def run(*args, **options) -> "finetune.Trainer":
    """finetune.main in this process, with the flags every test wants (CPU, quiet, no reporting)."""
    argv = [str(a) for a in args]
    defaults = {"--use_cpu": "true", "--report_to": "none", "--disable_tqdm": "true", "--seed": "0", "--threads": "1"}
    for key, value in {**defaults, **{f"--{k}": v for k, v in options.items()}}.items():
        if key not in argv:
            argv += [key, str(value)]
    return finetune.main(argv)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
