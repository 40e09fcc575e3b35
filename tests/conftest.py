"""Shared test set-up: everything offline, caches in a temporary HF_HOME, tiny models built in the test; and the
helpers that several test modules use (test modules import nothing from each other): a synthetic corpus, the
command line of a ~9k-parameter pretraining run and readers of its outputs, the fault tests' debug hooks, and the
snippet that hides the modeling_minigpt package from a child process.
"""

import json
import os
import random
import socket
import tempfile
import textwrap
from pathlib import Path

# Before transformers, datasets or evaluate are imported: nothing may reach the Hub, and caches stay private.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HOME"] = os.environ.get("MINIGPT_TEST_HF_HOME") or tempfile.mkdtemp(prefix="minigpt-hf-home-")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import modeling_minigpt  # noqa: E402,F401  (registers the Auto classes)
from modeling_minigpt import MiniGPTConfig  # noqa: E402


def tiny_config(**overrides) -> MiniGPTConfig:
    """2 layers, width 32, 4 heads, vocabulary 100: big enough to exercise every path, small enough to be instant."""
    fields = dict(
        vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    fields.update(overrides)
    return MiniGPTConfig(**fields)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core CI machine the threads' spin-waits make
    each step up to 20x slower. Subprocesses get the same through OMP_NUM_THREADS where they set their env."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process pretraining run builds its own Accelerator, and accelerate keeps process-wide singletons
    between them. accelerate has no public reset: its own test base class (accelerate.test_utils.AccelerateTestCase)
    calls these two private methods in tearDown, so this fixture does the same, in this one place. Modules that run
    minigpt.train.pretrain in-process use it with `pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")`."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ------------------------------------------------------------------------------------------- corpus and runs
WORDS = "the king queen sword crown night day love war peace hath thou art lord lady doth speak hear".split()


def make_corpus(n_docs: int, words_per_doc: int = 40, seed: int = 0) -> list[str]:
    """Documents of random sentences, each tagged with its index so that a test can find where it went."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(words_per_doc)]
        docs.append(f"doc{i} " + " ".join(words) + ".")
    return docs


def write_txt(path, docs):
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 synthetic documents in one .txt file, shared by a module's pretraining runs."""
    return write_txt(tmp_path_factory.mktemp("corpus") / "corpus.txt", make_corpus(60))


def tiny_args(corpus, out, *extra) -> list[str]:
    """minigpt.train.pretrain's command line for a ~9k-parameter model on 16-token blocks: a step takes milliseconds."""
    return [
        "--data", str(corpus), "--output_dir", str(out), "--cpu",
        "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--vocab_size", "300",
        "--batch_size", "4", "--learning_rate", "3e-3", "--min_learning_rate", "3e-4", "--warmup_steps", "2",
        "--report_to", "none", "--log_every", "1", "--eval_every", "0", "--eval_batches", "2", "--save_every", "0",
        *map(str, extra),
    ]  # fmt: skip


def read_log(out) -> list[dict]:
    """The records of <out>/log.jsonl."""
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def losses(out) -> dict[int, float]:
    """{step: training loss} from <out>/log.jsonl."""
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a, b, atol: float = 0.0) -> None:
    """The model.safetensors of two folders hold the same tensors (bit for bit with the default atol)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)


def debug_env(**hooks) -> dict[str, str]:
    """minigpt.train.faults.DebugHooks as environment variables: debug_env(save_delay=2) == {"MINIGPT_DEBUG_SAVE_DELAY": "2"}."""
    return {f"MINIGPT_DEBUG_{name.upper()}": str(value) for name, value in hooks.items()}


@pytest.fixture
def debug_hooks(monkeypatch):
    """Switch DebugHooks on for in-process runs of this test: debug_hooks(inject_nonfinite_at_step=5)."""

    def switch_on(**hooks):
        for name, value in debug_env(**hooks).items():
            monkeypatch.setenv(name, value)

    return switch_on


def ctrl_c_reaches_it() -> None:
    """preexec_fn of a process a test sends Ctrl-C (SIGINT): the default disposition, as in a terminal. A shell
    that starts pytest in the background (`cmd &`, a CI runner) hands every child SIGINT ignored, and Python then
    never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    """A port nobody listens on now, so that parallel runs don't collide on accelerate's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Run first in a child process: any import of modeling_minigpt fails, as on a machine without the package.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_minigpt" or name.startswith("modeling_minigpt."):
                raise ImportError(f"{name} is not installed here")
    sys.meta_path.insert(0, _Absent())
    """
)


@pytest.fixture(scope="module")
def hub():
    """A local Hub-compatible server (tests/hub_server.py) on 127.0.0.1, one per test module."""
    from hub_server import running_hub

    with running_hub() as server:
        yield server


# hypothesis profiles: "ci" (the default) keeps `make test` inside its time budget; `make test-long` sets
# HYPOTHESIS_PROFILE=long. deadline=None: a forward's time varies with the machine's load, not with the input.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # a dev extra; the property tests skip themselves without it
    pass
else:
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
    settings.register_profile("ci", max_examples=50, **_common)
    settings.register_profile("long", max_examples=1000, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# what an in-process pretraining run reads from the environment: the debug hooks, and accelerate's launch settings
LEAKABLE_ENV_PREFIXES = ("MINIGPT_DEBUG_", "ACCELERATE_", "FSDP_")


@pytest.fixture(autouse=True)
def no_leaked_environment():
    """Restore the MINIGPT_DEBUG_*, ACCELERATE_* and FSDP_* variables a test set or changed. monkeypatch.setenv alone
    does not: datasets' Dataset.map with num_proc rebinds os.environ to a deep copy (datasets 5.2, arrow_dataset.py,
    `os.environ = prev_env`), so the undo deletes from the old object and a hook such as rank dumps, or an FSDP
    setting, stays on for every later in-process run."""
    before = {k: v for k, v in os.environ.items() if k.startswith(LEAKABLE_ENV_PREFIXES)}
    yield
    for name in [k for k in os.environ if k.startswith(LEAKABLE_ENV_PREFIXES)]:
        if name not in before:
            del os.environ[name]
    os.environ.update(before)


@pytest.fixture
def processes():
    """Every subprocess.Popen a test appends here; killed at teardown if the test failed before it ended."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()  # SIGKILL ends a SIGSTOPped process too
            proc.wait(30)
