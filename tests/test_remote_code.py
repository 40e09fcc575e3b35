"""The code travels with the checkpoint: a folder loads with trust_remote_code where this package is absent."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config
from transformers import pipeline

from modeling_minigpt import MiniGPTForCausalLM
from train.tokenizer import train_tokenizer

pytestmark = pytest.mark.oldest

# Run first in the child process: any import of modeling_minigpt fails, as on a machine without the package.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_minigpt" or name.startswith("modeling_minigpt."):
                raise ImportError(f"{name} is not installed here")
    sys.meta_path.insert(0, _Absent())
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog. " * 3] * 30, vocab_size=300)
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(
        tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    ).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def test_save_pretrained_writes_auto_map_and_the_code(saved):
    folder, _, _ = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "minigpt"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_minigpt.MiniGPTConfig",
        "AutoModelForCausalLM": "modeling_minigpt.MiniGPTForCausalLM",
    }
    code = (folder / "modeling_minigpt.py").read_text()
    assert "from .configuration_minigpt import" in code  # relative, so the copy imports its sibling


def test_trust_remote_code_load_without_the_package_generates_the_same_tokens(saved):
    folder, model, tokenizer = saved
    ids = tokenizer("the quick brown", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)[0].tolist()
    child = BLOCK_PACKAGE + textwrap.dedent(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        try:
            import modeling_minigpt
            raise SystemExit("the package is importable; the test would prove nothing")
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        out = model.generate(torch.tensor([{ids[0].tolist()}]), max_new_tokens=12, do_sample=False)
        print(json.dumps(out[0].tolist()))
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_loading_the_folder_without_trust_remote_code_asks_for_it(saved):
    folder, _, _ = saved
    child = BLOCK_PACKAGE + textwrap.dedent(
        f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=False)
        except ValueError as error:
            assert "trust_remote_code" in str(error), error
            print("asked")
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("asked"), result.stderr[-3000:]


def test_text_generation_pipeline_on_the_folder(saved):
    folder, model, tokenizer = saved
    generator = pipeline("text-generation", model=str(folder))
    text = generator("the quick brown", max_new_tokens=10, do_sample=False)[0]["generated_text"]
    ids = tokenizer("the quick brown", return_tensors="pt").input_ids
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=10, do_sample=False)[0], skip_special_tokens=True)
    assert text == expected
