"""Shared test set-up: everything offline, caches in a temporary HF_HOME, tiny models built in the test."""

import os
import tempfile

# Before transformers, datasets or evaluate are imported: nothing may reach the Hub, and caches stay private.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HOME"] = os.environ.get("MINIGPT_TEST_HF_HOME") or tempfile.mkdtemp(prefix="minigpt-hf-home-")

import pytest  # noqa: E402
import torch  # noqa: E402

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
