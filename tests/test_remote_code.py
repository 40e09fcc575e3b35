"""The code travels with the checkpoint: a folder loads with trust_remote_code where this package is absent."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BLOCK_PACKAGE, tiny_config  # BLOCK_PACKAGE: hides modeling_minigpt from a child
from transformers import pipeline

from minigpt.train.tokenizer import train_tokenizer
from modeling_minigpt import MiniGPTForCausalLM, MiniGPTForSequenceClassification

pytestmark = pytest.mark.oldest

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
        "AutoModel": "modeling_minigpt.MiniGPTModel",
        "AutoModelForCausalLM": "modeling_minigpt.MiniGPTForCausalLM",
        "AutoModelForSequenceClassification": "modeling_minigpt.MiniGPTForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_minigpt.MiniGPTForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_minigpt.MiniGPTForQuestionAnswering",
    }
    code = (folder / "modeling_minigpt.py").read_text()
    assert "from .configuration_minigpt import" in code  # relative, so the copy imports its sibling
    assert (folder / "chunked_loss.py").is_file()  # the skip_logits loss, imported relatively, travels too


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
        ids = torch.tensor([{ids[0].tolist()}])
        chunked, full = model(ids, labels=ids, skip_logits=True).loss, model(ids, labels=ids).loss
        assert torch.allclose(chunked, full, atol=1e-5), (chunked, full)
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
        print(json.dumps(out[0].tolist()))
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_trainer_label_smoothing_shifts_the_labels_with_only_trust_remote_code(saved):
    """Trainer shifts the labels for label smoothing by the model's class name in transformers' causal-LM table; the
    checkpoint's own code adds the name, so a Trainer in a process without the package smooths the causal loss too."""
    folder, model, _ = saved
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[:, :-1], dim=-1)
    targets = ids[:, 1:]
    nll = -logprobs.gather(-1, targets[..., None]).mean()
    expected = 0.9 * nll + 0.1 * (-logprobs.mean(-1)).mean()
    child = BLOCK_PACKAGE + textwrap.dedent(
        f"""
        import tempfile, torch
        from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), label_smoothing_factor=0.1, use_cpu=True,
                                 report_to="none")
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            print(Trainer(model=model.eval(), args=args).compute_loss(model, {{"input_ids": ids, "labels": ids}}).item())
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(expected.item(), rel=1e-5)


def test_every_auto_class_loads_from_the_checkpoint_alone_whichever_head_saved_it(saved, tmp_path):
    """With the package installed, AutoModel and the task-head Auto classes work; from the checkpoint alone
    (trust_remote_code) they must too, for a folder written by the LM or by a classification head. The body's
    hidden states must be the saved model's."""
    lm_folder, lm, _ = saved
    torch.manual_seed(1)
    classifier = MiniGPTForSequenceClassification(tiny_config(num_labels=3)).eval()
    classifier.save_pretrained(tmp_path)
    ids = torch.randint(3, 100, (1, 6))
    expected = {str(lm_folder): lm.model(ids).last_hidden_state, str(tmp_path): classifier.model(ids).last_hidden_state}
    child = BLOCK_PACKAGE + textwrap.dedent(
        f"""
        import json, torch, transformers
        autos = ["AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification",
                 "AutoModelForTokenClassification", "AutoModelForQuestionAnswering"]
        result = {{}}
        for folder in {list(expected)!r}:
            for name in autos:
                model = getattr(transformers, name).from_pretrained(folder, trust_remote_code=True).eval()
                body = model if name == "AutoModel" else model.model
                hidden = body(torch.tensor({ids.tolist()})).last_hidden_state
                result[folder + "|" + name] = [type(model).__name__, hidden.flatten().tolist()]
        print(json.dumps(result))
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    heads = ["MiniGPTModel", "MiniGPTForCausalLM", "MiniGPTForSequenceClassification",
             "MiniGPTForTokenClassification", "MiniGPTForQuestionAnswering"]  # fmt: skip
    for folder, hidden in expected.items():
        got = [loaded[key] for key in loaded if key.startswith(folder + "|")]
        assert [name for name, _ in got] == heads
        for _, values in got:
            torch.testing.assert_close(torch.tensor(values).view_as(hidden), hidden)


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
