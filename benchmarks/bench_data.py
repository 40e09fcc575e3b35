"""How fast, how big and how hungry pretraining's data preparation is: MiniGPT's token store and its --streaming
against the two recipes people copy, run_clm's streaming pipeline and nanoGPT's prepare.py.

One synthetic English-like corpus (a .txt of blank-line separated paragraphs, deterministic from --seed) and one
byte-level BPE (trained once on its first --tokenizer_mb MB with the `tokenizers` library) serve every recipe, so
all of them tokenize identically. Each recipe runs in its own process with a fresh, empty cache folder and a fresh
HF_HOME (the datasets cache counts as disk too), and is timed from the moment it is started:

    prepared         python -m minigpt.train.pretrain --data CORPUS --tokenizer TOK ... (a token store is prepared)
    prepared-cached  the same command again on the store just made (what every later run of a project pays)
    streaming        the same with --streaming --validation_documents 200 (nothing prepared)
    run_clm          load_dataset("text", streaming=True) -> map(tokenize, batched) -> group_texts -> first batch
    nanogpt          load_dataset("text") -> train_test_split -> map(encode, num_proc=2) -> train.bin/val.bin

Measured: the time to the first optimizer step (pretrain's first "step 1" log line) or first batch, the total, the
prepare throughput (corpus MB / time until "Cached the token store"), the peak RSS (the largest process of the
tree, from wait4's rusage, and the polled sum over the tree), and the disk used afterwards under HF_HOME and the
cache folder, per token where a recipe keeps tokens. MB and GB are 2**20 and 2**30 bytes.

    python -m benchmarks.bench_data                      # what `make bench-data` runs: 200 MB, 10-20 min on 2 cores
    python -m benchmarks.bench_data --corpus_mb 5 --out /tmp/bench-data     # a quick check

This module runs the training script as a subprocess and never imports minigpt.train.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS_DIR, _write_atomically, accept_both_spellings, markdown_table

MB = 2**20
GB = 2**30
# the issue's targets
TARGET_FIRST_STEP_STREAMING_S = 30.0
TARGET_PREPARE_MB_S = 1.5
TARGET_BYTES_PER_TOKEN = 1.2 * 2
TARGET_RSS_GB = 1.5

RECIPES = ("prepared", "prepared-cached", "streaming", "run_clm", "nanogpt")
TITLES = {
    "prepared": "MiniGPT prepared (token store)",
    "prepared-cached": "MiniGPT prepared, store already cached",
    "streaming": "MiniGPT --streaming",
    "run_clm": "run_clm streaming (first batch)",
    "nanogpt": "nanoGPT prepare.py",
}
# pretrain's shape for every MiniGPT recipe: a model too small to matter, so the data side is what is timed
PRETRAIN_FLAGS = ["--cpu", "--max_steps", "1", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size",
                  "128", "--batch_size", "4", "--eval_every", "0", "--save_every", "0", "--report_to", "none",
                  "--overwrite_output_dir", "--log_every", "1"]  # fmt: skip
FIRST_STEP = re.compile(r"(^|\s)step 1 \|")
CACHED = "Cached the token store"

# ---------------------------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------------------------

COMMON_WORDS = """the of and to a in is it that was for on are with as he be at by this had not but from or have an
they which one you were her all she there would their we him been has when who will more no if out so said what up
its about into than them can only other new some could time these two may then do first any my now such like our
over man me even most made after also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year off come since against
go came right used take three small house found water place number part sound thought land river city light under
again found answer school grow study learn plant cover food sun four between keep eye never last let thought tree
cross farm hard start might story saw far sea draw left late run while press close night real few north open seem
together next white children begin got walk example ease paper group always music those both mark often letter
until mile river car feet care second book carry took science eat room friend began idea fish mountain stop once
base hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red list though
feel talk bird soon body dog family direct pose leave song measure door product black short numeral class wind
question happen complete ship area half rock order fire south problem piece told knew pass since top whole king
space heard best hour better true during hundred five remember step early hold west ground interest reach fast verb
sing listen six table travel less morning ten simple several vowel toward war lay against pattern slow center love
person money serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall
lead cry dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green quick develop ocean warm free minute strong special mind behind clear tail
produce fact street inch multiply nothing course stay wheel full force blue object decide surface deep moon island
foot system busy test record boat common gold possible plane instead dry wonder laugh thousand ago ran check game
shape equate miss brought heat snow tire bring yes distant fill east paint language among""".split()  # noqa: SIM905
ONSETS = ["", "b", "br", "c", "ch", "cl", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "pl",
          "pr", "r", "s", "sh", "sl", "st", "t", "th", "tr", "v", "w", "wh", "y", "z"]  # fmt: skip
VOWELS = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "oo", "ie", "y"]
CODAS = ["", "", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "ck", "m", "rt", "sh", "th", "ll", "x"]


def make_vocabulary(rng: np.random.Generator, size: int = 8000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words, Capitalised words, cumulative Zipf probabilities): common English words first, then pseudo-words of
    1-4 syllables, ranked in that order."""
    words = list(dict.fromkeys(COMMON_WORDS))
    seen = set(words)
    while len(words) < size:
        n = rng.choice([1, 1, 2, 2, 2, 3])
        word = "".join(ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))] +
                       CODAS[rng.integers(len(CODAS))] for _ in range(n))  # fmt: skip
        if 2 <= len(word) <= 14 and word not in seen:
            seen.add(word)
            words.append(word)
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    cumulative = np.cumsum(weights / weights.sum())
    cumulative[-1] = 1.0
    return np.array(words, dtype=object), np.array([w.capitalize() for w in words], dtype=object), cumulative


def paragraphs_text(rng: np.random.Generator, vocab, n: int) -> str:
    """`n` paragraphs, each followed by a blank line: 1-3 sentences mostly, now and then a long one, of about 12
    Zipf-distributed words each (a comma now and then, a full stop, question or exclamation mark at the end)."""
    words, capitals, cumulative = vocab
    sentences = 1 + rng.poisson(1.2, n) + np.where(rng.random(n) < 0.03, rng.poisson(12, n), 0)  # per paragraph
    lengths = np.maximum(2, np.round(rng.lognormal(np.log(11), 0.55, int(sentences.sum())))).astype(np.int64)
    ids = np.searchsorted(cumulative, rng.random(int(lengths.sum())))
    ends = np.cumsum(lengths) - 1  # each sentence's last word
    first = np.zeros(len(ids), dtype=bool)
    first[np.concatenate([[0], ends[:-1] + 1])] = True
    tokens = np.where(first, capitals[ids], words[ids])
    sep = np.where(rng.random(len(ids)) < 0.07, ", ", " ").astype(object)
    marks = np.array([".", ".", ".", ".", ".", ".", ".", ".", "?", "!"], dtype=object)
    mark = marks[rng.integers(len(marks), size=len(ends))]
    last = np.zeros(len(ends), dtype=bool)
    last[np.cumsum(sentences) - 1] = True  # each paragraph's last sentence
    sep[ends] = mark + np.where(last, "\n\n", " ").astype(object)
    return "".join((tokens + sep).tolist())


def write_corpus(path: Path, megabytes: float, seed: int) -> dict:
    """Write about `megabytes` MB of paragraphs to `path` (cut at a paragraph's end); returns its size and count."""
    rng = np.random.default_rng(seed)
    vocab = make_vocabulary(rng)
    target, written, documents = int(megabytes * MB), 0, 0
    start = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        while written < target:
            text = paragraphs_text(rng, vocab, 5000)
            if written + len(text) > target:  # the last chunk: stop at the first paragraph end past the target
                cut = text.find("\n\n", target - written) + 2
                text = text[:cut] if cut >= 2 else text
            f.write(text)
            written += len(text)
            documents += text.count("\n\n")
    tmp.replace(path)
    return {"path": str(path), "bytes": written, "mb": written / MB, "documents": documents, "seed": seed,
            "seconds": time.perf_counter() - start}  # fmt: skip


def read_corpus_meta(path: Path, seed: int) -> dict:
    data = path.read_bytes()
    return {"path": str(path), "bytes": len(data), "mb": len(data) / MB, "documents": data.count(b"\n\n"), "seed": seed,
            "seconds": 0.0, "reused": True}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The shared tokenizer
# ---------------------------------------------------------------------------------------------------------------


def train_shared_tokenizer(corpus: Path, folder: Path, megabytes: float, vocab_size: int) -> dict:
    """A byte-level BPE made as MiniGPT makes one (ByteLevel pre-tokenizer without prefix space, the 256 byte symbols
    as the initial alphabet, <|pad|> <|bos|> <|eos|>), trained on the corpus's first `megabytes` MB of paragraphs and
    saved with save_pretrained, so that pretrain --tokenizer and AutoTokenizer both load it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    start = time.perf_counter()
    with open(corpus, encoding="utf-8") as f:
        head = f.read(int(megabytes * MB))
    paragraphs = [p for p in head.split("\n\n") if p.strip()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tokenizer.train_from_iterator((paragraphs[i : i + 1000] for i in range(0, len(paragraphs), 1000)), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|eos|>",
                                      pad_token="<|pad|>")  # fmt: skip
    wrapped.save_pretrained(str(folder))
    return {"path": str(folder), "vocab_size": len(wrapped), "trained_on_mb": len(head) / MB,
            "seconds": time.perf_counter() - start}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The two outside recipes, written to the work folder and run as scripts
# ---------------------------------------------------------------------------------------------------------------

RUN_CLM_SCRIPT = '''"""run_clm's streaming data pipeline (transformers/examples/pytorch/language-modeling/run_clm.py) up to its
first batch: load_dataset(streaming=True) -> map(tokenize_function, batched=True) -> map(group_texts, batched=True)."""
import sys
from itertools import chain

corpus, tokenizer_dir, block_size, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from datasets import load_dataset
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
raw_datasets = load_dataset("text", data_files={"train": corpus}, streaming=True)
column_names = ["text"]


def tokenize_function(examples):
    return tokenizer(examples["text"])


def group_texts(examples):
    concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
              for k, t in concatenated_examples.items()}
    result["labels"] = result["input_ids"].copy()
    return result


tokenized_datasets = raw_datasets.map(tokenize_function, batched=True, remove_columns=column_names)
lm_datasets = tokenized_datasets.map(group_texts, batched=True)
batch = next(iter(lm_datasets["train"].iter(batch_size=batch_size)))
print(f"FIRST_BATCH {len(batch['input_ids'])} x {len(batch['input_ids'][0])}", flush=True)
'''

NANOGPT_SCRIPT = '''"""nanoGPT's data/openwebtext/prepare.py with the shared BPE in place of tiktoken's GPT-2 encoding and a local
.txt (one paragraph per row) in place of the Hub's openwebtext."""
import os
import sys

import numpy as np
from datasets import load_dataset
from tokenizers import Tokenizer

corpus, tokenizer_dir, out_dir, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
enc = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
eot_token = enc.token_to_id("<|eos|>")

dataset = load_dataset("text", data_files={"train": corpus}, sample_by="paragraph", num_proc=num_proc)
split_dataset = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
split_dataset["val"] = split_dataset.pop("test")


def process(example):
    ids = enc.encode(example["text"], add_special_tokens=False).ids  # encode_ordinary ignores any special token
    ids.append(eot_token)
    out = {"ids": ids, "len": len(ids)}
    return out


tokenized = split_dataset.map(process, remove_columns=["text"], desc="tokenizing the splits", num_proc=num_proc)
total = 0
for split, dset in tokenized.items():
    arr_len = np.sum(dset["len"], dtype=np.uint64)
    filename = os.path.join(out_dir, f"{split}.bin")
    dtype = np.uint16
    arr = np.memmap(filename, dtype=dtype, mode="w+", shape=(arr_len,))
    total_batches = min(1024, len(dset))
    idx = 0
    for batch_idx in range(total_batches):
        batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
        arr_batch = np.concatenate(batch["ids"])
        arr[idx : idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    total += int(arr_len)
print(f"TOKENS {total}", flush=True)
'''


# ---------------------------------------------------------------------------------------------------------------
# Measuring one process tree
# ---------------------------------------------------------------------------------------------------------------


def disk_usage(*folders: Path) -> int:
    """Bytes allocated on disk (du's count: st_blocks, each hard-linked file once) by the files and folders given and
    everything under the folders."""
    seen, total = set(), 0
    paths = [p for folder in folders for p in [folder, *_walk(folder)]]
    for path in paths:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def _walk(folder: Path):
    for root, dirs, files in os.walk(folder):
        yield from (os.path.join(root, name) for name in dirs + files)


def tree_rss(pid: int) -> int:
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(
    cmd: list[str], env: dict, log: Path, markers: dict[str, re.Pattern], timeout: float, disk: tuple[Path, ...] = ()
) -> dict:
    """Run `cmd` in a session of its own; returns its exit code, the seconds from its start to its end and to the first
    stdout line matching each marker, its largest process's peak RSS (wait4's ru_maxrss: the process and every
    descendant it reaped), the largest sum of the tree's RSS seen by polling every 0.1 s, and the most disk seen
    under the `disk` folders by polling every second. stdout and stderr go to `log` (stdout lines stamped with the
    seconds since the start)."""
    seen: dict[str, float] = {}
    with open(log, "w") as out, open(log.with_suffix(".stderr.log"), "w") as err:
        load_start = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                                start_new_session=True)  # fmt: skip

        def read():
            for line in proc.stdout:
                now = time.perf_counter() - start
                out.write(f"[{now:8.2f}] {line}")
                for name, pattern in markers.items():
                    if name not in seen and pattern.search(line):
                        seen[name] = now

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        tree_peak, disk_peak, disk_polled, status, rusage, timed_out = 0, 0, 0.0, None, None, False
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.perf_counter() - start
            if elapsed > timeout:
                timed_out = True
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    time.sleep(5)
                    pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                if not pid:
                    pid, status, rusage = os.wait4(proc.pid, 0)
                break
            tree_peak = max(tree_peak, tree_rss(proc.pid))
            if disk and elapsed - disk_polled >= 1.0:
                disk_peak, disk_polled = max(disk_peak, disk_usage(*disk)), elapsed
            time.sleep(0.1)
        total = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join(timeout=30)
    return {"returncode": proc.returncode, "timed_out": timed_out, "total_s": total, "markers_s": seen,
            "peak_rss_bytes": rusage.ru_maxrss * 1024, "tree_rss_bytes": tree_peak, "disk_peak_bytes": disk_peak,
            "cpu_s": rusage.ru_utime + rusage.ru_stime, "loadavg": [load_start, os.getloadavg()[0]]}  # fmt: skip


def child_env(hf_home: Path) -> dict:
    """The environment every recipe runs in: a fresh HF_HOME (no other cache variable left to point elsewhere),
    offline, unbuffered stdout, and the tokenizers' thread pool at its library default in every recipe."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("HF_") and k.endswith(("_CACHE", "_HOME"))) and k not in (
               "TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS", "XDG_CACHE_HOME")}  # fmt: skip
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("HF_DATASETS_CACHE", None)
    return env


# ---------------------------------------------------------------------------------------------------------------
# The recipes
# ---------------------------------------------------------------------------------------------------------------


def recipe_command(name: str, work: Path, corpus: Path, tok: Path, cache: Path, out: Path, num_proc: int) -> list:
    py = sys.executable
    if name in ("prepared", "prepared-cached", "streaming"):
        cmd = [py, "-m", "minigpt.train.pretrain", "--data", str(corpus), "--tokenizer", str(tok), "--data_cache_dir",
               str(cache), "--output_dir", str(out), *PRETRAIN_FLAGS]  # fmt: skip
        return cmd + (["--streaming", "--validation_documents", "200"] if name == "streaming" else [])
    if name == "run_clm":
        return [py, str(work / "run_clm_stream.py"), str(corpus), str(tok), "128", "4"]
    return [py, str(work / "nanogpt_prepare.py"), str(corpus), str(tok), str(cache), str(num_proc)]


def run_recipe(name: str, work: Path, corpus: dict, tok: Path, args) -> dict:
    """Run one recipe in a fresh process with fresh caches (prepared-cached: prepared's caches) and measure it."""
    folder = work / "runs" / ("prepared" if name == "prepared-cached" else name)
    hf_home, cache, out = folder / "hf_home", folder / "cache", folder / "output"
    if name != "prepared-cached":
        shutil.rmtree(folder, ignore_errors=True)
        for d in (hf_home, cache, out):
            d.mkdir(parents=True)
    cmd = recipe_command(name, work, Path(corpus["path"]), tok, cache, out, args.num_proc)
    markers = {"first_step": FIRST_STEP, "cached": re.compile(re.escape(CACHED)),
               "first_batch": re.compile(r"^FIRST_BATCH"), "tokens": re.compile(r"^TOKENS ")}  # fmt: skip
    print(f"[bench_data] {name}: {shlex.join(cmd)}", flush=True)
    result = run_measured(cmd, child_env(hf_home), work / f"{name}.log", markers, args.timeout, (hf_home, cache))
    result.update(recipe=name, title=TITLES[name], command=f"HF_HOME={shlex.quote(str(hf_home))} {shlex.join(cmd)}",
                  log=str(work / f"{name}.log"))  # fmt: skip
    result["disk_bytes"] = disk_usage(hf_home, cache)
    result["disk_hf_home_bytes"] = disk_usage(hf_home)
    result["disk_peak_bytes"] = max(result["disk_peak_bytes"], result["disk_bytes"])
    ok = result["returncode"] == 0 and not result["timed_out"]
    if not ok:
        tail = (work / f"{name}.stderr.log").read_text(errors="replace").strip().splitlines()[-5:]
        result["error"] = " / ".join(tail) or f"exit code {result['returncode']}"
        print(f"[bench_data] {name} FAILED (exit {result['returncode']}): {result['error']}", flush=True)
    tokens = None
    if name in ("prepared", "prepared-cached"):
        infos = sorted(cache.glob("*/info.json"))
        if infos:
            info = json.loads(infos[0].read_text())
            tokens = sum(info["tokens"].values())
            result["store"] = {"folder": str(infos[0].parent), "tokens": info["tokens"], "documents": info["documents"],
                               "dtype": info["dtype"], "bytes": disk_usage(infos[0].parent)}  # fmt: skip
    elif name == "nanogpt" and ok:
        tokens = sum(len(np.memmap(cache / f"{s}.bin", dtype=np.uint16, mode="r")) for s in ("train", "val"))
        result["bins_bytes"] = disk_usage(*(cache / f"{s}.bin" for s in ("train", "val")))
    result["tokens"] = tokens
    result["bytes_per_token"] = result["disk_bytes"] / tokens if tokens and name != "prepared-cached" else None
    marks = result["markers_s"]
    result["first_s"] = marks.get("first_step", marks.get("first_batch"))
    prepare_s = marks.get("cached") if name == "prepared" else result["total_s"] if name == "nanogpt" and ok else None
    result["prepare_s"] = prepare_s
    result["mb_per_s"] = corpus["mb"] / prepare_s if prepare_s else None
    result["targets"] = targets(name, result)
    print(f"[bench_data] {name}: first {fmt(result['first_s'], '.1f')} s, total {result['total_s']:.1f} s, "
          f"peak RSS {result['peak_rss_bytes'] / GB:.2f} GB (tree {result['tree_rss_bytes'] / GB:.2f} GB), "
          f"disk {result['disk_bytes'] / MB:.1f} MB", flush=True)  # fmt: skip
    return result


def targets(name: str, r: dict) -> list[tuple[str, bool | None]]:
    """The issue's targets that apply to a MiniGPT recipe, each (what, met)."""
    rss = max(r["peak_rss_bytes"], r["tree_rss_bytes"]) / GB
    out = []
    if name == "streaming":
        first = r["first_s"]
        out.append((f"first step <= {TARGET_FIRST_STEP_STREAMING_S:g} s", None if first is None else
                    first <= TARGET_FIRST_STEP_STREAMING_S))  # fmt: skip
    if name == "prepared":
        mbs, bpt = r["mb_per_s"], r["bytes_per_token"]
        out.append((f"prepare >= {TARGET_PREPARE_MB_S:g} MB/s", None if mbs is None else mbs >= TARGET_PREPARE_MB_S))
        out.append(
            (f"disk <= {TARGET_BYTES_PER_TOKEN:g} B/token", None if bpt is None else bpt <= TARGET_BYTES_PER_TOKEN)
        )
    if name in ("prepared", "prepared-cached", "streaming"):
        out.append((f"RSS <= {TARGET_RSS_GB:g} GB", rss <= TARGET_RSS_GB))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def fmt(value, spec: str = ".1f") -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())  # fmt: skip
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)  # fmt: skip
    versions = {}
    for pkg in ("datasets", "tokenizers", "transformers", "torch", "numpy", "pyarrow"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "cpu_model": model,
            "memory_gb": mem / GB if mem else None, "python": platform.python_version(), "os": platform.platform(),
            **versions}  # fmt: skip


def render(payload: dict) -> str:
    m, c, t = payload["machine"], payload["corpus"], payload["tokenizer"]
    headers = ["recipe", "first step / batch (s)", "total (s)", "CPU (s)", "MB/s", "peak RSS (GB)", "tree RSS (GB)",
               "disk after (MB)", "disk peak (MB)", "bytes/token", "targets"]  # fmt: skip
    rows = []
    for r in payload["rows"]:
        goals = "; ".join(f"{what}: {'n/a' if met is None else 'met' if met else '**not met**'}"
                          for what, met in r["targets"]) or "-"  # fmt: skip
        if r.get("error"):
            goals = f"FAILED ({r['error'][:120]}) " + goals
        rows.append([r["title"], fmt(r["first_s"]), fmt(r["total_s"]), fmt(r["cpu_s"]), fmt(r["mb_per_s"], ".2f"),
                     fmt(r["peak_rss_bytes"] / GB, ".2f"), fmt(r["tree_rss_bytes"] / GB, ".2f"),
                     fmt(r["disk_bytes"] / MB, ".1f"), fmt(r["disk_peak_bytes"] / MB, ".1f"),
                     fmt(r["bytes_per_token"], ".2f"), goals])  # fmt: skip
    store = next((r.get("store") for r in payload["rows"] if r["recipe"] == "prepared" and r.get("store")), None)
    generated = f", generated in {c['seconds']:.0f} s" if c.get("seconds") else ""
    lines = [
        f"### data: preparing a {c['mb']:.0f} MB corpus on {m['cpu_model']} ({m['usable_cores']} cores)\n",
        (f"{payload['date']}, python {m['python']}, datasets {m['datasets']}, tokenizers {m['tokenizers']}, "
         f"transformers {m['transformers']}, torch {m['torch']}, {m['memory_gb']:.0f} GB RAM, {m['os']}\n"),
        (f"Corpus: {c['bytes']:,} bytes ({c['mb']:.1f} MB) of synthetic English-like text, {c['documents']:,} "
         f"blank-line separated paragraphs (documents), seed {c['seed']}{generated}. Tokenizer: a "
         f"{t['vocab_size']}-token byte-level BPE trained once on its first {t['trained_on_mb']:.0f} MB in "
         f"{t['seconds']:.0f} s, shared by every recipe.\n"),
        markdown_table(headers, rows) + "\n",
        ("- first step / batch: seconds from the process's start to pretrain's first `step 1` log line (the first "
         "optimizer step done; --log_every 1), or to run_clm's first batch of 4 x 128 tokens. total: to its exit "
         "(pretrain also runs its final evaluation over the whole validation split and saves the model)."),
        ("- CPU: user + system seconds of the whole tree (wait4's rusage). The machine may be shared: the 1-minute "
         "load average at each recipe's start and end was "
         + ", ".join(f"{r['recipe']} {r['loadavg'][0]:.1f} -> {r['loadavg'][1]:.1f}" for r in payload["rows"])
         + f" ({m['usable_cores']} cores); a load above the core count means other "
         "processes competed for the CPUs, and wall times are longer than an idle machine's."),
        "- MB/s: corpus MB / seconds until pretrain logs `Cached the token store` (prepared), or / total (nanoGPT).",
        ("- peak RSS: the largest process of the tree (wait4's ru_maxrss); tree RSS: the largest sum over the tree, "
         "polled every 0.1 s (nanoGPT's map runs 2 worker processes; pages they share count twice). A target is met "
         "when both are within it."),
        ("- disk after: everything under the recipe's fresh HF_HOME and cache folder once it exited (du's count); "
         "bytes/token: that over the tokens kept (train + validation). disk peak: the most seen there while it ran "
         "(polled every second; MiniGPT's temporary Arrow copy of the corpus counts here, not after)."),
    ]  # fmt: skip
    if store:
        lines.append(f"- the token store: {store['bytes'] / MB:.1f} MB, {sum(store['tokens'].values()):,} {store['dtype']} "
                     f"tokens (train {store['tokens']['train']:,}, validation {store['tokens']['validation']:,}) from "
                     f"{sum(store['documents'].values()):,} documents")  # fmt: skip
    nanogpt = next((r for r in payload["rows"] if r["recipe"] == "nanogpt" and r.get("bins_bytes")), None)
    if nanogpt:
        lines.append(f"- nanoGPT's disk: its train.bin + val.bin {nanogpt['bins_bytes'] / MB:.1f} MB, the datasets "
                     f"cache it left under HF_HOME {nanogpt['disk_hf_home_bytes'] / MB:.1f} MB")  # fmt: skip
    lines.append(
        "\nCommands (each in a fresh HF_HOME and cache folder, with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "
        "PYTHONUNBUFFERED=1 and TOKENIZERS_PARALLELISM unset, one after the other, after one untimed "
        "`pretrain --help` that loads the libraries' files into the page cache):\n"
    )
    lines += [f"- {r['title']}: `{r['command']}`" for r in payload["rows"]]
    lines.append(f"\nThe whole benchmark: `{payload['command']}`")
    return "\n".join(lines) + "\n"


def write_results(payload: dict, out: Path, tag: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"data-{payload['date'][:10]}" + (f"-{tag}" if tag else "")
    _write_atomically(out / f"{stem}.json", json.dumps(payload, indent=2) + "\n")
    _write_atomically(out / f"{stem}.md", render(payload))
    return out / f"{stem}.md"


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    accept_both_spellings(parser)
    parser.add_argument("--corpus_mb", type=float, default=200.0, help="size of the synthetic corpus, in MB")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus")
    parser.add_argument("--tokenizer_mb", type=float, default=20.0, help="MB of the corpus's start the BPE learns from")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {RECIPES}")
    parser.add_argument("--num_proc", type=int, default=2, help="nanoGPT's map(num_proc=...)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds each recipe may run")
    parser.add_argument("--work_dir", default=None,
                        help="where the corpus, tokenizer, caches and logs go (default: a temporary folder under /tmp); "
                        "a corpus of the same size and seed found there is reused")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the work folder (default: removed at the end)")
    parser.add_argument("--out", default=None, help="directory for the results (default: benchmarks/results)")
    parser.add_argument("--tag", default="", help="suffix for the output file names")
    args = parser.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not recipes or set(recipes) - set(RECIPES):
        raise SystemExit(f"bench_data: error: --recipes {args.recipes!r} is not valid; pick from {list(RECIPES)}.")
    if "prepared-cached" in recipes and "prepared" not in recipes:
        raise SystemExit("bench_data: error: prepared-cached reuses the store that prepared makes; add prepared.")
    recipes = [r for r in RECIPES if r in recipes]  # prepared before prepared-cached

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="minigpt-bench-data-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[bench_data] work folder {work}", flush=True)
    try:
        corpus_path = work / f"corpus-{args.corpus_mb:g}mb-seed{args.seed}.txt"
        if corpus_path.is_file():
            corpus = read_corpus_meta(corpus_path, args.seed)
            print(f"[bench_data] reusing the corpus {corpus_path}", flush=True)
        else:
            corpus = write_corpus(corpus_path, args.corpus_mb, args.seed)
        print(f"[bench_data] corpus: {corpus['mb']:.1f} MB, {corpus['documents']:,} documents "
              f"({corpus['seconds']:.0f} s)", flush=True)  # fmt: skip
        tok = work / "tokenizer"
        shutil.rmtree(tok, ignore_errors=True)
        tokenizer = train_shared_tokenizer(corpus_path, tok, args.tokenizer_mb, args.vocab_size)
        print(f"[bench_data] tokenizer: {tokenizer['vocab_size']} tokens ({tokenizer['seconds']:.0f} s)", flush=True)
        (work / "run_clm_stream.py").write_text(RUN_CLM_SCRIPT)
        (work / "nanogpt_prepare.py").write_text(NANOGPT_SCRIPT)

        payload = {"benchmark": "data", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "machine": machine(), "corpus": corpus, "tokenizer": tokenizer, "work_dir": str(work),
                   "command": shlex.join(["python", "-m", "benchmarks.bench_data", *(argv if argv is not None else sys.argv[1:])]),
                   "targets": {"first_step_streaming_s": TARGET_FIRST_STEP_STREAMING_S,
                               "prepare_mb_per_s": TARGET_PREPARE_MB_S, "bytes_per_token": TARGET_BYTES_PER_TOKEN,
                               "rss_gb": TARGET_RSS_GB},
                   "rows": []}  # fmt: skip
        out = Path(args.out) if args.out else RESULTS_DIR
        # untimed: the first recipe would otherwise also pay for reading torch's and the other libraries' files from
        # disk into the page cache, which every later recipe finds there
        warm = [sys.executable, "-m", "minigpt.train.pretrain", "--help"]
        subprocess.run(warm, env=child_env(work / "warmup-hf_home"), capture_output=True, check=False)
        for name in recipes:
            payload["rows"].append(run_recipe(name, work, corpus, tok, args))
            path = write_results(payload, out, args.tag)  # after every recipe: a cut-short run keeps what it measured
        print("\n" + render(payload), flush=True)
        print(f"[bench_data] results: {path} and {path.with_suffix('.json')}", flush=True)
        return 0 if all(not r.get("error") for r in payload["rows"]) else 1
    finally:
        if args.keep:
            print(f"[bench_data] kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
