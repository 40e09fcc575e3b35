"""--streaming: pretraining data read, tokenized and packed while training, with nothing prepared ahead.

    source (files, tables, a Hub dataset)  --datasets, streaming-->  documents
        first --validation_documents  -->  the validation split, tokenized into memory once (every process)
        the rest  --split_dataset_by_node-->  this process's documents  --tokenize-->  ids, EOS after each
                  --pack-->  block_size blocks, the remainder carried to the next documents

The first step comes as soon as the first documents are read, whatever the corpus size. A checkpoint saves each
process's position (`StreamBlocks.state`: datasets' own state_dict of the stream, plus the tokens read but not yet
in a block), and --resume continues exactly there. Streams are read in order, not shuffled: shuffle the corpus
beforehand where its order is not random.
"""

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from minigpt.train.corpus import DataError, load_documents, load_hub_documents, resolve_data_files
from minigpt.train.tokenizer import load_tokenizer, train_tokenizer
from minigpt.train.tokens import PreparedData, TokenBlocks, encode_documents, tokenizer_threads, unigram_perplexity

DOCUMENTS_PER_READ = 64  # documents tokenized at a time
TOKENIZER_MB = 20  # at most this much of the stream trains the BPE, so that the first step comes within seconds


class StreamBlocks:
    """The training blocks of a document stream, for one process of `world` once `shard`ed; `blocks()` yields them
    (int64 arrays of block_size ids) for ever, epoch after epoch."""

    def __init__(self, make_documents: Callable, tokenizer, block_size: int, rank: int = 0, world: int = 1):
        self.make_documents, self.tokenizer, self.block_size = make_documents, tokenizer, block_size
        self.rank, self.world = rank, world
        self.epoch, self.buffer, self.position = 0, np.empty(0, dtype=np.int64), None
        self.documents = self._open()

    def shard(self, rank: int, world: int, checkpoint: Path | None = None) -> "StreamBlocks":
        """This process's share of the stream (datasets' split_dataset_by_node: whole files where there are enough,
        else every world-th document), at the position a checkpoint saved, if given."""
        stream = StreamBlocks(self.make_documents, self.tokenizer, self.block_size, rank, world)
        if checkpoint is not None:
            path = Path(checkpoint) / f"stream-rank{rank}.json"
            if not path.is_file():
                raise SystemExit(f"pretrain: error: cannot resume the stream from {checkpoint}: it has no {path.name} "
                                 "(it was not a --streaming run, or had fewer processes).")  # fmt: skip
            stream.restore(json.loads(path.read_text()))
        return stream

    def _open(self):
        from datasets.distributed import split_dataset_by_node

        documents = self.make_documents()
        return split_dataset_by_node(documents, self.rank, self.world) if self.world > 1 else documents

    def blocks(self) -> Iterator[np.ndarray]:
        while True:
            for batch in self.documents.iter(batch_size=DOCUMENTS_PER_READ):
                ids = encode_documents(self.tokenizer, batch["text"])
                self.buffer = np.concatenate([self.buffer, ids])
                self.position = self.documents.state_dict()  # after these documents
                while len(self.buffer) >= self.block_size:
                    block, self.buffer = self.buffer[: self.block_size], self.buffer[self.block_size :]
                    yield block
            self.epoch += 1  # the stream is read again from its start (a restored position holds for one pass)
            self.documents, self.position = self._open(), None

    def state(self) -> dict:
        """Where this process is: the stream's position after the documents read, and their tokens not yet in a
        block. JSON-serialisable; `restore` continues exactly there."""
        return {"rank": self.rank, "world": self.world, "epoch": self.epoch, "position": self.position,
                "buffer": self.buffer.tolist()}  # fmt: skip

    def restore(self, state: dict) -> None:
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise SystemExit(
                f"pretrain: error: the checkpoint's stream was read by process {state['rank']} of {state['world']}, "
                f"and this is process {self.rank} of {self.world}: resume a --streaming run with as many processes."
            )
        self.epoch, self.buffer = state["epoch"], np.asarray(state["buffer"], dtype=np.int64)
        self.documents, self.position = self._open(), state["position"]
        if self.position is not None:
            self.documents.load_state_dict(self.position)


def prepare_stream(args, cache_root: Path, log=print):
    """PreparedData for --streaming: the validation split read now (the first --validation_documents documents),
    the training stream opened but not read. Without --tokenizer, a BPE is trained on the first
    --tokenizer_train_mb MB of the training stream and kept in the cache for the other processes and later runs."""

    files = [] if args.dataset_name else resolve_data_files(args.data or [])
    if not files and not args.dataset_name:
        raise DataError("--streaming reads --data or --dataset_name; the built-in corpus is prepared, not streamed.")

    def documents():
        if args.dataset_name:
            return load_hub_documents(args, streaming=True)
        return load_documents(files, args.text_field, args.text_unit, streaming=True)

    n_val = args.validation_documents
    held_out = [row["text"] for row in documents().take(n_val)]
    if len(held_out) < n_val:
        raise DataError(f"The stream has {len(held_out)} documents, not more than --validation_documents {n_val}: "
                        "nothing would be left to train on. Lower --validation_documents or add text.")  # fmt: skip

    def training_documents():
        return documents().skip(n_val)

    tokenizer = stream_tokenizer(args, files, training_documents, cache_root, log)
    with tokenizer_threads():
        validation = TokenBlocks(encode_documents(tokenizer, held_out), args.block_size)
    if len(validation) == 0:
        raise DataError(f"The first {n_val} documents hold fewer tokens than one block of block_size="
                        f"{args.block_size}: raise --validation_documents or lower --block_size.")  # fmt: skip
    source = args.dataset_name or ", ".join(files)
    log(f"streaming {source}: validation is its first {n_val} documents ({len(validation)} blocks), held out of "
        "training; training reads the rest, tokenizing and packing as it goes")  # fmt: skip
    info = {"files": files or [source], "corpus": "user", "streaming": True, "documents": {"validation": n_val},
            "tokens": {"validation": len(validation.tokens)}, "blocks": {"validation": len(validation)},
            "vocab_size": len(tokenizer),
            "unigram_perplexity_validation": unigram_perplexity(validation, len(tokenizer))}  # fmt: skip
    train = StreamBlocks(training_documents, tokenizer, args.block_size)
    return PreparedData(train, validation, tokenizer, str(cache_root), False, info)


def stream_tokenizer(args, files: list[str], training_documents: Callable, cache_root: Path, log):
    """--tokenizer, or a BPE trained on the start of the training stream, cached by source and settings."""
    if args.tokenizer:
        return load_tokenizer(str(Path(args.tokenizer).expanduser()))
    key = hashlib.sha256(json.dumps([files, args.dataset_name, args.dataset_config_name, args.dataset_split,
                                     args.text_field, args.text_unit, args.validation_documents, args.vocab_size,
                                     args.tokenizer_train_mb]).encode()).hexdigest()[:16]  # fmt: skip
    folder = cache_root / f"stream-tokenizer-{key}"
    if (folder / "tokenizer.json").is_file():
        log(f"Using the tokenizer trained on this stream before, {folder}.")
        return load_tokenizer(str(folder))
    megabytes = min(args.tokenizer_train_mb, TOKENIZER_MB)
    budget = int(megabytes * 2**20)

    def texts():
        nonlocal budget
        for batch in training_documents().iter(batch_size=1000):
            yield batch["text"]
            budget -= sum(len(t) for t in batch["text"])
            if budget <= 0:
                return

    log(f"training a {args.vocab_size}-token BPE on the first {megabytes:g} MB of the stream (at most "
        f"{TOKENIZER_MB} MB, so that training starts soon; --tokenizer DIR skips this)")  # fmt: skip
    tokenizer = train_tokenizer(texts(), vocab_size=args.vocab_size)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_root))
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.rename(folder)
    except OSError:  # another process saved the same tokenizer first
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
