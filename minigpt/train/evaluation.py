"""Evaluate causal LM folders (MiniGPT or any AutoModelForCausalLM) on text or on prompt/answer pairs.

Text (.txt, or .jsonl with a text field): perplexity with the strided sliding window of transformers' perplexity
guide, so a text longer than the context is scored with up to `max_length - stride` tokens of context for every
token, and each token is scored exactly once; next-token accuracy; bits per UTF-8 byte, which compares models
with different tokenizers; tokens per second.

Pairs (.jsonl with prompt and answer fields): the perplexity of the answers given their prompts, then answers
generated with the chosen decoding strategy, scored by exact match and chrF (sacrebleu). Prompts are built with
the template that minigpt/train/finetune.py saved next to the model (prompt_template.json), unless overridden.

Every figure goes through the project's own `evaluate` metric modules (minigpt/train/metrics/<name>/<name>.py).

    python -m minigpt.train.evaluation runs/en_fr --data minigpt/train/examples/en_fr.jsonl
    python -m minigpt.train.evaluation runs/finetuned --data held_out.txt --compare runs/pretrain
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import modeling_minigpt  # noqa: F401  (registers MiniGPT with the Auto classes)
from minigpt.commands import one_line_usage, run_cli
from minigpt.folders import load_pretrained
from minigpt.train.corpus import read_rows
from minigpt.train.metrics import load_metric
from minigpt.train.pairs import (
    ESCAPES_HELP,
    PromptTemplate,
    SupervisedCollator,
    encode_pair,
    pair_fields,
    text_field_error,
    unescape,
)
from minigpt.sources import adapter_base, check_model_path
from minigpt.train.threads import THREADS_HELP, set_threads
from minigpt.train.tokenizer import check_vocab, context_length, load_tokenizer, special_token_ids, tokenizer_source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FALLBACK_CONTEXT = 1024  # tokens, for a model and tokenizer that state no context length


def load_model(path: str, tokenizer_path: str | None = None, device: str = "cpu", dtype: str = "float32",
               trust_remote_code: bool = False, option: str = "model"):
    """(model in eval mode on `device`, tokenizer) from a checkpoint folder, a Hub id or a LoRA adapter folder.

    An adapter folder (adapter_config.json, no config.json) loads as transformers loads one when peft is installed:
    its base model (base_model_name_or_path) with the adapter applied, which is how an adapter is evaluated."""
    kind = check_model_path(path, option)
    if kind == "adapter":
        adapter_base(path, option)  # a base that cannot be found is said now, naming this option
    tokenizer = load_tokenizer(tokenizer_source(path, tokenizer_path, kind), option="--tokenizer")
    model = load_pretrained(AutoModelForCausalLM, path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    check_vocab(tokenizer, model)
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Scoring given targets: summed NLL and argmax hits over the labelled positions
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_batch(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: summed -log p(label) in nats, argmax hits, and the number of scored tokens. labels[:, t] is the
    target of position t (the shift is done here, as in the causal LM loss); -100 marks what is not scored."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != -100
    nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")  # (B, T-1)
    hits = (logits.argmax(-1) == targets) & mask
    return (nll * mask).sum(-1), hits.sum(-1), mask.sum(-1)


def sliding_windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) for each window over a stream of n tokens, as in transformers' perplexity guide:
    windows start every `stride` tokens and score only the tokens that the previous window did not, so every
    token from position 1 on is scored exactly once, with at least max_length - stride tokens of context
    (fewer at the very start). stride = max_length (no overlap) would leave each window's first token without
    context and unscored, so the largest stride is max_length - 1."""
    if not 0 < stride < max_length:
        raise ValueError(
            f"--stride must lie in [1, max_length - 1 = {max_length - 1}], got {stride}; a smaller stride gives "
            "each token more context (and costs more windows)."
        )
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return windows


def text_metrics(model, tokenizer, texts: list[str], max_length: int | None = None, stride: int | None = None,
                 batch_size: int = 4) -> dict:
    """Perplexity, next-token accuracy, bits per byte and tokens/s of `texts`, read as one stream:
    [BOS] text_1 [EOS] text_2 ... text_n. The leading BOS (EOS if there is none) lets the first real token be
    scored too, so the scored tokens cover exactly the UTF-8 bytes of the texts (plus the separators)."""
    max_length = max_length or context_length(model, tokenizer) or FALLBACK_CONTEXT
    stride = stride or max(1, max_length // 2)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    stream = [start]
    for i, text in enumerate(texts):
        stream += tokenizer.encode(text, add_special_tokens=False, verbose=False)
        if i < len(texts) - 1:
            stream.append(tokenizer.eos_token_id)
    if len(stream) < 2:
        raise ValueError("The text is empty: there is no token to score.")
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)

    ppl = load_metric("perplexity")
    acc = load_metric("next_token_accuracy")
    bpb = load_metric("bits_per_byte")
    device = next(model.parameters()).device
    windows = sliding_windows(len(stream), max_length, stride)
    seconds, total_nll = 0.0, 0.0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        T = max(end - begin for begin, end, _ in chunk)
        input_ids = torch.full((len(chunk), T), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, (begin, end, first) in enumerate(chunk):
            input_ids[row, : end - begin] = torch.tensor(stream[begin:end])
            attention_mask[row, : end - begin] = 1
            labels[row, first - begin : end - begin] = input_ids[row, first - begin : end - begin]
        t0 = time.perf_counter()
        nll, hits, count = score_batch(model, input_ids.to(device), attention_mask.to(device), labels.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        ppl.add_batch(nll=nll.tolist(), num_tokens=count.tolist())
        acc.add_batch(correct=hits.tolist(), total=count.tolist())
        total_nll += nll.sum().item()
    bpb.add_batch(nll=[total_nll], num_bytes=[num_bytes])

    out = ppl.compute()
    out.update(acc.compute())
    out.update(bpb.compute())
    out.update(max_length=max_length, stride=stride, windows=len(windows), seconds=seconds,
               tokens_per_second=out["num_tokens"] / seconds if seconds > 0 else float("nan"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Prompt/answer pairs: answer perplexity, then generation scored by exact match and chrF
# ---------------------------------------------------------------------------------------------------------------


def pair_metrics(model, tokenizer, pairs: list[tuple[str, str]], template: PromptTemplate, batch_size: int = 16,
                 max_new_tokens: int = 64, **decoding) -> dict:
    """Teacher-forced answer perplexity and generated-answer exact match / chrF for (prompt, answer) pairs.
    `decoding` goes to `generate` (do_sample, num_beams, temperature, top_k, top_p, ...); greedy by default."""
    context = context_length(model, tokenizer) or FALLBACK_CONTEXT
    device = next(model.parameters()).device
    ppl = load_metric("perplexity")
    acc = load_metric("next_token_accuracy")
    collate = SupervisedCollator(tokenizer.pad_token_id)
    for i in range(0, len(pairs), batch_size):
        rows = []
        for j, (prompt, answer) in enumerate(pairs[i : i + batch_size]):
            ids, labels, _ = encode_pair(tokenizer, template, prompt, answer, context, "left", row=i + j + 1)
            rows.append({"input_ids": ids, "labels": labels})
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        nll, hits, count = score_batch(model, **batch)
        ppl.add_batch(nll=nll.tolist(), num_tokens=count.tolist())
        acc.add_batch(correct=hits.tolist(), total=count.tolist())
    answer_ppl = ppl.compute()
    answer_acc = acc.compute()

    predictions, seconds, new_tokens = [], 0.0, 0
    for i in range(0, len(pairs), batch_size):
        prompts = [template.prompt_ids(tokenizer, p)[-(context - 1) :] for p, _ in pairs[i : i + batch_size]]
        T = max(len(p) for p in prompts)
        budget = min(max_new_tokens, context - T)
        if budget < 1:
            raise ValueError(f"A prompt of {T} tokens fills the model's context of {context}; shorten the prompts.")
        # left padding: every prompt ends at the same position, where generation starts
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (T - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=budget,
                **special_token_ids(tokenizer), **decoding,
            )  # (B, T + new)
        seconds += time.perf_counter() - t0
        generated = out[:, T:]
        # a row's tokens end with its first EOS and generate() pads after it: counted by position, not by pad id,
        # since a tokenizer without a pad token pads with EOS and the EOS it generated would not count
        is_eos = generated == tokenizer.eos_token_id
        new_tokens += int(((is_eos.cumsum(1) - is_eos.long()) == 0).sum())
        predictions += [s.strip() for s in tokenizer.batch_decode(generated, skip_special_tokens=True)]

    references = [a.strip() for _, a in pairs]
    em = load_metric("exact_match").compute(predictions=predictions, references=references)
    chrf = load_metric("chrf").compute(predictions=predictions, references=references)
    return {
        "answer_perplexity": answer_ppl["perplexity"],
        "answer_next_token_accuracy": answer_acc["next_token_accuracy"],
        "exact_match": em["exact_match"],
        "chrf": chrf["chrf"],
        "num_examples": em["num_examples"],
        "generated_tokens_per_second": new_tokens / seconds if seconds > 0 else float("nan"),
        "predictions": predictions,
    }


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def read_data(path: str, mode: str, text_field: str, prompt_field: str, answer_field: str):
    """('text', [str]) or ('pairs', [(prompt, answer)]) from a .txt or .jsonl file."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"--data {path} is a folder; evaluation reads one .txt or .jsonl file.")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--data {path}: no such file; pass a .txt or .jsonl file.")
    if Path(path).suffix == ".txt":
        if mode == "pairs":
            raise ValueError(f"{path} is plain text; pairs mode needs a .jsonl with prompt and answer fields.")
        return "text", list(read_rows(path, text_unit="document")["text"])  # the whole file as one text
    if Path(path).suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: cannot read a {Path(path).suffix or 'suffix-less'} file; pass a .txt or .jsonl.")
    rows = read_rows(path)
    has_pairs = prompt_field in rows.column_names and answer_field in rows.column_names
    if mode == "pairs" or (mode == "auto" and has_pairs):
        if not has_pairs:
            pair = pair_fields(rows.column_names)
            hint = f" (here: --prompt_field {pair[0]} --answer_field {pair[1]})" if pair else ""
            raise ValueError(
                f"{path} lacks {prompt_field!r} or {answer_field!r} (fields: {rows.column_names}); name them with "
                f"--prompt_field and --answer_field{hint}."
            )
        return "pairs", list(zip(rows[prompt_field], rows[answer_field]))
    if text_field not in rows.column_names:
        raise text_field_error(path, text_field, rows.column_names, "--mode pairs")
    return "text", [t for t in rows[text_field] if t]


def evaluate_folder(path: str, args: argparse.Namespace, option: str = "model", data=None) -> dict:
    """The results of one model; `data` is what read_data returned, read here when None."""
    data = data or read_data(args.data, args.mode, args.text_field, args.prompt_field, args.answer_field)
    model, tokenizer = load_model(path, args.tokenizer, args.device, args.dtype, args.trust_remote_code, option)
    kind, data = data
    result = {"model": path, "parameters": sum(p.numel() for p in model.parameters())}
    if kind == "text":
        result.update(text_metrics(model, tokenizer, data, args.max_length, args.stride, args.batch_size))
        return result
    saved = PromptTemplate.load(path) or PromptTemplate()
    template = PromptTemplate(
        args.prompt_template if args.prompt_template is not None else saved.prompt_template,
        args.separator if args.separator is not None else saved.separator,
        saved.add_bos,
    )
    decoding = {"num_beams": args.num_beams, "do_sample": args.do_sample}
    if args.do_sample:
        torch.manual_seed(args.seed)
        decoding.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    result.update(pair_metrics(model, tokenizer, data, template, args.batch_size, args.max_new_tokens, **decoding))
    return result


ROWS = [  # (key, label, format)
    ("perplexity", "perplexity", "{:.3f}"),
    ("loss", "loss (nats/token)", "{:.4f}"),
    ("next_token_accuracy", "next-token accuracy", "{:.2%}"),
    ("bits_per_byte", "bits per byte", "{:.4f}"),
    ("num_tokens", "tokens scored", "{:d}"),
    ("windows", "windows (max_length / stride)", None),
    ("tokens_per_second", "tokens/s", "{:,.0f}"),
    ("answer_perplexity", "answer perplexity", "{:.3f}"),
    ("answer_next_token_accuracy", "answer next-token accuracy", "{:.2%}"),
    ("exact_match", "exact match", "{:.2%}"),
    ("chrf", "chrF", "{:.1f}"),
    ("num_examples", "examples", "{:d}"),
    ("generated_tokens_per_second", "generated tokens/s", "{:,.0f}"),
    ("parameters", "parameters", "{:,d}"),
]


def format_table(results: list[dict]) -> str:
    lines = [["", *[Path(r["model"]).name or r["model"] for r in results]]]
    for key, label, fmt in ROWS:
        if not any(key in r for r in results):
            continue
        cells = []
        for r in results:
            if key not in r:
                cells.append("-")
            elif key == "windows":
                cells.append(f"{r['windows']} ({r['max_length']} / {r['stride']})")
            else:
                cells.append(fmt.format(r[key]))
        lines.append([label, *cells])
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    one_line_usage(p, "evaluation")
    p.add_argument("model", help="checkpoint folder (model + tokenizer)")
    p.add_argument("--data", required=True, help=".txt, .jsonl with a text field, or .jsonl prompt/answer pairs")
    p.add_argument("--compare", metavar="DIR2", help="a second checkpoint folder, evaluated the same way, side by side")
    p.add_argument("--mode", choices=["auto", "text", "pairs"], default="auto",
                   help="auto: pairs when the .jsonl has the prompt and answer fields, else text")
    p.add_argument("--tokenizer", help="tokenizer folder, if it is not the model folder")
    p.add_argument("--text_field", default="text")
    p.add_argument("--prompt_field", default="prompt")
    p.add_argument("--answer_field", default="answer")
    p.add_argument("--prompt_template", type=unescape,
                   help="default: the model folder's prompt_template.json, else '{prompt}'. " + ESCAPES_HELP)
    p.add_argument("--separator", type=unescape,
                   help="default: from prompt_template.json, else a newline. " + ESCAPES_HELP)
    p.add_argument("--max_length", type=int, help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, help="tokens between window starts, < max_length (default: max_length / 2)")
    p.add_argument("--batch_size", type=int, default=4, help="windows (text) or pairs per forward pass")
    p.add_argument("--max_new_tokens", type=int, default=64, help="pairs: most tokens generated per answer")
    p.add_argument("--num_beams", type=int, default=1, help="pairs: beam search width (1 = greedy)")
    p.add_argument("--do_sample", action="store_true", help="pairs: sample instead of greedy/beam search")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--trust_remote_code", action="store_true", help="for non-MiniGPT folders that ship code")
    p.add_argument("--output_json", help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    threads = set_threads(args.threads, on_cpu=torch.device(args.device).type == "cpu")
    print(f"torch threads: {threads} (--threads)", file=sys.stderr)
    check_model_path(args.model, "model")  # a wrong folder or name fails before anything loads
    if args.compare:
        check_model_path(args.compare, "--compare")
    if args.prompt_template is not None:
        PromptTemplate(args.prompt_template)  # refused now (no {prompt}), not after the models load
    # bad data fails before any model loads
    data = read_data(args.data, args.mode, args.text_field, args.prompt_field, args.answer_field)
    results = [evaluate_folder(args.model, args, data=data)]
    if args.compare:
        results.append(evaluate_folder(args.compare, args, "--compare", data))
    print(f"data: {args.data}")
    print(format_table(results))
    if "predictions" in results[0]:
        _, pairs = data
        names = [Path(r["model"]).name or r["model"] for r in results]
        print("samples: " + " | ".join(names) if len(results) > 1 else "samples:")
        for (prompt, answer), *preds in list(zip(pairs, *[r["predictions"] for r in results]))[:5]:
            got = " | ".join(f"{name}: {p!r}" if len(results) > 1 else repr(p) for name, p in zip(names, preds))
            print(f"  {prompt!r} -> {got}  (reference {answer!r})")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results


def cli(argv: list[str] | None = None) -> None:
    """The `minigpt-evaluate` console script."""
    run_cli("evaluation", main, argv)


if __name__ == "__main__":
    cli()
