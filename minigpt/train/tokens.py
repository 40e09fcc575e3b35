"""Token ids on disk and the blocks cut from them when read.

A prepared corpus is a token store: a folder with one flat file of ids per split (`train.bin`, `validation.bin`:
every document's ids followed by EOS, uint16 where the vocabulary fits in 65,536 ids, else uint32), the tokenizer
and `info.json`. nanoGPT's `train.bin` is the same layout. Blocks are cut when the file is read (TokenBlocks), so a
new --block_size reads the same files, and nothing but the ids themselves is kept: about 2 bytes per token.
"""

import itertools
import json
import math
import os
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

STORE_FORMAT = "minigpt-token-store-1"  # info.json's "format": what marks a folder as a token store
SPLITS = ("train", "validation")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id of the vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@contextmanager
def tokenizer_threads():
    """Let a fast tokenizer's batch encoding use every core it is given (its Rust thread pool): TOKENIZERS_PARALLELISM
    is often set to false against forked workers, and nothing forks while the corpus is tokenized."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def encode_documents(tokenizer, texts: list[str]) -> np.ndarray:
    """The documents' ids, each followed by EOS, as one flat int64 array."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    return np.fromiter(itertools.chain.from_iterable(d + eos for d in ids), dtype=np.int64)


def write_token_file(path: Path, batches: Iterable[list[str]], tokenizer, dtype: np.dtype) -> int:
    """Tokenize batches of documents into the flat file `path`; returns the number of tokens written."""
    count = 0
    with tokenizer_threads(), open(path, "wb") as f:
        for texts in batches:
            ids = encode_documents(tokenizer, texts)
            f.write(ids.astype(dtype).tobytes())
            count += len(ids)
    return count


def read_token_file(path: str | Path, dtype: np.dtype | str) -> np.ndarray:
    """A flat token file as a read-only memory map (nothing is loaded until read)."""
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


def max_token_id(tokens: np.ndarray, chunk: int = 1 << 26) -> int:
    """The largest id of a token array, read chunk by chunk (a memory map of any size)."""
    return max((int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk)), default=-1)


def write_info(folder: Path, info: dict) -> None:
    (folder / "info.json").write_text(json.dumps({"format": STORE_FORMAT, **info}, indent=1))


def is_token_store(folder: str | Path) -> bool:
    info = Path(folder) / "info.json"
    return info.is_file() and json.loads(info.read_text()).get("format") == STORE_FORMAT


class TokenBlocks:
    """The consecutive `block_size`-token blocks of a flat token array (a memory map or an in-memory array); the tail
    shorter than a block is left out. Read as a datasets.Dataset of `input_ids` rows is: len(blocks), blocks[i],
    blocks[[i, j, ...]] or blocks[a:b] (a dict whose input_ids is an int64 array of shape (n, block_size)),
    blocks["input_ids"] (every block, as lists) and blocks.iter(batch_size)."""

    column_names = ["input_ids"]

    def __init__(self, tokens: np.ndarray, block_size: int):
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def __getitem__(self, key):
        if isinstance(key, str):  # the column: "input_ids"
            return self[np.arange(len(self))]["input_ids"].tolist()
        if isinstance(key, (int, np.integer)):
            start = int(key) * self.block_size
            return {"input_ids": np.asarray(self.tokens[start : start + self.block_size], dtype=np.int64)}
        rows = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)  # (n,)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"block index out of range for {len(self)} blocks")
        positions = rows[:, None] * self.block_size + np.arange(self.block_size)  # (n, block_size)
        return {"input_ids": np.asarray(self.tokens[positions], dtype=np.int64)}

    def with_format(self, kind: str | None = None) -> "TokenBlocks":
        return self  # rows are numpy already

    def iter(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self[np.arange(start, min(start + batch_size, len(self)))]


@dataclass
class PreparedData:
    train: "TokenBlocks | StreamBlocks"  # noqa: F821  (rows of block_size token ids; a stream with --streaming)
    validation: TokenBlocks
    tokenizer: PreTrainedTokenizerBase
    cache_dir: str
    from_cache: bool
    info: dict  # sources, document and token counts, unigram perplexity of the validation split


def unigram_perplexity(blocks, vocab_size: int) -> float:
    """Perplexity of the split's own unigram distribution over the tokens a causal LM predicts (each block's 1:).

    It is the lowest perplexity any context-free model reaches on this split, so it is the bar to beat.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in blocks.with_format("numpy").iter(batch_size=1024):
        counts += np.bincount(np.asarray(batch["input_ids"])[:, 1:].ravel(), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(math.exp(-(p * np.log(p)).sum()))
