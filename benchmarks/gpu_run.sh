#!/usr/bin/env bash
# The GPU benchmark run, in one command from the repository root (about 8 minutes on an H200):
#
#     OUT=/some/dir bash benchmarks/gpu_run.sh
#
# It installs nothing: it needs torch, transformers and a CUDA GPU (no datasets, evaluate or matplotlib; the
# scaling plot can be drawn afterwards with `python -m benchmarks.bench_scaling --plot-from <json>`).
# It runs, at the GPT-2 124M shape (12 layers, 12 heads, 768 wide, context 1024, vocabulary 50304), MiniGPT
# against transformers' GPT2LMHeadModel(attn_implementation="sdpa"):
#   1. bench_train:    bf16 autocast, batch 16 x 1024, fused AdamW, eager and torch.compile;
#   2. bench_generate: prompt 128 + 256 new tokens, batch 1 and 32: dynamic cache, static cache (compiled by
#                      generate), no cache, and MiniGPT's FastDecoder (compiled step replayed as a CUDA graph);
#   3. bench_scaling:  per-token latency with and without the KV cache, and the training step, as the context
#                      grows, with whatever time is left.
# Each stage runs under a cap (run_all --budget) and writes its JSON and markdown table into $OUT as it goes,
# so a stage cut short still leaves what it measured. The summary is $OUT/<date>-summary-cuda-gpt2-124m.md.
set -uo pipefail
cd "$(dirname "$0")/.."

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-benchmarks/results}"
BUDGET="${BUDGET:-450}"  # seconds for the three stages together
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then PY="$candidate"; break; fi
    done
fi
[ -n "$PY" ] || { echo "gpu_run: no python with torch found; set PYTHON=/path/to/python" >&2; exit 2; }

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('transformers', transformers.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
    "$PY" -c "import accelerate; print('accelerate', accelerate.__version__)" 2>/dev/null || true
} 2>&1 | tee "$OUT/environment.txt"

"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" || exit 2

"$PY" -m benchmarks.run_all --device cuda --size gpt2-124m --out "$OUT" --budget "$BUDGET"
status=$?

echo
cat "$OUT"/*-summary-cuda-gpt2-124m.md 2>/dev/null
exit $status
