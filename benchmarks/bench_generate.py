"""Greedy generation speed: MiniGPT against transformers' GPT2LMHeadModel (sdpa), same shape and precision.

Each run decodes a random prompt greedily for a fixed number of new tokens (no EOS, so every run does the same
work), through `model.generate()` with
    dynamic   the default DynamicCache;
    static    cache_implementation="static", which generate() compiles (CUDA graphs) by itself on GPU;
    no_cache  use_cache=False: every step recomputes the whole sequence;
and, for MiniGPT only,
    fast      modeling_minigpt.fast_decode.FastDecoder with its defaults: on GPU the whole step (forward, argmax,
              bookkeeping) compiled with torch.compile(fullgraph=True) and replayed as one CUDA graph; on CPU the
              same step run eagerly.
GPU: bf16 weights; CPU: fp32. Reports new tokens/s, ms per new token and peak memory (median over the timed runs;
warm-up runs excluded), with ratios to GPT-2 in the same setting.

    python -m benchmarks.bench_generate --device cpu --size small
    python -m benchmarks.bench_generate --device cuda --size gpt2-124m --batches 1,32
"""

import argparse
import sys

import torch

from benchmarks import common
from modeling_minigpt.fast_decode import FastDecoder

SETTINGS = ["dynamic", "static", "fast", "no_cache"]  # table order
# run order: the settings the targets are about first, the slow no_cache last, so that a run stopped at its
# time cap (a GPU run compiles four static-cache steps and two fast loops) has what matters most
RUN_ORDER = ["static", "fast", "dynamic", "no_cache"]


def runs_in(name: str, setting: str) -> bool:
    """MiniGPT runs every setting, GPT-2 every generate() one."""
    return name == "minigpt" or setting != "fast"


def make_run(model, name: str, setting: str, ids: torch.Tensor, max_new_tokens: int, cuda_graphs=None):
    """run(n): generate n <= max_new_tokens tokens for the batch `ids` and check that it did."""
    mask = torch.ones_like(ids)
    decoder = None
    if setting == "fast":
        decoder = FastDecoder(model, ids.shape[0], ids.shape[1] + max_new_tokens, cuda_graphs=cuda_graphs)
    options = {"dynamic": {}, "static": {"cache_implementation": "static"}, "no_cache": {"use_cache": False}}

    @torch.no_grad()
    def run(n: int = max_new_tokens):
        if decoder is not None:
            out = decoder.generate(ids, n, attention_mask=mask)
        else:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0, **options[setting])
        assert out.shape == (ids.shape[0], ids.shape[1] + n), f"{name} {setting}: got {tuple(out.shape)}"
        return out

    return run


def run(args) -> dict:
    shape = common.SIZES[args.size]
    P, N = args.prompt_len, args.new_tokens
    if P + N > shape["n_positions"]:
        raise SystemExit(f"--prompt-len {P} + --new-tokens {N} exceeds the {args.size} context "
                         f"({shape['n_positions']}); lower one of them.")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = []
    payload = {"prompt_len": P, "new_tokens": N, "dtype": str(dtype).removeprefix("torch."), "repeats": args.repeats,
               "warmup": args.warmup, "results": rows}
    models = {name: common.build_model(name, shape, args.device).to(dtype).eval() for name in args.models}

    for setting in sorted(args.settings, key=RUN_ORDER.index):
        for batch in args.batches:
            if setting == "no_cache" and batch not in args.no_cache_batches:
                continue
            ids = torch.randint(3, 50257, (batch, P), generator=torch.Generator().manual_seed(batch)).to(args.device)
            names = [n for n in models if runs_in(n, setting)]
            rows += measure(args, models, names, setting, ids, N)
            common.free_memory(args.device)
            common.write_results("generate", args, payload, table(rows), final=False)
    common.write_results("generate", args, payload, table(rows))
    return payload


def measure(args, models: dict, names: list[str], setting: str, ids: torch.Tensor, N: int) -> list[dict]:
    """Rows for one (batch, setting). GPU: each model warmed up and timed in turn, its peak memory counted from
    before its warm-up (its weights, its cache, what generation allocates); CPU: all warmed up, then timed
    interleaved run by run, so that a noisy neighbour slows every model alike. A model that fails gets a row
    with its error, so that one broken setting does not cost the rest of a (GPU) run."""
    batch = ids.shape[0]
    # warm-up runs need the full length only where the cache shape is compiled in (static on GPU)
    warm_tokens = N if args.device == "cuda" and setting == "static" else min(N, 8)
    runs, errors, times, memory, agreement, notes = {}, {}, {n: [] for n in names}, {}, {}, {}

    def attempt(name, fn):
        try:
            fn()
        except Exception as err:  # noqa: BLE001  (recorded in the results, and printed)
            errors[name] = f"{type(err).__name__}: {err}"
            runs.pop(name, None)
            print(f"[generate] batch {batch} {setting} {name}: FAILED {errors[name][:500]}", flush=True)

    def warm_up(name):
        print(f"[generate] batch {batch} {setting} {name}: warming up", flush=True)
        runs[name] = make_run(models[name], name, setting, ids, N)
        try:
            for _ in range(args.warmup):
                runs[name](warm_tokens)
        except Exception as err:
            if setting != "fast" or args.device != "cuda":
                raise
            # a failed capture should not cost the compiled-step figure: time it without CUDA graphs, and say so
            notes[name] = f"without CUDA graphs, whose capture failed: {type(err).__name__}: {err}"
            print(f"[generate] batch {batch} fast {name}: {notes[name][:500]}", flush=True)
            runs[name] = make_run(models[name], name, setting, ids, N, cuda_graphs=False)
            for _ in range(args.warmup):
                runs[name](warm_tokens)

    def time_one(name):
        times[name] += common.time_runs(runs[name], args.device, 0, 1)

    def check(name):  # the fast loop, compiled and captured as timed, against generate()
        if setting == "fast":
            agreement[name] = same_tokens(models[name], runs[name], ids, N)

    if args.device == "cuda":
        for name in names:
            weights = sum(p.numel() * p.element_size() for p in models[name].parameters())
            baseline = torch.cuda.memory_allocated() - weights
            attempt(name, lambda: warm_up(name))
            common.reset_peak_memory(args.device)
            for _ in range(args.repeats if name in runs else 0):
                attempt(name, lambda: time_one(name))
            memory[name] = (torch.cuda.max_memory_allocated() - baseline) / 2**30
            if name in runs:
                attempt(name, lambda: check(name))
            runs.pop(name, None)  # frees a fast decoder's cache before the next model
    else:
        for name in names:
            attempt(name, lambda: warm_up(name))
        for _ in range(args.repeats):
            for name in list(runs):
                attempt(name, lambda: time_one(name))
        for name in list(runs):
            attempt(name, lambda: check(name))

    rows = []
    for name in names:
        row = {"model": name, "batch": batch, "setting": setting}
        if name in errors or not times[name]:
            rows.append({**row, "error": errors.get(name, "no timed run")})
            continue
        seconds = common.median(times[name])
        rows.append({**row, "tokens_per_s": batch * N / seconds, "ms_per_token": 1000 * seconds / N,
                     "peak_memory_gib": memory.get(name), "times_s": times[name],
                     "rounds": f"{batch}/{setting}" if args.device == "cpu" else None})  # timed interleaved
        if name in agreement:
            rows[-1]["same_tokens_as_generate"] = agreement[name]
        if name in notes:
            rows[-1]["note"] = notes[name]
        print(f"[generate] batch {batch} {setting} {name}: {batch * N / seconds:,.1f} tokens/s", flush=True)
    return rows


@torch.no_grad()
def same_tokens(model, run, ids: torch.Tensor, N: int) -> float:
    """Share of new tokens where a run and generate() with the dynamic cache agree. 1.0 in fp32; in bf16 a
    random-weight model has near-ties that different (equally valid) kernels may break differently, after
    which the two continuations diverge."""
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                               do_sample=False, pad_token_id=0)
    return (run()[:, ids.shape[1]:] == reference[:, ids.shape[1]:]).float().mean().item()


def table(rows: list[dict]) -> str:
    """One row per (batch, setting, model), with the ratio to GPT-2 in the same batch and setting; the fast loop
    is compared with GPT-2's static-cache generate(), the fastest GPT-2 path."""
    ok = [r for r in rows if "error" not in r]
    reference = {(r["batch"], r["setting"]): r for r in ok if r["model"] == "gpt2"}
    static = {r["batch"]: r for r in ok if r["model"] == "minigpt" and r["setting"] == "static"}
    out = []
    for r in sorted(rows, key=lambda r: (r["batch"], SETTINGS.index(r["setting"]), r["model"] != "minigpt")):
        if "error" in r:
            failed = "failed: " + r["error"][:80].replace("|", "/")
            out.append([r["batch"], r["setting"], r["model"], failed] + [""] * 5)
            continue
        ref = reference.get((r["batch"], "static" if r["setting"] == "fast" else r["setting"]))
        ratio = 1 / common.time_ratio(r, ref) if ref else None  # the fast loop's runs are not paired: medians
        own_static = static.get(r["batch"]) if r["setting"] == "fast" else None
        vs_static = r["tokens_per_s"] / own_static["tokens_per_s"] if own_static else None
        label = r["model"] + (" (no CUDA graphs: capture failed)" if r.get("note") else "")
        out.append([r["batch"], r["setting"], label, f"{r['tokens_per_s']:,.1f}",
                    common.fmt(r["ms_per_token"], ".2f"), common.fmt(r["peak_memory_gib"], ".2f"),
                    common.fmt(ratio, ".2f", "x"),
                    common.fmt(vs_static, ".2f", "x"), common.fmt(r.get("same_tokens_as_generate"), ".0%")])
    headers = ["batch", "cache", "model", "new tokens/s", "ms/token", "peak GiB", "vs GPT-2", "vs own static",
               "tokens = generate()"]
    return common.markdown_table(headers, out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--batches", default=None,
                        help="comma-separated batch sizes (default: 1,32 on GPU, 1,8 on CPU)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: 128; 64 for small)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default: 256; 128 for small)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {SETTINGS}")
    parser.add_argument("--no-cache-batches", default=None,
                        help="batch sizes that also run no_cache (default: all on GPU, 1 on CPU, where it is slow)")
    args = common.resolve_common_args(parser.parse_args(argv))
    small = args.size == "small"
    args.batches = [int(b) for b in (args.batches or ("1,8" if args.device == "cpu" else "1,32")).split(",")]
    default_no_cache = ",".join(map(str, args.batches)) if args.device == "cuda" else "1"
    args.no_cache_batches = [int(b) for b in (args.no_cache_batches or default_no_cache).split(",")]
    args.prompt_len = args.prompt_len or (64 if small else 128)
    args.new_tokens = args.new_tokens or (128 if small else 256)
    args.settings = [s for s in args.settings.split(",") if s]
    if set(args.settings) - set(SETTINGS):
        raise SystemExit(f"--settings {args.settings} is not valid; pick from {SETTINGS}.")
    args.repeats = args.repeats or 3
    # one warm-up run per setting: on GPU it compiles (static, fast) and captures the CUDA graphs
    args.warmup = args.warmup if args.warmup is not None else 1
    return args


def main(argv=None):
    common.set_cpu_env()
    run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
