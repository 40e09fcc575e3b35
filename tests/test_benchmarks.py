"""The benchmark scripts run end to end, as `make bench` runs them, at the smallest settings.

These tests time nothing that they assert on (speed targets live in the benchmarks' own tables, see README); they
check that every script finishes, measures both models, writes its JSON, table and plot, and that the fast
decoding loop gives generate()'s tokens.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, out: Path, *args: str) -> dict:
    """Run `python -m benchmarks.<script> --device cpu --out <out> <args>` and return the JSON it wrote."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", f"benchmarks.{script}", "--device", "cpu", "--out", str(out), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (json_file,) = out.glob(f"*-{script.removeprefix('bench_')}-cpu-small*.json")
    assert json_file.with_suffix(".md").read_text().count("|") > 10, "no markdown table next to the JSON"
    return json.loads(json_file.read_text())


def test_bench_train_measures_both_models_and_every_ablation(tmp_path):
    payload = bench("bench_train", tmp_path, "--batch_size", "1", "--seq_len", "32", "--repeats", "1", "--ablations")
    rows = payload["results"]
    assert not [r for r in rows if "error" in r], rows
    assert {r["model"] for r in rows} == {
        "minigpt", "gpt2", "minigpt:logits", "minigpt:gelu_new", "minigpt:vocab50257", "minigpt:mask"
    }
    assert all(r["tokens_per_s"] > 0 and r["step_ms"] > 0 for r in rows)
    assert payload["torch"] and payload["transformers"] and payload["shape"]["vocab_size"] == 50304


def test_bench_generate_runs_every_setting_and_the_fast_loop_matches_generate(tmp_path):
    args = ["--batches", "1,2", "--prompt_len", "8", "--new_tokens", "6", "--repeats", "1"]
    rows = bench("bench_generate", tmp_path, *args)["results"]
    assert not [r for r in rows if "error" in r], rows
    measured = {(r["model"], r["setting"], r["batch"]) for r in rows}
    for batch in (1, 2):
        for setting in ("dynamic", "static"):
            assert {("minigpt", setting, batch), ("gpt2", setting, batch)} <= measured
        assert ("minigpt", "fast", batch) in measured
    assert ("minigpt", "no_cache", 1) in measured and ("gpt2", "no_cache", 1) in measured
    assert all(r["same_tokens_as_generate"] == 1.0 for r in rows if r["setting"] == "fast")


def test_bench_scaling_writes_the_plot_and_runs_rope_past_the_learned_positions(tmp_path):
    rows = bench("bench_scaling", tmp_path, "--lengths", "16,300", "--repeats", "1")["results"]
    assert {(r["model"], r["context"]) for r in rows} == {
        ("gpt2", 16), ("minigpt", 16), ("minigpt-rope", 16), ("minigpt-sinusoidal", 16),
        ("minigpt-rope", 300), ("minigpt-sinusoidal", 300),  # 300 > n_positions=256: learned ones stop at 256
    }
    assert all(r["cache_ms"] > 0 and r["no_cache_ms"] > 0 for r in rows)
    png = next(tmp_path.glob("*-scaling-cpu-small.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, words", [(["--device", "cpu", "--settings", "beam"], ["--settings", "dynamic"]),
                                         (["--device", "cpu", "--prompt_len", "200", "--new_tokens", "100"],
                                          ["exceeds", "lower"])])
def test_bench_generate_bad_arguments_say_what_to_change(argv, words):
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_generate", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and all(word in done.stderr for word in words), done.stderr[-2000:]


def test_benchmark_flags_take_the_underscore_spelling_of_the_train_scripts_and_the_dashed_one():
    """`--peak_tflops` as in minigpt.train.pretrain; the dashed spellings the benchmarks began with keep working."""
    from benchmarks import bench_generate, bench_train

    for spelling in (["--peak_tflops", "5", "--seq_len", "8", "--batch_size", "2"],
                     ["--peak-tflops", "5", "--seq-len", "8", "--batch-size", "2"]):  # fmt: skip
        args = bench_train.parse_args(["--device", "cpu", "--threads", "0", *spelling])
        assert (args.peak_tflops, args.seq_len, args.batch_size) == (5.0, 8, 2)
    args = bench_generate.parse_args(["--device", "cpu", "--threads", "0", "--prompt_len", "8", "--new-tokens", "4"])
    assert (args.prompt_len, args.new_tokens) == (8, 4)


def test_benchmarks_count_mfu_with_the_training_formula_and_peak_table():
    """One copy of each: benchmarks/common.py looks peaks up in minigpt.flops; bench_train counts FLOPs with it."""
    from benchmarks import bench_train, common
    from minigpt import flops

    assert bench_train.flops_per_token is flops.flops_per_token
    assert bench_train.count_params is flops.count_params
    assert not hasattr(common, "PEAK_BF16_FLOPS") and flops.PEAK_TFLOPS["H100"] == 989.0
    assert flops.flops_per_token(1000, n_layer=2, n_embd=8, seq_len=16) == 6 * 1000 + 12 * 2 * 8 * 16
    assert common.device_peak_flops("cpu", 100.0) == (100e12, "100 TFLOP/s (given)")
    assert common.device_peak_flops("cpu", None)[0] is None


def test_bench_variants_trains_the_baseline_and_a_variant_and_writes_the_table(tmp_path):
    """Two runs of the tiny preset cut to 60 steps (the built-in corpus is prepared once and cached): the table and
    JSON come out, with the final whole-split loss, the ratio to the baseline and the recipe column."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "benchmarks.bench_variants", "--positions", "learned", "--norms", "post",
           "--activations", "relu", "--baseline_seeds", "1", "--max_steps", "60", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (json_file,) = tmp_path.glob("*-variants-cpu-tiny.json")
    payload = json.loads(json_file.read_text())
    (row,) = payload["results"]
    assert (row["position"], row["norm"], row["activation"]) == ("learned", "post", "relu")
    assert row["val_loss"] > 0 and row["vs_baseline"] == pytest.approx(row["val_loss"] / payload["baseline"]["mean"])
    assert row["recipe"] == ""  # the default recipe (Muon) trains post-LN with the preset's warmup
    assert "| learned | post | relu |" in json_file.with_suffix(".md").read_text()


def test_bench_recipe_runs_both_recipes_and_reports_the_steps_to_the_reference_loss(tmp_path):
    """One seed of each recipe cut to 50 steps, two at a time: the table, JSON and plot come out, the target is the
    AdamW run's final loss, and the Muon run (the default recipe) reaches it sooner."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "benchmarks.bench_recipe", "--seeds", "1", "--runs", "adamw:50", "muon:50",
           "--reference", "adamw:50", "--jobs", "2", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (json_file,) = tmp_path.glob("*-recipe-cpu-tiny.json")
    payload = json.loads(json_file.read_text())
    adamw, muon = payload["runs"]["adamw:50"], payload["runs"]["muon:50"]
    assert payload["target"] == pytest.approx(adamw["final"]) and sorted(map(int, muon["curve"])) == [0, 25, 50]
    assert adamw["steps_to_target"] == [50] and muon["steps_to_target"][0] <= 50 and muon["final"] < adamw["final"]
    assert "Muon 0.02" in muon["schedule"] and "cosine" in adamw["schedule"]
    assert json_file.with_suffix(".png").stat().st_size > 0
    assert "| muon, 50 steps |" in json_file.with_suffix(".md").read_text()
