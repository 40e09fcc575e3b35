"""Training-step speed: MiniGPT against transformers' GPT2LMHeadModel (sdpa), same shape, batch and precision.

One step is forward + loss + backward + fused AdamW step, on a fixed batch of random tokens (no data loading).
GPU: bf16 autocast; CPU: fp32. Eager and torch.compile. Reports the median step time over the timed steps
(warm-up steps, which include compilation, are excluded), tokens/s, MFU and peak memory, with ratios to GPT-2.

    python -m benchmarks.bench_train --device cpu --size small
    python -m benchmarks.bench_train --device cuda --size gpt2-124m --modes eager,compiled
    python -m benchmarks.bench_train --device cpu --ablations     # each MiniGPT technique switched off in turn

MiniGPT trains with `skip_logits=True` (the fused LM-head + cross-entropy loss), as minigpt/train/pretrain.py should.
The ablations switch one technique off each:
    minigpt:logits      the loss through transformers' ForCausalLMLoss on materialised [B, T, V] logits
    minigpt:gelu_new    GPT-2's 8-op tanh GELU instead of the fused kernel
    minigpt:vocab50257  GPT-2's unpadded vocabulary instead of 50304 (a multiple of 64)
    minigpt:mask        a materialised 4-D causal mask instead of sdpa's is_causal path (no flash kernel)
"""

import argparse
import sys

import torch
from transformers.activations import ACT2FN

from benchmarks import common
from minigpt.flops import count_params, flops_per_token, mfu

ABLATIONS = ["minigpt:logits", "minigpt:gelu_new", "minigpt:vocab50257", "minigpt:mask"]


def build_variant(name: str, shape: dict, device: str):
    """(model, extra forward kwargs) for a model name or a MiniGPT ablation."""
    base, _, ablation = name.partition(":")
    overrides = {"vocab_size": 50257} if ablation == "vocab50257" else {}
    model = common.build_model(base, shape, device, **overrides)
    kwargs = {"skip_logits": True} if base == "minigpt" and ablation != "logits" else {}
    if ablation == "gelu_new":
        for layer in model.model.layers:
            layer.mlp.act_fn = ACT2FN["gelu_new"]
    return model, kwargs


def causal_mask(batch: int, seq_len: int, device: str) -> torch.Tensor:
    """A materialised (B, 1, T, T) boolean causal mask: what a model without the is_causal path must build."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None].expand(batch, 1, -1, -1)


def prepare(name: str, mode: str, shape: dict, ids: torch.Tensor, args) -> tuple:
    """Build one model (and its fused AdamW), compile it if asked, and run the warm-up steps.
    Returns (step, number of parameters for MFU)."""
    device = args.device
    model, kwargs = build_variant(name, shape, device)
    model.train()
    n_params = count_params(model)
    forward = torch.compile(model) if mode == "compiled" else model
    mask = causal_mask(*ids.shape, device) if name.endswith(":mask") else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            loss = forward(input_ids=ids, labels=ids, use_cache=False, attention_mask=mask, **kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print(f"[train] {mode} {name}: warming up ({args.warmup} steps{', compiling' if mode == 'compiled' else ''})",
          flush=True)
    for _ in range(args.warmup):
        step()
    common.synchronize(device)
    return step, n_params


def measure(names: list[str], mode: str, shape: dict, ids: torch.Tensor, args, peak_flops, **tags) -> list[dict]:
    """Rows for models timed together: warmed up, then their steps interleaved (`tags` are added to each row).
    A model that fails gets a row with its error, so that one broken setting does not cost the rest of a run."""
    B, T = ids.shape
    steps, n_params, errors, times = {}, {}, {}, {name: [] for name in names}
    for name in names:
        try:
            steps[name], n_params[name] = prepare(name, mode, shape, ids, args)
        except Exception as err:  # noqa: BLE001  (recorded in the results, and printed)
            errors[name] = f"{type(err).__name__}: {err}"
            print(f"[train] {mode} {name}: FAILED {errors[name][:500]}", flush=True)
    common.reset_peak_memory(args.device)
    for _ in range(args.repeats):
        for name in list(steps):
            try:
                times[name] += common.time_runs(steps[name], args.device, 0, 1)
            except Exception as err:  # noqa: BLE001
                errors[name] = f"{type(err).__name__}: {err}"
                del steps[name]
    memory = common.peak_memory_gib(args.device)
    rows = []
    for name in names:
        if name in errors or not times[name]:
            rows.append({"model": name, "mode": mode, **tags, "error": errors.get(name, "no timed step")})
            continue
        step_s = common.median(times[name])
        tokens_per_s = B * T / step_s
        flops = flops_per_token(n_params[name], shape["n_layer"], shape["n_embd"], T)
        rows.append({
            "model": name, "mode": mode, **tags, "step_ms": 1000 * step_s, "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, flops, peak_flops / 1e12) if peak_flops else None,
            "peak_memory_gib": memory, "n_params": n_params[name], "times_s": times[name],
        })
        print(f"[train] {mode} {name}: {1000 * step_s:.1f} ms/step, {tokens_per_s:,.0f} tokens/s", flush=True)
    return rows


def run(args) -> dict:
    shape = common.SIZES[args.size]
    B, T = args.batch_size, args.seq_len
    if T > shape["n_positions"]:
        raise SystemExit(f"--seq_len {T} exceeds the {args.size} context ({shape['n_positions']}); lower it.")
    peak_flops, peak_note = common.device_peak_flops(args.device, args.peak_tflops)
    ids = torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(0)).to(args.device)
    rows = []
    payload = {"batch_size": B, "seq_len": T, "dtype": "bf16 autocast" if args.device == "cuda" else "fp32",
               "optimizer": "AdamW(fused=True)", "peak": peak_note, "repeats": args.repeats, "warmup": args.warmup,
               "results": rows}
    cpu = args.device == "cpu"
    # GPU: one model at a time, so that peak memory is its own. CPU: models timed together, steps interleaved
    # (rows with the same `rounds` key are compared step by step), so that a noisy neighbour slows all alike.
    plan = []
    for mode in args.modes:
        if cpu and args.ablations and args.models == ["minigpt"]:
            break  # on CPU every ablation is paired with its own MiniGPT run: a lone one would add nothing
        plan += [(args.models, mode, {"rounds": mode})] if cpu else [([n], mode, {}) for n in args.models]
    if args.ablations:  # each technique off, against MiniGPT with everything on; eager only
        for ablation in ABLATIONS:
            names = ["minigpt", ablation] if cpu else [ablation]
            plan.append((names, "eager", {"ablation": ablation, **({"rounds": ablation} if cpu else {})}))
    for names, mode, tags in plan:
        rows += measure(names, mode, shape, ids, args, peak_flops, **tags)
        torch._dynamo.reset()  # drop compiled graphs (and what they hold) before the next model
        common.free_memory(args.device)
        common.write_results("train", args, payload, table(rows), final=False)
    common.write_results("train", args, payload, table(rows))
    return payload


def table(rows: list[dict]) -> str:
    """The comparison with GPT-2 and, after --ablations, the cost of switching each technique off."""
    main = [r for r in rows if "ablation" not in r]
    reference = {r["mode"]: r for r in main if r["model"] == "gpt2" and "error" not in r}
    out = []
    for r in main:
        if "error" in r:
            out.append([r["model"], r["mode"], "failed: " + r["error"][:80].replace("|", "/")] + [""] * 6)
            continue
        ref = reference.get(r["mode"])
        time_ratio = common.time_ratio(r, ref) if ref else None
        speed = 1 / time_ratio if ref else None
        memory = r["peak_memory_gib"] / ref["peak_memory_gib"] if ref and ref["peak_memory_gib"] else None
        out.append([r["model"], r["mode"], common.fmt(r["step_ms"]), f"{r['tokens_per_s']:,.0f}",
                    common.fmt(r["mfu"] and 100 * r["mfu"], ".1f", "%"), common.fmt(r["peak_memory_gib"], ".2f"),
                    common.fmt(speed, ".2f", "x"), common.fmt(time_ratio, ".2f", "x"), common.fmt(memory, ".2f", "x")])
    headers = ["model", "mode", "ms/step", "tokens/s", "MFU", "peak GiB", "tokens/s vs GPT-2", "time vs GPT-2",
               "memory vs GPT-2"]
    text = common.markdown_table(headers, out) if out else ""
    ablations = [r for r in rows if r.get("ablation") == r["model"]]
    if not ablations:
        return text
    # the reference: MiniGPT timed in the same rounds (CPU), or MiniGPT's own eager row (GPU)
    own = {r["ablation"]: r for r in rows if "ablation" in r and r["model"] == "minigpt" and "error" not in r}
    full = next((r for r in main if r["model"] == "minigpt" and r["mode"] == "eager" and "error" not in r), None)
    out = []
    for r in ablations:
        ref = own.get(r["ablation"], full)
        if "error" in r or ref is None:
            out.append([r["model"], r.get("error", "no MiniGPT reference")[:80].replace("|", "/"), "", "", ""])
            continue
        memory = r["peak_memory_gib"] / ref["peak_memory_gib"] if ref["peak_memory_gib"] else None
        out.append([r["model"], common.fmt(r["step_ms"]), common.fmt(common.time_ratio(r, ref), ".3f", "x"),
                    common.fmt(r["peak_memory_gib"], ".2f"), common.fmt(memory, ".2f", "x")])
    headers = ["technique switched off (eager)", "ms/step", "time vs MiniGPT", "peak GiB", "memory vs MiniGPT"]
    return (text + "\n\n" if text else "") + common.markdown_table(headers, out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--batch_size", type=int, default=None, help="rows per step (default: 16 on GPU, 4 on CPU)")
    parser.add_argument("--seq_len", type=int, default=None, help="tokens per row (default: the preset's context)")
    parser.add_argument("--modes", default=None, help="eager,compiled (default: both on GPU, eager on CPU)")
    parser.add_argument("--ablations", action="store_true", help="also time MiniGPT with each technique off")
    args = common.resolve_common_args(parser.parse_args(argv))
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (16 if cuda else 4)
    args.seq_len = args.seq_len or common.SIZES[args.size]["n_positions"]
    args.modes = (args.modes or ("eager,compiled" if cuda else "eager")).split(",")
    if set(args.modes) - {"eager", "compiled"}:
        raise SystemExit(f"--modes {args.modes} is not valid; use eager, compiled or eager,compiled.")
    args.repeats = args.repeats or (10 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    return args


def main(argv=None):
    common.set_cpu_env()
    run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
