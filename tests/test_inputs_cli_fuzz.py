"""pretrain's argument dataclasses, fuzzed with hypothesis: any command line or config file drawn from valid and
invalid values either parses, to values of each field's type, or is a usage error that names one of the flags it set.
Never a crash, never a traceback. Nothing is trained, so this is fast.

No oracle here re-implements check_args to predict which inputs are valid: the specific messages for specific
inputs are asserted in test_inputs_cli.py.
"""

import contextlib
import io
import json

import pytest

from minigpt.train.args import ModelArguments, TrainArguments, parse_args

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st

COUNTS = ["-1", "0", "1", "2", "3", "8", "64", "1000", "1.5", "x", ""]
FLOATS = ["nan", "inf", "-inf", "-1", "-0.0", "0", "1e-9", "0.1", "0.5", "0.95", "1", "2", "1e10", "1e400", "x", ""]
SEEDS = ["-1", "0", "7", str(2**32 - 1), str(2**32), str(2**40), "x"]  # numpy takes seeds in [0, 2**32)
BOOLS = [None, "true", "false", "yes", "no", "1", "0", "T", "maybe", ""]  # None: the bare flag

# flag: (values to draw, the type a parsed value has), around the edges of the ranges the --help texts give
SPEC = {
    **dict.fromkeys(
        ["num_proc", "max_steps", "batch_size", "gradient_accumulation_steps", "warmup_steps", "cpu_threads",
         "eval_every", "eval_batches", "log_every", "save_every", "keep_last", "stop_at_step", "ddp_timeout",
         "validation_documents"],
        (COUNTS, int),
    ),
    **dict.fromkeys(
        ["dropout", "validation_fraction", "tokenizer_train_mb", "learning_rate", "min_learning_rate", "weight_decay",
         "adam_beta1", "adam_beta2", "max_grad_norm", "peak_tflops", "post_ln_warmup_fraction", "muon_learning_rate",
         "muon_momentum", "decay_ratio"],
        (FLOATS, float),
    ),
    **dict.fromkeys(
        ["bias", "compile", "cpu", "fsdp", "overwrite_output_dir", "skip_nonfinite", "push_to_hub", "hub_private",
         "streaming"],
        (BOOLS, bool),
    ),
    **dict.fromkeys(["seed", "split_seed"], (SEEDS, int)),
    "n_layer": (["-1", "0", "1", "2", "x"], int),
    "n_head": (["0", "1", "2", "3", "4", "x"], int),
    "n_embd": (["0", "8", "12", "16", "30", "x"], int),
    "n_inner": (["-1", "0", "1", "24", ""], int),
    "n_positions": (["0", "1", "8", "16", "64"], int),
    "block_size": (["-1", "0", "1", "2", "8", "16", "33", "x"], int),
    "vocab_size": (["0", "100", "258", "259", "300", "4096", "x"], int),
    "position_embedding_type": (["learned", "sinusoidal", "rope", "rotary", ""], str),
    "norm_position": (["pre", "post", "Pre", "middle"], str),
    "activation_function": (["gelu", "gelu_new", "relu", "silu", "tanh", "GELU", "swiglu", ""], str),
    "text_unit": (["paragraph", "line", "document", "sentence", ""], str),
    "token_dtype": (["uint16", "uint32", "int8", ""], str),
    "mixed_precision": (["no", "bf16", "fp16", "fp8", "BF16", ""], str),
    "optimizer": (["muon", "adamw", "Muon", "sgd", ""], str),
    "lr_scheduler_type": (["cosine", "warmup_stable_decay", "linear", "wsd", ""], str),
    "resume": (["latest", "/nonexistent/step-3"], str),
    "report_to": (["none", "tensorboard", "all", "wandb", "TensorBoard", "bogus", ""], str),
    "hub_model_id": (["alice/tiny", "tiny", "bad id!", "a/b/c", "x" * 97], str),  # checked with push_to_hub
}  # fmt: skip
# a bad value may be reported under the name the model config gives it
ALIASES = {"dropout": ["pdrop"], "n_positions": ["block_size"], "block_size": ["n_positions"]}


def _dataclass_fields() -> dict:
    from dataclasses import fields

    from minigpt.train.data import DataArguments

    return {f.name: f for dc in (ModelArguments, DataArguments, TrainArguments) for f in fields(dc)}


def test_every_numeric_and_choice_argument_is_fuzzed():
    """A new argument gets a SPEC entry, so that its validation is fuzzed too (paths and free text excepted)."""
    unspecified = sorted(set(_dataclass_fields()) - set(SPEC) - {"data", "text_field", "tokenizer", "data_cache_dir",
                                                                 "config", "output_dir", "dataset_name",
                                                                 "dataset_config_name", "dataset_split"})  # fmt: skip
    assert not unspecified, f"add {unspecified} to SPEC in {__file__}"


def _argv(values: dict[str, str | None]) -> list[str]:
    # --flag=value, so that a value such as -1 or an empty string is never taken for a flag or dropped
    return [f"--{name}" if raw is None else f"--{name}={raw}" for name, raw in values.items()]


def _parse(argv: list[str]):
    """(the parsed dataclasses or None, the SystemExit code or None, what went to stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            return parse_args(argv), None, stderr.getvalue()
        except SystemExit as e:
            return None, e.code, stderr.getvalue() + (e.code if isinstance(e.code, str) else "")


@settings(max_examples=4 * settings.default.max_examples)  # a parse takes milliseconds: 200 in CI, 4000 long
@given(st.data())
def test_cli_fuzz_every_command_line_parses_or_is_a_usage_error_naming_a_flag_it_set(data):
    names = data.draw(st.lists(st.sampled_from(sorted(SPEC)), max_size=4, unique=True), label="flags")
    values = {name: data.draw(st.sampled_from(SPEC[name][0]), label=name) for name in names}
    parsed, code, message = _parse(_argv(values))
    if parsed is not None:
        by_name = {k: v for dc in parsed for k, v in vars(dc).items()}
        for name in names:
            assert type(by_name[name]) is SPEC[name][1], f"{name}={values[name]!r} became {by_name[name]!r}"
        return
    assert code not in (None, 0) and "error:" in message and "Traceback" not in message, _argv(values)
    named = {n for n in names for alias in [n, *ALIASES.get(n, [])] if alias in message}
    assert named, f"the message names none of {names}:\n{message}"


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("configs")


json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(0, 3), max_size=2),
)


@settings(max_examples=2 * settings.default.max_examples)  # 100 in CI, 2000 long
@given(st.data())
def test_config_file_fuzz_wrong_types_are_usage_errors_never_crashes(config_dir, data):
    """A JSON/YAML config holds typed values: null, bools, floats where ints belong, lists. Each one either parses to
    a value of the field's type, or is a usage error; never a TypeError in between. A file's values go through the
    command line's checks, so what a file is accepted with, the command line accepts too."""
    names = data.draw(st.lists(st.sampled_from(sorted(SPEC)), min_size=1, max_size=4, unique=True), label="keys")
    values = {name: data.draw(st.one_of(json_values, st.sampled_from(SPEC[name][0])), label=name) for name in names}
    path = config_dir / "fuzz.json"
    path.write_text(json.dumps(values))
    parsed, code, message = _parse(["--config", str(path)])
    if parsed is None:
        assert code not in (None, 0) and "error" in message and "Traceback" not in message, values
        return
    by_name = {k: v for dc in parsed for k, v in vars(dc).items()}
    given_ = [n for n in names if values[n] is not None]  # null means the default
    for name in given_:
        assert type(by_name[name]) is SPEC[name][1], f"{name}: {values[name]!r} became {by_name[name]!r}"
    as_cli = {n: (str(by_name[n]).lower() if SPEC[n][1] is bool else str(by_name[n])) for n in given_}
    assert _parse(_argv(as_cli))[0] is not None, f"accepted from a file, refused on the command line: {as_cli}"
