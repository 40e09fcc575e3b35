"""Model folders, the one way every tool opens, checks and writes them.

    load_pretrained(cls, path)   from_pretrained, with a truncated or corrupted weight file named first
    check_minigpt_folder(path)   is this a MiniGPT model folder in safetensors? (push and the exporters ask)
    load_minigpt(path)           the causal LM of such a folder, fp32, eval mode (the exporters)
    write_model_code(config, path), has_remote_code(path, config)
                                 config.json with auto_map and the modeling files, so the folder loads with
                                 trust_remote_code where the package is absent
    enable_cache(path)           `use_cache: true` in a saved folder's configs, as inference and export recipes want
"""

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files from_pretrained reads in `folder`: model.safetensors, or the shards of its index."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # cut short, or not the index format
            raise OSError(f"{index} is truncated or corrupted ({err!r}); restore it or save the model again.") from err
    else:
        names = ["model.safetensors"]
    return [folder / name for name in names if (folder / name).is_file()]


def check_weight_file(path: Path) -> None:
    """Raise an OSError naming `path` unless it is a complete safetensors file. Reads the header only: safetensors
    checks there that the tensors it lists cover the file exactly, which a truncated file fails. (A flipped bit
    inside tensor data goes unseen: the format has no checksum.)"""
    try:
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as err:
        raise OSError(
            f"{path} is truncated or corrupted ({err}): it is not a complete safetensors file. Restore it from a "
            "copy or save the model again; from a training run, resume from an earlier checkpoint."
        ) from err


def load_pretrained(model_class, name_or_path: str | Path, **kwargs):
    """`model_class.from_pretrained(name_or_path, **kwargs)` (an Auto class or a model class), with one check first:
    a truncated or corrupted weight file (a save killed halfway, a partial copy, a full disk) fails with an error
    that names the file, where safetensors' own ("incomplete metadata, file not fully covered") names none."""
    folder = Path(name_or_path, kwargs.get("subfolder") or "")
    if folder.is_dir():
        for path in weight_files(folder):
            check_weight_file(path)
    try:
        return model_class.from_pretrained(name_or_path, **kwargs)
    except SafetensorError as err:  # a file from the Hub cache
        raise OSError(
            f"A weight file of {str(name_or_path)!r} is truncated or corrupted ({err}); download it again with "
            "from_pretrained(..., force_download=True)."
        ) from err


def check_minigpt_folder(folder: str | Path) -> dict:
    """The folder's config.json, after checking that the folder is a MiniGPT model in safetensors; otherwise an error
    that says what the folder is instead and what to pass."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder; pass a MiniGPT checkpoint folder (the output_dir of minigpt-pretrain or "
            "minigpt-finetune, or a folder written by save_pretrained)."
        )
    if not (folder / "config.json").is_file():
        if any(folder.glob("adapter_config.json")) or any(folder.glob("*/adapter_config.json")):
            raise ValueError(
                f"{folder} holds a PEFT adapter, not a full model; merge it first "
                "(model.merge_and_unload().save_pretrained(dir)) and pass that folder."
            )
        raise FileNotFoundError(
            f"{folder} has no config.json, so it is not a saved model; pass the folder that save_pretrained wrote "
            "(with config.json and model.safetensors), e.g. a checkpoint-N."
        )
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "minigpt":
        raise ValueError(
            f"{folder}/config.json has model_type={config.get('model_type')!r}: not MiniGPT (model_type 'minigpt'). "
            "Convert a GPT-2 first (python -m minigpt.hub.convert_gpt2); publish other models with `hf upload`."
        )
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise FileNotFoundError(
            f"{folder} has no .safetensors weights{f' (only {found})' if found else ''}; re-save the model with "
            "model.save_pretrained(folder), which writes model.safetensors."
        )
    return config


def load_minigpt(folder: str | Path):
    """The MiniGPT causal LM of a checkpoint folder, in eval mode on the CPU, fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    import modeling_minigpt  # noqa: F401  (registers MiniGPT with the Auto classes)

    check_minigpt_folder(folder)
    return load_pretrained(AutoModelForCausalLM, Path(folder), dtype=torch.float32).eval()


def write_model_code(config, folder: Path) -> list[str]:
    """config.json with an auto_map naming every MiniGPT class, and the code files (modeling_minigpt.py with what it
    imports relatively, configuration_minigpt.py), as save_pretrained writes them: the folder then loads through
    every Auto class with trust_remote_code. Returns the names of the files written."""
    from transformers.dynamic_module_utils import custom_object_save

    from modeling_minigpt import MiniGPTForCausalLM  # here, not at the top: loading needs no package (see tests)
    from modeling_minigpt.configuration_minigpt import AUTO_MAP

    config.auto_map = dict(AUTO_MAP)  # a config loaded from an older checkpoint may name only some classes
    written = custom_object_save(MiniGPTForCausalLM, folder)  # modeling_minigpt.py and its relative imports
    config.save_pretrained(folder)  # config.json and configuration_minigpt.py
    return sorted({"config.json", "configuration_minigpt.py", *(Path(path).name for path in written)})


def has_remote_code(folder: Path, config: dict) -> bool:
    """Does config.json map every MiniGPT Auto class to code files that are present in the folder, together with
    the files those import relatively (chunked_loss.py, input_checks.py)?"""
    from transformers.dynamic_module_utils import get_relative_import_files

    from modeling_minigpt.configuration_minigpt import AUTO_MAP

    auto_map = config.get("auto_map") or {}
    if not all(key in auto_map for key in AUTO_MAP):
        return False
    modules = {ref.split("--")[-1].split(".")[0] for ref in auto_map.values() if isinstance(ref, str)}
    files = [folder / f"{module}.py" for module in modules]
    if not all(path.is_file() for path in files):
        return False
    return all(Path(needed).is_file() for path in files for needed in get_relative_import_files(path))


def enable_cache(folder: Path) -> None:
    """Set use_cache to true in a saved folder's config.json and generation_config.json (where they say otherwise).
    Gradient checkpointing (and TRL's trainers) switch model.config.use_cache off while training, and a checkpoint
    saved so would make generate() run without a cache; transformers' export recipes (torch.export, ExecuTorch)
    refuse a config or generation config without it ("The model must have caching enabled")."""
    for path in (Path(folder) / "config.json", Path(folder) / "generation_config.json"):
        if not path.is_file():
            continue
        fields = json.loads(path.read_text())
        if fields.get("use_cache") is not True:
            fields["use_cache"] = True
            path.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
