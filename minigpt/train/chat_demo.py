"""A chat model that learns a task made at run time, asked through the OpenAI API: `minigpt-chat-demo`.

    minigpt-chat-demo [--base runs/tiny] [--output_dir runs/chat] [--max_steps 1200]

1. The base model: the tiny preset's (`minigpt-pretrain --config tiny`) in --base, pretrained first where the folder
   holds none.
2. The task (minigpt/train/chat_task.py): 8,000 conversations in which the user tells their name (and what they
   like) and asks for it back, and 100 held-out ones whose names never occur in training.
3. Fine-tuning: `minigpt-finetune` in chat mode, found by itself from the `messages` records.
4. Serving: `minigpt-serve` on 127.0.0.1, and each held-out question asked through the official `openai` client
   (/v1/chat/completions, greedy); an answer counts when it is exactly right.
It prints the held-out accuracy and exits 1 below 90%.
"""

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from minigpt.commands import one_line_usage, run_cli
from minigpt.train.chat_task import as_training_records, conversations, make_names

TRAIN_CONVERSATIONS, HELD_OUT = 8000, 100
TARGET = 0.9


def main(argv: list[str] | None = None) -> float:
    p = one_line_usage(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), "chat_demo")
    p.add_argument("--base", default="runs/tiny", help="the base model folder (pretrained here with the tiny preset "
                   "where it holds no model)")  # fmt: skip
    p.add_argument("--output_dir", default="runs/chat", help="the chat model, its data and the served answers")
    p.add_argument("--max_steps", type=int, default=1200, help="fine-tuning steps (batch 16)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the fine-tune")
    p.add_argument("--target", type=float, default=TARGET, help="the held-out accuracy below which it exits 1")
    args = p.parse_args(argv)
    try:
        import openai  # noqa: F401  (the demo asks its questions with the official client)
    except ImportError:
        raise ValueError("the chat demo asks its questions with the openai client: pip install openai") from None
    base, out = Path(args.base), Path(args.output_dir)
    if not (base / "config.json").is_file():
        from minigpt.train import pretrain

        print(f"chat demo: no model in {base}; pretraining the tiny preset there first")
        pretrain.main(["--config", "tiny", "--output_dir", str(base), "--cpu", "--overwrite_output_dir"])

    names = make_names(TRAIN_CONVERSATIONS + HELD_OUT, seed=0)
    random.Random(0).shuffle(names)  # sorted, the held-out names would all begin with Z
    train, held_out = names[:TRAIN_CONVERSATIONS], names[TRAIN_CONVERSATIONS:]
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    records = as_training_records(conversations(train, seed=1))
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    questions = conversations(held_out, seed=2)
    print(f"chat demo: {len(records):,} training conversations, {len(questions)} held out with unseen names")

    from minigpt.train import finetune

    model = out / "model"
    finetune.main(["--model_name_or_path", str(base), "--train_file", str(data / "train.jsonl"), "--output_dir",
                   str(model), "--max_steps", str(args.max_steps), "--per_device_train_batch_size", "16",
                   "--learning_rate", "3e-3", "--warmup_steps", "20", "--lr_scheduler_type", "cosine",
                   "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no",
                   "--threads", str(args.threads), "--disable_tqdm", "true"])  # fmt: skip

    answers = ask_through_the_server(model, questions)
    right = sum(reply == answer for reply, (_, answer) in zip(answers, questions))
    (out / "answers.jsonl").write_text("".join(
        json.dumps({"messages": m, "expected": a, "reply": r}) + "\n" for (m, a), r in zip(questions, answers)))  # fmt: skip
    accuracy = right / len(questions)
    print(f"chat demo: {right} of {len(questions)} held-out questions answered exactly ({accuracy:.0%}) through "
          f"/v1/chat/completions; the answers are in {out / 'answers.jsonl'}")
    if accuracy < args.target:
        raise SystemExit(f"chat demo: below the {args.target:.0%} target; train longer (--max_steps) or from a base "
                         "pretrained longer")  # fmt: skip
    return accuracy


def ask_through_the_server(model: Path, questions: list) -> list[str]:
    """Each question's greedy answer from minigpt-serve (started here on a free 127.0.0.1 port, stopped at the end)."""
    import socket

    from openai import APIStatusError, OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "minigpt.serve", str(model), "--host", "127.0.0.1", "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 180
        while True:  # until the server answers
            try:
                client.models.list()
                break
            except APIStatusError:  # it answers, with an error status (transformers 5.17's server does on /v1/models)
                break
            except Exception:  # noqa: BLE001  (not up yet: connection refused)
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"minigpt-serve did not start on port {port}") from None
                time.sleep(1)
        answers = []
        for messages, _ in questions:
            reply = client.chat.completions.create(model=str(model), messages=messages, temperature=0,
                                                   max_tokens=24)  # fmt: skip
            answers.append((reply.choices[0].message.content or "").strip())
        return answers
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def cli(argv: list[str] | None = None) -> None:
    """The `minigpt-chat-demo` console script."""
    run_cli("chat_demo", main, argv)


if __name__ == "__main__":
    cli()
