"""minigpt-serve (minigpt/serve.py): transformers' own OpenAI-compatible server on a MiniGPT folder, asked through the
official `openai` client, answers exactly what `generate()` gives, with and without continuous batching.

Nothing is trained: a tiny random MiniGPT with a byte-level BPE and a ChatML chat template. Each server runs in a
subprocess on 127.0.0.1 and is stopped at the end of its test (terminate, wait, kill), whatever happened.
"""

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import free_port, make_corpus, tiny_config
from transformers import AutoTokenizer, GenerationConfig

from minigpt.train.tokenizer import train_tokenizer
from modeling_minigpt import MiniGPTForCausalLM

pytestmark = pytest.mark.oldest
openai = pytest.importorskip("openai", reason="the openai client is a dev extra: pip install -e '.[dev]'")
pytest.importorskip("fastapi", reason='transformers serve needs its extras: pip install "transformers[serving]"')
pytest.importorskip("uvicorn", reason='transformers serve needs its extras: pip install "transformers[serving]"')

REPO = Path(__file__).resolve().parents[1]
START_S = 180  # upper bounds: a timeout means a hang, never a slow machine
REQUEST_S = 120
STOP_S = 30
MAX_TOKENS = 8
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = ["the king", "thou art lord", "peace"]
CHATS = [
    [{"role": "user", "content": "hath the queen a sword"}],
    [{"role": "system", "content": "speak"}, {"role": "user", "content": "night"}],
]
# continuous batching with a small paged cache: by default it is sized from the machine's memory, which takes
# seconds to fill on a CPU
CB_OPTIONS = ["--continuous-batching", "--cb-block-size", "16", "--cb-num-blocks", "64", "--cb-max-batch-tokens", "64"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny MiniGPT with a chat template, saved with its tokenizer, as a fine-tune's output folder is."""
    folder = tmp_path_factory.mktemp("chat-model")
    tokenizer = train_tokenizer(make_corpus(60), vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(tiny_config(vocab_size=300, n_positions=128, tie_word_embeddings=False, **ids)).eval()
    model.resize_token_embeddings(len(tokenizer))  # the two chat tokens
    # A random model picks random tokens, and a byte-level token holding part of a multi-byte character decodes to
    # U+FFFD on its own, where a stream and a whole decode can differ. This one picks only tokens that decode to
    # printable ASCII alone, and never eos (so every answer runs max_tokens): the last LayerNorm gets a constant
    # channel, through which the head pushes every other token down. The head is scaled up, so that greedy decoding
    # has no near-ties that another summation order (the server's batch) could flip.
    printable = [
        i
        for i in range(len(tokenizer))
        if i not in tokenizer.all_special_ids
        and (text := tokenizer.decode([i]))
        and text.isascii()
        and text.isprintable()
    ]
    with torch.no_grad():
        model.model.norm.weight[0], model.model.norm.bias[0] = 0.0, 1.0
        model.lm_head.weight.mul_(30)
        model.lm_head.weight[:, 0] = -1000.0
        model.lm_head.weight[printable, 0] = 0.0
    model.generation_config = GenerationConfig(do_sample=False, **ids)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def expected(folder):
    """What generate() gives, greedy, for each prompt and chat: the text the server must answer."""
    model = MiniGPTForCausalLM.from_pretrained(folder).eval()  # loaded as the server loads it
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def continuation(ids: list[int]) -> str:
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        assert out.shape[1] == len(ids) + MAX_TOKENS
        return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

    texts = {prompt: continuation(tokenizer(prompt)["input_ids"]) for prompt in PROMPTS}
    for chat in CHATS:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        texts[str(chat)] = continuation(ids["input_ids"])
    assert len(set(texts.values())) == len(texts), texts  # different answers, so that none can stand for another
    return texts


@contextlib.contextmanager
def running_server(folder: Path, log: Path, *options: str):
    """`python -m minigpt.serve FOLDER --port P OPTIONS` on 127.0.0.1 (its default host), and an openai client for it,
    once it answers; the server is stopped on the way out, whatever happened inside."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minigpt.serve", str(folder), "--port", str(port), *options],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        wait_until_answers(proc, port, log)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=REQUEST_S)
    finally:
        proc.terminate()  # uvicorn stops on SIGTERM; the model's process exits with it
        try:
            proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_S)


def wait_until_answers(proc: subprocess.Popen, port: int, log: Path) -> None:
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + START_S
    while True:
        assert proc.poll() is None, (
            f"the server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}"
        )
        try:
            with no_proxy.open(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"no answer in {START_S} s:\n{log.read_text(errors='replace')[-4000:]}"
        time.sleep(0.5)


def complete(client, model: str, prompt: str, stream: bool) -> str:
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=stream)
    if stream:
        return "".join(chunk.choices[0].text for chunk in answer if chunk.choices)
    assert answer.usage.completion_tokens == MAX_TOKENS
    return answer.choices[0].text


def chat(client, model: str, messages: list[dict], stream: bool) -> str:
    answer = client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=stream
    )
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in answer if chunk.choices)
    assert answer.usage.completion_tokens == MAX_TOKENS
    return answer.choices[0].message.content


def test_completions_and_chat_equal_generate(folder, expected, tmp_path):
    with running_server(folder, tmp_path / "server.log") as client:
        for stream in (False, True):
            for prompt in PROMPTS:
                assert complete(client, str(folder), prompt, stream) == expected[prompt], (prompt, stream)
            for messages in CHATS:
                assert chat(client, str(folder), messages, stream) == expected[str(messages)], (messages, stream)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Uvicorn running on http://127.0.0.1:" in log, log[-4000:]


def test_continuous_batching_answers_concurrent_requests(folder, expected, tmp_path):
    requests = [(complete, prompt, stream) for prompt in PROMPTS for stream in (False, True)]
    requests += [(chat, messages, stream) for messages in CHATS for stream in (False, True)]
    # all at once, from threads of their own: the server batches them together
    with (
        running_server(folder, tmp_path / "server.log", *CB_OPTIONS) as client,
        ThreadPoolExecutor(len(requests)) as pool,
    ):
        futures = [pool.submit(ask, client, str(folder), what, stream) for ask, what, stream in requests]
        answers = [future.result(timeout=REQUEST_S) for future in futures]
    for (_, what, stream), answer in zip(requests, answers):
        assert answer == expected[what if isinstance(what, str) else str(what)], (what, stream)


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minigpt.serve", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=START_S,
    )


def test_bad_input_ends_in_one_line(tmp_path):
    missing = run_serve(str(tmp_path / "no-such-model"))
    assert missing.returncode == 1 and missing.stderr.startswith("serve: error: MODEL "), missing.stderr[-4000:]
    assert "no such folder" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    usage = run_serve("--no-such-option")
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1, usage.stderr
    assert usage.stderr.startswith("serve: error: No such option") and "--no-such-option" in usage.stderr, usage.stderr
