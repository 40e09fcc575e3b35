"""Workflows users run on a model, each run on transformers' GPT2LMHeadModel and on MiniGPT holding the same weights
(converted with minigpt/hub/convert_gpt2.py), so the two compute the same function. Where GPT-2 gets it right, MiniGPT must
give the same result:
- generate after the head's weights are changed in place (`.data` writes, new-token rows, a merged LoRA);
- training with gradient checkpointing and `use_cache=True`.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt.hub.convert_gpt2 import config_from_gpt2, convert_state_dict
from modeling_minigpt import MiniGPTForCausalLM
from modeling_minigpt.modeling_minigpt import CACHE_NAME

pytestmark = pytest.mark.oldest
VOCAB = 120


def gpt2_and_minigpt(attn: str = "sdpa") -> tuple[GPT2LMHeadModel, MiniGPTForCausalLM]:
    """A GPT-2 with every parameter moved off its init, and MiniGPT with the same weights."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=1,
                        eos_token_id=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,  # training-mode tests compare gradients
                        attn_implementation=attn)  # fmt: skip
    gpt2 = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in gpt2.parameters():
            p.add_(0.05 * torch.randn_like(p))
        gpt2.transformer.wte.weight.mul_(10)  # peaked next-token distributions: no greedy near-ties
    mini = MiniGPTForCausalLM(config_from_gpt2(gpt2.config))
    mini.config._attn_implementation = attn
    mini.load_state_dict(convert_state_dict(gpt2.state_dict(), config.n_layer))
    return gpt2.eval(), mini.eval()


def greedy(model, ids: torch.Tensor, n: int = 12):
    """(tokens, the logits of every generated step) of greedy generation with the KV cache."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    return out.sequences, torch.stack(out.logits, dim=1)  # (B, T + n), (B, n, V)


def assert_decode_steps_use_the_current_weights(model, sequences, step_logits):
    """Each cached decode step's logits equal a full forward over the same tokens with the weights as they are."""
    with torch.no_grad():
        full = model(sequences).logits[:, -step_logits.shape[1] - 1 : -1]  # the positions that predicted each step
    diff = (full - step_logits).abs().max().item()
    assert diff < 1e-4, f"decode-step logits differ from a full forward by {diff:.3g}: stale weights"


def update_lm_head_data(model, new_rows: torch.Tensor):
    model.lm_head.weight.data.copy_(new_rows)


def update_new_token_rows(model, new_rows: torch.Tensor):
    # the usual way to initialise added tokens; the head is tied, so it changes too
    model.get_input_embeddings().weight.data[-8:] = new_rows[-8:]


@pytest.mark.parametrize("update", [update_lm_head_data, update_new_token_rows])
def test_generate_after_an_in_place_weight_update_uses_the_new_weights(update):
    gpt2, mini = gpt2_and_minigpt()
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    for model in (gpt2, mini):
        greedy(model, ids)  # a first generate: anything cached from the old weights would be made now
    new_rows = torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(2))
    results = {}
    for name, model in (("gpt2", gpt2), ("minigpt", mini)):
        update(model, new_rows * 3)
        results[name] = greedy(model, ids)
        assert_decode_steps_use_the_current_weights(model, *results[name])
    assert results["minigpt"][0].tolist() == results["gpt2"][0].tolist()
    torch.testing.assert_close(results["minigpt"][1], results["gpt2"][1], atol=1e-4, rtol=1e-4)


def test_generate_after_merging_a_lora_on_the_lm_head_matches_gpt2():
    """peft's merge_and_unload writes the LoRA product into the head's weight through `.data`."""
    gpt2, mini = gpt2_and_minigpt()
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    lora = dict(r=4, lora_alpha=32, target_modules=["lm_head"], init_lora_weights=False)
    merged = {}
    for name, model in (("gpt2", gpt2), ("minigpt", mini)):
        greedy(model, ids)
        torch.manual_seed(3)  # the same LoRA matrices for both: the head has the same shape and name in each
        merged[name] = get_peft_model(model, LoraConfig(**lora)).merge_and_unload().eval()
    assert not torch.equal(merged["gpt2"].lm_head.weight, gpt2_and_minigpt()[0].lm_head.weight)  # it did merge
    results = {name: greedy(model, ids) for name, model in merged.items()}
    assert_decode_steps_use_the_current_weights(merged["minigpt"], *results["minigpt"])
    assert results["minigpt"][0].tolist() == results["gpt2"][0].tolist()
    torch.testing.assert_close(results["minigpt"][1], results["gpt2"][1], atol=1e-4, rtol=1e-4)


GPT2_NAME = {"model.embed_tokens.weight": "transformer.wte.weight", "model.layers.0.self_attn.qkv_proj.weight":
             "transformer.h.0.attn.c_attn.weight", "model.layers.1.mlp.down_proj.weight": "transformer.h.1.mlp.c_proj.weight"}  # fmt: skip


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_with_use_cache_gives_gpt2s_gradients(attn, use_reentrant):
    """GPT-2 warns, drops the cache and gives exact gradients; MiniGPT once gave gradients off by 0.1 (sdpa,
    reentrant), a cache of 16 positions for 8 tokens, or a size error in backward (eager)."""
    gpt2, mini = gpt2_and_minigpt(attn)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    for model in (gpt2, mini):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        out = model(ids, labels=ids, use_cache=True)
        out.loss.backward()
    assert getattr(out, CACHE_NAME) is None  # MiniGPT's output: no half-filled cache handed back
    grads = dict(mini.named_parameters())
    for mini_name, gpt2_name in GPT2_NAME.items():
        expected = gpt2.get_parameter(gpt2_name).grad
        got = grads[mini_name].grad
        got = got.t() if "c_attn" in gpt2_name or "c_proj" in gpt2_name else got  # Conv1D stores (in, out)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=mini_name)
