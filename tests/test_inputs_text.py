"""Text data from outside: empty files, one enormous line, binary files, mixed encodings, 10k tiny files. None may
crash deep inside a library; each is read whole, skipped with a warning, or refused with a clear error.
"""

import os

import pytest
from conftest import make_corpus, write_txt

from minigpt.train.data import DataArguments, DataError, load_documents, prepare_data, resolve_data_files


def prepare(tmp_path, data, **overrides):
    fields = dict(data=[str(p) for p in data], block_size=32, vocab_size=300, data_cache_dir=str(tmp_path / "cache"))
    return prepare_data(DataArguments(**{**fields, **overrides}), log=lambda *a: None)


def test_empty_and_blank_files_are_skipped_with_a_warning_or_refused(tmp_path):
    (tmp_path / "d").mkdir()
    good = write_txt(tmp_path / "d" / "good.txt", make_corpus(30))
    for name in ("empty.txt", "empty.jsonl", "sub/empty.txt"):
        (tmp_path / "d" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "d" / name).write_text("")
    (tmp_path / "d" / "blank.txt").write_text("\n \n\t\n\n")
    with pytest.warns(UserWarning, match="Skipping the empty file") as caught:
        files = resolve_data_files([str(tmp_path / "d")])
    assert len(caught) == 3 and files == sorted([str(good), str(tmp_path / "d" / "blank.txt")])
    with pytest.warns(UserWarning, match="Skipping the empty file"):
        data = prepare(tmp_path, [tmp_path / "d"])
    assert data.info["documents"]["train"] + data.info["documents"]["validation"] == 30  # blank lines add nothing

    with pytest.raises(DataError, match="only blank lines"):
        load_documents([str(tmp_path / "d" / "blank.txt")])
    with pytest.warns(UserWarning), pytest.raises(DataError, match="Every data file is empty"):
        resolve_data_files([str(tmp_path / "d" / "empty.txt"), str(tmp_path / "d" / "empty.jsonl")])


def test_an_enormous_single_line_is_one_whole_document(tmp_path):
    """25 MB on one line (a minified dump, a log without newlines), as .txt in every text_unit and as .jsonl: one
    document, neither truncated nor split at the reader's 10 MB chunks."""
    import json

    line = "word " * 5_000_000 + "END"
    txt = tmp_path / "one.txt"
    txt.write_text(f"first\n{line}\nlast\n")
    jsonl = tmp_path / "one.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("first", line, "last")))
    for path, unit in ((txt, "line"), (txt, "paragraph"), (txt, "document"), (jsonl, "paragraph")):
        docs = load_documents([str(path)], text_unit=unit)["text"]
        longest = max(docs, key=len)
        assert line in longest, (path.name, unit)
        assert len(docs) == (3 if unit == "line" or path == jsonl else 1), (path.name, unit)


def test_an_enormous_line_without_spaces_trains_and_packs(tmp_path):
    """500 kB of base64 on one line: one "word" for the BPE trainer and the tokenizer, which must cope."""
    import base64

    blob = base64.b64encode(os.urandom(375_000)).decode()
    path = write_txt(tmp_path / "blob.txt", make_corpus(60) + [blob])
    data = prepare(tmp_path, [path], split_seed=1)
    assert len(data.train) * 32 > len(blob) / 4  # the blob is in there, as thousands of blocks
    assert all(len(row) == 32 for row in data.train[:5]["input_ids"])


def test_binary_and_utf16_files_are_refused_and_mixed_encodings_decoded_with_replacement_and_a_warning(tmp_path):
    binary = tmp_path / "dump.txt"
    binary.write_bytes(bytes(range(256)) * 40 + os.urandom(20_000))  # NULs, control bytes, invalid UTF-8
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(
        "naïve café, 日本語\n\n".encode("utf-8")
        + "crème brûlée\n\n".encode("latin-1")
        + "こんにちは\n\n".encode("shift_jis")
        + "5 € only\n\n".encode("cp1252")
    )
    utf16 = tmp_path / "windows.txt"
    utf16.write_text("\n\n".join(make_corpus(5)), encoding="utf-16")
    good = write_txt(tmp_path / "good.txt", make_corpus(40))
    for path in (binary, utf16):  # NUL bytes: trained on, they would be U+FFFD and NULs, not text
        with pytest.raises(DataError, match=f"{path.name} is not text: it holds a NUL byte.*iconv -f utf-16"):
            load_documents([str(path)])
    with pytest.warns(UserWarning, match="mixed.txt is not valid UTF-8 .*replacement characters"):
        docs = load_documents([str(mixed)])["text"]
    assert docs[0] == "naïve café, 日本語" and "\ufffd" in "".join(docs)  # the valid UTF-8 survives intact
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        data = prepare(tmp_path, [mixed, good])
    assert len(data.train) > 0 and data.tokenizer.decode(data.train[0]["input_ids"])


def test_a_folder_of_10k_tiny_files_loads_every_one(tmp_path):
    folder = tmp_path / "many"
    for i in range(10_000):
        sub = folder / f"part{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"note{i:05d}.txt").write_text(f"note {i}: the king spoke to the queen.\n")
    data = prepare(tmp_path, [folder])
    assert len(data.info["files"]) == 10_000
    assert data.info["documents"]["train"] + data.info["documents"]["validation"] == 10_000
    assert prepare(tmp_path, [folder]).from_cache  # the second run skips the work
