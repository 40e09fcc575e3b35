"""How many CPU threads torch uses in fine-tuning, evaluation and generation (`--threads`), with a default that
suits a machine other work shares.

torch's default is one intra-op thread per core. Small models gain little from more threads, and lose much when
other processes want the same cores. On a shared 2-core machine (load ~2.5), fine-tuning a small model ran at 1.3
steps/s with torch's default against 8.7 with one thread, and generation at 7 tokens/s against 178; a 4-layer,
width-256 MiniGPT measured there (November 2026) gave 0.38 against 2.0 training steps/s and 30 against 260 greedy
tokens/s with 2 threads against 1. So the default takes half the cores this process may run on, at most 4 and at
least 1: 1 on a 2-core box, 4 from 8 cores up.
OMP_NUM_THREADS, where set, is the default instead. `--threads 0` keeps torch's own choice.
"""

import os

import torch

MAX_DEFAULT_THREADS = 4
THREADS_HELP = (
    "Intra-op CPU threads (torch.set_num_threads), as pretrain's --cpu_threads; 0 = torch's default, one per core. "
    "Default: $OMP_NUM_THREADS if set, else half the available cores, between 1 and 4 (small models gain little "
    "from more threads and lose much when other processes share the cores)."
)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (taskset, cgroups' cpusets)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """$OMP_NUM_THREADS if it is a positive integer, else half the available cores, clamped to [1, 4]."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(MAX_DEFAULT_THREADS, available_cores() // 2))


def set_threads(threads: int | None, on_cpu: bool = True) -> int:
    """Apply --threads and return the number torch now uses. None: default_threads() on CPU; on an accelerator
    torch's own choice is kept (the CPU only feeds the device). 0: torch's default. Negative: an error."""
    if threads is not None and threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = torch's default), got {threads}.")
    if threads is None and on_cpu:
        threads = default_threads()
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
