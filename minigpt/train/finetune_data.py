"""Fine-tuning data (minigpt/train/finetune.py): its arguments, reading a file, tokenizing it in causal or supervised
mode, and the causal collator. The prompt template, the label masking of pairs and their collator are in pairs.py,
shared with evaluation.py.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import DataCollatorWithPadding

from minigpt.train.chat import check_messages, encode_conversation
from minigpt.train.corpus import read_rows
from minigpt.train.pairs import ESCAPES_HELP, PromptTemplate, encode_pair, text_field_error, unescape

logger = logging.getLogger("minigpt.train.finetune")
MODES = ("causal", "supervised", "chat")


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": ".txt or .jsonl (causal), .jsonl (supervised)."})
    validation_file: str | None = field(default=None, metadata={"help": "Held-out file in the same format."})
    validation_split_percentage: float = field(
        default=0.0, metadata={"help": "Percent of train_file held out for evaluation when no validation_file."}
    )
    mode: str = field(
        default="causal",
        metadata={"help": "causal (plain text), supervised (prompt/answer pairs) or chat (conversations: .jsonl "
                  "records {'messages': [{'role', 'content'}, ...]}, TRL's format; found by itself in a .jsonl)."},
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Tokens per training row (the block size when packing); default: the "
                                "model's context (n_positions)."}
    )
    text_field: str = field(default="text", metadata={"help": "causal .jsonl: the field holding the text."})
    packing: bool = field(
        default=True, metadata={"help": "causal: concatenate documents (EOS between) into full blocks; "
                                "false: one row per document, truncated and padded."}
    )
    prompt_field: str = field(default="prompt", metadata={"help": "supervised: the field holding the prompt."})
    answer_field: str = field(default="answer", metadata={"help": "supervised: the field holding the answer."})
    prompt_template: str = field(
        default="{prompt}",
        metadata={"help": "supervised: how a prompt is written, must contain {prompt}. " + ESCAPES_HELP},
    )
    separator: str = field(
        default="\n", metadata={"help": "supervised: text between prompt and answer. It ends the prompt (prompt and "
                                "answer are tokenized apart), so prefer a newline or ':' to a trailing space. "
                                + ESCAPES_HELP}
    )
    add_bos: bool = field(
        default=True, metadata={"help": "supervised: start each row with the BOS token; the saved tokenizer then adds "
                                "it to every text it encodes (add_special_tokens=False leaves it out)."}
    )
    truncation: str = field(
        default="left",
        metadata={"help": "supervised, for a row longer than max_length: 'left' drops the start of the prompt "
                  "(with a warning), 'error' refuses."},
    )


def template_of(args: DataArguments) -> PromptTemplate:
    return PromptTemplate(args.prompt_template, args.separator, args.add_bos)


@dataclass
class CausalCollator(DataCollatorWithPadding):
    """Pads a batch of causal rows (transformers' DataCollatorWithPadding) and makes every real token a target:
    labels are the input ids, -100 where attention_mask is 0.

    Padding is masked by position, not by id. DataCollatorForLanguageModeling masks every label equal to
    pad_token_id, and a tokenizer without a pad token (every GPT-2-style one) pads with EOS: every EOS, the one that
    ends a document too, would then be masked, and the model would never learn to stop.
    """

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__([{"input_ids": r["input_ids"]} for r in rows])  # input_ids, attention_mask (B, T)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch


def check_data_file(path: str, mode: str, option: str = "--train_file") -> None:
    """Refuse, before anything is loaded, a data file that does not exist, is a folder or has a suffix this mode
    cannot read."""
    wanted = {"causal": ".txt, .jsonl or .json", "supervised": ".jsonl or .json with prompt and answer fields",
              "chat": ".jsonl or .json with a messages field"}.get(mode, ".jsonl or .json")  # fmt: skip
    if Path(path).is_dir():
        raise IsADirectoryError(
            f"{option} {path} is a folder; fine-tuning takes one {wanted} file (minigpt-pretrain is the one that "
            "reads folders)."
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option} {path}: no such file; pass an existing {wanted} file.")
    suffix = Path(path).suffix
    if not ((suffix == ".txt" and mode == "causal") or suffix in (".jsonl", ".json")):
        raise ValueError(f"{path}: cannot read a {suffix or 'suffix-less'} file in {mode} mode; pass a {wanted} file.")


def load_rows(path: str, mode: str, option: str = "--train_file") -> datasets.Dataset:
    """Read a data file into a Dataset: .txt -> one row per paragraph in `text`, .jsonl/.json -> one per record."""
    check_data_file(path, mode, option)
    return read_rows(path, text_unit="paragraph")


def tokenize_supervised(rows: datasets.Dataset, tokenizer, template: PromptTemplate, args: DataArguments,
                        max_length: int, name: str) -> datasets.Dataset:
    for key in (args.prompt_field, args.answer_field):
        if key not in rows.column_names:
            raise ValueError(
                f"{name} has no field {key!r}; its fields are {rows.column_names}. Name the prompt and answer fields "
                "with --prompt_field and --answer_field."
            )

    def encode(i, row):
        return encode_pair(tokenizer, template, row[args.prompt_field], row[args.answer_field], max_length,
                           args.truncation, row=f"{i + 1} of {name}")  # fmt: skip

    return labelled_rows(rows, encode, f"rows of {name}", "their prompts lost tokens on the left", max_length)


def labelled_rows(rows: datasets.Dataset, encode, what: str, lost: str, max_length: int) -> datasets.Dataset:
    """Rows of input_ids and labels, `encode(index, row)` giving each (ids, labels, truncated); warns how many were
    longer than max_length and what they `lost`."""

    def encode_batch(batch, indices):
        out = {"input_ids": [], "labels": [], "truncated": []}
        for n, i in enumerate(indices):
            ids, labels, truncated = encode(i, {key: values[n] for key, values in batch.items()})
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["truncated"].append(truncated)
        return out

    encoded = rows.map(encode_batch, batched=True, with_indices=True, remove_columns=rows.column_names)
    truncated = sum(encoded["truncated"])
    if truncated:
        logger.warning("%d of %d %s were longer than max_length=%d; %s.", truncated, len(encoded), what, max_length,
                       lost)  # fmt: skip
    return encoded.remove_columns("truncated")


def tokenize_causal(rows: datasets.Dataset, tokenizer, args: DataArguments, max_length: int, name: str):
    if args.text_field not in rows.column_names:
        raise text_field_error(name, args.text_field, rows.column_names, "--mode supervised", args)
    eos = tokenizer.eos_token_id

    def encode(batch):
        docs = [tokenizer.encode(t, add_special_tokens=False) + [eos] for t in batch[args.text_field] if t.strip()]
        if not args.packing:
            return {"input_ids": [d[:max_length] for d in docs]}
        # pack: one stream of documents separated by EOS, cut into max_length blocks (the tail block is shorter)
        stream = [t for d in docs for t in d]
        return {"input_ids": [stream[i : i + max_length] for i in range(0, len(stream), max_length)]}

    encoded = rows.map(encode, batched=True, batch_size=10_000, remove_columns=rows.column_names)
    if len(encoded) == 0:
        raise ValueError(f"{name} holds no text; fill the file or pick the right --text_field.")
    return encoded


def check_data_args(args: DataArguments) -> None:
    """Every data argument that can be checked without the model or the tokenizer, checked before either loads.
    The template options take the escapes \\n, \\t and \\\\ (see ESCAPES_HELP): they are turned into the characters here.
    Conversations (records with a `messages` field) given in the default causal mode switch it to chat."""
    if args.mode not in MODES:
        raise ValueError(f"--mode {args.mode!r} is unknown; use causal (plain text), supervised (pairs) or chat.")
    if args.mode == "causal" and args.train_file and holds_conversations(args.train_file):
        logger.info("%s holds conversations ('messages' records): fine-tuning in chat mode", args.train_file)
        args.mode = "chat"
    if args.truncation not in ("left", "error"):
        raise ValueError(f"--truncation {args.truncation!r} is unknown; use left or error.")
    if args.train_file is None:
        raise ValueError("No --train_file; pass the text (causal) or the .jsonl pairs (supervised) to train on.")
    check_data_file(args.train_file, args.mode, "--train_file")
    if args.validation_file:
        check_data_file(args.validation_file, args.mode, "--validation_file")
    args.prompt_template, args.separator = unescape(args.prompt_template), unescape(args.separator)
    template_of(args)  # a template without {prompt} is refused now


def holds_conversations(path: str) -> bool:
    """Whether the first record of a .jsonl file has a `messages` field."""
    if not str(path).endswith(".jsonl") or not Path(path).is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return isinstance(record := json.loads(first), dict) and "messages" in record
    except ValueError:
        return False


def tokenize_chat(rows: datasets.Dataset, tokenizer, max_length: int, name: str) -> datasets.Dataset:
    if "messages" not in rows.column_names:
        raise ValueError(f"{name} has no field 'messages'; its fields are {rows.column_names}. Chat mode reads TRL's "
                         "conversational format: {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}.")  # fmt: skip

    def encode(i, row):
        check_messages(row["messages"], f"{i + 1} of {name}")
        return encode_conversation(tokenizer, row["messages"], max_length)

    return labelled_rows(rows, encode, f"conversations of {name}", "they lost their first tokens", max_length)


def build_datasets(args: DataArguments, tokenizer, max_length: int, seed: int):
    """(train, eval or None), tokenized: rows of input_ids (and labels in supervised mode)."""
    train_rows = load_rows(args.train_file, args.mode)
    eval_rows = load_rows(args.validation_file, args.mode, "--validation_file") if args.validation_file else None
    if eval_rows is None and args.validation_split_percentage > 0:
        split = train_rows.train_test_split(test_size=args.validation_split_percentage / 100, seed=seed)
        train_rows, eval_rows = split["train"], split["test"]

    def tokenize(rows, name):
        if args.mode == "causal":
            return tokenize_causal(rows, tokenizer, args, max_length, name)
        if args.mode == "chat":
            return tokenize_chat(rows, tokenizer, max_length, name)
        return tokenize_supervised(rows, tokenizer, template_of(args), args, max_length, name)

    train = tokenize(train_rows, args.train_file)
    evaluation = tokenize(eval_rows, args.validation_file or "the validation split") if eval_rows else None
    return train, evaluation
