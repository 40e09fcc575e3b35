"""Every source pretraining reads, as a user gives it: tables (.csv, .parquet, .arrow, a save_to_disk folder), token
ids ready to train (a token store folder, nanoGPT's flat .bin), streams; each bad input with its error; the token
store's size; and a --streaming run resumed exactly where it stopped, on one process and on two."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_weights, free_port, losses, make_corpus, tiny_args, write_txt

from minigpt.train.data import DataArguments, DataError, prepare_data
from minigpt.train.pretrain import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
REPO = Path(__file__).resolve().parents[1]
DOCS = make_corpus(120)


def prepare(tmp_path, data, **overrides):
    fields = dict(data=[str(p) for p in data], block_size=16, vocab_size=300, data_cache_dir=str(tmp_path / "cache"))
    return prepare_data(DataArguments(**{**fields, **overrides}), log=lambda *a: None)


def tables(tmp_path) -> dict[str, Path]:
    """The same documents as tables, the text in a `body` column beside an `id` column."""
    import datasets
    import pyarrow as pa

    table = datasets.Dataset.from_dict({"id": list(range(len(DOCS))), "body": DOCS})
    paths = {"jsonl": tmp_path / "corpus.jsonl", "csv": tmp_path / "corpus.csv",
             "parquet": tmp_path / "corpus.parquet", "arrow": tmp_path / "corpus.arrow", "saved": tmp_path / "saved"}  # fmt: skip
    table.to_json(paths["jsonl"])
    table.to_csv(paths["csv"])
    table.to_parquet(paths["parquet"])
    with pa.ipc.new_stream(str(paths["arrow"]), table.data.table.schema) as writer:
        writer.write_table(table.data.table)
    table.save_to_disk(str(paths["saved"]))
    return paths


def test_tables_give_the_documents_of_their_text_column(tmp_path):
    paths = tables(tmp_path)
    reference = prepare(tmp_path, [paths["jsonl"]], text_field="body")
    for kind in ("csv", "parquet", "arrow", "saved"):
        data = prepare(tmp_path, [paths[kind]], text_field="body")
        assert data.info["documents"] == reference.info["documents"], kind
        assert data.train["input_ids"] == reference.train["input_ids"], kind  # the same text, split and ids
    with pytest.raises(DataError, match=r"has no field 'text'; its fields are \['id', 'body'\].*--text_field"):
        prepare(tmp_path, [paths["parquet"]])
    empty = tmp_path / "empty.parquet"
    __import__("datasets").Dataset.from_dict({"text": ["", "  "]}).to_parquet(empty)
    with pytest.raises(DataError, match="No text found .*an empty column"):
        prepare(tmp_path, [empty])


def test_a_table_given_as_text_is_refused_not_trained_as_bytes(tmp_path):
    paths = tables(tmp_path)
    disguised = tmp_path / "corpus_parquet.txt"
    disguised.write_bytes(paths["parquet"].read_bytes())
    with pytest.raises(DataError, match=r"corpus_parquet.txt is not text: it holds a NUL byte.*\.parquet"):
        prepare(tmp_path, [disguised])
    with pytest.raises(DataError, match=r"Cannot read .*\.docx is none of"):
        (tmp_path / "notes.docx").write_bytes(b"PK\x03\x04")
        prepare(tmp_path, [tmp_path / "notes.docx"])


def test_the_token_store_holds_two_bytes_a_token_and_nothing_else_and_any_block_size_reads_it(tmp_path):
    corpus = write_txt(tmp_path / "corpus.txt", make_corpus(400))
    hf_datasets_cache = Path(os.environ["HF_HOME"]) / "datasets"
    before = sorted(hf_datasets_cache.rglob("*")) if hf_datasets_cache.exists() else []
    data = prepare(tmp_path, [corpus])
    store = Path(data.cache_dir)
    tokens = data.info["tokens"]["train"] + data.info["tokens"]["validation"]
    assert sorted(p.name for p in store.iterdir()) == ["info.json", "tokenizer", "train.bin", "validation.bin"]
    assert (store / "train.bin").stat().st_size == 2 * data.info["tokens"]["train"]  # uint16 ids
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert on_disk <= 1.2 * 2 * tokens + 200_000  # + the tokenizer files
    assert sorted(hf_datasets_cache.rglob("*")) == before if hf_datasets_cache.exists() else True  # no Arrow copies
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]
    wider = prepare(tmp_path, [corpus], block_size=32)
    assert wider.from_cache and wider.cache_dir == data.cache_dir and len(wider.train) == len(data.train) // 2

    # the store folder is itself a source: the same blocks, with its own tokenizer
    again = prepare(tmp_path, [store])
    assert again.train["input_ids"] == data.train["input_ids"]


def test_a_flat_token_file_trains_with_its_tokenizer_and_bad_ones_are_refused(tmp_path):
    corpus = write_txt(tmp_path / "corpus.txt", make_corpus(200))
    data = prepare(tmp_path, [corpus])
    store = Path(data.cache_dir)
    ids = np.fromfile(store / "train.bin", dtype=np.uint16)
    flat = tmp_path / "train.bin"
    ids.tofile(flat)  # nanoGPT's layout: one flat uint16 array
    blocks = prepare(tmp_path, [flat], tokenizer=str(store / "tokenizer"))
    assert len(blocks.train) + len(blocks.validation) == len(ids) // 16 or len(blocks.train) > 0
    assert blocks.train[0]["input_ids"].tolist() == ids[:16].tolist()
    with pytest.raises(DataError, match="needs the tokenizer that made it"):
        prepare(tmp_path, [flat])
    np.array([5, 70000 % 65536, 1000], dtype=np.uint16).tofile(tmp_path / "big.bin")
    with pytest.raises(DataError, match=r"holds the id 4464, beyond the vocabulary of --tokenizer \(300 tokens\)"):
        prepare(tmp_path, [tmp_path / "big.bin"], tokenizer=str(store / "tokenizer"))
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not a whole number of uint16 ids"):
        prepare(tmp_path, [tmp_path / "odd.bin"], tokenizer=str(store / "tokenizer"))


def test_a_hub_name_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"--dataset_name 'no-such/corpus' could not be loaded.*offline"):
        prepare_data(DataArguments(dataset_name="no-such/corpus", data_cache_dir=str(tmp_path)), log=lambda *a: None)


def streaming_args(corpus, out, *extra):
    return tiny_args(corpus, out, "--streaming", "--validation_documents", 10, "--tokenizer", "TOKENIZER", *extra)


@pytest.fixture(scope="module")
def stream_corpus(tmp_path_factory):
    """A .jsonl of 240 documents in 4 files, and a tokenizer for it (streams train with a given one)."""
    folder = tmp_path_factory.mktemp("stream")
    docs = make_corpus(240, seed=3)
    for part in range(4):
        with open(folder / f"part{part}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs[part::4])
    data = prepare_data(DataArguments(data=[str(folder)], vocab_size=300, block_size=16,
                                      data_cache_dir=str(folder.parent / "stream-cache")), log=lambda *a: None)  # fmt: skip
    return folder, str(Path(data.cache_dir) / "tokenizer")


def with_tokenizer(argv, tokenizer):
    return [tokenizer if a == "TOKENIZER" else a for a in argv]


def test_streaming_trains_and_resumes_exactly_where_it_stopped(stream_corpus, tmp_path):
    folder, tokenizer = stream_corpus
    common = ("--max_steps", 8, "--save_every", 0, "--dropout", 0.1)
    main(with_tokenizer(streaming_args(folder, tmp_path / "whole", *common), tokenizer))
    main(with_tokenizer(streaming_args(folder, tmp_path / "cut", *common, "--stop_at_step", 3), tokenizer))
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-3" / "stream-rank0.json").read_text())
    assert state["position"] is not None and state["world"] == 1
    main(["--resume", str(tmp_path / "cut")])
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # bit for bit, the same blocks after the resume
    assert_same_weights(tmp_path / "cut", tmp_path / "whole")


@pytest.mark.slow
def test_streaming_on_two_ranks_reads_each_its_part_and_resumes_exactly(stream_corpus, tmp_path):
    folder, tokenizer = stream_corpus

    def launch(*argv):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "minigpt.train.pretrain", *map(str, argv)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc.stdout

    common = ("--max_steps", 6, "--save_every", 0)
    text = launch(*with_tokenizer(streaming_args(folder, tmp_path / "whole", *common), tokenizer))
    assert "x 2 processes" in text and "validation is its first 10 documents" in text
    launch(*with_tokenizer(streaming_args(folder, tmp_path / "cut", *common, "--stop_at_step", 2), tokenizer))
    step = tmp_path / "cut" / "checkpoints" / "step-2"
    assert {json.loads((step / f"stream-rank{r}.json").read_text())["rank"] for r in (0, 1)} == {0, 1}
    launch("--resume", tmp_path / "cut")
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert_same_weights(tmp_path / "cut", tmp_path / "whole")


def test_a_hub_dataset_trains_prepared_and_streamed(hub, tmp_path):
    """run_clm's --dataset_name (and --dataset_config_name/--dataset_split) against the project's local Hub server."""
    from hub_server import hub_env, push_dataset

    records = "".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(make_corpus(120, seed=5)))
    push_dataset(hub, "alice/tiny-corpus", {"data/train.jsonl": records.encode()})
    env = hub_env(hub, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", HF_HOME=str(tmp_path / "hf"),
                  OMP_NUM_THREADS="1")  # fmt: skip
    for mode in ([], ["--streaming", "--validation_documents", "10"]):
        out = tmp_path / f"out{len(mode)}"
        argv = tiny_args("UNUSED", out, "--max_steps", 2, "--dataset_name", "alice/tiny-corpus", *mode)
        argv = [a for i, a in enumerate(argv) if a != "--data" and (i == 0 or argv[i - 1] != "--data")]
        proc = subprocess.run([sys.executable, "-m", "minigpt.train.pretrain", *map(str, argv)], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert (out / "model.safetensors").is_file()
    assert "streaming alice/tiny-corpus: validation is its first 10 documents" in proc.stdout
    missing = subprocess.run([sys.executable, "-m", "minigpt.train.pretrain", "--dataset_name", "alice/absent",
                              "--output_dir", str(tmp_path / "x"), "--cpu"], capture_output=True, text=True, env=env,
                             timeout=600)  # fmt: skip
    assert missing.returncode == 1 and "--dataset_name 'alice/absent' could not be loaded" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_sources_of_every_kind_mix_and_a_streamed_csv_finds_its_column(tmp_path):
    """.csv and pandas-written .parquet give `large_string` columns where .txt and .jsonl give `string`; a streamed
    .csv knows its columns only once read."""
    paths = tables(tmp_path)
    text = write_txt(tmp_path / "more.txt", make_corpus(30, seed=9))
    mixed = prepare(tmp_path, [paths["csv"], paths["parquet"], text], text_field="body")
    assert sum(mixed.info["documents"].values()) == 2 * len(DOCS) + 30
    stream = prepare(tmp_path, [paths["csv"]], text_field="body", streaming=True, validation_documents=5,
                     tokenizer=str(Path(mixed.cache_dir) / "tokenizer"))  # fmt: skip
    assert next(stream.train.blocks()).shape == (16,)
    with pytest.raises(DataError, match=r"has no field 'text'; its fields are \['id', 'body'\]"):
        prepare(tmp_path, [paths["csv"]], streaming=True, tokenizer=str(Path(mixed.cache_dir) / "tokenizer"))
