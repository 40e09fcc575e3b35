"""The task heads (sequence and token classification, extractive QA): transformers' generic heads on MiniGPTModel,
as Llama has them. Sequence classification is trained with Trainer on a small labelled set made here."""

import pytest
import torch
from conftest import tiny_config
from datasets import Dataset
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    Trainer,
    TrainingArguments,
)

from modeling_minigpt import MiniGPTConfig, MiniGPTForSequenceClassification

pytestmark = pytest.mark.oldest
PAD, MARK = 0, 7  # a sequence's label: does it hold the token MARK?


def labelled_set(n: int, seed: int) -> list[dict]:
    """Rows of 4 to 12 tokens from [10, 100) plus, in half of them, one MARK somewhere: label 1 if present."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(10, 100, (int(torch.randint(4, 13, (1,), generator=gen)),), generator=gen)
        if i % 2:
            ids[torch.randint(0, len(ids), (1,), generator=gen)] = MARK
        rows.append({"input_ids": ids.tolist(), "labels": i % 2})
    return rows


def pad(rows: list[dict], side: str) -> dict:
    """A batch padded with PAD on `side`, with its attention mask."""
    width = max(len(r["input_ids"]) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = width - len(r["input_ids"])
        ids.append([PAD] * fill + r["input_ids"] if side == "left" else r["input_ids"] + [PAD] * fill)
        mask.append([0] * fill + [1] * len(r["input_ids"]) if side == "left" else [1] * len(r["input_ids"]) + [0] * fill)
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if "labels" in rows[0]:
        batch["labels"] = torch.tensor([r["labels"] for r in rows])
    return batch


@pytest.mark.parametrize(
    "auto, head", [(AutoModelForSequenceClassification, "score"), (AutoModelForTokenClassification, "score"),
                   (AutoModelForQuestionAnswering, "qa_outputs")]  # fmt: skip
)
def test_each_head_comes_from_its_auto_class_and_reloads(auto, head, tmp_path):
    config = tiny_config(num_labels=3)
    model = auto.from_config(config).eval()
    assert type(model).__name__.startswith("MiniGPTFor") and hasattr(model, head)
    model.save_pretrained(tmp_path)
    reloaded, info = auto.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(3, 100, (2, 7))
    out, again = model(ids), reloaded.eval()(ids)
    for name in out.keys():
        if torch.is_tensor(out[name]):
            torch.testing.assert_close(again[name], out[name])
    shapes = {k: tuple(v.shape) for k, v in out.items() if torch.is_tensor(v)}
    expected = {
        AutoModelForSequenceClassification: {"logits": (2, 3)},
        AutoModelForTokenClassification: {"logits": (2, 7, 3)},
        AutoModelForQuestionAnswering: {"start_logits": (2, 7), "end_logits": (2, 7)},
    }[auto]
    assert {k: shapes[k] for k in expected} == expected


def test_sequence_classification_pools_the_last_real_token_under_left_and_right_padding():
    torch.manual_seed(0)
    model = MiniGPTForSequenceClassification(tiny_config(num_labels=2)).eval()
    rows = labelled_set(6, seed=1)
    alone = torch.cat([model(torch.tensor([r["input_ids"]])).logits for r in rows])  # (6, 2), no padding at all
    for side in ("left", "right"):
        batch = pad(rows, side)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5, msg=side)


def test_sequence_classification_learns_with_trainer(tmp_path):
    """Trainer (right padding in training) takes accuracy from chance (0.5) to near 1; evaluated on held-out rows
    with both paddings."""
    torch.manual_seed(0)
    config = MiniGPTConfig(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, num_labels=2,
                           pad_token_id=PAD, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = MiniGPTForSequenceClassification(config)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=6, per_device_train_batch_size=32,
                             learning_rate=3e-3, warmup_steps=10, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=1000, seed=0, dataloader_num_workers=0)  # fmt: skip
    train = Dataset.from_list(labelled_set(640, seed=1))
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=lambda rows: pad(rows, "right"))
    trainer.train()
    model.eval()
    held_out = labelled_set(200, seed=2)
    with torch.no_grad():
        for side in ("left", "right"):
            batch = pad(held_out, side)
            labels = batch.pop("labels")
            accuracy = (model(**batch).logits.argmax(-1) == labels).float().mean().item()
            print(f"sequence classification, {side} padding: accuracy {accuracy:.3f} (chance 0.5)")
            assert accuracy >= 0.9, (side, accuracy)
