"""minigpt/train/evaluation.py and the project's evaluate metric modules, on MiniGPT and on a random GPT2LMHeadModel."""

import json
import math
import subprocess

import evaluate
import pytest
import sacrebleu
import torch
from conftest import ctrl_c_reaches_it
from finetune_helpers import EN_FR, PYTHON, ROOT, make_checkpoint, read_jsonl, subprocess_env
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt.train import evaluation as lm_eval
from minigpt.train.metrics import metric_path
from minigpt.train.pairs import PromptTemplate
from minigpt.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny MiniGPT and a tiny random GPT2LMHeadModel (both 32 positions), sharing one tokenizer."""
    root = tmp_path_factory.mktemp("models")
    texts = [v for row in read_jsonl(EN_FR) for v in row.values()]
    tokenizer = train_tokenizer(texts, vocab_size=400, min_frequency=1)
    mini = make_checkpoint(root / "minigpt", tokenizer, n_positions=32, n_embd=32)
    torch.manual_seed(1)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))  # fmt: skip
    gpt2.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    return {"minigpt": mini, "gpt2": root / "gpt2"}


@pytest.fixture(scope="module")
def long_text(tmp_path_factory):
    """English text of a few hundred tokens: many times the models' 32-token context."""
    text = " ".join(f"{r['prompt']} means {r['answer']}." for r in read_jsonl(EN_FR)[:40])
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Metric modules, loaded offline by path
# ---------------------------------------------------------------------------------------------------------------


def test_metric_modules_load_by_path_and_compute():
    load = lambda name: evaluate.load(metric_path(name))  # noqa: E731
    assert load("perplexity").compute(nll=[2.0, 4.0], num_tokens=[2, 2])["perplexity"] == pytest.approx(math.exp(1.5))
    assert load("next_token_accuracy").compute(correct=[1, 3], total=[4, 4])["next_token_accuracy"] == 0.5
    bpb = load("bits_per_byte").compute(nll=[math.log(2) * 12], num_bytes=[4])
    assert bpb["bits_per_byte"] == pytest.approx(3.0)
    em = load("exact_match")
    assert em.compute(predictions=["bonjour ", "Merci"], references=["bonjour", "merci"])["exact_match"] == 0.5
    assert em.compute(predictions=["Merci"], references=["merci"], ignore_case=True)["exact_match"] == 1.0
    preds, refs = ["le chat noir", "la maison bleue"], ["un chat noir", "la grande maison"]
    chrf = load("chrf").compute(predictions=preds, references=refs)
    assert chrf["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    assert 0 < chrf["chrf"] < 100
    with pytest.raises(ValueError, match="at least one predicted token"):
        load("next_token_accuracy").compute(correct=[0], total=[0])


# ---------------------------------------------------------------------------------------------------------------
# Perplexity: sliding windows
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, max_length, stride", [(100, 32, 16), (100, 32, 31), (100, 32, 1), (20, 32, 16)])
def test_sliding_windows_score_each_token_once_with_enough_context(n, max_length, stride):
    windows = lm_eval.sliding_windows(n, max_length, stride)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in windows:
        assert end - begin <= max_length
        if begin > 0:
            assert first - begin >= max_length - stride  # context before the first scored token
    with pytest.raises(ValueError, match="--stride must lie in"):
        lm_eval.sliding_windows(n, max_length, max_length)


@pytest.mark.parametrize("name", ["minigpt", "gpt2"])
def test_perplexity_of_a_short_text_is_the_models_own_loss(folders, name):
    model, tokenizer = lm_eval.load_model(str(folders[name]))
    text = "the black cat drinks water"
    result = lm_eval.text_metrics(model, tokenizer, [text])
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(text)])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert result["num_tokens"] == ids.shape[1] - 1 and result["windows"] == 1
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(loss * result["num_tokens"] / math.log(2) / len(text), rel=1e-5)
    assert 0 <= result["next_token_accuracy"] <= 1 and result["tokens_per_second"] > 0


@pytest.mark.parametrize("name", ["minigpt", "gpt2"])
def test_strided_perplexity_of_a_long_text_matches_the_guide_loop(folders, long_text, name):
    model, tokenizer = lm_eval.load_model(str(folders[name]))
    text = long_text.read_text()
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(text)])
    assert ids.shape[1] > 8 * 32
    max_length, stride = 32, 8
    # transformers' perplexity guide, one window at a time, with the model's own loss (the guide subtracts one
    # token per window from its count; the loss covers exactly the labels after the shift, counted here)
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + max_length, ids.shape[1])
        input_ids = ids[:, begin:end]
        targets = input_ids.clone()
        targets[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(input_ids=input_ids, labels=targets).loss.item()
        n = int((targets[:, 1:] != -100).sum())
        nll, count, prev_end = nll + loss * n, count + n, end
        if end == ids.shape[1]:
            break
    result = lm_eval.text_metrics(model, tokenizer, [text], max_length=max_length, stride=stride, batch_size=5)
    assert result["num_tokens"] == count == ids.shape[1] - 1
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # more context per token changes the figure: the stride is really used
    no_overlap = lm_eval.text_metrics(model, tokenizer, [text], max_length=max_length, stride=max_length - 1)
    assert no_overlap["num_tokens"] == count and no_overlap["perplexity"] != pytest.approx(result["perplexity"])


def test_compare_prints_both_models_side_by_side(folders, long_text, tmp_path, capsys):
    out = tmp_path / "results.json"
    results = lm_eval.main([str(folders["minigpt"]), "--data", str(long_text), "--compare", str(folders["gpt2"]),
                            "--stride", "16", "--output_json", str(out), "--threads", "1"])  # fmt: skip
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if "minigpt" in line)
    assert "gpt2" in header
    for label in ("perplexity", "next-token accuracy", "bits per byte", "tokens/s", "windows (max_length / stride)"):
        row = next(line for line in table.splitlines() if line.startswith(label))
        assert len(row.split()) >= 3, row
    saved = json.loads(out.read_text())
    assert [r["model"] for r in saved] == [str(folders["minigpt"]), str(folders["gpt2"])]
    assert saved[0]["num_tokens"] == saved[1]["num_tokens"]  # same tokenizer, same text
    assert saved[0]["perplexity"] != saved[1]["perplexity"]
    assert all(r["bits_per_byte"] > 0 and r["stride"] == 16 for r in results)


# ---------------------------------------------------------------------------------------------------------------
# Supervised pairs: generation, exact match, chrF
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoding", [{}, {"num_beams": 3}, {"do_sample": True, "top_k": 5, "temperature": 0.7}])
def test_pair_metrics_score_the_generated_answers(folders, decoding):
    model, tokenizer = lm_eval.load_model(str(folders["minigpt"]))
    pairs = [(r["prompt"], r["answer"]) for r in read_jsonl(EN_FR)[:6]]
    torch.manual_seed(0)
    result = lm_eval.pair_metrics(model, tokenizer, pairs, PromptTemplate(), batch_size=4, max_new_tokens=6,
                                  **decoding)  # fmt: skip
    predictions, references = result["predictions"], [a for _, a in pairs]
    assert len(predictions) == 6 and result["num_examples"] == 6
    assert result["exact_match"] == sum(p == r for p, r in zip(predictions, references)) / 6
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    assert result["answer_perplexity"] > 1


def test_pairs_from_the_command_line_by_path(folders, tmp_path):
    """`python minigpt/train/evaluation.py`: train/ comes first on sys.path there and must not shadow the evaluate library."""
    proc = subprocess.run([PYTHON, str(ROOT / "minigpt" / "train" / "evaluation.py"), str(folders["gpt2"]), "--data", str(EN_FR),
                           "--num_beams", "2", "--max_new_tokens", "4", "--batch_size", "50",
                           "--output_json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exact match" in proc.stdout and "chrF" in proc.stdout and "(reference 'bonjour')" in proc.stdout
    result = json.loads((tmp_path / "r.json").read_text())[0]
    assert result["num_examples"] == len(read_jsonl(EN_FR))


def test_bad_evaluation_input_is_refused(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        lm_eval.main([str(tmp_path / "missing"), "--data", str(EN_FR), "--threads", "1"])
    with pytest.raises(ValueError, match="lacks 'question'"):
        lm_eval.main([str(folders["gpt2"]), "--data", str(EN_FR), "--mode", "pairs", "--prompt_field", "question",
                      "--threads", "1"])  # fmt: skip
    model, tokenizer = lm_eval.load_model(str(folders["minigpt"]))
    with pytest.raises(ValueError, match="The text is empty"):
        lm_eval.text_metrics(model, tokenizer, [""])


def test_compare_labels_each_models_sample(folders, capsys):
    lm_eval.main([str(folders["minigpt"]), "--data", str(EN_FR), "--compare", str(folders["gpt2"]), "--max_new_tokens",
                  "3", "--batch_size", "50", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "samples: minigpt | gpt2" in out
    sample = next(line for line in out.splitlines() if "(reference 'bonjour')" in line)
    assert "minigpt: '" in sample and " | gpt2: '" in sample, sample


def test_a_model_folder_without_a_tokenizer_says_so_and_names_the_option(folders, tmp_path):
    bare = tmp_path / "bare"
    GPT2LMHeadModel.from_pretrained(folders["gpt2"]).save_pretrained(bare)
    with pytest.raises(ValueError, match="has no tokenizer") as e:
        lm_eval.main([str(bare), "--data", str(EN_FR), "--threads", "1"])
    assert "--tokenizer DIR" in str(e.value) and "sentencepiece" not in str(e.value)
    [result] = lm_eval.main([str(bare), "--data", str(EN_FR), "--tokenizer", str(folders["gpt2"]), "--max_new_tokens",
                             "2", "--batch_size", "50", "--threads", "1"])  # fmt: skip
    assert result["num_examples"] == len(read_jsonl(EN_FR))


def test_pairs_with_other_field_names_say_how_to_evaluate_them_as_pairs(folders, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": r["prompt"], "response": r["answer"]}) + "\n"
                            for r in read_jsonl(EN_FR)[:4]))  # fmt: skip
    with pytest.raises(ValueError, match="looks like prompt/answer pairs") as e:
        lm_eval.main([str(folders["gpt2"]), "--data", str(data), "--threads", "1"])
    assert "--mode pairs --prompt_field question --answer_field response" in str(e.value)


def test_threads_are_set_from_the_option(folders, long_text, capsys):
    before = torch.get_num_threads()
    try:
        lm_eval.main([str(folders["minigpt"]), "--data", str(long_text), "--threads", "2"])
        assert torch.get_num_threads() == 2 and "torch threads: 2" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("script", ["minigpt.train.finetune", "minigpt.train.evaluation"])
def test_bad_input_on_the_command_line_is_one_error_line_not_a_traceback(tmp_path, script):
    """As pretrain, generate and push do: the message that names the fix, without 18 lines of traceback around it."""
    args = (["--model_name_or_path", "./no-such-model", "--train_file", str(EN_FR), "--output_dir", str(tmp_path / "o")]
            if script == "minigpt.train.finetune" else ["./no-such-model", "--data", str(EN_FR)])  # fmt: skip
    proc = subprocess.run([PYTHON, "-m", script, *args], capture_output=True, text=True, cwd=tmp_path,
                          env=subprocess_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    name = script.split(".")[-1]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{name}: error: ") and "no such folder" in proc.stderr


def _sigint_after(cmd: list[str], ready: str, log) -> tuple[int, str]:
    """A real SIGINT to a real process once its output holds `ready`; (exit status, output)."""
    import signal
    import time

    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, preexec_fn=ctrl_c_reaches_it,
                                env=dict(subprocess_env(), PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 300  # a loaded machine; a timeout means a hang
        while ready not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        return proc.wait(300), log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_exits_130_with_one_line(folders, tmp_path):
    text = tmp_path / "long.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 4000)
    status, out = _sigint_after([PYTHON, "-m", "minigpt.train.evaluation", str(folders["minigpt"]), "--data", str(text),
                                 "--stride", "1", "--batch_size", "1", "--threads", "1"], "torch threads",
                                tmp_path / "log")
    assert status == 130 and "Traceback" not in out, out[-4000:]
    assert out.strip().splitlines()[-1] == "evaluation: interrupted"


def test_wrong_folders_names_and_data_say_what_they_are(folders, tmp_path, monkeypatch, capsys):
    """A run's checkpoints/ folder is not a model folder (not "has no tokenizer"); a bare name that is no folder fails
    at once; a data folder is a folder; pairs under other names (q/a) get the --prompt_field/--answer_field fix."""
    run_dir = tmp_path / "tiny"
    (run_dir / "checkpoints" / "step-10").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-10" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model .*checkpoints is not a model folder \(no config.json\).* "
                                                r"It holds model folders: step-10; pass one of those"):
        lm_eval.main([str(run_dir / "checkpoints"), "--data", str(EN_FR)])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"no such folder tyni \(and tyni is not a Hub id.*HF_HUB_OFFLINE"):
        lm_eval.main(["tyni", "--data", str(EN_FR)])
    with pytest.raises(IsADirectoryError, match="--data .* is a folder; evaluation reads one .txt or .jsonl file"):
        lm_eval.main([str(folders["minigpt"]), "--data", str(tmp_path)])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"q": "hot", "a": "cold"}\n')
    with pytest.raises(ValueError, match="looks like prompt/answer pairs.*--mode pairs --prompt_field q "
                                         "--answer_field a"):
        lm_eval.main([str(folders["minigpt"]), "--data", str(pairs)])
    with pytest.raises(SystemExit, match=r"evaluation: error: .*--prompt_field q --answer_field a"):
        monkeypatch.setattr("sys.argv", ["minigpt-evaluate", str(folders["minigpt"]), "--data", str(pairs)])
        lm_eval.cli()


def test_a_lora_adapter_folder_evaluates_on_its_base_and_one_without_its_base_says_what_to_pass(folders, tmp_path):
    """An adapter folder loads as transformers loads it with peft: its base with the adapter applied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minigpt.train.lora import apply_lora

    base = AutoModelForCausalLM.from_pretrained(folders["minigpt"])
    adapter = tmp_path / "run" / "adapter"
    apply_lora(base).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(folders["minigpt"]).save_pretrained(adapter)
    result = lm_eval.main([str(adapter), "--data", str(EN_FR), "--max_new_tokens", "2", "--threads", "1"])[0]
    assert result["num_examples"] == len(read_jsonl(EN_FR))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "./gone"}))
    with pytest.raises(FileNotFoundError, match=r"is a LoRA adapter on ./gone, but .*no such folder.*pass a merged "
                                                r"model folder, or fix base_model_name_or_path"):
        lm_eval.main([str(adapter), "--data", str(EN_FR)])
