"""Chat: conversational fine-tuning with a chat template (minigpt/train/chat.py), and the ecosystem's own chat tools on
the result: apply_chat_template, pipeline(messages), TRL's SFTTrainer with assistant_only_loss. The server side
(minigpt-serve and the OpenAI client) is tests/test_serve.py."""

import importlib.util
import json
import math

import pytest
import torch
from finetune_helpers import EN_FR, ROOT, example_texts, make_checkpoint, run, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

from minigpt.train import finetune
from minigpt.train.chat import CHAT_TOKENS, CHATML_TEMPLATE, END_OF_TURN, add_chat_template, encode_conversation
from minigpt.train.chat_task import as_training_records, conversations, make_names
from minigpt.train.pairs import PromptTemplate
from minigpt.train.tokenizer import train_tokenizer

pytestmark = pytest.mark.oldest
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "My name is Ana."}, {"role": "assistant", "content": "Hello, Ana!"}],
    "two turns, a system message": [
        SYSTEM, {"role": "user", "content": "My name is Ana."}, {"role": "assistant", "content": "Hello, Ana!"},
        {"role": "user", "content": "What is my name?"}, {"role": "assistant", "content": "Your name is Ana."}],
    "three turns": [
        {"role": "user", "content": "I like red."}, {"role": "assistant", "content": "Red is a fine colour."},
        {"role": "user", "content": "My name is Bo."}, {"role": "assistant", "content": "Hello, Bo!"},
        {"role": "user", "content": "What do I like?"}, {"role": "assistant", "content": "You like red."}],
}  # fmt: skip


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = train_tokenizer(example_texts() + ["My name is Ana. What do I like? Your name is"] * 20, vocab_size=512,
                                min_frequency=1)  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def expected_row(tokenizer, messages) -> tuple[list[int], list[int]]:
    """ChatML written out piece by piece: the ids of every assistant turn's content and its <|im_end|> are labels."""
    ids, labels = [], []

    def add(text, learned):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(piece)
        labels.extend(piece if learned else [-100] * len(piece))

    for m in messages:
        add(f"<|im_start|>{m['role']}\n", False)
        add(m["content"] + END_OF_TURN, m["role"] == "assistant")
        add("\n", False)
    return ids, labels


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_the_loss_covers_every_assistant_turn_and_nothing_else(chat_tokenizer, name):
    ids, labels, truncated = encode_conversation(chat_tokenizer, CONVERSATIONS[name], max_length=512)
    assert (ids, labels) == expected_row(chat_tokenizer, CONVERSATIONS[name]) and not truncated
    end_of_turn = chat_tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assistant_turns = sum(m["role"] == "assistant" for m in CONVERSATIONS[name])
    assert [t for t in labels if t != -100].count(end_of_turn) == assistant_turns
    ids, labels, truncated = encode_conversation(chat_tokenizer, CONVERSATIONS[name], max_length=8)
    assert truncated and (ids, labels) == tuple(row[-8:] for row in expected_row(chat_tokenizer, CONVERSATIONS[name]))


def test_a_model_without_a_template_gets_chatml_its_tokens_and_mean_initialised_rows(tmp_path):
    base = make_checkpoint(tmp_path / "base")
    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    known = len(tokenizer)
    mean = model.get_input_embeddings().weight[:known].mean(0)
    eos = add_chat_template(model, tokenizer)
    assert tokenizer.chat_template == CHATML_TEMPLATE and len(tokenizer) == known + 2
    assert eos == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    torch.testing.assert_close(model.get_input_embeddings().weight[known : known + 2], mean.expand(2, -1))
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    assert add_chat_template(model, tokenizer) == [tokenizer.eos_token_id]  # a template is kept as it is


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny model fine-tuned on the name task's conversations (minigpt/train/chat_task.py), chat mode found by
    itself from the 'messages' records."""
    folder = tmp_path_factory.mktemp("chat")
    base = make_checkpoint(folder / "base", n_positions=128)
    records = as_training_records(conversations(make_names(200, 0), seed=1))
    data = write_jsonl(folder / "chat.jsonl", records)
    run("--model_name_or_path", base, "--train_file", data, "--output_dir", folder / "out", max_steps=30,
        per_device_train_batch_size=8, learning_rate=3e-3, save_strategy="no")  # fmt: skip
    return folder / "out", data


def test_a_chat_finetune_saves_its_template_and_answers_end_at_the_end_of_the_turn(chat_model):
    out, _ = chat_model
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHATML_TEMPLATE and END_OF_TURN in tokenizer.all_special_tokens
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert end_of_turn in GenerationConfig.from_pretrained(out).eos_token_id
    messages = CONVERSATIONS["two turns, a system message"][:-1]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nWhat is my name?<|im_end|>\n<|im_start|>assistant\n")

    model = AutoModelForCausalLM.from_pretrained(out)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    greedy = model.generate(**inputs, max_new_tokens=40, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert greedy[-1] in (end_of_turn, tokenizer.eos_token_id) or len(greedy) == 40
    reply = pipeline("text-generation", model=str(out))(messages, max_new_tokens=40, do_sample=False)
    assert reply[0]["generated_text"][-1] == {
        "role": "assistant", "content": tokenizer.decode(greedy, skip_special_tokens=True)}  # fmt: skip


def test_conversations_are_found_by_themselves_and_bad_ones_are_refused(tmp_path):
    good = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS["one turn"]}])
    args = finetune.DataArguments(train_file=str(good))
    finetune.check_data_args(args)
    assert args.mode == "chat"
    base = make_checkpoint(tmp_path / "base")
    for rows, message in (([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
                          ([{"messages": [{"role": "bot", "content": "hi"}]}], "must be a list of .*its message 1 is"),
                          ([{"text": "no messages"}], "has no field 'messages'")):  # fmt: skip
        bad = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(ValueError, match=message):
            run("--model_name_or_path", base, "--mode", "chat", "--train_file", bad, "--output_dir", tmp_path / "x",
                max_steps=1)  # fmt: skip


def test_a_supervised_finetune_saves_its_prompt_format_as_a_chat_template(tmp_path):
    base = make_checkpoint(tmp_path / "base")
    out = tmp_path / "out"
    run("--model_name_or_path", base, "--mode", "supervised", "--train_file", EN_FR, "--output_dir", out,
        "--prompt_template", "English: {prompt}", "--separator", "\\nFrench:", max_steps=2, save_strategy="no")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(out)
    template = PromptTemplate.load(out)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "good night"}], add_generation_prompt=True)
    ids = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    assert list(ids) == template.prompt_ids(tokenizer, "good night")  # what training wrote before each answer
    reply = pipeline("text-generation", model=str(out))([{"role": "user", "content": "good night"}], max_new_tokens=8)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"


def test_trls_sfttrainer_with_assistant_only_loss_trains_on_the_same_tokens(chat_model, tmp_path):
    pytest.importorskip("trl")
    out, data = chat_model
    spec = importlib.util.spec_from_file_location("sft_chat_trl", ROOT / "examples" / "sft_chat_trl.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.trainer_for(str(out), str(data), str(tmp_path / "trl"), max_steps=2, cpu=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(rows)
    records = [json.loads(line) for line in data.read_text().splitlines()[:3]]
    for labels, record in zip(batch["labels"].tolist(), records):
        _, ours, _ = encode_conversation(tokenizer, record["messages"], max_length=128)
        assert labels[: len(ours)] == ours and set(labels[len(ours) :]) <= {-100}
    result = trainer.train()
    assert math.isfinite(result.training_loss)


@pytest.mark.slow
def test_the_chat_demo_trains_serves_and_scores_every_held_out_question(tmp_path):
    """minigpt-chat-demo end to end on a tiny base, cut to a few steps: it fine-tunes, serves the model and asks each
    held-out question through the openai client (the accuracy itself is the README's, from the full run)."""
    pytest.importorskip("openai")
    from minigpt.train import chat_demo

    base = make_checkpoint(tmp_path / "base", n_positions=256)  # its BPE splits the made-up names into many pieces
    accuracy = chat_demo.main(["--base", str(base), "--output_dir", str(tmp_path / "chat"), "--max_steps", "3",
                               "--target", "0"])  # fmt: skip
    answers = [json.loads(line) for line in (tmp_path / "chat" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == chat_demo.HELD_OUT and 0 <= accuracy <= 1
    assert accuracy == sum(a["reply"] == a["expected"] for a in answers) / len(answers)
    assert all(a["messages"][-1]["role"] == "user" for a in answers)
