"""The pretraining loop end to end, on a tiny model and a synthetic corpus: outputs, resume, faults, bad inputs.

Most runs call `train.pretrain.main(argv)` in this process (no import cost); the signal and disk-full tests run the
script as a real subprocess, since that is what they are about.
"""

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_data import make_corpus, write_txt

from train.args import EXIT_NONFINITE, parse_args
from train.checkpoints import latest_checkpoint
from train.data import pack_blocks
from train.pretrain import collate, get_lr, main, training_step

REPO = Path(__file__).resolve().parents[1]


def tiny_args(corpus, out, *extra) -> list[str]:
    """A ~9k-parameter model on 16-token blocks: each optimizer step takes milliseconds on a CPU."""
    return [
        "--data", str(corpus), "--output_dir", str(out), "--cpu",
        "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--vocab_size", "300",
        "--batch_size", "4", "--learning_rate", "3e-3", "--min_learning_rate", "3e-4", "--warmup_steps", "2",
        "--report_to", "none", "--log_every", "1", "--eval_every", "0", "--eval_batches", "2", "--save_every", "0",
        *map(str, extra),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_txt(tmp_path_factory.mktemp("corpus") / "corpus.txt", make_corpus(60))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps process-wide singletons between them.

    One intra-op thread: these models are 16 wide, where a thread pool only adds synchronisation (and stalls badly
    when other processes share the cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)


def error_of(argv, capsys) -> str:
    """Run main() expecting a clean exit with an error; return its message (argparse's or ours)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    return (e.value.code if isinstance(e.value.code, str) else "") + capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- pure pieces
def test_lr_schedule_warms_up_then_decays_by_cosine():
    lr = lambda s: get_lr(s, max_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)  # noqa: E731
    assert lr(0) == pytest.approx(1 / 11) and lr(9) == pytest.approx(10 / 11)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # halfway through the cosine
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))


def test_packed_blocks_keep_every_eos_as_a_target():
    """Pretraining blocks are full (the tail is dropped), so no label is masked, least of all by id: with a
    tokenizer whose pad token is EOS (a GPT-2-style one given as --tokenizer), every separator stays a target."""
    from datasets import Dataset

    blocks = Dataset.from_dict(pack_blocks({"input_ids": [[5, 6], [7, 8, 9], [10]]}, block_size=4, eos_id=2))
    batch = collate(blocks.with_format("numpy"), [0, 1])
    assert batch["input_ids"].tolist() == [[5, 6, 2, 7], [8, 9, 2, 10]]  # the last document's EOS fell in the tail
    assert torch.equal(batch["labels"], batch["input_ids"])


def _grads_after(k: int, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin
    from conftest import tiny_config

    from modeling_minigpt import MiniGPTForCausalLM

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=k))
    torch.manual_seed(0)
    model = accelerator.prepare(MiniGPTForCausalLM(tiny_config()))
    training_step(accelerator, model, micro_batches)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_normalises_by_target_tokens_and_equals_one_big_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (8, 12), generator=g)
    labels = ids.clone()
    labels[0, 2:] = -100  # micro-batches with very different numbers of target tokens
    labels[1, 5:] = -100
    labels[4:6, 9:] = -100
    micro = [{"input_ids": ids[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, 8, 2)]
    accumulated = _grads_after(4, micro)
    big = _grads_after(1, [{"input_ids": ids, "labels": labels}])
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-7, msg=name)
    # the test can fail: averaging the four micro-batch means instead gives a different gradient
    naive = {n: sum(_grads_after(1, [m])[n] for m in micro) / 4 for n in big}
    assert not torch.allclose(
        naive["model.embed_tokens.weight"], big["model.embed_tokens.weight"], rtol=1e-3, atol=1e-6
    )


# -------------------------------------------------------------------------------------------------- full runs
def test_run_writes_a_loadable_model_checkpoints_logs_and_plot(corpus, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(corpus, out, "--max_steps", 30, "--eval_every", 10, "--save_every", 10, "--keep_last", 2,
                     "--report_to", "tensorboard", "--log_every", 5)  # fmt: skip
    result = main(args)
    assert result["status"] == "done" and result["step"] == 30
    assert math.isfinite(result["val_perplexity"]) and result["val_loss"] == pytest.approx(
        math.log(result["val_perplexity"])
    )

    log = read_log(out)
    train = [r for r in log if "loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["tokens_per_s"] > 0 for r in train)
    assert [r["step"] for r in log if "val_loss" in r] == [0, 10, 20, 30]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # (add_hparams adds a subfolder)

    # keep_last=2 of the saves at 10, 20, 30; each checkpoint is complete and self-contained
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-20", "step-30"]
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

    step30 = out / "checkpoints" / "step-30"
    assert json.loads((step30 / "train_state.json").read_text())["state"]["step"] == 30
    assert {"tokenizer.json", "tokenizer_config.json", "optimizer.bin", "random_states_0.pkl", "config.json",
            "modeling_minigpt.py", "generation_config.json"} <= {p.name for p in step30.iterdir()}  # fmt: skip
    from_ckpt = AutoModelForCausalLM.from_pretrained(step30)
    assert AutoTokenizer.from_pretrained(step30).get_vocab() == AutoTokenizer.from_pretrained(out).get_vocab()

    # the final folder: AutoModelForCausalLM, AutoTokenizer, pipeline, and sampling defaults with pad/eos
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, from_ckpt.state_dict()[name], msg=name)
    gen = GenerationConfig.from_pretrained(out)
    assert gen.do_sample and gen.top_p < 1 and gen.temperature < 1
    assert (gen.eos_token_id, gen.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert model.config.n_positions == 16 and model.config.vocab_size % 64 == 0
    text = pipeline("text-generation", model=model, tokenizer=tokenizer)("the king", max_new_tokens=5)[0]
    assert text["generated_text"].startswith("the king")


def test_resume_continues_exactly_where_the_run_stopped(corpus, tmp_path):
    # dropout and accumulation on, and the stop falls mid-epoch, so RNG, data position and schedule must all resume
    common = (
        "--max_steps",
        12,
        "--gradient_accumulation_steps",
        2,
        "--batch_size",
        16,
        "--dropout",
        0.1,
        "--debug_rank_dumps",
    )  # 9 steps per epoch
    a, b = tmp_path / "uninterrupted", tmp_path / "resumed"
    main(tiny_args(corpus, a, *common))
    first = main(tiny_args(corpus, b, *common, "--stop_at_step", 5))
    assert first["status"] == "stopped" and first["step"] == 5
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step-5"]
    first_blocks = json.loads((b / "debug" / "rank0.json").read_text())["blocks"]
    second = main(tiny_args(corpus, b, *common, "--resume", "latest"))
    assert second["status"] == "done" and second["step"] == 12

    assert_same_weights(a, b)
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() == set(range(1, 13))
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-6), step
    # the resumed run consumed exactly the blocks the uninterrupted one did after step 5: no replay, no skip
    blocks_a = json.loads((a / "debug" / "rank0.json").read_text())["blocks"]
    blocks_b = first_blocks + json.loads((b / "debug" / "rank0.json").read_text())["blocks"]
    assert blocks_b == blocks_a
    epoch = json.loads((a / "checkpoints" / "step-12" / "train_state.json").read_text())["state"]["epoch"]
    assert epoch >= 1, "the run should cross an epoch boundary"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_0_and_resume_matches(corpus, tmp_path):
    out = tmp_path / "signalled"
    common = ("--max_steps", 3000, "--seed", 7)
    cmd = [sys.executable, str(REPO / "train" / "pretrain.py"), *tiny_args(corpus, out, *common)]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "Received SIGTERM" in output and "Stopped at step" in output
    stopped = int(output.split("Stopped at step ")[1].split()[0])
    assert 3 <= stopped < 3000
    assert (out / "checkpoints" / f"step-{stopped}" / "train_state.json").is_file()
    assert not (out / "model.safetensors").exists(), "an interrupted run does not export a final model"

    # resume for 3 more steps, and compare with an uninterrupted run of the same schedule
    target = stopped + 3
    main(tiny_args(corpus, out, *common, "--resume", "latest", "--stop_at_step", target))
    ref = tmp_path / "reference"
    main(tiny_args(corpus, ref, *common, "--stop_at_step", target))
    assert losses(out) == pytest.approx(losses(ref), abs=1e-6)
    assert sorted(losses(out)) == list(range(1, target + 1))
    assert_same_weights(out / "checkpoints" / f"step-{target}", ref / "checkpoints" / f"step-{target}")


@pytest.mark.slow
def test_push_to_hub_publishes_the_final_model_through_hub_push(corpus, tmp_path):
    from hub_server import hub_env, running_hub

    out = tmp_path / "pushed"
    args = tiny_args(corpus, out, "--max_steps", 3, "--push_to_hub", "--hub_model_id", "alice/tiny-pretrain")
    with running_hub() as server:
        env = {**hub_env(server), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "train.pretrain", *args]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        files = server.files("alice/tiny-pretrain")
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"} <= set(files)
    assert not any(name.startswith("checkpoints/") for name in files), "only the final model is published"
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "Pushed" in proc.stdout


def test_nonfinite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        main(tiny_args(corpus, out, "--max_steps", 10, "--save_every", 2, "--inject_nonfinite_at_step", 5))
    assert e.value.code == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "the loss became nan at step 5" in err and "step-4" in err and "--skip_nonfinite" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    good = weights(out / "checkpoints" / "step-4")
    assert all(torch.isfinite(t).all() for t in good.values())
    assert max(losses(out)) == 4  # nothing logged for the bad step


def test_skip_nonfinite_skips_and_counts_the_step(corpus, tmp_path):
    out = tmp_path / "skip"
    result = main(tiny_args(corpus, out, "--max_steps", 8, "--skip_nonfinite", "--inject_nonfinite_at_step", 3))
    assert result["status"] == "done"
    log = [r for r in read_log(out) if "loss" in r]
    assert math.isnan(log[2]["loss"]) and log[2]["skipped_steps"] == 1
    assert log[-1]["skipped_steps"] == 1 and math.isfinite(log[-1]["loss"])
    assert all(torch.isfinite(t).all() for t in weights(out).values())


@pytest.mark.slow
def test_failed_saves_are_reported_retried_and_leave_earlier_checkpoints(corpus, tmp_path):
    """A real EFBIG ("File too large") from RLIMIT_FSIZE: checkpoints need a file the limit forbids."""
    out = tmp_path / "full"
    main(tiny_args(corpus, out, "--max_steps", 8, "--stop_at_step", 4, "--save_every", 2, "--keep_last", 5))
    before = {p.name: (p / "model.safetensors").read_bytes() for p in (out / "checkpoints").iterdir()}
    assert sorted(before) == ["step-2", "step-4"]
    model_bytes = len(before["step-4"])
    limit = int(model_bytes * 1.5)  # the model (and tokenizer) fit; the optimizer state (2x the model) does not

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    resume = tiny_args(corpus, out, "--max_steps", 8, "--save_every", 2, "--keep_last", 5, "--resume", "latest")
    cmd = [sys.executable, "-m", "train.pretrain", *resume]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    err = proc.stderr
    for step in (6, 8):
        assert f"could not save the checkpoint of step {step} in {out / 'checkpoints'}" in err
    assert "GiB free there" in err  # torch's own message for a short write is cryptic; the free space is not
    assert "the final checkpoint could not be saved" in err
    assert max(losses(out)) == 8, "training went on after the failed save at step 6"
    after = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert after == ["step-2", "step-4"], "no partial folder left, earlier checkpoints kept"
    for name, data in before.items():
        assert (out / "checkpoints" / name / "model.safetensors").read_bytes() == data


def test_interrupted_save_leftovers_are_never_resumed_and_are_cleaned(corpus, tmp_path, capsys):
    out = tmp_path / "leftover"
    main(tiny_args(corpus, out, "--max_steps", 6, "--stop_at_step", 2))
    ckpts = out / "checkpoints"
    # what a kill during the save of step 4 leaves behind: a complete-looking temporary folder
    (ckpts / "step-2").rename(ckpts / "keep")
    import shutil

    shutil.copytree(ckpts / "keep", ckpts / ".tmp-step-4")
    (ckpts / "keep").rename(ckpts / "step-2")
    assert latest_checkpoint(ckpts) == ckpts / "step-2"
    result = main(tiny_args(corpus, out, "--max_steps", 6, "--resume", "latest"))
    assert "Removing the incomplete checkpoint folder" in capsys.readouterr().out
    assert result["step"] == 6 and not (ckpts / ".tmp-step-4").exists()
    assert losses(out).keys() == set(range(1, 7))


# ------------------------------------------------------------------------------------------------ arguments
def test_config_presets_files_and_overrides(tmp_path):
    model, data, train = parse_args(["--config", "tiny", "--max_steps", "7"])
    assert (model.n_embd, data.block_size, train.max_steps) == (128, 128, 7)
    model, _, _ = parse_args(["--config", "gpt2-124m"])
    assert (model.n_layer, model.n_head, model.n_embd) == (12, 12, 768)
    cfg = tmp_path / "mine.json"
    cfg.write_text(json.dumps({"n_layer": 3, "learning_rate": 1e-3}))
    model, _, train = parse_args([f"--config={cfg}", "--n_layer", "5"])
    assert (model.n_layer, train.learning_rate) == (5, 1e-3)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--resume", "--keep_last", "--skip_nonfinite", "--inject_nonfinite_at_step", "--debug_save_delay",
                 "--ddp_timeout", "--push_to_hub", "--hub_model_id", "--stop_at_step", "--mixed_precision",
                 "--gradient_accumulation_steps", "--data", "--text_field", "--vocab_size", "--tokenizer"):  # fmt: skip
        assert flag in text
    assert "fault-injection tests" in text.lower() and "optimizer steps" in text.lower()


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--block_size", "64", "--n_positions", "32"), "--block_size 64 is larger than the model's n_positions 32"),
        (("--resume", "/nonexistent/step-3"), "is not a checkpoint"),
        (("--max_steps", "0"), "--max_steps must be >= 1"),
        (("--push_to_hub",), "--push_to_hub needs --hub_model_id"),
        (("--n_embd", "30", "--n_head", "4"), "must be divisible by n_head"),
        (("--config", "no-such-preset"), "neither a file nor a preset"),
        (("--vocab_size", "100"), "--vocab_size must be at least 259"),
    ],
)
def test_bad_arguments_are_clear_errors(corpus, tmp_path, capsys, extra, message):
    assert message in error_of(tiny_args(corpus, tmp_path / "x", *extra), capsys)


@pytest.mark.filterwarnings("ignore:Skipping the empty file")
def test_bad_data_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    small = write_txt(tmp_path / "small.txt", make_corpus(20, words_per_doc=2))
    cases = [
        (tmp_path / "missing.txt", "does not exist"),
        (empty, "Every data file is empty"),
        (small, "fewer than one block"),
    ]
    for path, message in cases:
        argv = tiny_args(path, tmp_path / "x", "--block_size", "16" if path != small else "512", "--n_positions", 512)
        assert message in error_of(argv, capsys), path


def test_resume_with_a_different_model_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "r"
    main(tiny_args(corpus, out, "--max_steps", 4, "--stop_at_step", 2))
    message = error_of(tiny_args(corpus, out, "--max_steps", 4, "--resume", "latest", "--n_embd", 32), capsys)
    assert "model.n_embd: 16 -> 32" in message


def test_unknown_config_keys_are_named(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("n_layers: 3\n")
    assert "unknown keys ['n_layers']" in error_of(["--config", str(cfg)], capsys)


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints_unless_overwriting(corpus, tmp_path, capsys):
    out = tmp_path / "twice"
    main(tiny_args(corpus, out, "--max_steps", 3))
    assert "already holds checkpoints of an earlier run (latest: step-3)" in error_of(
        tiny_args(corpus, out, "--max_steps", 2), capsys
    )
    result = main(tiny_args(corpus, out, "--max_steps", 2, "--overwrite_output_dir"))
    assert result["step"] == 2 and sorted(losses(out)) == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]


def test_resume_latest_without_checkpoint_starts_fresh(corpus, tmp_path, capsys):
    result = main(tiny_args(corpus, tmp_path / "new", "--max_steps", 2, "--resume", "latest"))
    assert result["step"] == 2 and "starting from scratch" in capsys.readouterr().out


def test_shipped_accelerate_configs_load():
    """accelerate refuses unknown keys; FSDP wraps the classes the model names in _no_split_modules."""
    from accelerate.commands.config.config_args import load_config_from_file

    from modeling_minigpt import MiniGPTForCausalLM

    expected = {"single_gpu": ("NO", 1, 1), "multi_gpu": ("MULTI_GPU", 8, 1), "fsdp": ("FSDP", 8, 1),
                "multi_node": ("MULTI_GPU", 16, 2)}  # fmt: skip
    for name, (kind, processes, machines) in expected.items():
        config = load_config_from_file(str(REPO / "train" / "configs" / f"{name}.yaml"))
        assert (config.distributed_type.value, config.num_processes, config.num_machines) == (kind, processes, machines)
    fsdp = load_config_from_file(str(REPO / "train" / "configs" / "fsdp.yaml")).fsdp_config
    assert (
        fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    )
    assert MiniGPTForCausalLM._no_split_modules == ["MiniGPTBlock"]
