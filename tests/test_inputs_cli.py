"""Command lines and config files of minigpt/train/pretrain.py, and the config reader minigpt/train/finetune.py shares with it.

Each bad value is a usage error, before any work starts, whose message names the flag and what to change: specific
inputs are checked against specific messages here (random ones in test_inputs_cli_fuzz.py). Presets and config
files go through argparse like the command line, which wins over them. The fault tests' debug hooks stay off the
command line and out of --help.
"""

import json
import re

import pytest

from minigpt.train.args import PRESETS_DIR, parse_args, read_arguments
from minigpt.train.faults import DebugHooks


def usage_error(argv: list[str], capsys) -> str:
    """parse_args(argv) must exit with a usage error; returns what it printed (and its SystemExit message)."""
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code not in (None, 0)
    return capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")


@pytest.mark.parametrize(
    "argv, message",
    [
        # ranges of the training arguments (check_args)
        ("--max_steps 0", "--max_steps must be >= 1, got 0."),
        ("--batch_size 0", "--batch_size must be >= 1, got 0."),
        ("--keep_last 0", "--keep_last must be >= 1, got 0."),
        ("--gradient_accumulation_steps -1", "--gradient_accumulation_steps must be >= 1, got -1."),
        ("--log_every 0", "--log_every must be >= 1, got 0."),
        ("--ddp_timeout 0", "--ddp_timeout must be >= 1, got 0."),
        ("--warmup_steps -1", "--warmup_steps must be >= 0, got -1."),
        ("--eval_every -1", "--eval_every must be >= 0, got -1."),
        ("--save_every -1", "--save_every must be >= 0, got -1."),
        ("--eval_batches -1", "--eval_batches must be >= 0, got -1."),
        ("--cpu_threads -1", "--cpu_threads must be >= 0, got -1."),
        ("--stop_at_step -1", "--stop_at_step must be >= 0, got -1."),
        ("--max_grad_norm -1", "--max_grad_norm must be >= 0, got -1.0."),
        ("--weight_decay -0.1", "--weight_decay must be >= 0, got -0.1."),
        ("--peak_tflops -1", "--peak_tflops must be >= 0, got -1.0."),
        ("--learning_rate nan", "--learning_rate must be a finite number, got nan."),
        ("--weight_decay inf", "--weight_decay must be a finite number, got inf."),
        ("--max_grad_norm inf", "--max_grad_norm must be a finite number, got inf."),
        ("--peak_tflops inf", "--peak_tflops must be a finite number, got inf."),
        ("--learning_rate 0.1 --min_learning_rate 1", "0 <= --min_learning_rate <= --learning_rate, got 0.1 and 1.0."),
        ("--learning_rate 0", "Need 0 < --learning_rate"),
        ("--adam_beta1 1", "--adam_beta1 must lie in [0, 1), got 1.0."),
        ("--adam_beta2 -0.1", "--adam_beta2 must lie in [0, 1), got -0.1."),
        ("--post_ln_warmup_fraction 1.5", "--post_ln_warmup_fraction must lie in [0, 1], got 1.5."),
        ("--post_ln_warmup_fraction nan", "--post_ln_warmup_fraction must lie in [0, 1], got nan."),
        (f"--seed {2**32}", "--seed must lie in [0, 2**32)"),
        ("--seed -1", "--seed must lie in [0, 2**32)"),
        ("--max_steps 0 --batch_size 0", "--max_steps must be >= 1, got 0. --batch_size must be >= 1, got 0."),
        # outputs, resume and trackers
        ("--report_to bogus", "--report_to 'bogus' is not an accelerate tracker; use one of ["),
        ("--push_to_hub", "--push_to_hub needs --hub_model_id user/name."),
        ("--push_to_hub --hub_model_id=bad_id!", "--hub_model_id 'bad_id!' is not a Hub repo id"),
        ("--resume /nonexistent/step-3", "--resume '/nonexistent/step-3' is not a checkpoint: there is no folder"),
        # a misspelled --output_dir is nothing to resume, never a silent fresh start
        ("--resume latest --output_dir /nonexistent/run", "there is no folder /nonexistent/run, so nothing to resume"),
        ("--config no-such-preset", "--config 'no-such-preset' is neither a file nor a preset; presets: ["),
        # the model (MiniGPTConfig's own checks, and argparse's choices)
        ("--block_size 64 --n_positions 32", "--block_size 64 is larger than the model's n_positions 32"),
        ("--n_positions 0", "--n_positions must be >= 1, got 0; leave it out to use --block_size."),
        ("--n_embd 30 --n_head 4", "MiniGPTConfig.n_embd (30) must be divisible by n_head (4)"),
        ("--n_layer 0", "MiniGPTConfig.n_layer (num_hidden_layers) must be a positive integer, got 0."),
        ("--n_inner 0", "MiniGPTConfig.n_inner must be a positive integer, got 0."),
        ("--dropout 1", "MiniGPTConfig.embd_pdrop must lie in [0, 1), got 1.0."),
        ("--activation_function swiglu", "MiniGPTConfig.activation_function='swiglu' is unknown"),
        ("--position_embedding_type rotary", "invalid choice: 'rotary' (choose from 'learned', 'sinusoidal', 'rope')"),
        ("--norm_position middle", "invalid choice: 'middle' (choose from 'pre', 'post')"),
        ("--mixed_precision fp8", "invalid choice: 'fp8'"),
        ("--n_layer x", "argument --n_layer/--n-layer: invalid int value: 'x'"),
        ("--bias maybe", "argument --bias: Truthy value expected: got maybe"),
        # the data (check_data_arguments)
        ("--vocab_size 100", "--vocab_size must be at least 259"),
        ("--block_size 1", "--block_size must be at least 2 tokens, got 1."),
        ("--validation_fraction 1", "--validation_fraction must lie in (0, 1), got 1.0."),
        ("--tokenizer_train_mb 0", "--tokenizer_train_mb must be a finite number > 0, got 0.0."),
        ("--num_proc -1", "--num_proc must be >= 0, got -1."),
        ("--split_seed -1", "--split_seed must be >= 0, got -1."),
        ("--tokenizer /nonexistent", "--tokenizer '/nonexistent' is not a folder."),
        ("--text_unit sentence", "invalid choice: 'sentence'"),
    ],
)
def test_each_bad_value_is_a_usage_error_with_its_own_message(capsys, argv, message):
    assert message in usage_error(argv.split(), capsys)


@pytest.mark.parametrize(
    "argv",
    [
        "--dropout 0.0",
        f"--seed {2**32 - 1}",
        "--learning_rate 6e-4 --min_learning_rate 6e-4",
        "--block_size 1024 --n_positions 2048",
        "--max_grad_norm 0 --warmup_steps 0 --eval_every 0 --save_every 0",
        "--report_to none --mixed_precision bf16 --position_embedding_type rope --norm_position post --no_bias",
    ],
)
def test_values_at_the_edges_of_their_ranges_are_accepted(argv):
    parse_args(argv.split())


def test_push_to_hub_without_the_hub_or_a_token_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """push_folder refuses both, but only after the whole run; the same checks stop the run before it starts."""
    from huggingface_hub import constants

    argv = ["--push_to_hub", "--hub_model_id", "alice/tiny"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets when huggingface_hub loads
    assert "--push_to_hub: HF_HUB_OFFLINE is set, so huggingface_hub may not reach the Hub" in usage_error(argv, capsys)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no `hf auth login`
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    message = usage_error(argv, capsys)
    assert "--push_to_hub: No Hugging Face token found: run `hf auth login`" in message
    assert "minigpt-push OUTPUT_DIR REPO_ID" in message
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    assert parse_args(argv)[2].push_to_hub


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
    assert named in usage_error(argv, capsys)


# ------------------------------------------------------------------------------------ presets and config files
def test_config_presets_files_and_overrides(tmp_path):
    assert sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) == ["gpt2-124m", "tiny"]
    model, data, train = parse_args(["--config", "tiny", "--max_steps", "7"])
    assert (model.n_embd, data.block_size, train.max_steps) == (128, 128, 7)
    model, _, _ = parse_args(["--config", "gpt2-124m"])
    assert (model.n_layer, model.n_head, model.n_embd) == (12, 12, 768)
    cfg = tmp_path / "mine.json"
    cfg.write_text(json.dumps({"n_layer": 3, "learning_rate": 1e-3}))
    model, _, train = parse_args([f"--config={cfg}", "--n_layer", "5"])
    assert (model.n_layer, train.learning_rate) == (5, 1e-3)
    # given twice, the last --config counts, as the last value of any flag does
    assert parse_args(["--config", "tiny", f"--config={cfg}"])[0].n_layer == 3
    assert parse_args([f"--config={cfg}", "--config", "tiny"])[0].n_layer == 4


def test_unknown_config_keys_are_named(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("n_layers: 3\n")
    assert "unknown arguments ['n_layers']" in usage_error(["--config", str(cfg)], capsys)


def test_config_file_values_are_type_checked_like_flags_in_both_scripts(tmp_path, capsys):
    """read_arguments puts a file's values through argparse: a string where an int belongs is a usage error naming
    the flag, for pretrain's --config and for finetune's positional config file alike (where set_defaults once let
    such values through to fail deep inside)."""
    from transformers import HfArgumentParser

    from minigpt.train import finetune

    cfg = tmp_path / "typo.yaml"
    cfg.write_text("max_steps: ten\n")
    assert "argument --max_steps/--max-steps: invalid int value: 'ten'" in usage_error(["--config", str(cfg)], capsys)
    with pytest.raises(SystemExit):
        finetune.parse_args([str(cfg)])
    assert "invalid int value: 'ten'" in capsys.readouterr().err
    parser = HfArgumentParser(finetune.ARGUMENT_CLASSES)
    (cfg := tmp_path / "ok.json").write_text(json.dumps({"max_steps": 5, "output_dir": "o", "report_to": ["none"]}))
    training_args = read_arguments(parser, ["--max_steps", "7"], cfg)[-1]
    assert (training_args.max_steps, training_args.output_dir, training_args.report_to) == (7, "o", [])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_arguments(parser, [], tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------------------- --help
def test_help_documents_every_flag_and_no_debug_hook(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--resume", "--keep_last", "--skip_nonfinite", "--ddp_timeout", "--push_to_hub", "--hub_model_id",
                 "--stop_at_step", "--mixed_precision", "--gradient_accumulation_steps", "--data", "--text_field",
                 "--vocab_size", "--tokenizer", "--eval_batches", "--peak_tflops"):  # fmt: skip
        assert flag in text
    words = " ".join(text.split()).lower()  # argparse wraps the help texts
    assert "optimizer steps" in words and "the final evaluation always reads the whole split" in words
    # the fault tests' hooks come from MINIGPT_DEBUG_* environment variables, not from the public command line
    for hook in ("inject_nonfinite", "debug", "save_delay", "rank_dumps", "fault-injection", "MINIGPT_DEBUG"):
        assert hook not in text
    assert "--inject_nonfinite_at_step" in usage_error(["--inject_nonfinite_at_step", "5"], capsys)


@pytest.mark.parametrize(
    "environ, message",
    [
        (
            {"MINIGPT_DEBUG_INJECT_NONFINITE_INTO": "optimizer"},
            "MINIGPT_DEBUG_INJECT_NONFINITE_INTO='optimizer' is not",
        ),
        (
            {"MINIGPT_DEBUG_INJECT_NONFINITE_AT_STEP": "x"},
            "MINIGPT_DEBUG_INJECT_NONFINITE_AT_STEP='x' is not of type int",
        ),
        ({"MINIGPT_DEBUG_SAVE_DELAY": "-1"}, "MINIGPT_DEBUG_SAVE_DELAY='-1' must be a finite number >= 0"),
        ({"MINIGPT_DEBUG_RANK_DUMPS": "maybe"}, "MINIGPT_DEBUG_RANK_DUMPS='maybe' is not of type bool"),
    ],
)
def test_debug_hooks_come_from_the_environment_and_bad_values_are_named(environ, message):
    assert DebugHooks.from_env({}) == DebugHooks()
    hooks = {"MINIGPT_DEBUG_INJECT_NONFINITE_AT_STEP": "3", "MINIGPT_DEBUG_INJECT_NONFINITE_INTO": "grads",
             "MINIGPT_DEBUG_SAVE_DELAY": "0.5", "MINIGPT_DEBUG_RANK_DUMPS": "1"}  # fmt: skip
    assert DebugHooks.from_env(hooks) == DebugHooks(3, "grads", 0.5, True)
    with pytest.raises(SystemExit, match=re.escape(f"pretrain: error: {message}")):
        DebugHooks.from_env(environ)
