r"""Generate text from a trained checkpoint, from the command line, with transformers' own `generate`.

    python minigpt/train/generate.py --model runs/tiny --prompt "ROMEO:" --strategy top_p --temperature 0.8
    python -m minigpt.train.generate --model runs/tiny --prompt "To be" --strategy beam --num_beams 4 --no_stream
    minigpt-generate --model runs/en_fr --prompt "good night"   # a supervised fine-tune: its template, greedy

What the model was trained on is what it gets by default: without --strategy, decoding follows the model's own
generation_config.json (a supervised fine-tune decodes greedily, a pretrained model samples with its saved
settings), and a folder with a prompt_template.json (a supervised fine-tune's) wraps --prompt in that template,
with the BOS its training rows began with, as evaluation.py does; --raw_prompt passes --prompt on as it is.
--prompt reads \n, \t and \\ as newline, tab and backslash, as minigpt-finetune's template options do.

Strategies, which override generation_config.json: greedy (argmax), top_k (sample among the k likeliest), top_p
(sample from the smallest set whose probability reaches p), beam (beam search). Each sampling run uses a fresh seed,
printed to stderr; pass it back with --seed to get the same text again. Output streams token by token
unless --no_stream (beam search cannot stream: it only knows the best sequence at the end).
An empty prompt (without a template) starts a fresh document: generation begins after an EOS, as every document
did in training.
"""

import argparse
import secrets
import sys

import torch
from transformers import AutoModelForCausalLM, TextStreamer, set_seed

import modeling_minigpt  # noqa: F401  (registers MiniGPT with the Auto classes, so no remote code is needed)
from minigpt.commands import one_line_usage, run_cli
from minigpt.folders import load_pretrained
from minigpt.train.pairs import ESCAPES_HELP, TEMPLATE_FILE, PromptTemplate, unescape
from minigpt.sources import adapter_base, check_model_path
from minigpt.train.threads import THREADS_HELP, set_threads
from minigpt.train.tokenizer import context_length, load_tokenizer, special_token_ids, tokenizer_source

STRATEGIES = ("greedy", "top_k", "top_p", "beam")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Strategies: " + ", ".join(STRATEGIES),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    one_line_usage(p, "generate")
    p.add_argument("--model", required=True, help="A folder written by save_pretrained (e.g. pretrain's output_dir), "
                   "a Hub id, or a LoRA adapter folder (loaded on its base model, as transformers does with peft).")
    p.add_argument("--prompt", default="", type=unescape,
                   help=f"Text to continue; with the model folder's {TEMPLATE_FILE} (a supervised fine-tune's), the "
                   "bare prompt, wrapped in that template as in training. Empty: start a new document. " + ESCAPES_HELP)
    p.add_argument("--raw_prompt", action="store_true",
                   help=f"Pass --prompt on as it is, without the model folder's {TEMPLATE_FILE}.")
    p.add_argument("--tokenizer", default=None, help="Tokenizer folder, if it is not the model folder.")
    p.add_argument("--strategy", default=None, choices=STRATEGIES,
                   help="Decoding strategy, overriding the model's generation_config.json. None: that file's "
                   "decoding (greedy for a supervised fine-tune), as transformers' generate and pipeline use it.")
    p.add_argument("--max_new_tokens", type=int, default=200, help="Tokens to generate after the prompt.")
    p.add_argument("--temperature", type=float, default=0.8, help="Softmax temperature of --strategy top_k/top_p, > 0.")
    p.add_argument("--top_k", type=int, default=50, help="k of --strategy top_k (tokens).")
    p.add_argument("--top_p", type=float, default=0.95, help="p of --strategy top_p (nucleus), in (0, 1].")
    p.add_argument("--num_beams", type=int, default=4, help="Beams of --strategy beam.")
    p.add_argument("--seed", type=int, default=None,
                   help="Sampling seed; None: a fresh one each run, printed so that the run can be repeated.")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP + " None: that default, on CPU.")
    p.add_argument("--no_stream", action="store_true", help="Print the text at the end instead of token by token.")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... Default: cuda if available, else cpu.")
    p.add_argument("--trust_remote_code", action="store_true", help="Allow code shipped in a non-MiniGPT folder.")
    args = p.parse_args(argv)
    problems = []
    try:  # the checks every script runs on a model name: no such folder, not a model folder, a missing Hub id
        args.kind = check_model_path(args.model, "--model")
        if args.kind == "adapter":
            adapter_base(args.model, "--model")  # a base that cannot be found is said now, as a usage error
    except (ValueError, OSError) as error:
        problems.append(str(error))
    if args.max_new_tokens < 1:
        problems.append(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}.")
    if not args.temperature > 0:
        problems.append(f"--temperature must be > 0, got {args.temperature} (use --strategy greedy for argmax).")
    if args.top_k < 1:
        problems.append(f"--top_k must be >= 1, got {args.top_k}.")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top_p must lie in (0, 1], got {args.top_p}.")
    if args.num_beams < 2 and args.strategy == "beam":
        problems.append(f"--num_beams must be >= 2 for beam search, got {args.num_beams}.")
    if args.threads is not None and args.threads < 0:
        problems.append(f"--threads must be >= 0 (0 = torch's default), got {args.threads}.")
    if problems:
        p.error(" ".join(problems))
    return args


def strategy_kwargs(args: argparse.Namespace) -> dict:
    """The generate() arguments of each strategy; explicit values override the checkpoint's generation_config.
    No --strategy: none, so generate() decodes as the model's generation_config.json says."""
    if args.strategy is None:
        return {}
    if args.strategy == "greedy":
        return dict(do_sample=False, num_beams=1)
    if args.strategy == "beam":
        return dict(do_sample=False, num_beams=args.num_beams, early_stopping=True)
    if args.strategy == "top_k":
        return dict(do_sample=True, num_beams=1, temperature=args.temperature, top_k=args.top_k, top_p=1.0)
    return dict(do_sample=True, num_beams=1, temperature=args.temperature, top_p=args.top_p, top_k=0)


def decoding(model, args: argparse.Namespace) -> tuple[bool, int, str]:
    """(samples, beams, a description) of the decoding that generate() will do: --strategy's, else the model's
    generation_config.json's."""
    if args.strategy is not None:
        kwargs = strategy_kwargs(args)
        return kwargs["do_sample"], kwargs["num_beams"], f"--strategy {args.strategy}"
    config = model.generation_config
    beams = config.num_beams or 1
    if config.do_sample:
        settings = ", ".join(f"{k} {getattr(config, k)}" for k in ("temperature", "top_k", "top_p",
                                                                     "repetition_penalty")
                             if getattr(config, k, None) is not None)  # fmt: skip
        kind = "sampling" + (f" ({settings})" if settings else "")
    else:
        kind = f"beam search ({beams} beams)" if beams > 1 else "greedy"
    return bool(config.do_sample), beams, f"the model's generation_config.json: {kind} (--strategy overrides it)"


def prompt_ids(tokenizer, prompt: str, template: PromptTemplate | None) -> torch.Tensor:
    """The prompt's ids: wrapped in the fine-tune's template with its BOS as training did, else as the tokenizer
    encodes it (a supervised fine-tune's tokenizer adds the BOS its training rows began with)."""
    if template is not None:
        return torch.tensor([template.prompt_ids(tokenizer, prompt)])
    return tokenizer(prompt, return_tensors="pt").input_ids


def generate(model, tokenizer, prompt: str, args: argparse.Namespace, stream: bool = False,
             template: PromptTemplate | None = None) -> str:
    """Continue `prompt` (wrapped in `template` if given); returns the full prompt plus the generated text (special
    tokens removed)."""
    ids = prompt_ids(tokenizer, prompt, template)
    if ids.shape[1] == 0:  # a new document: in training, every document followed an EOS
        ids = torch.tensor([[tokenizer.eos_token_id]])
    limit = context_length(model)  # the model's own limit; None: it has none
    max_new = args.max_new_tokens
    if limit is not None:
        if ids.shape[1] >= limit:
            raise SystemExit(
                f"generate: error: the prompt is {ids.shape[1]} tokens, but the model accepts at most "
                f"{limit} positions. Shorten --prompt."
            )
        if ids.shape[1] + max_new > limit:
            max_new = limit - ids.shape[1]
            print(
                f"generate: note: generating {max_new} tokens, not {args.max_new_tokens}: the model accepts at "
                f"most {limit} positions.",
                file=sys.stderr,
            )
    ids = ids.to(model.device)
    set_seed(args.seed if args.seed is not None else 0)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        streamer=streamer,
        **special_token_ids(tokenizer),
        **strategy_kwargs(args),
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = set_threads(args.threads, on_cpu=torch.device(device).type == "cpu")
    try:
        tokenizer = load_tokenizer(tokenizer_source(args.model, args.tokenizer, args.kind), option="--tokenizer",
                                   trust_remote_code=args.trust_remote_code)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"generate: error: {e}") from None
    model = load_pretrained(AutoModelForCausalLM, args.model, trust_remote_code=args.trust_remote_code).to(device)
    model.eval()
    sampling, beams, how = decoding(model, args)
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    print(f"generate: {threads} CPU threads, decoding as {how}" + (
        f", seed {args.seed} (--seed {args.seed} repeats this text)" if sampling else ""), file=sys.stderr)
    template = None if args.raw_prompt else PromptTemplate.load(args.model)
    if template is not None:
        print(f"generate: --prompt wrapped in the model's {TEMPLATE_FILE} "
              f"({template.prompt_template!r} + {template.separator!r}{', after BOS' if template.add_bos else ''}), "
              "as in training; --raw_prompt skips it.", file=sys.stderr)
    stream = not args.no_stream and beams == 1
    if not args.no_stream and beams > 1:
        print("generate: note: beam search cannot stream; printing the best beam at the end.", file=sys.stderr)
    text = generate(model, tokenizer, args.prompt, args, stream=stream, template=template)
    if not stream:
        print(text)
    return text


def cli(argv: list[str] | None = None) -> None:
    """The `minigpt-generate` console script."""
    run_cli("generate", main, argv)


if __name__ == "__main__":
    cli()
