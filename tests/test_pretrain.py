"""The pretraining loop end to end, on a tiny model and a synthetic corpus: outputs, resume, MFU, the evaluations,
and runs refused up front. Faults (signals, NaN/inf, failed saves) are in test_faults.py; arguments and config files
in test_inputs_cli.py.

Every run calls `minigpt.train.pretrain.main(argv)` in this process (no import cost).
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_weights, losses, make_corpus, read_log, tiny_args, write_txt

from minigpt.train.args import parse_args
from minigpt.train.data import prepare_data
from minigpt.schedule import get_lr
from minigpt.train.loader import collate
from minigpt.train.tokens import TokenBlocks
from minigpt.train.pretrain import main, training_step

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
REPO = Path(__file__).resolve().parents[1]


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


def test_warmup_stable_decay_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    lr = lambda s: get_lr(s, 1.0, 0.1, warmup_steps=10, max_steps=110, kind="warmup_stable_decay", decay_ratio=0.4)  # noqa: E731
    assert lr(0) == pytest.approx(1 / 11) and lr(10) == 1.0 and lr(66) == 1.0  # the decay starts at 110 - 44
    assert lr(77) == pytest.approx(1.0 - 0.9 * 11 / 44)  # a quarter of the way down
    assert lr(109) == pytest.approx(1.0 - 0.9 * 43 / 44) and lr(110) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))
    # a decay longer than the steps after warmup starts where the warmup ends
    assert get_lr(2, 1.0, 0.0, warmup_steps=2, max_steps=4, kind="warmup_stable_decay", decay_ratio=1.0) == 1.0


def test_packed_blocks_keep_every_eos_as_a_target():
    """Pretraining blocks are full (the tail is dropped), so no label is masked, least of all by id: with a
    tokenizer whose pad token is EOS (a GPT-2-style one given as --tokenizer), every separator stays a target."""

    blocks = TokenBlocks(np.array([5, 6, 2, 7, 8, 9, 2, 10, 2]), block_size=4)  # three documents, EOS after each
    batch = collate(blocks, [0, 1])
    assert batch["input_ids"].tolist() == [[5, 6, 2, 7], [8, 9, 2, 10]]  # the last document's EOS fell in the tail
    assert torch.equal(batch["labels"], batch["input_ids"])


def _grads_after(micro_batches: list[dict]) -> dict[str, torch.Tensor]:
    """Gradients of tiny_config()'s model after training_step over `micro_batches`, one optimizer step's worth."""
    from accelerate import Accelerator
    from conftest import tiny_config

    from modeling_minigpt import MiniGPTForCausalLM

    accelerator = Accelerator(cpu=True)
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
    accumulated = _grads_after(micro)
    big = _grads_after([{"input_ids": ids, "labels": labels}])
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-7, msg=name)
    # the test can fail: averaging the four micro-batch means instead gives a different gradient
    naive = {n: sum(_grads_after([m])[n] for m in micro) / 4 for n in big}
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
    recipe = json.loads((out / "training_summary.json").read_text())["recipe"]  # the model card's record
    assert recipe.startswith("Muon 0.02 (momentum 0.95) for the blocks' weight matrices, AdamW 0.003 -> 0.0003")

    # keep_last=2 of the saves at 10, 20, 30; each checkpoint is complete and self-contained
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-20", "step-30"]
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

    step30 = out / "checkpoints" / "step-30"
    record = json.loads((step30 / "train_state.json").read_text())
    assert record["state"]["step"] == 30
    assert record["hardware"].startswith("CPU (") and "1 process x 1 torch thread" in record["hardware"]  # for the card
    assert record["corpus"] is None  # --data given: the card names the files of args.data
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
    assert gen.use_cache is True  # read by transformers' torch.export/ExecuTorch recipe, which refuses None
    assert (gen.eos_token_id, gen.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert model.config.n_positions == 16 and model.config.vocab_size % 64 == 0
    text = pipeline("text-generation", model=model, tokenizer=tokenizer)("the king", max_new_tokens=5)[0]
    assert text["generated_text"].startswith("the king")


@pytest.mark.parametrize("optimizer, schedule", [("muon", "warmup_stable_decay"), ("adamw", "cosine")])
def test_resume_continues_exactly_where_the_run_stopped(corpus, tmp_path, debug_hooks, optimizer, schedule):
    # dropout and accumulation on, and the stop falls mid-epoch, so RNG, data position and schedule must all resume;
    # both recipes: Muon's momentum buffers and AdamW's moments must come back from the checkpoint
    debug_hooks(rank_dumps=1)
    common = ("--max_steps", 12, "--gradient_accumulation_steps", 2, "--batch_size", 16, "--dropout", 0.1,
              "--optimizer", optimizer)  # fmt: skip
    a, b = tmp_path / "uninterrupted", tmp_path / "resumed"  # 9 steps per epoch
    main(tiny_args(corpus, a, *common))
    first = main(tiny_args(corpus, b, *common, "--stop_at_step", 5))
    assert first["status"] == "stopped" and first["step"] == 5
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step-5"]
    first_blocks = json.loads((b / "debug" / "rank0.json").read_text())["blocks"]
    # checkpoints written before the LR became get_lr(step) also hold LambdaLR's state: it is ignored, not needed
    saved = b / "checkpoints" / "step-5" / "train_state.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "scheduler": {"last_epoch": 5, "_step_count": 6}}))
    second = main(tiny_args(corpus, b, *common, "--resume", "latest"))
    assert second["status"] == "done" and second["step"] == 12

    assert_same_weights(a, b, atol=1e-6)
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() == set(range(1, 13))
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-6), step
    lr = {r["step"]: r["lr"] for r in read_log(b) if "lr" in r}
    assert lr == {r["step"]: r["lr"] for r in read_log(a) if "lr" in r}  # the schedule resumed too
    assert lr[6] == pytest.approx(get_lr(5, max_lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=12, kind=schedule,
                                         decay_ratio=0.4))  # fmt: skip
    # the resumed run consumed exactly the blocks the uninterrupted one did after step 5: no replay, no skip
    blocks_a = json.loads((a / "debug" / "rank0.json").read_text())["blocks"]
    blocks_b = first_blocks + json.loads((b / "debug" / "rank0.json").read_text())["blocks"]
    assert blocks_b == blocks_a
    epoch = json.loads((a / "checkpoints" / "step-12" / "train_state.json").read_text())["state"]["epoch"]
    assert epoch >= 1, "the run should cross an epoch boundary"


def test_mfu_counts_the_trained_block_size_not_n_positions(corpus, tmp_path, capsys):
    """16-token blocks in a model with 64 positions: attention's FLOPs scale with the 16 tokens each one attends
    over. MFU = (6 N + 12 L C T) x tokens/s / (peak x processes), N the parameters without the position table
    (the tied head counted once), computed here by hand from the saved model and the logged tokens/s."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "mfu"
    main(tiny_args(corpus, out, "--max_steps", 2, "--n_positions", 64, "--peak_tflops", 0.5))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_positions == 64
    n = sum(p.numel() for name, p in model.named_parameters() if name != "model.embed_positions.weight")
    L, C, T = 1, 16, 16  # n_layer, n_embd, block_size
    flops_per_token = 6 * n + 12 * L * C * T
    for record in (r for r in read_log(out) if "loss" in r):
        assert record["mfu"] == pytest.approx(flops_per_token * record["tokens_per_s"] / 0.5e12, rel=1e-9)
        # the test can fail: n_positions (64) in place of T gives a number 15% larger
        assert record["mfu"] != pytest.approx((6 * n + 12 * L * C * 64) * record["tokens_per_s"] / 0.5e12, rel=1e-3)
    assert f"{flops_per_token / 1e6:.1f} MFLOP/token at 16 tokens; MFU against 0.5 TFLOP/s" in capsys.readouterr().out


def test_periodic_evaluations_sample_and_the_final_one_covers_the_whole_split(corpus, tmp_path, capsys):
    """--eval_batches 1 samples the first batch at steps 0 and 2, and the log says so; the final evaluation (the
    returned figure) covers every validation block. Its loss is checked against full [B, T, V] logits and
    cross-entropy computed here, which validate()'s lean skip_logits path must equal."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    out = tmp_path / "eval"
    argv = tiny_args(corpus, out, "--max_steps", 4, "--eval_every", 2, "--eval_batches", 1, "--batch_size", 4)
    result = main(argv)
    printed = capsys.readouterr().out
    _, data_args, _ = parse_args(argv)
    validation = prepare_data(data_args, log=lambda *_: None).validation
    n_val = len(validation)
    assert n_val > 4, "the validation split must be larger than one batch for this test to mean anything"

    evals = {r["step"]: r for r in read_log(out) if "val_loss" in r}
    assert sorted(evals) == [0, 2, 4]
    for step in (0, 2):
        assert (evals[step]["val_blocks"], evals[step]["val_split_blocks"]) == (4, n_val)
        assert f"step {step} | val_loss" in printed
    assert f"4 of {n_val} validation blocks (a sample)" in printed
    assert evals[4]["val_blocks"] == evals[4]["val_split_blocks"] == result["val_blocks"] == n_val
    assert f"{n_val} of {n_val} validation blocks\n" in printed
    assert result["val_loss"] == evals[4]["val_loss"] != evals[2]["val_loss"]

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.as_tensor(validation["input_ids"])  # (n_val, T)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits  # (n_val, T, V)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="mean")
    assert result["val_loss"] == pytest.approx(nll.item(), rel=1e-5)
    assert result["val_perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)


@pytest.mark.slow
def test_push_to_hub_publishes_the_final_model_through_hub_push(corpus, tmp_path):
    from hub_server import hub_env, running_hub

    out = tmp_path / "pushed"
    args = tiny_args(corpus, out, "--max_steps", 3, "--push_to_hub", "--hub_model_id", "alice/tiny-pretrain")
    with running_hub() as server:
        env = {**hub_env(server), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "minigpt.train.pretrain", *args]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        files = server.files("alice/tiny-pretrain")
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"} <= set(files)
    assert not any(name.startswith("checkpoints/") for name in files), "only the final model is published"
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "Pushed" in proc.stdout


# ------------------------------------------------------------------------------------------------ arguments
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


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints_unless_overwriting(corpus, tmp_path, capsys):
    out = tmp_path / "twice"
    main(tiny_args(corpus, out, "--max_steps", 3))
    assert "already holds checkpoints of an earlier run (latest: step-3)" in error_of(
        tiny_args(corpus, out, "--max_steps", 2), capsys
    )
    result = main(tiny_args(corpus, out, "--max_steps", 2, "--overwrite_output_dir"))
    assert result["step"] == 2 and sorted(losses(out)) == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]


def test_resume_alone_continues_with_the_saved_arguments(corpus, tmp_path, capsys):
    """`--resume OUTDIR` and nothing else continues the run exactly (nanoGPT's and litgpt's resume): the data,
    model and schedule come from the checkpoint's train_state.json."""
    a, b = tmp_path / "uninterrupted", tmp_path / "resumed"
    common = ("--max_steps", 5, "--dropout", 0.1, "--seed", 3)
    main(tiny_args(corpus, a, *common))
    main(tiny_args(corpus, b, *common, "--stop_at_step", 2))
    capsys.readouterr()
    result = main(["--resume", str(b)])
    out = capsys.readouterr().out
    assert result["status"] == "done" and result["step"] == 5
    assert f"Resumed from {b / 'checkpoints' / 'step-2'} at step 2" in out
    assert "overrides" not in out and "changed on resume" not in out  # nothing given, nothing overridden
    assert losses(b) == losses(a)
    assert_same_weights(a, b)

    # the finished run, resumed again: it says there is nothing left to train, and how to train longer
    main(["--resume", str(b)])
    assert "resume: the checkpoint has all 5 steps already; nothing is trained" in capsys.readouterr().out


def test_resume_prints_each_override_and_announces_a_schedule_change(corpus, tmp_path, capsys):
    out = tmp_path / "r"
    main(tiny_args(corpus, out, "--max_steps", 4, "--stop_at_step", 3))
    capsys.readouterr()
    main(["--resume", str(out / "checkpoints" / "step-3"), "--max_steps", "8", "--log_every", "2"])
    text = capsys.readouterr().out
    assert "resume: --max_steps 8 overrides the checkpoint's 4" in text
    assert "resume: --log_every 2 overrides the checkpoint's 1" in text
    wsd = dict(max_lr=3e-3, min_lr=3e-4, warmup_steps=2, kind="warmup_stable_decay", decay_ratio=0.4)
    lr_then, lr_now = get_lr(3, max_steps=4, **wsd), get_lr(3, max_steps=8, **wsd)  # in the decay; still stable
    assert (
        f"schedule: changed on resume (max_steps 4 -> 8): the learning rate of step 4 is {lr_now:.3g}, where the "
        f"checkpoint's schedule had {lr_then:.3g}" in text
    )
    assert text.index("changed on resume") < text.index("step 4 | loss")
    assert sorted(losses(out)) == [1, 2, 3, 4, 6, 8]


def test_resume_is_checked_before_any_data_preparation(corpus, tmp_path, capsys):
    """A model or data argument that differs from the checkpoint's is refused before the corpus is tokenized."""
    out, other = tmp_path / "r", write_txt(tmp_path / "other.txt", make_corpus(30, seed=1))
    main(tiny_args(corpus, out, "--max_steps", 4, "--stop_at_step", 2))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(out), "--data", str(other)])
    assert f"data.data: ['{corpus}'] -> ['{other}']" in str(e.value.code)
    assert "tokenized" not in capsys.readouterr().out  # refused before prepare_data's first line


def test_resume_with_nothing_to_resume_is_an_error(corpus, tmp_path, capsys):
    """A misspelled folder or one without checkpoints is an error that says so, never a silent fresh start."""
    (tmp_path / "empty").mkdir()
    for resume in ("latest", str(tmp_path / "empty"), str(tmp_path / "typo")):
        message = error_of(tiny_args(corpus, tmp_path / "empty", "--max_steps", 2, "--resume", resume), capsys)
        assert "nothing to resume" in message, resume
    assert not (tmp_path / "typo").exists()


def test_an_earlier_runs_final_model_never_stays_beside_a_new_run(corpus, tmp_path, capsys):
    """--overwrite_output_dir removes the earlier run's final model too: a new run that stops early leaves none, and
    a folder with only a final model (its checkpoints deleted) is an earlier run all the same."""
    out = tmp_path / "twice"
    main(tiny_args(corpus, out, "--max_steps", 3))
    result = main(tiny_args(corpus, out, "--max_steps", 4, "--stop_at_step", 2, "--overwrite_output_dir"))
    assert result["status"] == "stopped"
    final_model = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json")
    assert not [name for name in final_model if (out / name).exists()]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert sorted(losses(out)) == [1, 2]
    main(tiny_args(corpus, out, "--max_steps", 2, "--overwrite_output_dir"))
    shutil.rmtree(out / "checkpoints")
    message = error_of(tiny_args(corpus, out, "--max_steps", 2), capsys)
    assert "already holds the final model (model.safetensors) of an earlier run" in message


def test_a_warmup_as_long_as_the_run_is_announced_before_the_first_step(corpus, tmp_path, capsys):
    main(tiny_args(corpus, tmp_path / "w", "--max_steps", 3, "--warmup_steps", 3))
    text = capsys.readouterr().out
    assert "warning: --warmup_steps 3 >= --max_steps 3: the learning rate rises the whole run" in text
    assert text.index("warning: --warmup_steps") < text.index("step 1 | loss")
    main(tiny_args(corpus, tmp_path / "ok", "--max_steps", 3, "--warmup_steps", 2))
    assert "warning: --warmup_steps" not in capsys.readouterr().out


def test_each_log_line_is_printed_once(corpus, tmp_path):
    """A real process, stdout and stderr apart (the progress bar goes to stderr): every record once, on stdout."""
    argv = tiny_args(corpus, tmp_path / "once", "--max_steps", 4, "--eval_every", 2, "--report_to", "tensorboard")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "minigpt.train.pretrain", *argv]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    for step in range(1, 5):
        assert sum(line.startswith(f"step {step} | loss") for line in lines) == 1, proc.stdout
    assert sum(line.startswith("step 2 | val_loss") for line in lines) == 1, proc.stdout
    assert "| loss" not in proc.stderr


def test_shipped_accelerate_configs_load():
    """accelerate refuses unknown keys; FSDP wraps the classes the model names in _no_split_modules."""
    from accelerate.commands.config.config_args import load_config_from_file

    from modeling_minigpt import MiniGPTForCausalLM

    folder = REPO / "minigpt" / "train" / "configs" / "accelerate"
    expected = {"single_gpu": ("NO", 1, 1), "multi_gpu": ("MULTI_GPU", 8, 1), "fsdp": ("FSDP", 8, 1),
                "multi_node": ("MULTI_GPU", 16, 2)}  # fmt: skip
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(expected)
    for name, (kind, processes, machines) in expected.items():
        config = load_config_from_file(str(folder / f"{name}.yaml"))
        assert (config.distributed_type.value, config.num_processes, config.num_machines) == (kind, processes, machines)
    fsdp = load_config_from_file(str(folder / "fsdp.yaml")).fsdp_config
    assert (
        fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    )
    assert MiniGPTForCausalLM._no_split_modules == ["MiniGPTBlock"]


def test_threads_are_chosen_as_in_the_other_scripts_and_printed(corpus, tmp_path, capsys, monkeypatch):
    """--threads (an alias of --cpu_threads) as finetune, evaluation and generate take it; by default on CPU,
    $OMP_NUM_THREADS where set (else half the cores, 1 to 4), printed before the first step."""
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        main(tiny_args(corpus, tmp_path / "a", "--max_steps", 1))
        assert "threads: 1 intra-op CPU thread(s) per process" in capsys.readouterr().out
        main(tiny_args(corpus, tmp_path / "b", "--max_steps", 1, "--threads", 2))
        assert "threads: 2 intra-op CPU thread(s) per process" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ the recipes
def test_a_checkpoint_saved_before_muon_resumes_with_adamw_and_cosine_exactly(corpus, tmp_path):
    """train_state.json files written before --optimizer existed hold no optimizer or schedule type: they trained
    with AdamW and the cosine schedule, and resume with them although the default is now Muon."""
    a, b = tmp_path / "uninterrupted", tmp_path / "old"
    common = ("--max_steps", 6, "--optimizer", "adamw")
    main(tiny_args(corpus, a, *common))
    main(tiny_args(corpus, b, *common, "--stop_at_step", 3))
    saved = b / "checkpoints" / "step-3" / "train_state.json"
    record = json.loads(saved.read_text())
    for key in ("optimizer", "lr_scheduler_type", "decay_ratio", "muon_learning_rate", "muon_momentum"):
        del record["args"]["train"][key]
    saved.write_text(json.dumps(record))
    assert main(["--resume", str(b)])["status"] == "done"
    assert_same_weights(a, b, atol=1e-6)
    lr = {r["step"]: r["lr"] for r in read_log(b) if "lr" in r}
    assert lr[5] == pytest.approx(get_lr(4, max_lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=6))  # cosine


def test_resume_with_another_optimizer_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "muon"
    main(tiny_args(corpus, out, "--max_steps", 4, "--stop_at_step", 2))
    message = error_of(["--resume", str(out), "--optimizer", "adamw"], capsys)
    assert "cannot resume from" in message
    assert "with --optimizer adamw (given on the command line or by --config): it was trained with muon" in message


def test_a_presets_other_recipe_is_one_flag_away():
    """--config tiny is the Muon recipe; --optimizer adamw switches to the preset's AdamW recipe (nanoGPT's, the
    default before Muon) as a whole, and flags still win over either."""
    from minigpt.train.args import parse_run

    def recipe(*argv):
        train = parse_run(["--config", "tiny", *argv])[2]
        return (train.optimizer, train.learning_rate, train.min_learning_rate, train.warmup_steps,
                train.lr_scheduler_type)  # fmt: skip

    assert recipe() == ("muon", 8e-3, 8e-4, 10, "warmup_stable_decay")
    assert recipe("--optimizer", "adamw") == ("adamw", 2e-3, 2e-4, 30, "cosine")
    assert recipe("--optimizer", "adamw", "--warmup_steps", "5") == ("adamw", 2e-3, 2e-4, 5, "cosine")
    assert parse_run(["--optimizer", "adamw"])[2].lr_scheduler_type == "cosine"  # each optimizer's own schedule
    assert parse_run([])[2].lr_scheduler_type == "warmup_stable_decay"


@pytest.mark.parametrize(
    "recipes, words",
    [
        ("\n  adamw:\n    learning_rat: 1.0e-3", "`recipes: adamw:` has unknown arguments ['learning_rat']"),
        ("\n  adamw:\n    optimizer: muon", "`recipes: adamw:` has unknown arguments ['optimizer']"),
        ("\n  adamW:\n    learning_rate: 1.0e-3", "`recipes:` names 'adamW', which is no --optimizer choice"),
        ("\n  adamw:", "`recipes: adamw:` must be a non-empty mapping"),
        (" adamw", "`recipes:` must map an --optimizer choice (muon, adamw) to arguments"),
        ("\n  - adamw", "`recipes:` must map an --optimizer choice"),
    ],
)
def test_a_config_with_a_mistake_in_its_recipes_is_a_one_line_error(tmp_path, capsys, recipes, words):
    config = tmp_path / "bad.yaml"
    config.write_text(f"optimizer: muon\nrecipes:{recipes}\n")
    message = error_of(["--config", str(config)], capsys)
    assert words in message and len(message.strip().splitlines()) == 1, message


def test_resume_applies_overridden_optimizer_settings_over_the_checkpoints(corpus, tmp_path):
    """The checkpoint's optimizer state holds its param groups' settings; the resume's flags win, as it prints."""
    from minigpt.train.pretrain import setup

    out = tmp_path / "run"
    main(tiny_args(corpus, out, "--max_steps", 4, "--stop_at_step", 2))
    run = setup(["--resume", str(out), "--muon_momentum", "0.5", "--weight_decay", "0", "--adam_beta2", "0.99"])
    groups = run.optimizer.param_groups
    assert [g.get("momentum") for g in groups] == [0.5, None, None]
    assert all(g["weight_decay"] == 0.0 for g in groups) and [g.get("betas") for g in groups][1:] == [(0.9, 0.99)] * 2
    assert run.optimizer.state_dict()["state"], "the state was loaded"
    run.accelerator.end_training()


def test_compiled_pretraining_follows_the_eager_run(corpus, tmp_path):
    """--compile with the default recipe (Muon's update runs eagerly beside the compiled model) and accumulation:
    the same losses and weights as eager mode, to float32 rounding."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = ("--max_steps", 3, "--gradient_accumulation_steps", 2)
    main(tiny_args(corpus, eager, *common))
    main(tiny_args(corpus, compiled, *common, "--compile"))
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    assert_same_weights(eager, compiled, atol=1e-4)
