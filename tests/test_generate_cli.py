"""minigpt/train/generate.py: every strategy against transformers' own generate, seeds, streaming, and bad inputs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ctrl_c_reaches_it, make_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from minigpt.train import generate
from minigpt.train.threads import default_threads
from minigpt.train.tokenizer import train_tokenizer
from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM

REPO = Path(__file__).resolve().parents[1]
PROMPT = "the king hath"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model with a real BPE tokenizer and generation defaults, saved like pretrain's output."""
    folder = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer(make_corpus(60), vocab_size=300)
    config = MiniGPTConfig(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(config)
    model.generation_config = GenerationConfig(do_sample=True, top_p=0.95, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)  # fmt: skip
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(model_dir, *args) -> str:
    return generate.main(["--model", str(model_dir), "--prompt", PROMPT, "--no_stream", "--threads", "1",
                          *map(str, args)])


def reference(model_dir, seed=None, **kwargs) -> str:
    """transformers' generate called directly, for comparison."""
    from transformers import set_seed

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    if seed is not None:
        set_seed(seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_greedy_matches_transformers_generate(model_dir):
    text = run(model_dir, "--strategy", "greedy", "--max_new_tokens", 12)
    assert text == reference(model_dir, do_sample=False, max_new_tokens=12)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert run(model_dir, "--strategy", "greedy", "--max_new_tokens", 12, "--seed", 5) == text  # no randomness


def test_degenerate_sampling_equals_greedy(model_dir):
    greedy = run(model_dir, "--strategy", "greedy", "--max_new_tokens", 12)
    assert run(model_dir, "--strategy", "top_k", "--top_k", 1, "--max_new_tokens", 12) == greedy
    # a nucleus that holds only the likeliest token is greedy too
    assert run(model_dir, "--strategy", "top_p", "--top_p", 1e-6, "--max_new_tokens", 12) == greedy


@pytest.mark.parametrize("strategy", ["top_k", "top_p"])
def test_sampling_is_reproducible_by_seed(model_dir, strategy):
    texts = {seed: run(model_dir, "--strategy", strategy, "--seed", seed, "--max_new_tokens", 12) for seed in (0, 1, 2)}
    assert run(model_dir, "--strategy", strategy, "--seed", 1, "--max_new_tokens", 12) == texts[1]
    assert len(set(texts.values())) > 1, "different seeds should draw different text from a random model"
    # the CLI's defaults: temperature 0.8 with k=50, or p=0.95
    only = {"top_k": 50, "top_p": 1.0} if strategy == "top_k" else {"top_p": 0.95, "top_k": 0}
    assert texts[0] == reference(model_dir, seed=0, do_sample=True, temperature=0.8, max_new_tokens=12, **only)


def test_beam_search_matches_and_explains_that_it_cannot_stream(model_dir, capsys):
    text = generate.main(["--model", str(model_dir), "--threads", "1", "--prompt", PROMPT, "--strategy", "beam",
                          "--num_beams", "3", "--max_new_tokens", "8"])  # fmt: skip
    captured = capsys.readouterr()
    assert "beam search cannot stream" in captured.err
    assert captured.out.strip() == text
    assert text == reference(model_dir, do_sample=False, num_beams=3, early_stopping=True, max_new_tokens=8)


def test_streaming_prints_the_same_text(model_dir, capsys):
    text = generate.main(["--model", str(model_dir), "--threads", "1", "--prompt", PROMPT, "--strategy", "greedy",
                          "--max_new_tokens", "10"])  # fmt: skip
    assert capsys.readouterr().out.strip() == text.strip()


def test_empty_prompt_starts_a_new_document(model_dir):
    text = generate.main(["--model", str(model_dir), "--threads", "1", "--strategy", "greedy", "--max_new_tokens", "8",
                          "--no_stream"])  # fmt: skip
    assert isinstance(text, str)


def test_too_many_new_tokens_are_capped_to_the_positions(model_dir, capsys):
    run(model_dir, "--strategy", "greedy", "--max_new_tokens", 500)
    assert "the model accepts at most 64 positions" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent"], "--model /nonexistent: no such folder"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--top_p", "1.5"], "--top_p must lie in (0, 1]"),
        (["--strategy", "beam", "--num_beams", "1"], "--num_beams must be >= 2"),
        (["--strategy", "nucleus"], "invalid choice"),
        (["--prompt", "the king " * 80], "Shorten --prompt"),
    ],
)
def test_bad_inputs_are_clear_errors(model_dir, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        generate.main(["--model", str(model_dir), "--threads", "1", *args])
    assert e.value.code != 0
    assert message in (e.value.code if isinstance(e.value.code, str) else "") + capsys.readouterr().err


def test_script_runs_by_path_from_any_directory(model_dir, tmp_path):
    cmd = [sys.executable, str(REPO / "minigpt" / "train" / "generate.py"), "--model", str(model_dir), "--prompt", PROMPT,
           "--strategy", "greedy", "--max_new_tokens", "12", "--no_stream"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == run(model_dir, "--strategy", "greedy", "--max_new_tokens", 12)


def test_sampling_draws_a_fresh_seed_each_run_and_prints_it_for_a_rerun(model_dir, capsys):
    first = generate.main(["--model", str(model_dir), "--prompt", PROMPT, "--no_stream", "--threads", "1",
                           "--max_new_tokens", "12"])  # fmt: skip
    seeds = [int(re.search(r"seed (\d+)", capsys.readouterr().err).group(1))]
    texts = {first}
    for _ in range(3):
        texts.add(generate.main(["--model", str(model_dir), "--prompt", PROMPT, "--no_stream", "--threads", "1",
                                 "--max_new_tokens", "12"]))  # fmt: skip
        seeds.append(int(re.search(r"seed (\d+)", capsys.readouterr().err).group(1)))
    assert len(set(seeds)) > 1 and len(texts) > 1, (seeds, texts)
    assert run(model_dir, "--seed", seeds[0], "--max_new_tokens", 12) == first  # the printed seed repeats the text


def test_help_shows_the_defaults_and_the_threads_option(capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 200)" in text and "--threads" in text and "--raw_prompt" in text
    assert "overriding the model's generation_config.json" in text and "prompt_template.json" in text


def test_threads_are_set_and_printed(model_dir, capsys):
    before = torch.get_num_threads()
    try:
        run(model_dir, "--strategy", "greedy", "--max_new_tokens", 2, "--threads", 2)
        assert torch.get_num_threads() == 2 and "2 CPU threads" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
    assert 1 <= default_threads() <= 4


def test_a_folder_without_a_tokenizer_says_so_and_takes_one_from_tokenizer(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(bare)
    with pytest.raises(SystemExit) as e:
        run(bare, "--strategy", "greedy")
    assert "has no tokenizer" in str(e.value.code) and "--tokenizer" in str(e.value.code)
    assert "sentencepiece" not in str(e.value.code)
    greedy = run(model_dir, "--strategy", "greedy", "--max_new_tokens", 6)
    assert run(bare, "--strategy", "greedy", "--max_new_tokens", 6, "--tokenizer", model_dir) == greedy


def test_a_bare_name_an_adapter_folder_and_ctrl_c(model_dir, tmp_path, monkeypatch, capsys):
    """A bare name that is no folder fails at once; a LoRA adapter folder generates on its base (as transformers
    loads it with peft); Ctrl-C (a real SIGINT to a real process) exits 130 with one line, no traceback."""
    import signal
    import time

    from minigpt.train.lora import apply_lora

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit):
        run("tiny")
    assert re.search(r"no such folder tiny \(and tiny is not a Hub id.*HF_HUB_OFFLINE", capsys.readouterr().err)

    adapter = tmp_path / "adapter"
    apply_lora(AutoModelForCausalLM.from_pretrained(model_dir)).save_pretrained(adapter)  # no tokenizer: the base's
    assert run(adapter, "--strategy", "greedy", "--max_new_tokens", "3") == run(model_dir, "--strategy", "greedy",
                                                                              "--max_new_tokens", "3")  # B = 0 at init

    long = tmp_path / "long"  # rope positions: a context long enough to stream for minutes
    config = MiniGPTConfig.from_pretrained(model_dir)
    config.position_embedding_type, config.n_positions = "rope", 10**6
    MiniGPTForCausalLM(config).save_pretrained(long)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(long)
    log = tmp_path / "log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "minigpt.train.generate", "--model", str(long), "--prompt",
                                 "To be", "--max_new_tokens", "900000", "--threads", "1", "--seed", "0"],
                                cwd=REPO, stdout=f, stderr=subprocess.STDOUT, preexec_fn=ctrl_c_reaches_it,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 300  # a loaded machine; a timeout means a hang
        while "To be" not in log.read_text(errors="replace").split("repeats this text)")[-1]:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(300) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text(errors="replace")
    assert "Traceback" not in out and out.rstrip().endswith("generate: interrupted"), out[-4000:]



# ---------------------------------------------------------------------------------------------------------------
# A supervised fine-tune: its template and its greedy generation_config.json by default, as its card's pipeline
# ---------------------------------------------------------------------------------------------------------------

EN_FR_PAIRS = [("good night", "bonne nuit"), ("good morning", "bonjour"), ("thank you", "merci"),
               ("the cat", "le chat"), ("the dog", "le chien"), ("the house", "la maison")]  # fmt: skip
TEMPLATE, SEPARATOR = "English: {prompt}", "\nFrench:"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A tiny model fine-tuned (supervised, a template and a separator) on a few pairs, from a base whose
    generation_config.json samples, as pretraining's does."""
    from finetune_helpers import make_checkpoint, write_jsonl
    from finetune_helpers import run as finetune

    folder = tmp_path_factory.mktemp("finetune")
    base = make_checkpoint(folder / "base", train_tokenizer([f"{a} {b}" for a, b in EN_FR_PAIRS] + make_corpus(20),
                                                            vocab_size=300, min_frequency=1))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(base)
    GenerationConfig(do_sample=True, temperature=0.8, top_k=50, top_p=0.95, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(base)  # fmt: skip
    data = write_jsonl(folder / "pairs.jsonl", [{"prompt": a, "answer": b} for a, b in EN_FR_PAIRS])
    finetune("--model_name_or_path", base, "--mode", "supervised", "--train_file", data, "--output_dir",
             folder / "out", "--prompt_template", TEMPLATE, "--separator", r"\nFrench:", max_steps=60,
             per_device_train_batch_size=len(EN_FR_PAIRS), learning_rate=3e-3, warmup_steps=5,
             save_strategy="no")  # fmt: skip
    return folder / "out"


@pytest.mark.oldest  # the pipeline and generation_config handling of the oldest transformers too
def test_a_supervised_finetune_gets_its_template_and_greedy_decoding_as_its_card_pipeline_does(finetuned, capsys):
    from transformers import pipeline

    card = pipeline("text-generation", model=str(finetuned), trust_remote_code=True)
    answers = []
    for prompt, _ in EN_FR_PAIRS[:3]:
        full = TEMPLATE.replace("{prompt}", prompt) + SEPARATOR
        expected = card(full, max_new_tokens=16, return_full_text=False)[0]["generated_text"]
        text = generate.main(["--model", str(finetuned), "--prompt", prompt, "--no_stream", "--threads", "1",
                              "--max_new_tokens", "16"])  # fmt: skip
        err = capsys.readouterr().err
        assert text == full + expected, (text, full, expected)
        assert "generation_config.json: greedy" in err and "seed" not in err  # no seed: nothing is drawn
        assert "prompt_template.json" in err and "'English: {prompt}'" in err
        # --raw_prompt passes the prompt on as it is; \n in --prompt is a newline, as finetune's options read it
        escaped = full.replace("\n", r"\n")
        assert generate.main(["--model", str(finetuned), "--prompt", escaped, "--raw_prompt", "--no_stream",
                              "--threads", "1", "--max_new_tokens", "16"]) == text  # fmt: skip
        answers.append(expected.strip())
    print(f"\nfine-tuned answers: {answers}")
    assert answers == [b for _, b in EN_FR_PAIRS[:3]]


@pytest.mark.oldest  # the pipeline and generation_config handling of the oldest transformers too
def test_an_explicit_strategy_overrides_the_saved_generation_config(finetuned, model_dir, capsys):
    from transformers import set_seed

    from minigpt.train.pairs import PromptTemplate

    text = generate.main(["--model", str(finetuned), "--prompt", "good night", "--no_stream", "--threads", "1",
                          "--max_new_tokens", "8", "--strategy", "top_k", "--seed", "3"])  # fmt: skip
    assert "--strategy top_k, seed 3" in capsys.readouterr().err
    tokenizer = AutoTokenizer.from_pretrained(finetuned)
    model = AutoModelForCausalLM.from_pretrained(finetuned).eval()
    ids = torch.tensor([PromptTemplate.load(finetuned).prompt_ids(tokenizer, "good night")])
    set_seed(3)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=True,
                         temperature=0.8, top_k=50, top_p=1.0)  # fmt: skip
    assert text == tokenizer.decode(out[0], skip_special_tokens=True)
    # a pretrained model without --strategy samples with its saved settings (top_p 0.95, temperature 1)
    sampled = run(model_dir, "--seed", 4, "--max_new_tokens", 12)
    err = capsys.readouterr().err
    assert "generation_config.json: sampling" in err and "top_p 0.95" in err and "seed 4" in err
    assert sampled == reference(model_dir, seed=4, max_new_tokens=12)
    assert "seed" not in (run(model_dir, "--strategy", "greedy", "--max_new_tokens", 4), capsys.readouterr().err)[1]
