"""FLOPs and MFU, counted one way for a training run and a benchmark: the parameter count, the FLOPs per trained
token, the dense bf16 peak of a device, and model FLOPs utilisation."""

import torch

# Dense bf16 peak per device, in TFLOP/s, matched as a substring of torch.cuda.get_device_name(), first hit wins
# (so GH200 before H200, A100 and A10G before A10, L40S before L4). `--peak_tflops` overrides it; CPUs have no entry.
PEAK_TFLOPS = {
    "GH200": 989.0,
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "4090": 165.0,
    "3090": 71.0,
    "V100": 125.0,  # fp16 tensor cores; V100 has no bf16
    "T4": 65.0,  # fp16 tensor cores; T4 has no bf16
}


def lookup_peak_tflops(device: torch.device | str) -> tuple[float, str]:
    """(peak TFLOP/s, the PEAK_TFLOPS key it matched) for a CUDA device; (0.0, its name or "") when none is known."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0.0, ""
    name = torch.cuda.get_device_name(device)
    return next(((tflops, key) for key, tflops in PEAK_TFLOPS.items() if key in name), (0.0, name))


def count_params(model: torch.nn.Module) -> int:
    """Parameters as nanoGPT counts them for MFU: tied weights once, learned position embeddings left out (a lookup,
    not a matmul)."""
    seen, total = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or name.endswith(("embed_positions.weight", "wpe.weight")):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6·N for the matmuls with weights, 12·L·C·T for attention over
    the T tokens of the *trained* sequence (PaLM, appendix B; nanoGPT's estimate_mfu)."""
    return 6 * n_params + 12 * n_layer * n_embd * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: the FLOP/s the tokens needed, as a fraction of `devices` devices' peak."""
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12 * devices)
