"""Model invariants, property-based: what must hold for every config and every input, not just the examples.

Each property draws a config (every position type, both norm positions, every activation in transformers'
ACT2FN, eager or sdpa attention, 1-2 layers, width 8 or 16 in 1-8 heads, with and without biases, tied or untied
head), a batch shape, a padding pattern (none, an all-ones mask, left, right, or mixed per row) and the token
ids, padding ids included: a correct attention mask makes whatever sits under the padding irrelevant.

Models are built once per drawn config (`build` is an LRU cache) and never modified; a test that needs another
dtype or backend changes a deep copy. The number of examples per property comes from the hypothesis profile
registered in conftest.py: "ci" by default, "long" under `make test-long` (HYPOTHESIS_PROFILE=long).

Tolerances: two fp32 computations that are equal in exact arithmetic but add in a different order (another
batch size, a cache, another attention kernel) may differ by a few ulps, so they are compared with
`assert_close(rtol=FP32_RTOL, atol=FP32_ATOL)`. Where nothing changes but the bytes on disk (save/load), they
must be bit-identical. bf16 is compared with BF16_TOLERANCE, relative to the largest fp32 logit.
"""

import copy
import functools
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers import DynamicCache, StaticCache  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM  # noqa: E402
from modeling_minigpt.configuration_minigpt import NORM_POSITIONS, POSITION_EMBEDDING_TYPES  # noqa: E402

VOCAB = 61  # a prime, so that no width or length lines up with it by accident
N_POSITIONS = 40
MAX_LEN = 12
ACTIVATIONS = sorted(ACT2FN)  # every activation transformers knows, relu to xielu
FP32_RTOL, FP32_ATOL = 1e-5, 1e-5
# bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); a 2-layer model compounds that to about 1-2% of
# the largest logit, and rarely 3%. 5% leaves a margin and still catches, e.g., position encodings computed in
# bf16 (about 20% at position 2000).
BF16_TOLERANCE = 0.05



# ---------------------------------------------------------------- strategies and helpers


@st.composite
def configs(draw, attn_implementations=("eager", "sdpa")):
    """A small config as a sorted tuple of (field, value), hashable so that `build` can cache the model."""
    n_embd = draw(st.sampled_from([8, 16]))  # narrower, a LayerNorm leaves too little: width 2 normalises to +-1
    fields = dict(
        position_embedding_type=draw(st.sampled_from(POSITION_EMBEDDING_TYPES)),
        norm_position=draw(st.sampled_from(NORM_POSITIONS)),
        activation_function=draw(st.sampled_from(ACTIVATIONS)),
        attn_implementation=draw(st.sampled_from(attn_implementations)),
        n_layer=draw(st.integers(1, 2)),
        n_embd=n_embd,
        n_head=draw(st.sampled_from([1, 2, 4, 8] if n_embd == 16 else [1, 2, 4])),  # head size 2-16, even for rope
        n_inner=draw(st.sampled_from([None, 8, 24])),
        bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        # 0.02 is GPT-2's; 0.3 makes attention far from uniform, so that a wrong mask shows in the logits
        initializer_range=draw(st.sampled_from([0.02, 0.3])),
    )
    return tuple(sorted(fields.items()))


@functools.lru_cache(maxsize=64)
def build(fields: tuple) -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    config = MiniGPTConfig(
        vocab_size=VOCAB, n_positions=N_POSITIONS, bos_token_id=1, eos_token_id=2, pad_token_id=0, **dict(fields)
    )
    model = MiniGPTForCausalLM(config).eval()
    assert model.config._attn_implementation == dict(fields)["attn_implementation"]
    return model


def token_ids(draw, rows: int, length: int) -> torch.Tensor:
    flat = draw(st.lists(st.integers(0, VOCAB - 1), min_size=rows * length, max_size=rows * length))
    return torch.tensor(flat, dtype=torch.long).view(rows, length)


@st.composite
def batches(draw, min_len=1, padding=("none", "ones", "left", "right", "mixed")):
    """(input_ids (B, T), attention_mask (B, T) or None). Each padded row keeps at least one real token."""
    B, T = draw(st.integers(1, 3)), draw(st.integers(min_len, MAX_LEN))
    ids = token_ids(draw, B, T)
    kind = draw(st.sampled_from(padding))
    if kind == "none":
        return ids, None
    mask = torch.zeros(B, T, dtype=torch.long)
    for row in range(B):
        n_real = T if kind == "ones" else draw(st.integers(1, T))
        side = draw(st.sampled_from(["left", "right"])) if kind == "mixed" else kind
        if side == "left":
            mask[row, T - n_real :] = 1
        else:
            mask[row, :n_real] = 1
    return ids, mask


def real_positions(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()


@torch.no_grad()
def logits(model, ids, mask=None, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits  # (B, T, V)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=FP32_RTOL, atol=FP32_ATOL)


# ---------------------------------------------------------------- the properties


@given(configs(), batches(min_len=2), st.data())
def test_causality_later_tokens_change_no_earlier_logits(fields, batch, data):
    ids, mask = batch
    t = data.draw(st.integers(0, ids.shape[1] - 2), label="t")
    shift = data.draw(st.integers(1, VOCAB - 1), label="shift")
    changed = ids.clone()
    changed[:, t + 1 :] = (ids[:, t + 1 :] + shift) % VOCAB  # every token after t is different
    model = build(fields)
    before, after = logits(model, ids, mask), logits(model, changed, mask)

    real = real_positions(ids, mask)
    assert_close(after[:, : t + 1][real[:, : t + 1]], before[:, : t + 1][real[:, : t + 1]])
    # the comparison is sensitive: the changed token at t + 1 changes that position's logits
    if real[:, t + 1].any():
        assert not torch.allclose(after[:, t + 1][real[:, t + 1]], before[:, t + 1][real[:, t + 1]])


@given(configs(), batches())
def test_batch_independence_a_row_does_not_depend_on_the_others(fields, batch):
    ids, mask = batch
    model = build(fields)
    batched = logits(model, ids, mask)
    real = real_positions(ids, mask)
    for row in range(ids.shape[0]):
        alone = logits(model, ids[row : row + 1], None if mask is None else mask[row : row + 1])
        assert_close(batched[row][real[row]], alone[0][real[row]])


@given(configs(), st.sampled_from(["left", "right"]), st.data())
def test_padding_with_a_correct_mask_leaves_real_logits_unchanged(fields, side, data):
    """Rows of different lengths padded to a common length, left or right, with random ids under the padding."""
    rows = data.draw(st.lists(st.integers(1, MAX_LEN - 4), min_size=1, max_size=3), label="lengths")
    T = max(rows) + data.draw(st.integers(0, 4), label="extra padding")
    ids, mask = token_ids(data.draw, len(rows), T), torch.zeros(len(rows), T, dtype=torch.long)
    for row, n_real in enumerate(rows):
        real = slice(T - n_real, T) if side == "left" else slice(0, n_real)
        mask[row, real] = 1
    model = build(fields)
    padded = logits(model, ids, mask)
    for row in range(len(rows)):
        unpadded = logits(model, ids[row : row + 1][mask[row : row + 1].bool()].view(1, -1))
        assert_close(padded[row][mask[row].bool()], unpadded[0])


@pytest.mark.oldest
@given(configs(), st.sampled_from(["dynamic", "static"]), st.sampled_from(["cache", "past_key_values"]), st.data())
def test_prefill_then_incremental_decode_equals_the_full_forward(fields, cache_class, cache_arg, data):
    """Any split point, then chunks of 1-3 tokens; left padding (as generate uses) or none; both cache classes
    and both names of the cache argument (`past_key_values` up to transformers 5.23, `cache` from 5.24)."""
    B, T = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(2, MAX_LEN), label="T")
    split = data.draw(st.integers(1, T - 1), label="split")
    ids = token_ids(data.draw, B, T)
    mask = None
    if data.draw(st.booleans(), label="left padding"):
        mask = torch.ones(B, T, dtype=torch.long)
        for row in range(B):  # at least one real token in the prefill, as in generate
            mask[row, : data.draw(st.integers(0, split - 1), label="pads")] = 0
    ends = [split]
    while ends[-1] < T:
        ends.append(ends[-1] + data.draw(st.integers(1, min(3, T - ends[-1])), label="chunk"))

    model = build(fields)
    full = logits(model, ids, mask)
    if cache_class == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=T + data.draw(st.integers(0, 3), label="spare"))
    pieces, start = [], 0
    with torch.no_grad():
        for end in ends:
            chunk_mask = None if mask is None else mask[:, :end]
            out = model(input_ids=ids[:, start:end], attention_mask=chunk_mask, use_cache=True, **{cache_arg: cache})
            pieces.append(out.logits)
            start = end
    assert cache.get_seq_length() == T
    real = real_positions(ids, mask)
    assert_close(torch.cat(pieces, dim=1)[real], full[real])


@given(configs(attn_implementations=("eager",)), batches())
def test_eager_and_sdpa_agree_with_and_without_a_mask(fields, batch):
    ids, mask = batch
    eager = build(fields)
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    real = real_positions(ids, mask)
    assert_close(logits(sdpa, ids, mask)[real], logits(eager, ids, mask)[real])


@pytest.mark.oldest
@given(configs(), batches())
def test_save_and_load_round_trip_through_safetensors_only(fields, batch):
    ids, mask = batch
    model = build(fields)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        files = sorted(path.name for path in Path(folder).iterdir())
        assert "model.safetensors" in files, files
        pickles = [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
        assert not pickles, f"save_pretrained wrote pickled files: {pickles}"
        loaded = MiniGPTForCausalLM.from_pretrained(
            folder, use_safetensors=True, attn_implementation=model.config._attn_implementation
        ).eval()

    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    tied = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert tied == model.config.tie_word_embeddings
    # the same weights bit for bit, but not always the same address alignment (safetensors maps tensors at 8-byte
    # offsets), and MKL picks its small-GEMM kernels by alignment: equal to rounding, not always bit for bit
    torch.testing.assert_close(logits(loaded, ids, mask), logits(model, ids, mask), rtol=1e-6, atol=1e-6)


@given(configs(), batches(), st.data())
def test_bf16_logits_are_within_tolerance_of_fp32(fields, batch, data):
    """Positions start anywhere up to n_positions (learned) or 4096 (sinusoidal, rope: no table), since position
    encodings are where low precision hurts most."""
    ids, mask = batch
    model = build(fields)
    T = ids.shape[1]
    last_start = N_POSITIONS - T if model.config.position_embedding_type == "learned" else 4096
    start = data.draw(st.integers(0, last_start), label="first position")
    positions = torch.arange(T).expand_as(ids) if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    positions = positions + start

    full = logits(model, ids, mask, position_ids=positions)
    half = logits(copy.deepcopy(model).to(torch.bfloat16), ids, mask, position_ids=positions)
    assert half.dtype == torch.bfloat16
    real = real_positions(ids, mask)
    error = (half.float() - full)[real].abs().max().item()
    scale = full[real].abs().max().item()
    assert error <= BF16_TOLERANCE * scale + 1e-3, f"bf16 error {error:.4g} against a largest logit of {scale:.4g}"
