"""`skip_logits=True` gives the plain path's loss and gradients whatever the LM head is.

The chunked loss reads the head's weight instead of calling the head, which is exact only for a plain Linear. A head
that is more than its weight (LoRA and modules_to_save from peft, accelerate's disk offload, a torchao int8 weight)
once gave the base head's loss, garbage from a meta placeholder, or no gradient to the adapter; each is checked
here against the plain loss of the same model, and the plain Linear against the chunked path."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from modeling_minigpt import MiniGPTForCausalLM
from modeling_minigpt.chunked_loss import computes_plain_linear

pytestmark = pytest.mark.oldest
IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))


def build(tied: bool = True) -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    return MiniGPTForCausalLM(tiny_config(tie_word_embeddings=tied))


def loss_and_grads(model, **kwargs) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(input_ids=IDS, labels=IDS, **kwargs).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_skip_logits_equals_the_plain_path(model):
    plain, plain_grads = loss_and_grads(model)
    skipped, skipped_grads = loss_and_grads(model, skip_logits=True)
    assert skipped == pytest.approx(plain, rel=1e-6)
    assert plain_grads.keys() == skipped_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(skipped_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("targets", [["lm_head"], ["lm_head", "qkv_proj"]])
def test_lora_on_the_lm_head(tied, targets):
    model = get_peft_model(build(tied), LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    assert not computes_plain_linear(model.base_model.model.lm_head)
    assert_skip_logits_equals_the_plain_path(model)


def test_modules_to_save_lm_head():
    config = LoraConfig(r=4, target_modules=["qkv_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    model = get_peft_model(build(tied=False), config)
    with torch.no_grad():  # the trainable copy differs from the original, as after training
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2)
    assert_skip_logits_equals_the_plain_path(model)


def test_a_plain_head_takes_the_chunked_path_with_the_same_loss_and_gradients():
    model = build()
    assert computes_plain_linear(model.lm_head)
    assert_skip_logits_equals_the_plain_path(model)


def test_a_hooked_head_is_called():
    model = build()
    model.lm_head.register_forward_hook(lambda module, args, output: output * 2)
    assert not computes_plain_linear(model.lm_head)
    assert_skip_logits_equals_the_plain_path(model)


def test_disk_offloaded_head(tmp_path):
    """accelerate loads the offloaded weight only when the head's forward runs; before that it is a meta tensor, and
    a matmul with it returned uninitialised memory (2450.8, 3.99e+20, NaN)."""
    build(tied=False).save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map={"model": "cpu", "lm_head": "disk"}, offload_folder=tmp_path / "offload"
    )
    assert model.lm_head.weight.is_meta
    with torch.no_grad():
        plain = model(input_ids=IDS, labels=IDS).loss.item()
        skipped = model(input_ids=IDS, labels=IDS, skip_logits=True).loss.item()
    expected = build(tied=False)(input_ids=IDS, labels=IDS).loss.item()
    assert plain == pytest.approx(expected, rel=1e-5)
    assert skipped == pytest.approx(plain, rel=1e-6)


def test_torchao_int8_head(tmp_path):
    """In a child process that has torchao (make installs it into <venv>/torchao, apart from the venv: once imported it
    prints library-load lines on every transformers start)."""
    torchao = Path(sys.prefix) / "torchao"
    if not (torchao / "torchao").is_dir():
        pytest.skip(f"torchao is not in {torchao}; `make venv` puts it there")
    build(tied=False).save_pretrained(tmp_path)
    expected = build(tied=False)(input_ids=IDS, labels=IDS).loss.item()
    child = textwrap.dedent(
        f"""
        import json, torch
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import AutoModelForCausalLM, TorchAoConfig
        import modeling_minigpt  # registers MiniGPT with the Auto classes
        quantization = TorchAoConfig(Int8WeightOnlyConfig(), include_input_output_embeddings=True,
                                     modules_to_not_convert=[])
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, quantization_config=quantization)
        assert type(model.lm_head.weight) is not torch.nn.Parameter, type(model.lm_head.weight)  # quantized
        ids = torch.tensor({IDS.tolist()})
        with torch.no_grad():
            plain = model(input_ids=ids, labels=ids).loss.item()
            skipped = model(input_ids=ids, labels=ids, skip_logits=True).loss.item()
        print(json.dumps([plain, skipped]))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(torchao), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plain, skipped = json.loads(result.stdout.strip().splitlines()[-1])
    assert skipped == pytest.approx(plain, rel=1e-6)
    assert plain == pytest.approx(expected, rel=1e-2)  # int8 weights: the same model, to rounding


def test_the_skip_logits_loss_has_no_logits_and_needs_labels():
    model = copy.deepcopy(get_peft_model(build(), LoraConfig(r=4, target_modules=["lm_head"])))
    out = model(input_ids=IDS, labels=IDS, skip_logits=True)
    assert out.logits is None and out.loss is not None
    with pytest.raises(ValueError, match="labels"):
        build()(input_ids=IDS, skip_logits=True)
