"""Continuous batching: `model.generate_batch(...)`, the engine behind `transformers serve --continuous-batching`.

It packs the requests into one row and hands the model a PagedAttentionCache, which has no get_seq_length() and
needs the attention's keyword arguments in `cache.update` (transformers 5.25), or is updated by the paged attention
functions themselves (5.17). Whatever the packing and the scheduling, greedy decoding must give each prompt the tokens
`generate()` gives it alone.
"""

import dataclasses

import pytest
import torch
import transformers
from conftest import tiny_config
from transformers import GenerationConfig
from transformers.generation import GenerationMixin

from modeling_minigpt import MiniGPTForCausalLM

pytestmark = pytest.mark.oldest

if not hasattr(GenerationMixin, "generate_batch") or not hasattr(transformers, "ContinuousBatchingConfig"):
    pytest.skip(
        f"transformers {transformers.__version__} has no continuous batching (generate_batch)", allow_module_level=True
    )

# different lengths, one longer than a batch's token budget below, so that its prefill is cut into chunks that read
# the cache its earlier chunks wrote, while the other requests decode beside it
PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [40], [50, 51, 52, 53, 54]]
NEW_TOKENS = 6
EOS = 2  # tiny_config's eos_token_id


def build(position_embedding_type: str, attn_implementation: str = "sdpa") -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    config = tiny_config(position_embedding_type=position_embedding_type, tie_word_embeddings=False)
    model = MiniGPTForCausalLM(config).eval()
    model.set_attn_implementation(attn_implementation)
    # a peaked output distribution: the packed batch sums in another order than a lone prompt, and greedy must not
    # flip on a near-tie; an untied head keeps the tokens varied (scaled tied embeddings just repeat the last token)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def small_cache() -> "transformers.ContinuousBatchingConfig":
    """A small paged cache (by default it is sized from the machine's memory, which takes seconds to fill on a CPU),
    and at most 8 tokens a step. Its pages are `page_size` from transformers 5.25 (`block_size` there is deprecated),
    `block_size` before."""
    fields = {field.name for field in dataclasses.fields(transformers.ContinuousBatchingConfig)}
    page = "page_size" if "page_size" in fields else "block_size"
    return transformers.ContinuousBatchingConfig(**{page: 16}, num_blocks=16, max_batch_tokens=8)


def generate_alone_and_batched(model, eos_token_id) -> tuple[dict, dict]:
    """{prompt: new tokens} from generate() on each prompt alone, and from one generate_batch() on all of them."""
    greedy = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "eos_token_id": eos_token_id, "pad_token_id": 0}
    # generate() fills what its config leaves unset from the model's, and generate_batch() sets eos to -1 in the
    # config it is given when unset: each call gets a config of its own, and the model's says the same
    model.generation_config.eos_token_id = eos_token_id
    alone = {
        tuple(p): model.generate(torch.tensor([p]), generation_config=GenerationConfig(**greedy))[0, len(p) :].tolist()
        for p in PROMPTS
    }
    outputs = model.generate_batch(
        PROMPTS,
        generation_config=GenerationConfig(**greedy),
        continuous_batching_config=small_cache(),
        progress_bar=False,
    )
    batched = {tuple(out.prompt_ids): list(out.generated_tokens) for out in outputs.values()}
    return alone, batched


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_generate_batch_equals_generate(pos, attn):
    model = build(pos, attn)
    # eos off: every request runs its full length, so that every decode step is compared
    alone, batched = generate_alone_and_batched(model, eos_token_id=None)
    assert batched == alone
    assert all(len(tokens) == NEW_TOKENS for tokens in batched.values())
    # generate_batch puts the model's own attention back afterwards
    assert model.config._attn_implementation == attn


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_generate_batch_stops_each_request_at_eos(pos):
    """With the model's eos, requests end at different steps (some right after their prefill) while the others go
    on in the freed batch; each still gets exactly generate()'s tokens, the eos included."""
    alone, batched = generate_alone_and_batched(build(pos), eos_token_id=EOS)
    assert batched == alone
    lengths = {len(tokens) for tokens in alone.values()}
    assert len(lengths) > 1, f"every request ran {lengths} tokens: pick prompts some of which end early"
