"""Data for the local lm-eval tasks in this folder: minigpt/train/examples/qa.jsonl as 4-way multiple choice (the
right answer plus the next three answers in the file), read from disk, so nothing is fetched from the Hub."""

import json
from pathlib import Path

import datasets

QA = Path(__file__).resolve().parents[2] / "minigpt" / "train" / "examples" / "qa.jsonl"


def load_qa(**kwargs) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in QA.read_text().splitlines() if line.strip()]
    answers = [row["answer"] for row in rows]
    docs = []
    for i, row in enumerate(rows):
        wrong = [answers[(i + k) % len(answers)] for k in (1, 2, 3)]
        label = i % 4  # the right answer takes each position in turn
        choices = wrong[:label] + [row["answer"]] + wrong[label:]
        docs.append({"question": row["question"], "choices": choices, "label": label})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
