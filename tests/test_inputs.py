"""Inputs from outside: checkpoint folders to resume from, command lines and config files, text data, and the Hub
token. None of them may run code, crash deep inside a library, or leak a secret.

- a checkpoint folder is someone else's files: every pickle in it is unpickled with weights_only=True (plain
  tensors and numbers) or refused with an error naming the file, and a poisoned pickle never runs;
- pretrain's argument dataclasses, fuzzed with hypothesis: each invalid combination is a SystemExit with a message
  naming the flag, each valid one parses (nothing is trained, so this is fast);
- text: empty files, one enormous line, binary files, mixed encodings, 10k tiny files;
- a push and a `pretrain --push_to_hub`, against tests/hub_server.py: the token appears in no output and no file.
"""

import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from test_data import make_corpus, write_txt
from test_pretrain import fresh_accelerate_state, tiny_args  # noqa: F401  (autouse fixture)

from train.args import ModelArguments, TrainArguments, parse_args
from train.pretrain import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_txt(tmp_path_factory.mktemp("corpus") / "corpus.txt", make_corpus(60))


# ------------------------------------------------------------------------------------------ checkpoint pickles
class Plant:
    """Unpickling this runs `exec`, which writes a marker file: the proof that a pickle executed code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


RUN = ("--max_steps", 4, "--dropout", 0.1)  # dropout: the RNG state matters to an exact resume


@pytest.fixture
def checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    main(tiny_args(corpus, out, *RUN, "--stop_at_step", 2))
    return out


def test_a_checkpoint_holds_no_pickle_that_needs_more_than_weights_only(checkpoint):
    """Every pickled file in a checkpoint loads with weights_only=True (accelerate's numpy allow-list included), so
    refusing anything else costs no legitimate checkpoint."""
    from accelerate.utils import load

    folder = checkpoint / "checkpoints" / "step-2"
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pkl", ".pt", ".pth"))
    assert "optimizer.bin" in pickled and "random_states_0.pkl" in pickled
    for name in pickled:
        load(folder / name, map_location="cpu")  # raises UnpicklingError on anything but tensors and numbers


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_a_poisoned_pickle_in_a_checkpoint_never_runs(corpus, checkpoint, tmp_path, capsys, name):
    """Resume from a folder whose `name` carries code: nothing runs, and the resume stops naming the file.
    custom_checkpoint_0.pkl is where accelerate stores objects registered with register_for_checkpointing, which
    it loads with weights_only=False."""
    folder = checkpoint / "checkpoints" / "step-2"
    marker = tmp_path / "pwned"
    torch.save({"state": {0: Plant(marker)}, "param_groups": []}, folder / name)
    with pytest.raises(SystemExit) as e:
        main(tiny_args(corpus, checkpoint, *RUN, "--resume", str(folder)))
    assert not marker.exists(), f"unpickling {name} ran code"
    message = str(e.value.code) + capsys.readouterr().err
    assert name in message and "cannot resume" in message


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "model.safetensors"])
def test_a_truncated_state_file_stops_the_resume_naming_it(corpus, checkpoint, capsys, name):
    """A half-copied checkpoint must not resume silently with fresh RNG or optimizer state, nor crash deep inside."""
    folder = checkpoint / "checkpoints" / "step-2"
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SystemExit) as e:
        main(tiny_args(corpus, checkpoint, *RUN, "--resume", "latest"))
    message = str(e.value.code) + capsys.readouterr().err
    assert name in message and "cannot resume" in message


# ------------------------------------------------------------------------------------------------ CLI fuzzing
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

COUNTS = ["-1", "0", "1", "2", "3", "8", "64", "1000", "1.5", "x", ""]
FLOATS = ["nan", "inf", "-inf", "-1", "-0.0", "0", "1e-9", "0.1", "0.5", "0.95", "1", "2", "1e10", "1e400", "x", ""]
SEEDS = ["-1", "0", "7", str(2**32 - 1), str(2**32), str(2**40), "x"]  # numpy takes seeds in [0, 2**32)
BOOLS = [None, "true", "false", "yes", "no", "1", "0", "T", "maybe", ""]  # None: the bare flag
finite = math.isfinite


def _repo_id_ok(value: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
        return True
    except Exception:  # noqa: BLE001 (HFValidationError)
        return False


def _trackers() -> set[str]:
    from accelerate.utils import LoggerType

    return {t.value for t in LoggerType} | {"none"}


# flag: (values to draw, type argparse applies, is the value valid on its own). Ranges come from the --help texts.
SPEC = {
    "n_layer": (["-1", "0", "1", "2", "x"], int, lambda v: v >= 1),
    "n_head": (["0", "1", "2", "3", "4", "x"], int, lambda v: v >= 1),
    "n_embd": (["0", "8", "12", "16", "30", "x"], int, lambda v: v >= 1),
    "n_inner": (["-1", "0", "1", "24", ""], int, lambda v: v >= 1),
    "n_positions": (["0", "1", "8", "16", "64"], int, lambda v: v >= 1),
    "position_embedding_type": (["learned", "sinusoidal", "rope", "rotary", ""], str, None),
    "norm_position": (["pre", "post", "Pre", "middle"], str, None),
    "activation_function": (["gelu", "gelu_new", "relu", "silu", "tanh", "GELU", "swiglu", ""], str, None),
    "dropout": (FLOATS, float, lambda v: 0 <= v < 1),
    "bias": (BOOLS, bool, None),
    "text_unit": (["paragraph", "line", "document", "sentence", ""], str, None),
    "block_size": (["-1", "0", "1", "2", "8", "16", "33", "x"], int, lambda v: v >= 2),
    "validation_fraction": (FLOATS, float, lambda v: 0 < v < 1),
    "split_seed": (SEEDS, int, lambda v: v >= 0),  # numpy's Generator takes any size
    "vocab_size": (["0", "100", "258", "259", "300", "4096", "x"], int, lambda v: v >= 259),
    "tokenizer_train_mb": (FLOATS, float, lambda v: finite(v) and v > 0),
    "num_proc": (COUNTS, int, lambda v: v >= 0),
    "max_steps": (COUNTS, int, lambda v: v >= 1),
    "batch_size": (COUNTS, int, lambda v: v >= 1),
    "gradient_accumulation_steps": (COUNTS, int, lambda v: v >= 1),
    "learning_rate": (FLOATS, float, lambda v: finite(v) and v > 0),
    "min_learning_rate": (FLOATS, float, lambda v: finite(v) and v >= 0),
    "warmup_steps": (COUNTS, int, lambda v: v >= 0),
    "weight_decay": (FLOATS, float, lambda v: finite(v) and v >= 0),
    "adam_beta1": (FLOATS, float, lambda v: 0 <= v < 1),
    "adam_beta2": (FLOATS, float, lambda v: 0 <= v < 1),
    "max_grad_norm": (FLOATS, float, lambda v: finite(v) and v >= 0),
    "mixed_precision": (["no", "bf16", "fp16", "fp8", "BF16", ""], str, None),
    "compile": (BOOLS, bool, None),
    "seed": (SEEDS, int, lambda v: 0 <= v < 2**32),
    "cpu": (BOOLS, bool, None),
    "cpu_threads": (COUNTS, int, lambda v: v >= 0),
    "eval_every": (COUNTS, int, lambda v: v >= 0),
    "eval_batches": (COUNTS, int, lambda v: v >= 0),
    "log_every": (COUNTS, int, lambda v: v >= 1),
    "save_every": (COUNTS, int, lambda v: v >= 0),
    "keep_last": (COUNTS, int, lambda v: v >= 1),
    # "" is no resume, like null: safe, since a fresh run refuses a folder with checkpoints
    "resume": (["latest", "/nonexistent/step-3"], str, lambda v: v in ("latest", "")),
    "stop_at_step": (COUNTS, int, lambda v: v >= 0),
    "overwrite_output_dir": (BOOLS, bool, None),
    "report_to": (["none", "tensorboard", "all", "wandb", "TensorBoard", "bogus", ""], str, lambda v: v in _trackers()),
    "peak_tflops": (FLOATS, float, lambda v: finite(v) and v >= 0),
    "skip_nonfinite": (BOOLS, bool, None),
    "ddp_timeout": (COUNTS, int, lambda v: v >= 1),
    "push_to_hub": (BOOLS, bool, None),
    "hub_model_id": (["alice/tiny", "tiny", "bad id!", "a/b/c", "x" * 97], str, None),  # checked with push_to_hub
    "hub_private": (BOOLS, bool, None),
    "inject_nonfinite_at_step": (COUNTS, int, lambda v: v >= 0),
    "inject_nonfinite_into": (["loss", "grads", "weights", "optimizer_state", "optimizer", "Loss", ""], str, None),
    "debug_save_delay": (FLOATS, float, lambda v: finite(v) and v >= 0),
    "debug_rank_dumps": (BOOLS, bool, None),
}
# a bad value may be reported under the name the model config gives it
ALIASES = {"dropout": ["pdrop"], "n_positions": ["block_size"], "block_size": ["n_positions"]}


def _dataclass_fields() -> dict:
    from dataclasses import fields

    from train.data import DataArguments

    return {f.name: f for dc in (ModelArguments, DataArguments, TrainArguments) for f in fields(dc)}


def test_every_numeric_and_choice_argument_is_fuzzed():
    """A new argument gets a SPEC entry, so that its validation is fuzzed too (paths and free text excepted)."""
    unspecified = sorted(set(_dataclass_fields()) - set(SPEC) - {"data", "text_field", "tokenizer", "data_cache_dir",
                                                                 "config", "output_dir"})  # fmt: skip
    assert not unspecified, f"add {unspecified} to SPEC in {__file__}"


def expected_problems(values: dict[str, str | None]) -> set[str]:
    """The flags that make this command line invalid, by the documented ranges: the oracle."""
    from transformers.activations import ACT2FN

    from modeling_minigpt import MiniGPTConfig

    fields, bad, parsed = _dataclass_fields(), set(), {}
    for name, raw in values.items():
        pool, kind, ok = SPEC[name]
        if kind is bool:
            if raw is not None and raw.lower() not in ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0"):
                bad.add(name)
            parsed[name] = raw is None or raw.lower() in ("yes", "true", "t", "y", "1")
            continue
        try:
            value = kind(raw)  # what argparse's type= does
        except ValueError:
            bad.add(name)
            continue
        choices = fields[name].metadata.get("choices")
        if typing.get_origin(fields[name].type) is typing.Literal:
            choices = typing.get_args(fields[name].type)
        if name == "activation_function":
            choices = sorted(ACT2FN)
        if (choices and value not in choices) or (ok is not None and not ok(value)):
            bad.add(name)
        parsed[name] = value
    get = lambda name: parsed.get(name, fields[name].default)  # noqa: E731
    if get("min_learning_rate") > get("learning_rate") and not bad & {"learning_rate", "min_learning_rate"}:
        bad |= {"learning_rate", "min_learning_rate"}
    if get("push_to_hub") and (get("hub_model_id") is None or not _repo_id_ok(get("hub_model_id"))):
        bad |= {"push_to_hub", "hub_model_id"}
    model = ("n_layer", "n_head", "n_embd", "n_inner", "n_positions", "position_embedding_type", "norm_position",
             "activation_function", "dropout", "bias", "block_size")  # fmt: skip
    if not bad & set(model):
        n_positions = get("n_positions") or get("block_size")
        if get("block_size") > n_positions:
            bad |= {"block_size", "n_positions"}
        try:
            MiniGPTConfig(
                vocab_size=320, n_positions=n_positions, n_embd=get("n_embd"), n_layer=get("n_layer"),
                n_head=get("n_head"), n_inner=get("n_inner"), position_embedding_type=get("position_embedding_type"),
                norm_position=get("norm_position"), activation_function=get("activation_function"),
                embd_pdrop=get("dropout"), attn_pdrop=get("dropout"), resid_pdrop=get("dropout"), bias=get("bias"),
            )  # fmt: skip
        except ValueError:
            bad |= {"n_layer", "n_head", "n_embd", "n_inner", "n_positions", "position_embedding_type", "dropout"}
    return bad


def _argv(values: dict[str, str | None]) -> list[str]:
    # --flag=value, so that a value such as -1 or an empty string is never taken for a flag or dropped
    return [f"--{name}" if raw is None else f"--{name}={raw}" for name, raw in values.items()]


@settings(max_examples=4 * settings.default.max_examples)  # a parse takes milliseconds: 200 in CI, 4000 long
@given(st.data())
def test_cli_fuzz_every_invalid_command_line_is_a_usage_error_naming_the_flag(data):
    import contextlib
    import io

    names = data.draw(st.lists(st.sampled_from(sorted(SPEC)), max_size=4, unique=True), label="flags")
    values = {name: data.draw(st.sampled_from(SPEC[name][0]), label=name) for name in names}
    problems = expected_problems(values)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            parse_args(_argv(values))
            outcome = None
        except SystemExit as e:
            outcome = e.code
    message = stderr.getvalue()
    if not problems:
        assert outcome is None, f"a valid command line was refused: {_argv(values)}\n{message}"
        return
    assert outcome not in (None, 0), f"an invalid command line was accepted: {_argv(values)} (bad: {problems})"
    assert "error:" in message
    named = {n for n in problems for alias in [n, *ALIASES.get(n, [])] if alias in message}
    assert named, f"the message names none of {sorted(problems)}:\n{message}"


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
    a value of the field's type inside its documented range, or is a usage error; never a TypeError in between."""
    import contextlib
    import io
    import json

    names = data.draw(st.lists(st.sampled_from(sorted(SPEC)), min_size=1, max_size=4, unique=True), label="keys")
    values = {name: data.draw(st.one_of(json_values, st.sampled_from(SPEC[name][0])), label=name) for name in names}
    path = config_dir / "fuzz.json"
    path.write_text(json.dumps(values))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            parsed = parse_args(["--config", str(path)])
        except SystemExit as e:
            assert e.code not in (None, 0) and "error" in (stderr.getvalue() + str(e.code)), values
            return
    by_name = {k: v for dc in parsed for k, v in vars(dc).items()}
    for name in names:
        kind, value = SPEC[name][1], by_name[name]
        if values[name] is None:
            continue  # null means the default
        assert type(value) is kind, f"{name}: {values[name]!r} became {value!r}, not {kind.__name__}"
    given_ = [n for n in names if values[n] is not None]
    as_cli = {n: (str(by_name[n]).lower() if SPEC[n][1] is bool else str(by_name[n])) for n in given_}
    assert not expected_problems(as_cli), f"accepted out-of-range values {values} -> {as_cli}"


# ------------------------------------------------------------------------------------------------------ text
from train.data import DataArguments, DataError, load_documents, prepare_data, resolve_data_files  # noqa: E402


def prepare(tmp_path, data, **overrides):
    fields = dict(data=[str(p) for p in data], block_size=32, vocab_size=300, data_cache_dir=str(tmp_path / "cache"))
    return prepare_data(DataArguments(**{**fields, **overrides}), log=lambda *a: None)


def test_empty_and_blank_files_are_skipped_with_a_warning_or_refused(tmp_path):
    (tmp_path / "d").mkdir()
    good = write_txt(tmp_path / "d" / "good.txt", make_corpus(30))
    for name in ("empty.txt", "empty.jsonl", "sub/empty.txt"):
        (tmp_path / "d" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "d" / name).write_text("")
    (tmp_path / "d" / "blank.txt").write_text("\n \n\t\n\n")
    with pytest.warns(UserWarning, match="Skipping the empty file") as caught:
        files = resolve_data_files([str(tmp_path / "d")])
    assert len(caught) == 3 and files == sorted([str(good), str(tmp_path / "d" / "blank.txt")])
    with pytest.warns(UserWarning, match="Skipping the empty file"):
        data = prepare(tmp_path, [tmp_path / "d"])
    assert data.info["documents"]["train"] + data.info["documents"]["validation"] == 30  # blank lines add nothing

    with pytest.raises(DataError, match="only blank lines"):
        load_documents([str(tmp_path / "d" / "blank.txt")])
    with pytest.warns(UserWarning), pytest.raises(DataError, match="Every data file is empty"):
        resolve_data_files([str(tmp_path / "d" / "empty.txt"), str(tmp_path / "d" / "empty.jsonl")])


def test_an_enormous_single_line_is_one_whole_document(tmp_path):
    """25 MB on one line (a minified dump, a log without newlines), as .txt in every text_unit and as .jsonl: one
    document, neither truncated nor split at the reader's 10 MB chunks."""
    import json

    line = "word " * 5_000_000 + "END"
    txt = tmp_path / "one.txt"
    txt.write_text(f"first\n{line}\nlast\n")
    jsonl = tmp_path / "one.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("first", line, "last")))
    for path, unit in ((txt, "line"), (txt, "paragraph"), (txt, "document"), (jsonl, "paragraph")):
        docs = load_documents([str(path)], text_unit=unit)["text"]
        longest = max(docs, key=len)
        assert line in longest, (path.name, unit)
        assert len(docs) == (3 if unit == "line" or path == jsonl else 1), (path.name, unit)


def test_an_enormous_line_without_spaces_trains_and_packs(tmp_path):
    """500 kB of base64 on one line: one "word" for the BPE trainer and the tokenizer, which must cope."""
    import base64

    blob = base64.b64encode(os.urandom(375_000)).decode()
    path = write_txt(tmp_path / "blob.txt", make_corpus(60) + [blob])
    data = prepare(tmp_path, [path], split_seed=1)
    assert len(data.train) * 32 > len(blob) / 4  # the blob is in there, as thousands of blocks
    assert all(len(row) == 32 for row in data.train[:5]["input_ids"])


def test_binary_and_mixed_encoding_files_are_decoded_with_replacement_and_a_warning(tmp_path):
    binary = tmp_path / "dump.txt"
    binary.write_bytes(bytes(range(256)) * 40 + os.urandom(20_000))  # NULs, control bytes, invalid UTF-8
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(
        "naïve café, 日本語\n\n".encode("utf-8")
        + "crème brûlée\n\n".encode("latin-1")
        + "こんにちは\n\n".encode("shift_jis")
        + "5 € only\n\n".encode("cp1252")
        + "utf-16 text".encode("utf-16")
    )
    utf16 = tmp_path / "windows.txt"
    utf16.write_text("\n\n".join(make_corpus(5)), encoding="utf-16")
    good = write_txt(tmp_path / "good.txt", make_corpus(40))
    for path in (binary, mixed, utf16):
        with pytest.warns(UserWarning, match=f"{path.name} is not valid UTF-8 .*replacement characters"):
            docs = load_documents([str(path)])["text"]
        assert "\ufffd" in "".join(docs)
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        docs = load_documents([str(mixed)])["text"]
    assert docs[0] == "naïve café, 日本語"  # the valid UTF-8 survives intact
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        data = prepare(tmp_path, [binary, mixed, utf16, good])
    assert len(data.train) > 0 and data.tokenizer.decode(data.train[0]["input_ids"])


def test_a_folder_of_10k_tiny_files_loads_every_one(tmp_path):
    folder = tmp_path / "many"
    for i in range(10_000):
        sub = folder / f"part{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"note{i:05d}.txt").write_text(f"note {i}: the king spoke to the queen.\n")
    data = prepare(tmp_path, [folder])
    assert len(data.info["files"]) == 10_000
    assert data.info["documents"]["train"] + data.info["documents"]["validation"] == 10_000
    assert prepare(tmp_path, [folder]).from_cache  # the second run skips the work


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--n_layer", "2", "3"], "'3'"),  # a stray value
        (["stray"], "stray"),
        (["--no_such_flag", "1"], "--no_such_flag"),
        (["--n_layer"], "--n_layer"),  # a missing value
        (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    ],
)
def test_malformed_command_lines_are_usage_errors(capsys, argv, named):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code not in (None, 0)
    assert named in capsys.readouterr().err + str(e.value.code)


# ----------------------------------------------------------------------------------------------------- secrets
def test_no_output_and_no_written_file_holds_the_hub_token(corpus, tmp_path):
    """A `pretrain --push_to_hub` run and a `python -m hub.push`, against the local Hub server, with the token in
    HF_TOKEN: stdout, stderr, every file they wrote (output folder, checkpoints, model card, log, TensorBoard events,
    their HF_HOME and TMPDIR) and every file they pushed are searched for it, as bytes."""
    from hub_server import WRITE_TOKEN, hub_env, running_hub

    secret = WRITE_TOKEN.encode()
    home, tmp, out = tmp_path / "hf_home", tmp_path / "tmpdir", tmp_path / "run"
    tmp.mkdir()
    with running_hub() as hub:
        env = hub_env(hub, HF_HOME=str(home), TMPDIR=str(tmp))
        argv = tiny_args(corpus, out, "--max_steps", 4, "--save_every", 2, "--eval_every", 2, "--report_to",
                         "tensorboard", "--push_to_hub", "--hub_model_id", "alice/secret-test")  # fmt: skip
        train = [sys.executable, "-m", "train.pretrain", *argv]
        push = [sys.executable, "-m", "hub.push", str(out), "alice/secret-test-cli"]
        runs = [subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=600) for cmd in (train, push)]
        for run in runs:
            assert run.returncode == 0, run.stderr.decode(errors="replace")[-3000:]
            assert secret not in run.stdout and secret not in run.stderr, "the token was printed"
        assert b"Pushed" in runs[0].stdout and b"pushed" in runs[1].stdout
        pushed = {**hub.files("alice/secret-test"), **hub.files("alice/secret-test-cli")}
        assert "README.md" in pushed and "model.safetensors" in pushed
        for name, content in pushed.items():
            assert secret not in content, f"the token was pushed in {name}"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.match("*/checkpoints/step-2/optimizer.bin") for p in written)
    assert any("tfevents" in p.name for p in written) and (out / "README.md").is_file()
    leaks = [str(p) for p in written if secret in p.read_bytes()]
    assert not leaks, f"the token was written to {leaks}"
