"""The model itself: config validation, forward, loss, outputs, init, loading options and bad input."""

import json
import math
import sys
import warnings

import pytest
import torch
from conftest import tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM, MiniGPTModel
from modeling_minigpt.modeling_minigpt import CACHE_NAME

pytestmark = pytest.mark.oldest

VARIANTS = [(pos, norm) for pos in ("learned", "sinusoidal", "rope") for norm in ("pre", "post")]


def build(**overrides) -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    return MiniGPTForCausalLM(tiny_config(**overrides)).eval()


# ---------------------------------------------------------------- config


def test_config_defaults_are_gpt2_124m_with_standard_names():
    config = MiniGPTConfig()
    assert (config.n_layer, config.n_head, config.n_embd, config.n_positions) == (12, 12, 768, 1024)
    assert config.vocab_size == 50304 and config.vocab_size % 64 == 0
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.max_position_embeddings == 1024 and config.intermediate_size == 4 * 768


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(n_embd=30, n_head=4), ["n_embd", "n_head"]),
        (dict(activation_function="swishy"), ["activation_function", "gelu_new"]),
        (dict(norm_position="middle"), ["norm_position", "pre", "post"]),
        (dict(position_embedding_type="alibi"), ["position_embedding_type", "learned", "sinusoidal", "rope"]),
        (dict(n_layer=0), ["n_layer", "positive"]),
        (dict(vocab_size=-5), ["vocab_size"]),
        (dict(attn_pdrop=1.0), ["attn_pdrop", "[0, 1)"]),
        (dict(resid_pdrop=-0.1), ["resid_pdrop"]),
    ],
)
def test_invalid_config_names_the_field_and_the_allowed_values(fields, words):
    with pytest.raises(ValueError) as error:
        tiny_config(**fields)
    for word in words:
        assert word in str(error.value)


def test_config_file_with_unknown_position_type_is_refused(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"learned"', '"relative"')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="position_embedding_type"):
        AutoConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------- forward and loss


@pytest.mark.parametrize("pos, norm", VARIANTS)
def test_forward_shapes_and_loss_every_variant(pos, norm):
    model = build(position_embedding_type=pos, norm_position=norm)
    ids = torch.randint(3, 100, (2, 12))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 12, 100)
    # an untrained model predicts roughly uniformly: loss near ln(V)
    assert abs(out.loss.item() - math.log(100)) < 0.5
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_loss_matches_shifted_cross_entropy_and_ignores_minus_100():
    model = build()
    ids = torch.randint(3, 100, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    # num_items_in_batch turns the mean into a sum over the whole (accumulated) batch
    n = (labels[:, 1:] != -100).sum()
    summed = model(ids, labels=labels, num_items_in_batch=2 * n).loss
    torch.testing.assert_close(summed, expected / 2)


def test_post_ln_blocks_have_no_final_norm_and_pre_ln_has_one():
    assert isinstance(build(norm_position="pre").model.norm, torch.nn.LayerNorm)
    assert isinstance(build(norm_position="post").model.norm, torch.nn.Identity)


def test_attention_is_scaled_by_inverse_sqrt_head_dim_and_future_is_masked():
    model = build()
    model.config._attn_implementation = "eager"
    ids = torch.randint(3, 100, (1, 6))
    weights = model(ids, output_attentions=True).attentions[0]  # (B, nh, T, T)
    assert model.model.layers[0].self_attn.scaling == pytest.approx(1 / math.sqrt(32 / 4))
    future = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    assert torch.all(weights[..., future] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, 6))


def test_hidden_states_and_attentions_on_request():
    model = build()
    ids = torch.randint(3, 100, (2, 5))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layer + 1
    model.config._attn_implementation = "eager"
    out = model(ids, output_attentions=True)
    assert len(out.attentions) == model.config.n_layer and out.attentions[0].shape == (2, 4, 5, 5)


def test_logits_to_keep_returns_only_the_last_positions():
    model = build()
    ids = torch.randint(3, 100, (2, 9))
    full = model(ids).logits
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 100)
    torch.testing.assert_close(last, full[:, -1:])


def test_return_dict_false_gives_a_tuple():
    model = build()
    ids = torch.randint(3, 100, (1, 4))
    out = model(ids, labels=ids, return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0


def test_cache_is_accepted_under_both_names():
    model = build()
    ids = torch.randint(3, 100, (1, 8))
    full = model(ids).logits
    for name in ("past_key_values", "cache"):
        cache = DynamicCache(config=model.config)
        model(ids[:, :5], use_cache=True, **{name: cache})
        step = model(ids[:, 5:], use_cache=True, **{name: cache}).logits
        torch.testing.assert_close(step, full[:, 5:], atol=1e-5, rtol=1e-5)


def test_the_old_cache_name_warns_only_where_transformers_deprecated_it():
    """transformers' common test_bc_cache_name_forward: from 5.24 (`cache` is the name) `past_key_values=` gives the
    same FutureWarning as the built-in models; up to 5.23 it is the current name and stays silent."""
    model = build()
    ids = torch.randint(3, 100, (1, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    deprecations = [str(w.message) for w in caught if "`past_key_values` is deprecated" in str(w.message)]
    if CACHE_NAME == "cache":
        assert deprecations and all(issubclass(w.category, FutureWarning) for w in caught if "deprecated" in str(w.message))
    else:
        assert not deprecations
    assert getattr(out, CACHE_NAME).get_seq_length() == 6


def test_given_both_cache_names_the_one_holding_tokens_is_used():
    """`cache` wins, as in transformers' own models, except where it is empty and `past_key_values` is not: PEFT's
    prefix tuning passes its prefix as `past_key_values` beside the empty `cache` of transformers >= 5.24's generate."""
    model = build()
    ids = torch.randint(3, 100, (1, 8))
    full = model(ids).logits
    prefix = DynamicCache(config=model.config)
    model(ids[:, :5], cache=prefix, use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        empty = DynamicCache(config=model.config)
        out = model(ids[:, 5:], past_key_values=prefix, cache=empty, use_cache=True)
        torch.testing.assert_close(out.logits, full[:, 5:], atol=1e-5, rtol=1e-5)
        assert getattr(out, CACHE_NAME) is prefix and empty.get_seq_length() == 0
        other = DynamicCache(config=model.config)
        model(ids[:, :5], cache=other, use_cache=True)
        out = model(ids[:, 5:], past_key_values=DynamicCache(config=model.config), cache=other, use_cache=True)
        assert getattr(out, CACHE_NAME) is other and other.get_seq_length() == 8


# ---------------------------------------------------------------- init, tying, loading


def test_gpt2_style_init_scales_residual_projections():
    torch.manual_seed(0)
    config = MiniGPTConfig(vocab_size=512, n_embd=256, n_layer=8, n_head=4, n_positions=64)
    model = MiniGPTForCausalLM(config)
    std = config.initializer_range
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    scaled = std / math.sqrt(2 * config.n_layer)
    assert model.model.layers[0].self_attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.all(model.model.layers[0].self_attn.qkv_proj.bias == 0)


def test_lm_head_is_tied_and_untying_works(tmp_path):
    model = build()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = build(tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    untied.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.lm_head.weight, untied.lm_head.weight)


def test_lm_head_is_a_plain_linear_with_no_state_beyond_its_weight():
    """The head holds nothing derived from its weight (a packed copy, a cache keyed on its address or version),
    since such state goes stale under writes through `.data`; see test_generation.py for the workflows."""
    head = build().lm_head
    assert type(head) is torch.nn.Linear
    assert {name for name, _ in head.named_parameters()} == {"weight"} and not list(head.buffers())


def test_save_and_load_with_auto_classes_gives_identical_logits(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_minigpt.py", "modeling_minigpt.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    ids = torch.randint(3, 100, (2, 7))
    for auto in (AutoModelForCausalLM, AutoModel):
        loaded, info = auto.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        if auto is AutoModel:
            assert isinstance(loaded, MiniGPTModel)
            torch.testing.assert_close(loaded(ids).last_hidden_state, model.model(ids).last_hidden_state)
        else:
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading(tmp_path, dtype):
    build().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert model.dtype == dtype
    out = model(torch.randint(3, 100, (1, 5)))
    assert out.logits.dtype == dtype and torch.isfinite(out.logits.float()).all()


def test_device_map_auto_respects_no_split_modules(tmp_path):
    pytest.importorskip("accelerate")
    build().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto")
    assert set(model._no_split_modules) == {"MiniGPTBlock"}
    assert model(torch.randint(3, 100, (1, 5))).logits.shape == (1, 5, 100)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(3, 100, (2, 10))
    grads = []
    for checkpointing in (False, True):
        model = build().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.layers[0].gradient_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.qkv_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------- bad input


def test_token_id_outside_the_vocabulary_is_a_clear_error():
    model = build()
    with pytest.raises(IndexError, match=r"Token id 100 is outside the vocabulary \[0, 100\).*resize_token_embeddings"):
        model(torch.tensor([[5, 100]]))
    with pytest.raises(IndexError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 5]]))


def test_sequence_longer_than_learned_positions_is_a_clear_error():
    model = build()
    with pytest.raises(ValueError, match="n_positions=64.*Truncate"):
        model(torch.randint(3, 100, (1, 65)))
    # rotary and sinusoidal encodings have no table, so they extrapolate instead
    for pos in ("rope", "sinusoidal"):
        assert build(position_embedding_type=pos)(torch.randint(3, 100, (1, 80))).logits.shape == (1, 80, 100)


def test_generation_past_learned_positions_is_a_clear_error():
    model = build()
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(torch.randint(3, 100, (1, 60)), max_new_tokens=10, do_sample=False)


def test_attention_mask_with_the_wrong_shape_is_a_clear_error():
    model = build()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 5\).*\(1, 6\)"):
        model(torch.randint(3, 100, (1, 6)), attention_mask=torch.ones(1, 5, dtype=torch.long))


def test_empty_input_is_a_clear_error():
    model = build()
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


# ---------------------------------------------------------------- attention backends


@torch.no_grad()
def test_flex_attention_backend_matches_sdpa_with_and_without_padding():
    model = build()
    ids = torch.randint(3, 100, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in row 0
    reference = model(ids).logits, model(ids, attention_mask=mask).logits
    model.set_attn_implementation("flex_attention")  # CPU flex attention runs forward only, hence no_grad
    torch.testing.assert_close(model(ids).logits, reference[0], atol=1e-5, rtol=1e-5)
    padded = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(padded[1], reference[1][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0, 5:], reference[1][0, 5:], atol=1e-5, rtol=1e-5)


def test_flash_attention_2_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn", reason="flash_attention_2 needs the flash-attn package")
    if not torch.cuda.is_available():
        pytest.skip("flash_attention_2 needs a CUDA device")
    model = build().cuda().to(torch.bfloat16)
    ids = torch.randint(3, 100, (2, 16), device="cuda")
    reference = model(ids).logits.float()
    model.set_attn_implementation("flash_attention_2")
    torch.testing.assert_close(model(ids).logits.float(), reference, atol=2e-2, rtol=2e-2)


class RecordHostSyncs(torch.overrides.TorchFunctionMode):
    """Records every tensor-to-Python conversion (each waits for the device to finish) that MiniGPT's own code makes
    inside the mode; transformers' mask helpers make their own, as they do for GPT-2 and Llama."""

    SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = sys._getframe(1).f_code.co_filename
        if func in self.SYNCS and "modeling_minigpt" in caller:
            self.calls.append(f"{func.__name__} in {caller}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_a_decode_step_makes_no_host_sync_and_the_prefill_still_checks_its_input(pos):
    """Each .item() on a GPU waits for the device, and at batch 1 that limits decoding speed: the values of the
    input are checked where it enters (the prefill), shapes on every call."""
    model = build(position_embedding_type=pos)
    ids = torch.randint(3, 100, (2, 6))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        prefill = RecordHostSyncs()
        with prefill:
            model(ids, cache=cache, use_cache=True, logits_to_keep=1)
        assert prefill.calls  # the vocabulary (and position) checks ran
        step = RecordHostSyncs()
        with step:
            for t in range(3):
                model(ids[:, :1], attention_mask=torch.ones(2, 7 + t, dtype=torch.long), cache=cache, use_cache=True,
                      logits_to_keep=1)  # fmt: skip
    assert step.calls == []


def test_the_sinusoidal_encoding_starts_on_the_token_embeddings_scale(tmp_path):
    """At full strength a (sin, cos) encoding has norm sqrt(C/2) = 8 at C=128, against 0.02 * sqrt(C) = 0.23 for a
    token embedding, and the tokens are drowned. By default it is scaled to the embeddings' initial norm."""
    model = build(position_embedding_type="sinusoidal", n_embd=128, n_head=4)
    encoding = model.model.embed_positions(torch.arange(50)[None])[0]  # (T, C)
    token_norm = 0.02 * math.sqrt(128)
    torch.testing.assert_close(encoding.norm(dim=-1), torch.full((50,), token_norm), rtol=1e-5, atol=1e-6)
    assert model.model.embed_tokens.weight.norm(dim=-1).mean().item() == pytest.approx(token_norm, rel=0.05)
    model.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).model.embed_positions.scale == model.model.embed_positions.scale


def test_a_sinusoidal_checkpoint_saved_before_the_scale_existed_computes_what_it_did(tmp_path):
    model = build(position_embedding_type="sinusoidal", sinusoidal_scale=1.0)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["sinusoidal_scale"]  # as written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert old.config.sinusoidal_scale == 1.0
    encoding = old.model.embed_positions(torch.arange(4)[None])[0]
    torch.testing.assert_close(encoding[1, :2], torch.tensor([math.sin(1.0), math.cos(1.0)]))  # the paper's values
    ids = torch.randint(3, 100, (2, 7))
    torch.testing.assert_close(old(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="sinusoidal_scale"):
        MiniGPTConfig(sinusoidal_scale=float("nan"))
