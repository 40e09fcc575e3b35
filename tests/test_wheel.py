"""The regular (non-editable) wheel: it holds every file of minigpt/ and modeling_minigpt/ that git tracks, data files
included (presets, accelerate configs, examples, metric modules), and nothing else; installed in a fresh venv, its
console scripts train, save and evaluate from a folder whose own train.py and hub.py would break any import of them.

The fresh venv installs nothing from the network: a .pth file puts the test interpreter's site-packages (torch,
transformers, ...) on its path. A plain path line in a .pth does not run the .pth files of the folder it adds, so
the editable install of this checkout stays invisible there; the test checks that every import resolves inside the
venv.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Runs in the fresh venv with cwd=elsewhere, which sys.path puts first: the decoys are importable, and must be unused.
CHECK_INSTALL = """
import importlib, importlib.metadata, json, sys
from pathlib import Path

venv = Path(sys.prefix).resolve()
inside = lambda module: venv in Path(module.__file__).resolve().parents  # noqa: E731
for name in ("train", "hub"):
    try:
        importlib.import_module(name)
        raise SystemExit(f"the decoy {name}.py in the working folder was not imported")
    except RuntimeError as e:
        assert "decoy" in str(e), e

import minigpt, modeling_minigpt, minigpt.train.metrics as metrics
from minigpt.train.args import PRESETS_DIR
assert inside(minigpt) and inside(modeling_minigpt), (minigpt.__file__, modeling_minigpt.__file__)
assert not any("editable" in type(f).__module__ for f in sys.meta_path), sys.meta_path

dist = importlib.metadata.distribution("minigpt")  # the first on sys.path: the venv's own
scripts = [ep for ep in dist.entry_points if ep.group == "console_scripts"]
for ep in scripts:
    module = importlib.import_module(ep.module)
    assert inside(module) and callable(getattr(module, ep.attr)), ep

for name in metrics.available_metrics():
    metrics.load_metric(name)

from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("out")
tokenizer = AutoTokenizer.from_pretrained("out")
ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
generated = model.generate(ids, max_new_tokens=3, do_sample=False)
print(json.dumps({
    "scripts": [ep.name for ep in scripts], "metrics": metrics.available_metrics(), "model": type(model).__module__,
    "presets": sorted(p.name for p in Path(PRESETS_DIR).iterdir()), "new": generated.shape[1] - ids.shape[1],
}))
"""


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def files_in_git() -> list[str]:
    """What a clone of this checkout holds: tracked files, and new ones not yet committed unless ignored."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout of the project")
    return sorted({f for f in out.split("\0") if f and (REPO / f).is_file() and "__pycache__" not in f})


@pytest.mark.slow
def test_the_wheel_ships_every_package_file_and_trains_from_any_folder(tmp_path):
    # 1. Build from a copy of what git holds, so that the checkout gets no build/ or egg-info and nothing stale in it
    #    (an old build/lib/train/, say) can reach the wheel.
    files = files_in_git()
    src = tmp_path / "src"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", src,
         "-w", tmp_path / "dist"], cwd=tmp_path)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("minigpt-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    package_files = {f for f in files if f.startswith(("minigpt/", "modeling_minigpt/"))}
    assert {"minigpt/train/configs/presets/tiny.yaml", "minigpt/train/metrics/chrf/chrf.py"} <= package_files
    assert package_files - names == set(), "package files missing from the wheel"
    top = {n.split("/")[0] for n in names}
    assert top == {"minigpt", "modeling_minigpt", wheel.name.split("-py")[0] + ".dist-info"}, top  # no tests/, train/

    # 2. A fresh venv that sees the test interpreter's dependencies but not its (editable) minigpt, checked before
    #    the wheel goes in; the .pth comes off meanwhile, so that pip does not see the other minigpt as installed.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps_pth = site / "_test_wheel_deps.pth"
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # torch, transformers, ...
    deps_pth.write_text("".join(f"{p}\n" for p in deps))
    absent = subprocess.run(
        [python, "-c", "import yaml, minigpt"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert "No module named 'minigpt'" in absent.stderr, absent.stderr  # yaml, a dependency, did import
    deps_pth.rename(tmp_path / deps_pth.name)
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel])
    (tmp_path / deps_pth.name).rename(deps_pth)

    # 3. From another folder, with decoys of the old top-level packages, through the installed console scripts.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("train", "hub"):
        (elsewhere / f"{name}.py").write_text(f"raise RuntimeError('decoy {name}.py imported')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    # the tiny preset on its built-in corpus, shrunk to a ~10k-parameter model: data preparation is most of the time
    run([venv / "bin" / "minigpt-pretrain", "--config", "tiny", "--max_steps", 2, "--output_dir", "out", "--cpu",
         "--n_layer", 1, "--n_head", 2, "--n_embd", 16, "--vocab_size", 300, "--batch_size", 4, "--warmup_steps", 1,
         "--eval_every", 0, "--save_every", 0, "--report_to", "none"], cwd=elsewhere, env=env)  # fmt: skip
    assert (elsewhere / "out" / "model.safetensors").is_file()

    report = json.loads(run([python, "-c", CHECK_INSTALL], cwd=elsewhere, env=env).stdout.strip().splitlines()[-1])
    assert {f"minigpt-{s}" for s in ("demo", "pretrain", "finetune", "evaluate", "generate", "convert-gpt2", "push",
                                     "export-onnx")} <= set(report["scripts"])  # fmt: skip
    assert all((venv / "bin" / script).is_file() for script in report["scripts"])
    assert {"bits_per_byte", "chrf", "exact_match", "next_token_accuracy", "perplexity"} <= set(report["metrics"])
    assert {"gpt2-124m.yaml", "tiny.yaml"} <= set(report["presets"])
    assert report["model"] == "modeling_minigpt.modeling_minigpt" and report["new"] >= 1  # EOS may come first

    # the examples and the pair metrics, through minigpt-evaluate on the first 4 shipped EN->FR pairs
    examples = site / "minigpt" / "train" / "examples" / "en_fr.jsonl"
    (elsewhere / "pairs.jsonl").write_text("".join(examples.read_text().splitlines(keepends=True)[:4]))
    run([venv / "bin" / "minigpt-evaluate", "out", "--data", "pairs.jsonl", "--max_new_tokens", 4,
         "--output_json", "eval.json"], cwd=elsewhere, env=env)  # fmt: skip
    (result,) = json.loads((elsewhere / "eval.json").read_text())
    assert len(result["predictions"]) == 4 and {"exact_match", "chrf"} <= set(result), sorted(result)
