"""Prompt/answer pairs as labelled token rows, shared by fine-tuning (minigpt/train/finetune.py) and evaluation
(minigpt/train/evaluation.py), which must build a prompt the same way at training and at generation time.

    [BOS] prompt_template with {prompt} = prompt, + separator | answer EOS

Labels are -100 on everything left of the bar (and on padding), so only the answer and its EOS are learned or
scored. The template travels in the checkpoint folder as `prompt_template.json`.
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

TEMPLATE_FILE = "prompt_template.json"

# A shell passes "\nA:" on as backslash, n, A, colon (bash interprets escapes only in $'...'), and so does a plain
# or single-quoted YAML scalar: the template options take \n, \t and \\ as the characters, so that the README's
# --separator "\nA:" means a newline, as a Python user would read it.
ESCAPES_HELP = r"Write a newline as \n, a tab as \t and a backslash as \\."
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str | None) -> str | None:
    """The template option `text` with its escapes \\n, \\t and \\\\ turned into newline, tab and backslash; any other
    backslash is kept as it is."""
    if text is None:
        return None
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


@dataclass
class PromptTemplate:
    """How a (prompt, answer) pair becomes tokens; `save`/`load` carry it in the checkpoint folder."""

    prompt_template: str = "{prompt}"
    separator: str = "\n"
    add_bos: bool = True

    def __post_init__(self):
        if "{prompt}" not in self.prompt_template:
            raise ValueError(
                f"prompt_template={self.prompt_template!r} has no '{{prompt}}' placeholder; write where the prompt "
                "goes, e.g. --prompt_template 'English: {prompt}'."
            )

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
        text = self.prompt_template.replace("{prompt}", prompt) + self.separator
        bos = [tokenizer.bos_token_id] if self.add_bos and tokenizer.bos_token_id is not None else []
        return bos + tokenizer.encode(text, add_special_tokens=False)

    def answer_ids(self, tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
        return tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]

    def save(self, folder: str | os.PathLike):
        (Path(folder) / TEMPLATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "PromptTemplate | None":
        path = Path(folder) / TEMPLATE_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    prompt,
    answer,
    max_length: int,
    truncation: str = "left",
    row: int | str = "?",
) -> tuple[list[int], list[int], bool]:
    """Token ids and labels of one pair; labels are -100 on the prompt. Returns (input_ids, labels, truncated)."""
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise ValueError(
            f"Row {row}: prompt and answer must be strings, got {type(prompt).__name__} and "
            f"{type(answer).__name__}; fix the row or pick other fields with --prompt_field/--answer_field."
        )
    if not answer.strip():
        raise ValueError(f"Row {row}: the answer is empty, so there is nothing to learn; drop the row or fill it in.")
    prompt_ids = template.prompt_ids(tokenizer, prompt)
    answer_ids = template.answer_ids(tokenizer, answer)
    excess = len(prompt_ids) + len(answer_ids) - max_length
    truncated = excess > 0
    if truncated:
        if truncation != "left":
            raise ValueError(
                f"Row {row}: prompt ({len(prompt_ids)} tokens) + answer ({len(answer_ids)}) exceed max_length="
                f"{max_length}. Shorten the row, raise --max_length (up to the model's context), or pass "
                "--truncation left to drop the start of long prompts."
            )
        keep_bos = 1 if template.add_bos and tokenizer.bos_token_id is not None else 0
        if len(prompt_ids) - keep_bos - excess < 1:
            raise ValueError(
                f"Row {row}: the answer alone is {len(answer_ids)} tokens (with EOS) and does not fit in "
                f"max_length={max_length} with at least one prompt token; shorten the answer or raise --max_length."
            )
        prompt_ids = prompt_ids[:keep_bos] + prompt_ids[keep_bos + excess :]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids, truncated


PROMPT_NAMES = ("prompt", "question", "input", "instruction", "query", "source")
ANSWER_NAMES = ("answer", "output", "response", "completion", "target")


def pair_fields(columns: list[str], args=None) -> tuple[str, str] | None:
    """The (prompt, answer) field names when a .jsonl's fields look like pairs, else None. `args` may name the
    fields (prompt_field, answer_field); the common names (PROMPT_NAMES x ANSWER_NAMES) are tried after them."""
    names = [(args.prompt_field, args.answer_field)] if args is not None else []
    for prompt, answer in names + [(p, a) for p in PROMPT_NAMES for a in ANSWER_NAMES]:
        if prompt in columns and answer in columns:
            return prompt, answer
    if len(columns) == 2:  # q/a, en/fr, src/tgt: two fields are a pair, the first one the prompt
        return columns[0], columns[1]
    return None


def text_field_error(name: str, text_field: str, columns: list[str], pairs_mode: str, args=None) -> ValueError:
    """The error of a .jsonl without the text field; where its fields look like pairs, it says how to read them as
    pairs (`pairs_mode`: the option that does, --mode supervised in finetune, --mode pairs in evaluation)."""
    pair = pair_fields(columns, args)
    if pair:
        return ValueError(
            f"{name} has no field {text_field!r} but looks like prompt/answer pairs (fields: {columns}). Read it as "
            f"pairs with {pairs_mode} --prompt_field {pair[0]} --answer_field {pair[1]}; or, for plain text, pass "
            "--text_field."
        )
    return ValueError(f"{name} has no field {text_field!r}; its fields are {columns}. Pass --text_field.")


@dataclass
class SupervisedCollator:
    """Right-pads a batch of supervised rows: input_ids with the pad id, labels with -100, attention_mask 0.

    Labels are padded by position, so an answer's EOS stays a target even where the pad id is EOS itself.
    Not transformers' DataCollatorForSeq2Seq, which pads labels the same way but on the tokenizer's padding_side:
    a tokenizer saved for batched generation says "left", and these rows are right-padded whatever it says.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            T = math.ceil(T / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in rows:
            n = T - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * n)
            batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * n)
            batch["labels"].append(list(r["labels"]) + [-100] * n)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}  # each (B, T)
