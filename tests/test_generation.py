"""Generation through transformers' own `generate`: every strategy, the caches, padding and streaming."""

import pytest
import torch
from conftest import tiny_config
from transformers import GenerationConfig, StaticCache, TextStreamer

from modeling_minigpt import MiniGPTForCausalLM

pytestmark = pytest.mark.oldest
EOS = 2


def build(peaked=True, **overrides) -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(tiny_config(**overrides)).eval()
    # a peaked output distribution makes greedy near-ties impossible, so token-exact comparisons are meaningful;
    # sampling tests keep the flat one, where every seed draws something different
    if peaked:
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(20)
    return model


def prompt(batch=2, length=6, seed=1):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_with_cache_equals_without_cache(pos, attn):
    model = build(position_embedding_type=pos)
    model.config._attn_implementation = attn
    ids = prompt()
    cached = model.generate(ids, max_new_tokens=20, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=20, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape == (2, 26)


def test_greedy_is_the_argmax_of_the_logits():
    model = build()
    ids = prompt(batch=1)
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    running = ids
    for _ in range(5):
        running = torch.cat([running, model(running).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, running)


def test_static_cache_equals_dynamic_cache():
    model = build()
    ids = prompt()
    dynamic = model.generate(ids, max_new_tokens=12, do_sample=False)
    static = model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)
    # and an explicit StaticCache object passed in by the user
    cache = StaticCache(config=model.config, max_cache_len=40)
    explicit = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert torch.equal(dynamic, explicit)


@pytest.mark.parametrize(
    "options",
    [
        dict(top_k=5),
        dict(top_p=0.8),
        dict(temperature=0.7),
        dict(top_k=10, top_p=0.9, temperature=1.3),
    ],
)
def test_sampling_is_seeded_and_reproducible(options):
    model = build(peaked=False)
    ids = prompt()

    def sample(seed):
        torch.manual_seed(seed)
        return model.generate(ids, max_new_tokens=15, do_sample=True, **options)

    assert torch.equal(sample(123), sample(123))
    assert any(not torch.equal(sample(123), sample(seed)) for seed in range(5))


def test_top_k_one_equals_greedy():
    model = build()
    ids = prompt()
    torch.manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=1)
    assert torch.equal(sampled, model.generate(ids, max_new_tokens=10, do_sample=False))


def test_top_k_only_picks_among_the_k_most_likely():
    model = build(peaked=False)
    ids = prompt(batch=1)
    allowed = model(ids).logits[0, -1].topk(3).indices
    for seed in range(10):
        torch.manual_seed(seed)
        token = model.generate(ids, max_new_tokens=1, do_sample=True, top_k=3, temperature=5.0)[0, -1]
        assert token in allowed


def test_beam_search_scores_at_least_as_well_as_greedy():
    model = build()
    ids = prompt(batch=1)
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    beams = model.generate(
        ids, max_new_tokens=8, num_beams=4, num_return_sequences=2, do_sample=False,
        output_scores=True, return_dict_in_generate=True, length_penalty=0.0,
    )
    assert beams.sequences.shape == (2, 14)

    def logprob(seq):
        logits = model(seq[None]).logits[0, ids.shape[1] - 1 : -1].log_softmax(-1)
        return logits.gather(-1, seq[ids.shape[1] :, None]).sum().item()

    assert logprob(beams.sequences[0]) >= logprob(greedy.sequences[0]) - 1e-4


def test_repetition_penalty_changes_the_output_and_reduces_repeats():
    model = build()
    ids = prompt(batch=1)
    plain = model.generate(ids, max_new_tokens=30, do_sample=False)
    penalised = model.generate(ids, max_new_tokens=30, do_sample=False, repetition_penalty=5.0)
    assert not torch.equal(plain, penalised)
    assert len(set(penalised[0, 6:].tolist())) >= len(set(plain[0, 6:].tolist()))


def test_eos_stops_generation_and_max_new_tokens_bounds_it():
    model = build()
    ids = prompt(batch=1)
    free = model.generate(ids, max_new_tokens=10, do_sample=False)
    stop_token = free[0, 8].item()  # the third generated token becomes the "end of sequence"
    stopped = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=stop_token)
    first = (free[0, 6:] == stop_token).nonzero()[0].item()
    assert stopped.shape[1] == 6 + first + 1 and stopped[0, -1].item() == stop_token
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 10)


def test_batched_left_padding_gives_each_row_its_own_tokens_and_logits():
    model = build()
    rows = [torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # pad id 0
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=10, do_sample=False,
                               output_scores=True, return_dict_in_generate=True)
        assert torch.equal(batched.sequences[i, width:], alone.sequences[0, len(row):])
        for step_batched, step_alone in zip(batched.scores, alone.scores):
            torch.testing.assert_close(step_batched[i], step_alone[0], atol=1e-5, rtol=1e-5)
    # the plain forward agrees too: positions come from the attention mask
    logits = model(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        torch.testing.assert_close(logits[i, width - len(row):], model(row[None]).logits[0], atol=1e-5, rtol=1e-5)


def test_text_streamer_receives_the_generated_text(capsys):
    from minigpt.train.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["to be or not to be, that is the question"] * 20, vocab_size=300)
    model = build(vocab_size=len(tokenizer))
    ids = tokenizer("to be", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, streamer=TextStreamer(tokenizer))
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(out[0]).strip()


def test_generation_config_defaults_are_used(tmp_path):
    model = build()
    model.generation_config = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    model.save_pretrained(tmp_path)
    reloaded = MiniGPTForCausalLM.from_pretrained(tmp_path)
    assert reloaded.generation_config.max_new_tokens == 3
    assert reloaded.generate(prompt(batch=1)).shape[1] <= 6 + 3
