"""The opt-in fast decode loop (modeling_minigpt.fast_decode) gives generate()'s greedy tokens exactly.

On a CPU the loop runs its step without CUDA graphs and without compiling; the step is the same function that
the GPU captures (tests/test_compile.py checks that it traces as one graph)."""

import pytest
import torch
from conftest import tiny_config

from modeling_minigpt import MiniGPTForCausalLM
from modeling_minigpt.fast_decode import FastDecoder, fast_generate

pytestmark = pytest.mark.oldest


def build(peaked=True, **overrides) -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(tiny_config(**overrides)).eval()
    if peaked:  # a peaked output distribution: no greedy near-ties, so token equality is meaningful
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(20)
    return model


def prompt(batch=3, length=7, seed=1):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padding(ids):
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return mask


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("padded", [False, True])
def test_greedy_tokens_equal_generate(pos, padded):
    model = build(position_embedding_type=pos)
    ids = prompt()
    mask = left_padding(ids) if padded else None
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    assert torch.equal(fast_generate(model, ids, 24, attention_mask=mask), expected)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_with_eos_stops_and_pads_like_generate(attn):
    model = build()
    model.config._attn_implementation = attn
    ids = prompt()
    free = model.generate(ids, max_new_tokens=24, do_sample=False)
    eos = int(free[0, ids.shape[1] + 5])  # a token row 0 emits on its 6th step: it stops there
    expected = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = fast_generate(model, ids, 24, eos_token_id=eos, pad_token_id=0, check_every=4)
    assert torch.equal(out, expected)
    assert (out[0, ids.shape[1] + 6 :] == 0).all()


def test_a_decoder_is_reusable_across_prompts_and_lengths():
    model = build()
    decoder = FastDecoder(model, batch_size=2, max_length=32)
    for seed, (length, new) in enumerate([(5, 20), (9, 12), (3, 29)]):
        ids = prompt(batch=2, length=length, seed=seed)
        expected = model.generate(ids, max_new_tokens=new, do_sample=False)
        assert torch.equal(decoder.generate(ids, new), expected)


def test_sampling_follows_the_seed_and_respects_top_k():
    model = build(peaked=False)  # a flat distribution: different seeds draw different tokens
    ids = prompt(batch=2)
    decoder = FastDecoder(model, batch_size=2, max_length=40)
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(decoder.generate(ids, 30, do_sample=True, top_k=3))
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
    # each sampled token is among the 3 most likely given what came before
    with torch.no_grad():
        logits = model(draws[0]).logits[:, ids.shape[1] - 1 : -1]  # (B, 30, V): predictions for the new tokens
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == draws[0][:, ids.shape[1] :, None]).any(-1).all()


def test_bad_calls_say_what_to_change():
    model = build()
    decoder = FastDecoder(model, batch_size=2, max_length=16)
    with pytest.raises(ValueError, match="batch_size=2"):
        decoder.generate(prompt(batch=3), 4)
    with pytest.raises(ValueError, match="max_length=16"):
        decoder.generate(prompt(batch=2, length=10), 7)
    with pytest.raises(ValueError, match="n_positions=64"):
        FastDecoder(model, batch_size=1, max_length=65)
    with pytest.raises(ValueError, match="cuda_graphs=False"):
        FastDecoder(model, batch_size=1, max_length=8, cuda_graphs=True)


def test_eos_and_pad_default_to_the_generation_config_as_in_generate():
    model = build()
    ids = prompt()
    free = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
    model.generation_config.eos_token_id = int(free[1, ids.shape[1] + 3])
    model.generation_config.pad_token_id = 0
    expected = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert expected.shape[1] < free.shape[1] or (expected == 0).any()  # the EOS changed the outcome
    assert torch.equal(fast_generate(model, ids, 24), expected)
