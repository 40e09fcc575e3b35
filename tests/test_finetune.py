"""minigpt/train/finetune.py: Trainer fine-tuning in causal and supervised modes, on tiny models built here.

The checks that prove learning: a tiny model fine-tuned on minigpt/train/examples/en_fr.jsonl reproduces at least 80% of
the answers exactly (label masking and the template work end to end), and pretraining then fine-tuning lowers the
held-out perplexity of the fine-tuning data (test_pretrain_then_finetune_lowers_held_out_perplexity).
"""

import json
import logging
import math
import platform
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ctrl_c_reaches_it, free_port
from finetune_helpers import (
    EN_FR,
    PYTHON,
    QA,
    ROOT,
    example_texts,
    make_checkpoint,
    qa_text_file,
    read_jsonl,
    run,
    subprocess_env,
    weights,
    write_jsonl,
)
from hub_server import hub_env
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from minigpt.train import evaluation as lm_eval
from minigpt.train import finetune
from minigpt.train.finetune_data import CausalCollator
from minigpt.train.summary import base_model_record
from minigpt.train.pairs import PromptTemplate, SupervisedCollator, encode_pair
from minigpt.train.threads import available_cores
from minigpt.train.tokenizer import BOS, EOS, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(example_texts(), vocab_size=512, min_frequency=1)


@pytest.fixture(scope="module")
def eos_pad_tokenizer(tmp_path_factory, tokenizer):
    """The same BPE saved without a pad token, as every GPT-2-style tokenizer is: load_tokenizer pads with EOS."""
    folder = tmp_path_factory.mktemp("no-pad")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token=BOS, eos_token=EOS).save_pretrained(
        folder
    )
    padless = load_tokenizer(str(folder))
    assert padless.pad_token_id == padless.eos_token_id == tokenizer.eos_token_id
    return padless


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("base"), tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Supervised rows: template, masking, collator
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.oldest
def test_supervised_labels_cover_only_the_answer_and_eos(tokenizer):
    template = PromptTemplate("English: {prompt}", "\nFrench:")
    ids, labels, truncated = encode_pair(tokenizer, template, "the cat", " le chat", max_length=64)
    prompt_len = len(template.prompt_ids(tokenizer, "the cat"))
    assert not truncated and len(ids) == len(labels)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[:prompt_len]) == "<|bos|>English: the cat\nFrench:"
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert tokenizer.decode(labels[prompt_len:]) == " le chat<|eos|>"

    rows = [{"input_ids": ids, "labels": labels}, {"input_ids": ids[:5], "labels": labels[:5]}]
    batch = SupervisedCollator(tokenizer.pad_token_id)(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, len(ids))
    assert batch["input_ids"][1, 5:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][1, 5:].eq(-100).all() and batch["attention_mask"][1, 5:].eq(0).all()
    assert batch["labels"][0].tolist() == labels


def test_build_datasets_uses_the_field_names_and_template(tokenizer, tmp_path):
    args = finetune.DataArguments(train_file=str(QA), mode="supervised", prompt_field="question",
                                  prompt_template="Q: {prompt}", separator="\nA:", validation_split_percentage=10)
    train, held_out = finetune.build_datasets(args, tokenizer, max_length=64, seed=0)
    assert len(train) + len(held_out) == len(read_jsonl(QA)) and len(held_out) == 8
    row = train[0]
    answer = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    prompt = tokenizer.decode(row["input_ids"][: len(row["input_ids"]) - len(answer)])
    assert prompt.startswith("<|bos|>Q: ") and prompt.endswith("?\nA:")
    assert tokenizer.decode(answer).endswith("<|eos|>")


def test_padding_is_masked_by_position_so_eos_stays_a_target_when_pad_is_eos(eos_pad_tokenizer):
    """Hand-built rows, with EOS = pad = 2: every EOS that separates or ends a document is a label, packed or not,
    causal or supervised; exactly the padding positions are -100."""
    eos = eos_pad_tokenizer.eos_token_id
    assert eos == eos_pad_tokenizer.pad_token_id == 2
    collate = CausalCollator(eos_pad_tokenizer)

    packed = collate([{"input_ids": [5, 6, 2, 7, 2, 8]}, {"input_ids": [9, 2, 10, 11, 12, 2]}])  # no padding at all
    assert packed["labels"].tolist() == [[5, 6, 2, 7, 2, 8], [9, 2, 10, 11, 12, 2]]
    assert packed["attention_mask"].tolist() == [[1] * 6, [1] * 6]

    unpacked = collate([{"input_ids": [5, 6, 2]}, {"input_ids": [7, 2]}, {"input_ids": [8, 9, 10, 2]}])
    assert unpacked["input_ids"].tolist() == [[5, 6, 2, 2], [7, 2, 2, 2], [8, 9, 10, 2]]
    assert unpacked["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert unpacked["labels"].tolist() == [[5, 6, 2, -100], [7, 2, -100, -100], [8, 9, 10, 2]]

    rows = [{"input_ids": [1, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2]},
            {"input_ids": [1, 8, 2], "labels": [-100, 8, 2]}]  # fmt: skip
    supervised = SupervisedCollator(eos_pad_tokenizer.pad_token_id)(rows)
    assert supervised["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, 2, 2]]
    assert supervised["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert supervised["labels"].tolist() == [[-100, -100, 6, 7, 2], [-100, 8, 2, -100, -100]]


@pytest.mark.parametrize("pad", ["own", "eos"])
@pytest.mark.parametrize("packing", [True, False])
def test_causal_rows_packed_or_padded(tokenizer, eos_pad_tokenizer, tmp_path, packing, pad):
    tokenizer = eos_pad_tokenizer if pad == "eos" else tokenizer
    docs = [r["answer"] + " " + r["question"] for r in read_jsonl(QA)[:12]]
    data = write_jsonl(tmp_path / "docs.jsonl", [{"body": d} for d in docs])
    args = finetune.DataArguments(train_file=str(data), mode="causal", text_field="body", packing=packing)
    train, _ = finetune.build_datasets(args, tokenizer, max_length=16, seed=0)
    stream = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_token_id]]
    if packing:  # one stream, EOS after each document, cut into full blocks (only the last may be shorter)
        assert [t for row in train["input_ids"] for t in row] == stream
        assert all(len(row) == 16 for row in train["input_ids"][:-1])
        ended = len(docs)  # every document's EOS is in some block
    else:  # one row per document, cut to max_length: a cut document loses its EOS
        assert len(train) == len(docs) and max(len(row) for row in train["input_ids"]) == 16
        ended = sum(len(tokenizer.encode(d)) + 1 <= 16 for d in docs)
    batch = CausalCollator(tokenizer)(list(train))
    padding = batch["attention_mask"] == 0
    assert torch.equal(batch["labels"] == -100, padding)  # exactly the padding positions are masked
    assert torch.equal(batch["labels"][~padding], batch["input_ids"][~padding])  # every real token is a target
    assert int((batch["labels"] == tokenizer.eos_token_id).sum()) == ended > 0  # EOS included, pad == EOS or not
    assert packing or padding.any()  # documents of different lengths were padded
    with pytest.raises(ValueError, match="no field 'text'.*--text_field"):
        finetune.build_datasets(finetune.DataArguments(train_file=str(data)), tokenizer, 16, 0)


def test_causal_finetuning_with_a_tokenizer_without_pad_trains_on_every_eos(tmp_path, eos_pad_tokenizer):
    """The run itself: minigpt.train.finetune --mode causal on a pad-less tokenizer feeds Trainer batches whose EOS
    separators are all targets (DataCollatorForLanguageModeling kept none of them)."""
    base = make_checkpoint(tmp_path / "base", eos_pad_tokenizer)
    data = qa_text_file(tmp_path / "qa.txt", read_jsonl(QA)[:16])
    for packing in ("true", "false"):
        trainer = run("--model_name_or_path", base, "--mode", "causal", "--train_file", data, "--output_dir",
                      tmp_path / packing, "--packing", packing, max_length=32, max_steps=1,
                      per_device_train_batch_size=8, save_strategy="no")  # fmt: skip
        batch = next(iter(trainer.get_train_dataloader()))
        real = batch["attention_mask"] == 1
        eos_in_text = (batch["input_ids"] == eos_pad_tokenizer.eos_token_id) & real
        assert eos_in_text.any() and torch.equal(batch["labels"] == eos_pad_tokenizer.eos_token_id, eos_in_text)
        assert torch.equal(batch["labels"] == -100, ~real)


def test_bad_supervised_input_is_refused_with_a_fix(tokenizer, tmp_path, caplog):
    args = finetune.DataArguments(train_file=str(QA), mode="supervised")  # QA names its field "question"
    with pytest.raises(ValueError, match=r"no field 'prompt'.*'question'.*--prompt_field"):
        finetune.build_datasets(args, tokenizer, 64, 0)

    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "hello", "answer": "bonjour"},
                                                   {"prompt": "thank you", "answer": "  "}])
    with pytest.raises(ValueError, match=r"Row 2 of .*empty\.jsonl: the answer is empty"):
        finetune.build_datasets(finetune.DataArguments(train_file=str(empty), mode="supervised"), tokenizer, 64, 0)

    with pytest.raises(ValueError, match="no '{prompt}' placeholder"):
        PromptTemplate("Translate:")

    template = PromptTemplate()
    long_prompt = " ".join(["the cat and the dog"] * 20)
    with pytest.raises(ValueError, match=r"exceed max_length=32.*--truncation left"):
        encode_pair(tokenizer, template, long_prompt, "le chat", 32, truncation="error")
    ids, labels, truncated = encode_pair(tokenizer, template, long_prompt, "le chat", 32, truncation="left")
    assert truncated and len(ids) == 32 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode([t for t in labels if t != -100]) == "le chat<|eos|>"  # the answer is whole
    with pytest.raises(ValueError, match="the answer alone is"):
        encode_pair(tokenizer, template, "hello", long_prompt, 16, truncation="left")

    long_rows = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long_prompt, "answer": "le chat"}] * 3)
    caplog.set_level(logging.WARNING, logger="minigpt.train.finetune")
    finetune.build_datasets(finetune.DataArguments(train_file=str(long_rows), mode="supervised"), tokenizer, 32, 0)
    assert "3 of 3 rows" in caplog.text and "lost tokens on the left" in caplog.text
    with pytest.raises(ValueError, match="--truncation"):
        finetune.build_datasets(
            finetune.DataArguments(train_file=str(long_rows), mode="supervised", truncation="error"), tokenizer, 32, 0
        )


def test_arguments_from_a_json_file_with_command_line_overrides(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_name_or_path": "m", "mode": "supervised", "learning_rate": 0.25,
                                  "lora": True, "lora_target_modules": "all-linear", "output_dir": "o"}))  # fmt: skip
    model_args, data_args, _, training_args, _ = finetune.parse_args([str(config), "--learning_rate", "0.5"])
    assert (model_args.model_name_or_path, data_args.mode, training_args.output_dir) == ("m", "supervised", "o")
    assert model_args.lora and model_args.lora_target_modules == "all-linear"
    assert training_args.learning_rate == 0.5  # the command line wins over the file


def test_mismatched_tokenizer_and_model_vocabulary_is_refused(tmp_path, tokenizer):
    small = make_checkpoint(tmp_path / "small", tokenizer, vocab_size=300)  # the model embeds 300 of 512 ids
    with pytest.raises(ValueError, match=r"tokenizer has 512 tokens but the model embeds only 300"):
        run("--model_name_or_path", small, "--train_file", EN_FR, "--mode", "supervised",
            "--output_dir", tmp_path / "out", max_steps=1)  # fmt: skip


def test_unknown_mode_and_missing_data_are_refused(base, tmp_path):
    with pytest.raises(ValueError, match="--mode 'sft' is unknown"):
        run("--model_name_or_path", base, "--train_file", EN_FR, "--mode", "sft", "--output_dir", tmp_path, max_steps=1)
    with pytest.raises(FileNotFoundError, match=r"--train_file .*nope.jsonl: no such file"):
        run("--model_name_or_path", base, "--train_file", tmp_path / "nope.jsonl", "--output_dir", tmp_path,
            max_steps=1)  # fmt: skip
    (tmp_path / "my_texts").mkdir()
    with pytest.raises(IsADirectoryError, match=r"--train_file .*my_texts is a folder; fine-tuning takes one "
                                                r"\.txt, \.jsonl or \.json file \(minigpt-pretrain is the one"):
        run("--model_name_or_path", base, "--train_file", tmp_path / "my_texts", "--output_dir", tmp_path,
            max_steps=1)  # fmt: skip
    with pytest.raises(ValueError, match="needs held-out data"):
        run("--model_name_or_path", base, "--train_file", EN_FR, "--mode", "supervised", "--output_dir", tmp_path,
            max_steps=1, eval_strategy="steps")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Learning end to end, and the output folder
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_translation_pairs_are_learned_and_the_output_is_a_complete_checkpoint(base, tmp_path):
    out = tmp_path / "en_fr"
    run("--model_name_or_path", base, "--mode", "supervised", "--train_file", EN_FR, "--output_dir", out,
        max_steps=300, per_device_train_batch_size=16, learning_rate=3e-3, warmup_steps=10,
        lr_scheduler_type="cosine", save_steps=150, logging_steps=50)  # fmt: skip

    model, tokenizer = lm_eval.load_model(str(out))
    pairs = [(r["prompt"], r["answer"]) for r in read_jsonl(EN_FR)]
    result = lm_eval.pair_metrics(model, tokenizer, pairs, PromptTemplate.load(out), batch_size=50)
    print(f"\nEN->FR exact match after 300 steps: {result['exact_match']:.0%} of {len(pairs)}, "
          f"chrF {result['chrf']:.1f}, answer perplexity {result['answer_perplexity']:.3f}")
    assert result["exact_match"] >= 0.8, result["predictions"]

    # complete checkpoints: the final folder and the intermediate checkpoint-N alike
    for folder in (out, out / "checkpoint-150"):
        present = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "modeling_minigpt.py", "configuration_minigpt.py",
                "tokenizer.json", "tokenizer_config.json", "generation_config.json", "prompt_template.json"} <= present
        assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
            "modeling_minigpt.MiniGPTForCausalLM"
        )
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["pad_token_id"] == 0
    assert generation["use_cache"] is True  # transformers' export recipes (torch.export, ExecuTorch) need it

    # without the package (trust_remote_code: the code files in the folder), through AutoModelForCausalLM and pipeline
    script = """
import json, sys
from transformers import AutoModelForCausalLM, pipeline
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
generate = pipeline("text-generation", model=sys.argv[1], trust_remote_code=True)
out = generate("hello\\n", max_new_tokens=8, return_full_text=False)  # the tokenizer adds BOS; greedy
assert "modeling_minigpt" not in sys.modules
print(json.dumps(out[0]["generated_text"]))
"""
    proc = subprocess.run([PYTHON, "-c", script, str(out), str(out / "checkpoint-150")], capture_output=True,
                          text=True, env=subprocess_env(), cwd=tmp_path, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]).strip() == result["predictions"][0]  # "hello" row


@pytest.mark.oldest
def test_gradient_accumulation_matches_one_big_batch(tmp_path, tokenizer):
    # four rows whose answers differ a lot in length: averaging per micro-batch would weight tokens unequally
    rows = [{"prompt": "one", "answer": "un"}, {"prompt": "two", "answer": "deux"},
            {"prompt": "my mother", "answer": "ma mère et mon père sont ici, je mange du pain"},
            {"prompt": "I read", "answer": "je lis un vieux livre dans la maison de mon frère aujourd'hui"}]
    data = write_jsonl(tmp_path / "four.jsonl", rows)
    # a wide init spreads the per-token losses, so that how tokens are weighted changes the mean
    base = make_checkpoint(tmp_path / "base", tokenizer, initializer_range=0.5)
    common = dict(max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0,
                  max_grad_norm=0.0, logging_steps=1, save_strategy="no")
    big = run("--model_name_or_path", base, "--mode", "supervised", "--train_file", data, "--output_dir",
              tmp_path / "big", per_device_train_batch_size=4, gradient_accumulation_steps=1, **common)
    accumulated = run("--model_name_or_path", base, "--mode", "supervised", "--train_file", data, "--output_dir",
                      tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common)

    # the loss Trainer logged equals the token-mean loss over all four rows, computed by the model itself
    model = AutoModelForCausalLM.from_pretrained(base)
    args = finetune.DataArguments(train_file=str(data), mode="supervised")
    train, _ = finetune.build_datasets(args, tokenizer, 64, 0)
    batch = SupervisedCollator(tokenizer.pad_token_id)(list(train))
    with torch.no_grad():
        true_loss = model(**batch).loss.item()
        per_row = [model(**SupervisedCollator(0)([r])).loss.item() for r in train]
    counts = [sum(label != -100 for label in r["labels"][1:]) for r in train]
    logged = [h["loss"] for h in (big.state.log_history[0], accumulated.state.log_history[0])]
    assert logged == pytest.approx([true_loss, true_loss], rel=1e-5)
    # ...which a per-micro-batch mean would miss for every way of splitting the rows 2 + 2
    for pair in ((0, 1), (0, 2), (0, 3)):
        other = tuple(i for i in range(4) if i not in pair)
        naive = sum(sum(per_row[i] * counts[i] for i in p) / sum(counts[i] for i in p) for p in (pair, other)) / 2
        assert abs(naive - true_loss) > 1e-2

    # one SGD step with lr 1 moves each weight by -grad: equal weights mean equal gradients
    before = model.state_dict()
    for name, param in big.model.state_dict().items():
        torch.testing.assert_close(accumulated.model.state_dict()[name], param, rtol=1e-5, atol=1e-6)
    assert not torch.equal(big.model.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           before["model.layers.0.mlp.up_proj.weight"])  # fmt: skip


def test_eval_best_model_early_stopping_save_limit_tensorboard_checkpointing_bf16(base, tmp_path):
    data = qa_text_file(tmp_path / "qa.txt", read_jsonl(QA))
    out = tmp_path / "out"
    # metric "loss" with greater_is_better: the *worst* eval loss, that of the first evaluation, counts as best, and
    # a huge threshold means no later evaluation improves, so early stopping ends the run after 3 evaluations
    trainer = run("--model_name_or_path", base, "--mode", "causal", "--train_file", data, "--output_dir", out,
                  "--load_best_model_at_end", "true", "--gradient_checkpointing", "true", "--bf16", "true",
                  validation_split_percentage=20, max_length=32, max_steps=40, per_device_train_batch_size=4,
                  learning_rate=3e-3, eval_strategy="steps", eval_steps=2, save_steps=2, save_total_limit=2,
                  metric_for_best_model="loss", greater_is_better="true", early_stopping_patience=2,
                  early_stopping_threshold=100.0, report_to="tensorboard", logging_steps=1)  # fmt: skip
    state = trainer.state
    evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    assert state.global_step == 6 and len(evals) >= 3  # stopped early, at the 3rd evaluation
    assert evals[0] > evals[2]  # the loss did fall, so checkpoint-2 is "best" only by the inverted criterion
    assert state.best_model_checkpoint == str(out / "checkpoint-2")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]  # limit 2, best kept
    final, best, last = weights(out), weights(out / "checkpoint-2"), weights(out / "checkpoint-6")
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)
    assert "eval_perplexity" in json.loads((out / "eval_results.json").read_text())
    assert list(out.glob("runs/*/events.out.tfevents.*")), "no tensorboard event file"
    assert all(layer.gradient_checkpointing for layer in trainer.model.model.layers)
    assert trainer.accelerator.mixed_precision == "bf16"


@pytest.mark.oldest
def test_resume_from_checkpoint_continues_exactly(base, tmp_path):
    data = qa_text_file(tmp_path / "qa.txt", read_jsonl(QA))
    common = dict(max_length=32, max_steps=6, save_steps=3, per_device_train_batch_size=4, learning_rate=3e-3)
    run("--model_name_or_path", base, "--train_file", data, "--output_dir", tmp_path / "a", **common)
    resumed = run("--model_name_or_path", base, "--train_file", data, "--output_dir", tmp_path / "b",
                  resume_from_checkpoint=tmp_path / "a" / "checkpoint-3", **common)  # fmt: skip
    assert resumed.state.global_step == 6
    assert not (tmp_path / "b" / "checkpoint-3").exists()  # steps 1-3 were not redone
    straight, continued = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name in straight:
        torch.testing.assert_close(continued[name], straight[name], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision needs a CUDA device")
def test_fp16_on_cuda(base, tmp_path):
    trainer = finetune.main(["--model_name_or_path", str(base), "--train_file", str(EN_FR), "--mode", "supervised",
                             "--output_dir", str(tmp_path), "--max_steps", "3", "--fp16", "true",
                             "--report_to", "none"])  # fmt: skip
    assert trainer.accelerator.mixed_precision == "fp16" and trainer.state.global_step == 3


# ---------------------------------------------------------------------------------------------------------------
# Command line: by path with a YAML file, accelerate launch with 2 processes, push to a local Hub
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_accelerate_launch_two_processes_by_path_with_yaml_and_push_to_a_local_hub(base, tmp_path, hub):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model_name_or_path: {base}\nmode: supervised\ntrain_file: {QA}\nprompt_field: question\n"
        f"prompt_template: 'Q: {{prompt}}'\nseparator: \"\\nA:\"\noutput_dir: {tmp_path / 'out'}\nmax_steps: 50\n"
        "per_device_train_batch_size: 4\nuse_cpu: true\nreport_to: none\nsave_strategy: 'no'\n"
    )
    # 2 real ranks on CPU (gloo); the script by path, its arguments from the YAML file plus overrides
    cmd = [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "minigpt" / "train" / "finetune.py"), str(config),
           "--max_steps", "3", "--push_to_hub", "true", "--hub_model_id", "alice/minigpt-qa"]  # fmt: skip
    env = hub_env(hub, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 per device x 1 accumulation x 2 processes = 8 pairs per optimizer step" in proc.stderr
    out = tmp_path / "out"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3  # the override won
    template = json.loads((out / "prompt_template.json").read_text())
    assert template["prompt_template"] == "Q: {prompt}" and template["separator"] == "\nA:"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(model.lm_head.weight, weights(base)["model.embed_tokens.weight"])  # it trained

    files = hub.files("alice/minigpt-qa")  # pushed once, by rank 0, through minigpt.hub.push.push_folder
    assert {"config.json", "model.safetensors", "modeling_minigpt.py", "tokenizer.json", "prompt_template.json",
            "generation_config.json"} <= set(files)
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert len(hub.repos["alice/minigpt-qa"].history("main")) <= 2  # creation (if any) and one upload
    assert "trainer_state.json" not in files  # Trainer's resume state stays local; the card read it there
    card = files["README.md"].decode()
    tokens = json.loads((out / "trainer_state.json").read_text())["num_input_tokens_seen"]  # both ranks' rows
    assert f"- **Tokens seen:** {tokens:,}\n" in card and tokens > 0
    assert "- **Hardware:** CPU (" in card and "), 2 processes x 1 torch thread, " in card

    bad = config.with_name("bad.yaml")
    bad.write_text(config.read_text() + "learning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown arguments \['learning_rat'\]"):
        finetune.parse_args([str(bad)])


def test_finetune_starts_from_a_checkpoint_converted_from_gpt2(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from minigpt.hub.convert_gpt2 import gpt2_to_minigpt

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))  # fmt: skip
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    gpt2_to_minigpt(str(tmp_path / "gpt2"), str(tmp_path / "converted"))
    trainer = run("--model_name_or_path", tmp_path / "converted", "--mode", "supervised", "--train_file", EN_FR,
                  "--output_dir", tmp_path / "out", max_steps=5, per_device_train_batch_size=8, learning_rate=1e-3,
                  logging_steps=1)
    assert trainer.model.config.model_type == "minigpt" and trainer.state.global_step == 5
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert history and all(math.isfinite(x) for x in history)
    assert (tmp_path / "out" / "modeling_minigpt.py").is_file()


@pytest.mark.slow
def test_pretrain_then_finetune_lowers_held_out_perplexity(tmp_path):
    """minigpt.train.pretrain on the default corpus (Shakespeare), then causal fine-tuning on most of the question/answer
    set: the perplexity of the held-out questions and answers must fall, measured by minigpt/train/evaluation.py."""
    rows = read_jsonl(QA)
    train_text, held_out = qa_text_file(tmp_path / "qa_train.txt", rows[:-16]), qa_text_file(
        tmp_path / "qa_held_out.txt", rows[-16:])  # fmt: skip
    pretrained = tmp_path / "pretrained"
    pretrain = [PYTHON, "-m", "minigpt.train.pretrain", "--n_layer", "2", "--n_head", "4", "--n_embd", "64",
                "--block_size", "64", "--vocab_size", "512", "--tokenizer_train_mb", "1", "--max_steps", "100",
                "--batch_size", "16", "--learning_rate", "3e-3", "--warmup_steps", "10", "--eval_every", "0",
                "--eval_batches", "2", "--log_every", "50", "--cpu", "--output_dir", str(pretrained),
                "--data_cache_dir", str(tmp_path / "cache")]  # fmt: skip
    proc = subprocess.run(pretrain, capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run("--model_name_or_path", pretrained, "--mode", "causal", "--train_file", train_text,
        "--output_dir", tmp_path / "finetuned", max_length=64, max_steps=40, per_device_train_batch_size=8,
        learning_rate=1e-3, warmup_steps=5, save_strategy="no")  # fmt: skip

    # both models side by side, each with its own tokenizer (here the same one)
    after, before = lm_eval.main([str(tmp_path / "finetuned"), "--data", str(held_out), "--compare", str(pretrained)])
    print(f"\nheld-out Q/A perplexity: {before['perplexity']:.2f} after pretraining -> {after['perplexity']:.2f} "
          f"after fine-tuning (bits per byte {before['bits_per_byte']:.3f} -> {after['bits_per_byte']:.3f})")
    assert after["num_tokens"] == before["num_tokens"]
    assert after["perplexity"] < 0.8 * before["perplexity"]


# ---------------------------------------------------------------------------------------------------------------
# A supervised fine-tune, used the way its model card says
# ---------------------------------------------------------------------------------------------------------------

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"), ("open", "shut"),
    ("day", "night"), ("light", "dark"), ("left", "right"), ("high", "low"), ("wet", "dry"), ("early", "late"),
    ("full", "empty"), ("hard", "soft"), ("rich", "poor"), ("strong", "weak"), ("thick", "thin"), ("win", "lose"),
    ("in", "out"), ("yes", "no"), ("push", "pull"), ("true", "false"), ("first", "last"), ("buy", "sell"),
    ("near", "far"), ("long", "short"), ("happy", "sad"), ("loud", "quiet"), ("clean", "dirty"), ("love", "hate"),
]  # fmt: skip

CARD_PIPELINE = """
import json, sys
from transformers import pipeline
generate = pipeline("text-generation", model=sys.argv[1], trust_remote_code=True)
prompts = json.loads(sys.argv[2])
print(json.dumps([generate(p, return_full_text=False)[0]["generated_text"] for p in prompts]))
"""


def test_a_supervised_finetune_answers_right_through_the_pipeline_call_of_its_card(tmp_path, tokenizer):
    """What the model was trained on ([BOS] prompt separator) is what the card's plain pipeline call gives it:
    the saved tokenizer adds BOS, generation_config.json decodes greedily, and the card shows the template."""
    from minigpt.hub.model_card import build_model_card

    base = make_checkpoint(tmp_path / "base", tokenizer)
    # pretraining's sampling defaults, which must not carry over into the fine-tuned model
    GenerationConfig(do_sample=True, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(base)
    rows = [{"prompt": f"opposite of {a}", "answer": b} for a, b in OPPOSITES]
    data = write_jsonl(tmp_path / "opposites.jsonl", rows)
    out = tmp_path / "out"
    run("--model_name_or_path", base, "--mode", "supervised", "--train_file", data, "--output_dir", out,
        max_steps=150, per_device_train_batch_size=30, learning_rate=3e-3, warmup_steps=10, save_strategy="no",
        threads=1)  # fmt: skip

    generation = json.loads((out / "generation_config.json").read_text())
    assert generation.get("do_sample", False) is False, generation
    assert not {"temperature", "top_k", "top_p", "repetition_penalty"} & set(generation), generation
    # both fast-tokenizer paths add BOS by default and only then; add_special_tokens=False gives the bare text
    for saved in (load_tokenizer(str(out)), PreTrainedTokenizerFast.from_pretrained(out)):
        bare = saved("opposite of hot\n", add_special_tokens=False).input_ids
        assert saved("opposite of hot\n").input_ids == [saved.bos_token_id] + bare
    card = str(build_model_card(out, "alice/opposites"))
    assert "'{prompt}'" in card and "'\\n'" in card and "return_full_text=False" in card

    prompts = [f"opposite of {a}\n" for a, _ in OPPOSITES[:10]]
    proc = subprocess.run([PYTHON, "-c", CARD_PIPELINE, str(out), json.dumps(prompts)], capture_output=True,
                          text=True, env=subprocess_env(), cwd=tmp_path, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [a.strip() for a in json.loads(proc.stdout.strip().splitlines()[-1])]
    assert answers == [b for _, b in OPPOSITES[:10]]


# ---------------------------------------------------------------------------------------------------------------
# Errors that point at the fix, threads, logging
# ---------------------------------------------------------------------------------------------------------------


def test_a_model_folder_without_a_tokenizer_says_so_and_names_the_option(base, tmp_path):
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(bare)
    with pytest.raises(ValueError, match="has no tokenizer") as e:
        run("--model_name_or_path", bare, "--train_file", EN_FR, "--mode", "supervised", "--output_dir",
            tmp_path / "out", max_steps=1)  # fmt: skip
    assert "--tokenizer_name_or_path" in str(e.value) and "sentencepiece" not in str(e.value)
    run("--model_name_or_path", bare, "--tokenizer_name_or_path", base, "--train_file", EN_FR, "--mode",
        "supervised", "--output_dir", tmp_path / "out", max_steps=1, save_strategy="no")  # fmt: skip


@pytest.mark.parametrize("fields", [("prompt", "answer"), ("question", "answer"), ("input", "output")])
def test_pairs_without_mode_supervised_say_that_mode_supervised_is_the_fix(base, tmp_path, fields):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{fields[0]: "hot", fields[1]: "cold"}] * 4)
    with pytest.raises(ValueError, match="--mode supervised") as e:
        run("--model_name_or_path", base, "--train_file", data, "--output_dir", tmp_path / "out", max_steps=1)
    assert f"--prompt_field {fields[0]} --answer_field {fields[1]}" in str(e.value)


@pytest.mark.parametrize("path", ["./bsae", "no_such_dir/base", "/tmp/no/such/model"])
def test_a_misspelled_local_path_fails_at_once_without_asking_the_hub(tmp_path, path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no_such_dir").mkdir()  # dir/name with an existing dir is a local path, not a Hub id
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run("--model_name_or_path", path, "--train_file", EN_FR, "--output_dir", tmp_path / "out", max_steps=1)
    assert time.perf_counter() - start < 10


def test_short_runs_log_the_loss_while_training_and_the_threads_at_start(base, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="minigpt.train.finetune"):
        trainer = run("--model_name_or_path", base, "--mode", "supervised", "--train_file", EN_FR, "--output_dir",
                      tmp_path / "out", max_steps=10, per_device_train_batch_size=4, save_strategy="no")  # fmt: skip
    assert "torch threads: 1 (--threads)" in caplog.text and torch.get_num_threads() == 1
    logged = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.args.logging_steps == 1 and logged[:3] == [1, 2, 3], logged
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["data"].startswith("en_fr.jsonl") and summary["learning_rate"] == trainer.args.learning_rate
    # an explicit --logging_steps wins
    trainer = run("--model_name_or_path", base, "--mode", "supervised", "--train_file", EN_FR, "--output_dir",
                  tmp_path / "out2", max_steps=4, per_device_train_batch_size=4, save_strategy="no",
                  logging_steps=2)  # fmt: skip
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [2, 4]


def test_gradient_checkpointing_still_saves_use_cache_true_in_the_final_folder_and_every_checkpoint(base, tmp_path):
    # gradient checkpointing switches model.config.use_cache off while training; a saved checkpoint must not keep
    # that, or generate() runs without a cache and torch.export/ExecuTorch recipes refuse the folder
    data = qa_text_file(tmp_path / "qa.txt", read_jsonl(QA))
    out = tmp_path / "out"
    trainer = run("--model_name_or_path", base, "--mode", "causal", "--train_file", data, "--output_dir", out,
                  "--gradient_checkpointing", "true", max_length=32, max_steps=2, save_steps=1,
                  per_device_train_batch_size=4)  # fmt: skip
    assert all(layer.gradient_checkpointing for layer in trainer.model.model.layers)
    folders = [out, out / "checkpoint-1", out / "checkpoint-2"]
    assert {f.name: json.loads((f / "config.json").read_text())["use_cache"] for f in folders} == {
        f.name: True for f in folders
    }
    assert AutoModelForCausalLM.from_pretrained(out / "checkpoint-1").config.use_cache is True


# ---------------------------------------------------------------------------------------------------------------
# What finetune adjusts, says and records
# ---------------------------------------------------------------------------------------------------------------


def loss_steps(trainer) -> list[int]:
    return [entry["step"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.oldest
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_an_explicit_value_in_a_config_file_is_kept_though_it_equals_the_default(base, tmp_path, suffix):
    values = {"model_name_or_path": str(base), "mode": "supervised", "train_file": str(EN_FR),
              "output_dir": str(tmp_path / "out"), "logging_steps": 500, "include_num_input_tokens_seen": "no",
              "max_steps": 4, "per_device_train_batch_size": 4, "save_strategy": "no"}  # fmt: skip
    config = tmp_path / f"config{suffix}"
    config.write_text(json.dumps(values))  # JSON is YAML too
    trainer = run(config)
    assert trainer.args.logging_steps == 500 and loss_steps(trainer) == []  # as asked: no loss log in 4 steps
    assert trainer.args.include_num_input_tokens_seen == "no" and trainer.state.num_input_tokens_seen == 0
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    # not counted, so estimated: 4 steps x 4 of the 100 pairs = 0.16 epochs of their 1,306 tokens
    assert (summary["tokens"], summary["tokens_estimated"]) == (round(1306 * 0.16), True)
    assert finetune.parse_args([str(config), "--eval_steps=3", "--no_packing", "--threads", "2"])[-1] == {
        *values, "eval_steps", "packing", "threads"}  # fmt: skip


def test_eval_steps_follows_the_adjusted_logging_steps_unless_given(base, tmp_path):
    common = ("--model_name_or_path", base, "--mode", "supervised", "--train_file", EN_FR, "--eval_strategy", "steps",
              "--validation_split_percentage", "10")  # fmt: skip
    trainer = run(*common, output_dir=tmp_path / "a", max_steps=40, save_strategy="no")
    assert (trainer.args.logging_steps, trainer.args.eval_steps) == (2, 2)  # 40 // 20; Trainer's default said 500
    assert [e["step"] for e in trainer.state.log_history if "eval_loss" in e][:3] == [2, 4, 6]
    trainer = run(*common, output_dir=tmp_path / "b", max_steps=40, save_strategy="no", eval_steps=20)
    assert (trainer.args.logging_steps, trainer.args.eval_steps) == (2, 20)


@pytest.mark.parametrize("packing", [True, False])
def test_causal_runs_say_how_many_documents_tokens_and_blocks_they_train_on(base, tmp_path, caplog, packing):
    with caplog.at_level(logging.INFO, logger="minigpt.train.finetune"):
        run("--model_name_or_path", base, "--mode", "causal", "--train_file", EN_FR, "--text_field", "answer",
            "--output_dir", tmp_path / "out", "--packing", str(packing).lower(), max_steps=1, save_strategy="no",
            per_device_train_batch_size=4)  # fmt: skip
    tokenizer = load_tokenizer(str(base))
    tokens = sum(len(tokenizer.encode(r["answer"], add_special_tokens=False)) + 1 for r in read_jsonl(EN_FR))
    if packing:  # 100 short answers make a handful of 64-token blocks: "rows" would say 11 where 100 went in
        expected = (f"training data: 100 documents, {tokens:,} tokens with an EOS after each, packed into "
                    f"{math.ceil(tokens / 64)} blocks of 64 tokens (the last may be shorter); 4 per device x 1 "
                    f"accumulation x 1 processes = 4 blocks per optimizer step, {math.ceil(tokens / 64 / 4)} steps "
                    "per epoch")  # fmt: skip
    else:
        expected = (f"training data: 100 documents, one row each (cut at max_length 64), {tokens:,} tokens; 4 per "
                    "device x 1 accumulation x 1 processes = 4 documents per optimizer step, 25 steps per epoch")
    assert expected in caplog.text, caplog.text


@pytest.mark.oldest
def test_the_summary_and_card_give_the_tokens_hardware_and_the_peak_learning_rate_reached(base, tmp_path):
    from minigpt.hub.model_card import build_model_card

    out = tmp_path / "out"
    # a warmup longer than the run: the rate climbs 0, 1e-3, 2e-3 and never reaches the configured 1e-2
    trainer = run("--model_name_or_path", base, "--mode", "supervised", "--train_file", EN_FR, "--output_dir", out,
                  max_steps=3, warmup_steps=10, learning_rate=1e-2, per_device_train_batch_size=100,
                  save_strategy="no")  # fmt: skip
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["learning_rate"] == pytest.approx(2e-3) == max(
        e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e)
    assert (summary["configured_learning_rate"], summary["warmup_steps"], summary["steps"]) == (1e-2, 10, 3)
    # every pair, all 1,306 tokens, in each of the 3 steps: counted by Trainer (non-padding), not estimated
    assert summary["tokens"] == trainer.state.num_input_tokens_seen == 3 * 1306 and "tokens_estimated" not in summary
    assert summary["hardware"] == f"CPU ({platform.machine()}, {available_cores()} cores), 1 process x 1 torch thread"
    card = str(build_model_card(out, "alice/en-fr"))
    assert "- **Tokens seen:** 3,918\n" in card
    assert f"- **Hardware:** {summary['hardware']}, " in card
    assert ("peak learning rate 0.002 reached (configured 0.01, never reached: the warmup of 10 steps was not over "
            "after 3)") in card  # fmt: skip


def test_arguments_are_checked_before_the_model_loads(base, tmp_path):
    """--mode supervise is refused before the model loads: here the model folder is unreadable, and the error is
    still the one about --mode."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("not json")
    for flags, message in ((["--mode", "supervise"], "--mode 'supervise' is unknown"),
                           (["--train_file", tmp_path], "is a folder"),
                           (["--mode", "supervised", "--prompt_template", "Q:"], "has no '{prompt}' placeholder")):
        argv = ["--model_name_or_path", broken, "--train_file", EN_FR, "--output_dir", tmp_path / "out", *flags]
        with pytest.raises((ValueError, OSError), match=message):
            run(*argv, max_steps=1)


def test_a_bare_name_that_is_no_folder_fails_at_once_offline_or_with_the_hub_unreachable(tmp_path, monkeypatch):
    """`--model_name_or_path tiny` with no folder tiny: said at once, for the model and the tokenizer options,
    whatever the developer's environment (HF_HUB_OFFLINE forced on, then a Hub endpoint where nobody listens)."""
    monkeypatch.chdir(tmp_path)
    base = make_checkpoint(tmp_path / "base")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    for flags, option in ((["--model_name_or_path", "tiny"], "--model_name_or_path"),
                          (["--model_name_or_path", base, "--tokenizer_name_or_path", "tiny"],
                           "--tokenizer_name_or_path")):
        with pytest.raises(FileNotFoundError, match=rf"{option}: no such folder tiny \(and tiny is not a Hub id of "
                                                    r"the form owner/name\).*HF_HUB_OFFLINE is set"):
            run(*flags, "--train_file", EN_FR, "--output_dir", tmp_path / "out", max_steps=1)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens
    with pytest.raises(FileNotFoundError, match=r"no such folder tiny .*huggingface.co could not be reached"):
        run("--model_name_or_path", "tiny", "--train_file", EN_FR, "--output_dir", tmp_path / "out", max_steps=1)
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "out").exists()


def test_a_mistyped_owner_slash_name_path_fails_at_once_offline_or_with_the_hub_unreachable(tmp_path, monkeypatch):
    """rusn/tiny (for runs/tiny), or runs/tiny typed in another folder: shaped like a Hub id, so it is asked of the
    Hub once, and the error names the folder it was looked for in, instead of a minute of Hub retries."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=rf"--model_name_or_path: no such folder rusn/tiny in {tmp_path}, and "
                                                r"as a Hub id: HF_HUB_OFFLINE is set"):
        run("--model_name_or_path", "rusn/tiny", "--train_file", EN_FR, "--output_dir", tmp_path / "out", max_steps=1)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens
    with pytest.raises(FileNotFoundError, match=r"no such folder rusn/tiny .*huggingface.co could not be reached"):
        run("--model_name_or_path", "rusn/tiny", "--train_file", EN_FR, "--output_dir", tmp_path / "out", max_steps=1)
    assert time.perf_counter() - start < 30


def test_a_literal_backslash_n_in_the_template_options_is_a_newline(base, tmp_path):
    """bash passes --separator "\\nA:" as backslash, n: both template options read \\n, \\t and \\\\ as the characters,
    on the command line and in a config file, so the model trains on, and its card shows, a real newline."""
    out = tmp_path / "out"
    run("--model_name_or_path", base, "--mode", "supervised", "--train_file", EN_FR, "--output_dir", out,
        "--prompt_template", r"Q:\t{prompt}\\", "--separator", r"\nA:", max_steps=1, save_strategy="no")
    assert PromptTemplate.load(out) == PromptTemplate("Q:\t{prompt}\\", "\nA:")
    config = tmp_path / "config.yaml"
    config.write_text(f"model_name_or_path: {base}\nmode: supervised\ntrain_file: {EN_FR}\noutput_dir: {out}2\n"
                      "separator: '\\nA:'\nmax_steps: 1\nsave_strategy: 'no'\nuse_cpu: true\nreport_to: none\n")
    finetune.main([str(config)])
    assert PromptTemplate.load(f"{out}2").separator == "\nA:"
    help_text = subprocess.run([PYTHON, "-m", "minigpt.train.finetune", "--help"], capture_output=True, text=True,
                               env=subprocess_env(), cwd=ROOT, timeout=300).stdout
    assert r"Write a newline as \n, a tab as \t and a backslash as \\." in " ".join(help_text.split())


def test_the_summary_and_card_name_the_base_model_and_what_it_was_trained_on(base, tmp_path):
    """A fine-tune's card says what it started from: a local base by its folder name (never an absolute path) with
    the base's own training facts, read from its records; a Hub id also goes into the `base_model:` metadata."""
    from minigpt.hub.model_card import build_model_card

    pretrained = tmp_path / "tiny"
    make_checkpoint(pretrained)
    # a pretrain run's record, as minigpt.train.pretrain writes it in each checkpoint
    (pretrained / "checkpoints" / "step-40").mkdir(parents=True)
    (pretrained / "checkpoints" / "step-40" / "train_state.json").write_text(json.dumps(
        {"args": {"data": {"data": [str(tmp_path / "shakespeare.txt")]}}, "state": {"step": 40, "tokens_seen": 81920}}))
    out = tmp_path / "en_fr"
    run("--model_name_or_path", pretrained, "--mode", "supervised", "--train_file", EN_FR, "--output_dir", out,
        max_steps=1, save_strategy="no")
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["base_model"] == {"name": "tiny", "hub": False, "data": "shakespeare.txt", "tokens": 81920}
    card = str(build_model_card(out, "alice/en-fr"))
    assert "Fine-tuned from the local model `tiny` (pretrained on shakespeare.txt, 81,920 tokens)." in card
    assert "- **Data:** en_fr.jsonl (supervised fine-tuning)" in card
    assert "base_model" not in card.split("---")[1] and str(tmp_path) not in card

    # a fine-tune of that fine-tune names the first one, fine-tuned on the pairs; a Hub id goes into the metadata
    assert base_model_record(str(out))["base_model"]["name"] == "tiny"
    summary["base_model"] = base_model_record("openai-community/gpt2")
    (out / "training_summary.json").write_text(json.dumps(summary))
    card = str(build_model_card(out, "alice/en-fr"))
    assert "base_model: openai-community/gpt2" in card.split("---")[1]
    assert "Fine-tuned from [openai-community/gpt2](https://huggingface.co/openai-community/gpt2)." in card


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([PYTHON, "-m", "minigpt.train.finetune", *map(str, argv)], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, env=dict(subprocess_env(), PYTHONUNBUFFERED="1"),
                                preexec_fn=ctrl_c_reaches_it)


def _interrupt_when(proc: subprocess.Popen, log: Path, ready) -> str:
    """SIGINT once `ready(log text)` holds; the whole output once the process has exited."""
    deadline = time.monotonic() + 300  # a loaded machine; a timeout means a hang
    while not ready(log.read_text(errors="replace")):
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(300)
    return log.read_text(errors="replace")


def test_ctrl_c_says_where_the_run_got_to_and_how_to_continue_it(base, tmp_path):
    """A real SIGINT to a real `python -m minigpt.train.finetune`: the step is saved as a checkpoint (also with
    --save_strategy no), then one line with the step, that checkpoint and the command that resumes from it, exit
    status 130, no traceback."""
    tiny = ["--model_name_or_path", base, "--mode", "supervised", "--train_file", EN_FR, "--max_steps", "100000",
            "--logging_steps", "1", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
            "--threads", "1", "--per_device_train_batch_size", "2"]
    saving, unsaved = tmp_path / "saving", tmp_path / "unsaved"
    procs = [_start([*tiny, "--output_dir", saving, "--save_steps", "2"], tmp_path / "saving.log"),
             _start([*tiny, "--output_dir", unsaved, "--save_strategy", "no"], tmp_path / "unsaved.log")]
    try:
        text = _interrupt_when(procs[0], tmp_path / "saving.log",
                               lambda _: (saving / "checkpoint-2" / "trainer_state.json").is_file())
        other = _interrupt_when(procs[1], tmp_path / "unsaved.log", lambda log: "'loss'" in log)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert procs[0].returncode == 130 and "Traceback" not in text, text[-4000:]
    last = text.strip().splitlines()[-1]
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    checkpoint = max((p for p in saving.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                     key=lambda p: int(p.name.split("-")[1]))
    assert step >= int(checkpoint.name.split("-")[1]) >= 2
    assert last.startswith(f"finetune: interrupted at step {step}; the last checkpoint is {checkpoint}; continue "
                           "with: ")
    assert "minigpt-finetune --model_name_or_path " in last  # the console script, by its path where not on PATH
    assert last.endswith(f"--output_dir {saving} --save_steps 2 --resume_from_checkpoint {checkpoint}")

    # with no periodic saves (--save_strategy no), Ctrl-C still saves the step it stopped at, as pretraining does
    assert procs[1].returncode == 130 and "Traceback" not in other, other[-4000:]
    last = other.strip().splitlines()[-1]
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    assert f"; the last checkpoint is {unsaved / f'checkpoint-{step}'}; continue with: " in last, last
    assert (unsaved / f"checkpoint-{step}" / "model.safetensors").is_file()
    assert not (unsaved / "model.safetensors").exists()  # stopped: no final model


def test_an_adapter_folder_continues_training_the_adapter(tmp_path):
    """--model_name_or_path <output_dir>/adapter of a --lora run: the adapter loads on its base, trainable (not the
    frozen inference load of AutoModelForCausalLM.from_pretrained(adapter)), and trains on; --lora on top of it is
    refused with what to pass instead."""
    from peft import PeftModel

    base = make_checkpoint(tmp_path / "base")
    first = tmp_path / "first"
    run("--model_name_or_path", base, "--mode", "supervised", "--train_file", EN_FR, "--output_dir", first,
        "--lora", "true", max_steps=2, learning_rate=1e-2, save_strategy="no")
    second = tmp_path / "second"
    trainer = run("--model_name_or_path", first / "adapter", "--mode", "supervised", "--train_file", EN_FR,
                  "--output_dir", second, max_steps=2, learning_rate=1e-2, save_strategy="no")
    assert isinstance(trainer.model, PeftModel)  # (its LoRA layers are merged away by now: the merged model is saved)
    assert not torch.equal(weights(second)["model.layers.0.self_attn.qkv_proj.weight"],
                           weights(first)["model.layers.0.self_attn.qkv_proj.weight"])  # trained further
    assert (second / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(ValueError, match=r"is a LoRA adapter and --lora adds a new one .*Drop --lora"):
        run("--model_name_or_path", first / "adapter", "--lora", "true", "--mode", "supervised", "--train_file",
            EN_FR, "--output_dir", tmp_path / "third", max_steps=1)


def test_push_to_hub_without_the_hub_is_refused_before_training(tmp_path, monkeypatch):
    """push_folder refuses offline mode and a missing token, but only after the run; finetune checks it first."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    base = make_checkpoint(tmp_path / "base")
    with pytest.raises(PermissionError, match=r"--push_to_hub: HF_HUB_OFFLINE is set.*minigpt-push OUTPUT_DIR"):
        run("--model_name_or_path", base, "--train_file", EN_FR, "--output_dir", tmp_path / "out",
            "--push_to_hub", "true", "--hub_model_id", "alice/x", max_steps=1)  # fmt: skip
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.oldest
def test_label_smoothing_scores_each_position_on_the_next_token(tmp_path, tokenizer):
    """--label_smoothing_factor once smoothed against the unshifted labels (5.304 where the formula gives 5.749):
    every position scored on its own input token. The logged loss of the first step is the written-out formula."""
    rows = [{"prompt": "one", "answer": "un"}, {"prompt": "my mother", "answer": "ma mère et mon père"},
            {"prompt": "I read", "answer": "je lis un vieux livre"}]  # fmt: skip
    data = write_jsonl(tmp_path / "three.jsonl", rows)
    base = make_checkpoint(tmp_path / "base", tokenizer, initializer_range=0.5)
    trainer = run("--model_name_or_path", base, "--mode", "supervised", "--train_file", data, "--output_dir",
                  tmp_path / "out", per_device_train_batch_size=3, max_steps=1, learning_rate=0.0, logging_steps=1,
                  save_strategy="no", label_smoothing_factor=0.1)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(base)
    train, _ = finetune.build_datasets(finetune.DataArguments(train_file=str(data), mode="supervised"), tokenizer, 64, 0)
    batch = SupervisedCollator(tokenizer.pad_token_id)(list(train))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1], dim=-1)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    nll = -logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep].mean()
    expected = 0.9 * nll + 0.1 * (-logprobs.mean(-1)[keep]).mean()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected.item(), rel=1e-4)
