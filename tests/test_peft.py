"""LoRA through peft on MiniGPT: which layers it adapts, save / reload / merge, bad target names, finetune --lora.

MiniGPT's linear layers, the names LoRA targets: self_attn.qkv_proj, self_attn.o_proj, mlp.up_proj, mlp.down_proj
(and lm_head, tied to the embeddings: "all-linear" leaves it out, and apply_lora neither lists nor accepts it).
"""

import warnings

import pytest
import torch
from conftest import tiny_config
from finetune_helpers import EN_FR, make_checkpoint, run, weights
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from minigpt.train.lora import DEFAULT_LORA_TARGETS, apply_lora, linear_module_names
from modeling_minigpt import MiniGPTForCausalLM

ADAPTED = {f"model.layers.{i}.{name}" for i in range(2)
           for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip



def adapted_layers(model) -> set[str]:
    prefix = "base_model.model."
    return {name[len(prefix) : -len(".lora_A")] for name, _ in model.named_modules() if name.endswith(".lora_A")}


def greedy(model, prompt: torch.Tensor, n: int = 10) -> list[int]:
    with torch.no_grad():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False)[0].tolist()  # fmt: skip


@pytest.mark.parametrize("targets", [DEFAULT_LORA_TARGETS, "all-linear"])
def test_lora_adapts_the_four_projections_of_every_block(targets):
    model = apply_lora(MiniGPTForCausalLM(tiny_config()), targets)
    assert adapted_layers(model) == ADAPTED  # all-linear leaves out the (tied) LM head
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)


def test_adapter_save_reload_and_merge_generate_the_same_tokens(tmp_path):
    # random embeddings of the usual std 0.02 give logits too flat for LoRA's small update to move; widen them
    base_dir = make_checkpoint(tmp_path / "base", n_embd=32, initializer_range=0.5)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), DEFAULT_LORA_TARGETS, r=8, alpha=32)
    # teach the adapter one sequence, so that it changes what the model generates
    torch.manual_seed(0)
    sequence = torch.randint(3, 512, (1, 12))
    # lr 3e-2 made the loss oscillate, so the last step's loss depended on the CPU's rounding; 1e-2 converges
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(60):
        loss = model(input_ids=sequence, labels=sequence).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] / 4
    prompt = sequence[:, :2]
    tokens = greedy(model, prompt)
    assert tokens[:6] == sequence[0, :6].tolist()  # the adapter learned (the start of) the sequence...
    assert greedy(AutoModelForCausalLM.from_pretrained(base_dir), prompt) != tokens  # ...the base model did not

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    assert greedy(reloaded, prompt) == tokens

    with torch.no_grad():
        adapter_logits = reloaded(input_ids=sequence).logits
    merged = reloaded.merge_and_unload()
    assert type(merged) is MiniGPTForCausalLM and not adapted_layers(merged)
    assert greedy(merged, prompt) == tokens
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=sequence).logits, adapter_logits, rtol=1e-4, atol=1e-4)

    merged.save_pretrained(tmp_path / "merged")
    assert greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), prompt) == tokens


def test_target_modules_that_match_nothing_are_refused_with_the_available_names():
    with pytest.raises(ValueError, match=r"\['q_proj', 'v_proj'\] match no module.*'o_proj', 'qkv_proj', 'up_proj'"):
        apply_lora(MiniGPTForCausalLM(tiny_config()), "q_proj,v_proj")
    with pytest.raises(ValueError, match=r"\['o_prj'\] match no module"):  # one typo among good names: peft is silent
        apply_lora(MiniGPTForCausalLM(tiny_config()), "qkv_proj,o_prj")
    with pytest.raises(ValueError, match="not found in the base model"):  # what peft alone says
        get_peft_model(MiniGPTForCausalLM(tiny_config()), LoraConfig(target_modules=["q_proj"]))


def test_the_tied_lm_head_is_neither_offered_nor_accepted_as_a_lora_target():
    tied = MiniGPTForCausalLM(tiny_config())
    assert linear_module_names(tied) == ["down_proj", "o_proj", "qkv_proj", "up_proj"]
    with pytest.raises(ValueError) as error:
        apply_lora(tied, "q_proj")
    assert "Its linear layers are ['down_proj', 'o_proj', 'qkv_proj', 'up_proj'];" in str(error.value)
    with pytest.raises(ValueError) as error:  # the head is the embedding matrix: an adapter on it would untie it
        apply_lora(tied, "qkv_proj,lm_head")
    assert str(error.value).startswith("LoRA target modules ['lm_head'] match no module of MiniGPTForCausalLM that "
                                       "LoRA can adapt (lm_head is the LM head, tied to the token embeddings).")
    untied = MiniGPTForCausalLM(tiny_config(tie_word_embeddings=False))  # a head of its own is a fair target
    assert linear_module_names(untied) == ["down_proj", "lm_head", "o_proj", "qkv_proj", "up_proj"]
    assert "base_model.model.lm_head" in {name[: -len(".lora_A")] for name, _ in apply_lora(untied, "lm_head")
                                          .named_modules() if name.endswith(".lora_A")}  # fmt: skip


def deprecations(caught) -> list[str]:
    return [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, (DeprecationWarning,
                                                                                            FutureWarning))]  # fmt: skip


@pytest.mark.oldest
def test_applying_lora_warns_of_no_deprecation():
    # peft's PeftModel.__init__ reads the model's is_gradient_checkpointing, deprecated in transformers 5.24
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # over pytest's filterwarnings, which ignores these
        apply_lora(MiniGPTForCausalLM(tiny_config()))
    assert deprecations(caught) == []


def test_finetune_with_lora_saves_the_adapter_and_the_merged_model(tmp_path):
    base = make_checkpoint(tmp_path / "base")
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = run("--model_name_or_path", base, "--mode", "supervised", "--train_file", EN_FR, "--output_dir", out,
                      "--lora", "true", "--gradient_checkpointing", "true", lora_target_modules="all-linear",
                      max_steps=20, learning_rate=1e-2, per_device_train_batch_size=8, save_steps=10)  # fmt: skip
    # the only one: transformers 5.24 renames the --gradient_checkpointing this test passes (5.17 has no new name)
    assert [d for d in deprecations(caught) if "`gradient_checkpointing` is deprecated" not in d] == []
    assert isinstance(trainer.model, PeftModel)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    assert (out / "checkpoint-10" / "adapter_model.safetensors").is_file()

    before, after = weights(base), weights(out)
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(after["model.layers.0.self_attn.qkv_proj.weight"],
                           before["model.layers.0.self_attn.qkv_proj.weight"])  # merged update  # fmt: skip

    prompt = torch.tensor([[1, 60, 61, 10]])
    merged = AutoModelForCausalLM.from_pretrained(out)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter").eval()
    assert greedy(merged, prompt) == greedy(adapter, prompt)
