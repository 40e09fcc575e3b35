"""Config fuzzing: every invalid MiniGPTConfig, built with keyword arguments or through `from_dict` (the path of
config.json), raises a ValueError that names the field; every valid one builds a model whose forward pass gives
finite logits and a finite loss. Nothing else (no TypeError, no crash deep in torch, no NaN) is allowed.

Values are drawn from what a JSON file, a YAML file or a command line can hold: ints, floats (NaN and inf
included), strings, bools, None and lists, plus the values that are valid for each field.
"""

import json
import math

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM  # noqa: E402
from modeling_minigpt.configuration_minigpt import NORM_POSITIONS, POSITION_EMBEDDING_TYPES  # noqa: E402

BASE = dict(
    vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0
)
ALIASES = {**MiniGPTConfig.attribute_map, "intermediate_size": "n_inner"}  # hidden_size -> n_embd, ...
SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
FLOATS = ("rope_theta", "layer_norm_epsilon", "embd_pdrop", "attn_pdrop", "resid_pdrop", "initializer_range")
CHOICES = {
    "activation_function": sorted(ACT2FN),
    "position_embedding_type": list(POSITION_EMBEDDING_TYPES),
    "norm_position": list(NORM_POSITIONS),
}
BOOLS = ("bias", "use_cache", "tie_word_embeddings")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
MAX_BUILT = 160
FIELDS = SIZES + FLOATS + tuple(CHOICES) + BOOLS + TOKEN_IDS + tuple(ALIASES)
# Most drawn configs are refused in microseconds, so these run 4x the profile's examples (ci 200, long 4000).
MORE_EXAMPLES = settings(max_examples=4 * settings.default.max_examples)



# What a config file or a command line can hold. Sizes stay small so that a valid draw builds in milliseconds.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.integers(),  # huge ones too: 10**30 is no float and no size
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.1, 0.5, 0.999, 1.0, 2.0, 16.0, -0.0, 1e-5, 1e300]),
    st.text(max_size=6),
    st.sampled_from([s for choices in CHOICES.values() for s in choices] + ["", "GELU", "Pre", "rotary", "32"]),
)
json_values = st.one_of(json_scalars, st.lists(st.one_of(st.integers(-2, 45), st.text(max_size=2)), max_size=3))


def valid_value(field: str):
    """A value that is valid for `field` on its own (combinations may still be invalid)."""
    field = ALIASES.get(field, field)
    if field in ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size"):
        return st.integers(1, 40)
    if field == "n_inner":
        return st.none() | st.integers(1, 40)
    if field in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
        return st.floats(0.0, 0.99) | st.just(0)  # an int where a float is expected is fine
    if field in ("layer_norm_epsilon", "rope_theta"):
        return st.floats(1e-8, 1e6) | st.integers(1, 10**4)
    if field == "initializer_range":
        return st.floats(0.0, 1.0) | st.sampled_from([0, 1])
    if field in CHOICES:
        return st.sampled_from(CHOICES[field])
    if field in BOOLS:
        return st.booleans()
    if field == "eos_token_id":  # generation may stop at any of several ids
        return st.none() | st.integers(0, 39) | st.lists(st.integers(0, 39), min_size=1, max_size=2)
    return st.none() | st.integers(0, 39)  # bos_token_id, pad_token_id


def construct(how: str, fields: dict) -> MiniGPTConfig:
    return MiniGPTConfig(**fields) if how == "kwargs" else MiniGPTConfig.from_dict(fields)


def names_in(field: str) -> set[str]:
    """The names an error about `field` may use: the field itself and its alias (n_embd / hidden_size)."""
    target = ALIASES.get(field, field)
    return {field, target} | {alias for alias, name in ALIASES.items() if name == target}


def assert_runs(config: MiniGPTConfig):
    """A valid config builds a model whose forward gives finite logits, and a finite loss in training mode.
    Sizes beyond MAX_BUILT are valid too (10**12 positions is a config, not an error), but too big to build here."""
    if max(getattr(config, "intermediate_size" if name == "n_inner" else name) for name in SIZES) > MAX_BUILT:
        return
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(config)
    T = min(config.n_positions, 6)
    ids = torch.randint(0, config.vocab_size, (2, T))
    with torch.no_grad():
        logits = model.eval()(ids).logits
        loss = model.train()(ids, labels=ids).loss if T > 1 else torch.zeros(())  # 1 token: nothing to predict
    assert logits.shape == (2, T, config.vocab_size)
    assert torch.isfinite(logits).all(), f"non-finite logits for {config.to_diff_dict()}"
    assert torch.isfinite(loss), f"non-finite loss for {config.to_diff_dict()}"


# ---------------------------------------------------------------- properties


@MORE_EXAMPLES
@given(st.sampled_from(FIELDS), json_values, st.sampled_from(["kwargs", "from_dict"]))
def test_any_value_in_one_field_is_refused_by_name_or_builds_a_working_model(field, value, how):
    fields = dict(BASE, **{field: value})
    try:
        config = construct(how, fields)
    except ValueError as error:
        assert any(name in str(error) for name in names_in(field)), f"{field}={value!r}: {error}"
        event("refused")
        return
    event("valid")
    if value is not None:  # None for n_inner means 4 * n_embd
        assert getattr(config, field) == value or _same_number(getattr(config, field), value)
    assert_runs(config)


@MORE_EXAMPLES
@given(st.data(), st.sampled_from(["kwargs", "from_dict"]))
def test_random_combinations_are_refused_by_name_or_build_a_working_model(data, how):
    """Several fields at once, each valid alone or anything at all: combinations such as n_embd % n_head != 0,
    rope with an odd head size, or a token id beyond vocab_size must be caught too."""
    # dict.fromkeys drops repeats; unique=True would make hypothesis reject and redraw a third of the lists
    chosen = list(dict.fromkeys(data.draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=5), label="fields")))
    fields = dict(BASE)
    for field in chosen:
        fields[field] = data.draw(valid_value(field) | json_values if data.draw(st.booleans()) else valid_value(field))
    try:
        config = construct(how, fields)
    except ValueError as error:
        named = set().union(*(names_in(field) for field in chosen))
        assert any(name in str(error) for name in named), f"{fields}: {error}"
        event("refused")
        return
    event("valid")
    assert_runs(config)


@given(st.data())
def test_valid_configs_survive_a_json_round_trip_and_run(data):
    fields = {field: data.draw(valid_value(field), label=field) for field in FIELDS if field not in ALIASES}
    fields["n_head"] = data.draw(st.sampled_from([h for h in range(1, 9) if fields["n_embd"] % h == 0]), label="n_head")
    if fields["position_embedding_type"] == "rope" and fields["n_embd"] // fields["n_head"] % 2:
        fields["position_embedding_type"] = "learned"  # rotary turns pairs of channels in each head
    if fields["position_embedding_type"] == "sinusoidal" and fields["n_embd"] % 2:
        fields["position_embedding_type"] = "learned"  # sin and cos fill pairs of channels
    for name in TOKEN_IDS:  # keep the ids inside the drawn vocabulary
        value = fields[name]
        fields[name] = [i % fields["vocab_size"] for i in value] if isinstance(value, list) else (
            None if value is None else value % fields["vocab_size"]
        )
    config = MiniGPTConfig(**fields)
    for name in FLOATS:  # ints in float fields are stored as floats, so config.json stays the same type
        assert isinstance(getattr(config, name), float)
    again = MiniGPTConfig.from_dict(json.loads(config.to_json_string()))
    assert again.to_dict() == config.to_dict()
    assert_runs(again)


# ---------------------------------------------------------------- the bugs these found, pinned as examples


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(n_embd="32"), "n_embd"),  # a string where an int belongs: was huggingface_hub's StrictDataclassError
        (dict(n_layer=2.0), "n_layer"),
        (dict(n_inner=None, n_head=None), "n_head"),
        (dict(attn_pdrop=None), "attn_pdrop"),
        (dict(bias="yes"), "bias"),
        (dict(embd_pdrop=math.nan), "embd_pdrop"),
        (dict(rope_theta=math.inf), "rope_theta"),  # was accepted: every rotary frequency became 0
        (dict(layer_norm_epsilon=math.inf), "layer_norm_epsilon"),  # was accepted: LayerNorm output all zeros
        (dict(initializer_range=1e30), "initializer_range"),  # was accepted: logits inf, loss NaN
        (dict(rope_theta=10**400), "rope_theta"),  # an int too large for a float
        (dict(pad_token_id=100), "pad_token_id"),  # was a warning: the embedding crashes on it later
        (dict(eos_token_id=[2, -1]), "eos_token_id"),  # was a warning: generation never stops
        (dict(hidden_size=30), "n_embd"),  # an alias skipped every check: 30 % 4 heads went through
        (dict(num_attention_heads=5), "n_head"),
        (dict(hidden_size="x"), "hidden_size"),  # was a TypeError from inside transformers' own validator
        (dict(n_embd=15, n_head=3, position_embedding_type="sinusoidal"), "n_embd"),  # was a shape error in forward
    ],
)
def test_bad_values_found_by_fuzzing_raise_value_errors_naming_the_field(fields, field):
    for how in ("kwargs", "from_dict"):
        with pytest.raises(ValueError, match=field):
            construct(how, dict(BASE, **fields))


def test_aliases_set_the_field_before_the_derived_values():
    """hidden_size=64 once left n_inner at 4 * the default width (3072) instead of 4 * 64."""
    config = MiniGPTConfig(hidden_size=64, num_attention_heads=4)
    assert (config.n_embd, config.n_head, config.intermediate_size) == (64, 4, 256)


def test_the_feed_forward_width_follows_n_embd_set_after_the_config_was_made(tmp_path):
    """transformers' model testers set sizes on a made config; GPT2Config keeps n_inner=None and the model takes
    4 * n_embd when it is built. MiniGPT once froze 4 * 768 = 3072 at config time."""
    config = AutoConfig.for_model("minigpt")
    config.hidden_size, config.num_attention_heads, config.num_hidden_layers, config.vocab_size = 64, 4, 1, 100
    assert config.n_inner is None and config.intermediate_size == 256
    model = MiniGPTForCausalLM(config)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (256, 64)
    other = MiniGPTConfig(n_embd=64, n_head=4, n_layer=1)
    other.n_embd = 32  # n_embd directly, as well as through its alias
    assert other.intermediate_size == 128
    explicit = MiniGPTConfig(n_embd=64, n_head=4, n_layer=1, intermediate_size=100)
    assert explicit.n_inner == 100
    explicit.n_embd = 32  # set by the user: stays
    assert explicit.intermediate_size == 100
    model.save_pretrained(tmp_path)  # round trip: n_inner stays None (derived), the weights fit
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.n_inner is None
    assert {**reloaded.config.to_dict(), "_name_or_path": ""} == {**model.config.to_dict(), "_name_or_path": ""}
    assert reloaded.model.layers[0].mlp.up_proj.weight.shape == (256, 64)


def test_ints_in_float_fields_are_accepted_as_written_by_json_and_yaml():
    config = MiniGPTConfig.from_dict(dict(BASE, attn_pdrop=0, rope_theta=10000, layer_norm_epsilon=1))
    assert (config.attn_pdrop, config.rope_theta, config.layer_norm_epsilon) == (0.0, 10000.0, 1.0)
    assert isinstance(config.attn_pdrop, float)


def test_a_bad_config_json_on_disk_is_refused_naming_the_field(tmp_path):
    MiniGPTConfig(**BASE).save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert '"n_embd": 16' in text
    (tmp_path / "config.json").write_text(text.replace('"n_embd": 16', '"n_embd": "16"'))
    with pytest.raises(ValueError, match="n_embd"):
        AutoConfig.from_pretrained(tmp_path)


def _same_number(stored, given) -> bool:
    """An int given for a float field is stored as that float."""
    return isinstance(given, int) and not isinstance(given, bool) and stored == float(given)
