"""Where a model comes from and where it goes: a local folder, a Hub id, or a peft adapter on a base model; the checks
every tool runs on a model or tokenizer name before loading it, so that a typo fails at once with what is wrong
instead of from_pretrained retrying the Hub for a minute and ending in "couldn't connect to huggingface.co"; and the
pre-flight of a Hub push (hub_access_problem), which the training scripts run before they train, not after.
"""

import contextlib
import importlib
import json
import os
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError


def check_local_path(path: str, what: str = "folder", option: str = "--model_name_or_path") -> None:
    """A name that is no local folder fails at once with what is wrong, instead of from_pretrained retrying the Hub
    for a minute. A path that looks local and does not exist is a typo. Local-looking: it starts with '.', '/' or
    '~', holds a backslash or more than one '/', or is 'dir/name' with an existing dir (a Hub id is 'owner/name').
    Any other name is asked of the Hub once (check_hub_id)."""
    if path is None or Path(path).expanduser().exists():
        return
    # "owner/name" is a Hub id unless "owner" is a local folder (runs/pretrian: a typo under runs/)
    looks_local = (
        path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1
        or ("/" in path and Path(path).parent.is_dir())
    )
    if looks_local:
        raise FileNotFoundError(f"{option} {path}: no such {what}; check the path (a Hub id looks like owner/name).")
    check_hub_id(path, option)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The errors of a request that got no answer, from the HTTP library huggingface_hub uses: httpx, or httpx2 in
    some builds."""
    errors = [OSError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module).TransportError)
    return tuple(errors)


def check_hub_id(name: str, option: str = "--model_name_or_path") -> None:
    """A name that is no local folder is a Hub id (owner/name, or one of the few owner-less legacy ids: gpt2,
    distilgpt2, ...) or a misspelled folder (rusn/tiny for runs/tiny, or a README command run from another folder).
    Ask the Hub once, with a short timeout (or the local cache when HF_HUB_OFFLINE is set), and fail at once where
    it has no such model or cannot answer, instead of letting from_pretrained retry for a minute and end in
    "couldn't connect to huggingface.co"."""
    if constants.HF_HUB_OFFLINE:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # downloaded before: from_pretrained reads the cache
        reason = "HF_HUB_OFFLINE is set and the local Hub cache has no copy of it"
    else:
        try:
            HfApi().model_info(name, timeout=10)
            return
        except RepositoryNotFoundError:
            reason = "huggingface.co has no model of that name (or none your token may read)"
        except HfHubHTTPError as error:
            if error.response is None or error.response.status_code not in (401, 404):
                return  # the Hub answered (gated, rate-limited, ...): from_pretrained reports it in its own words
            reason = "huggingface.co has no model of that name (or none your token may read)"
        except _transport_errors() as error:  # no answer at all: DNS, refused connection, timeout, proxy
            if isinstance(try_to_load_from_cache(name, "config.json"), str):
                return  # from_pretrained falls back to the cached copy
            reason = f"huggingface.co could not be reached ({type(error).__name__}: {error})"
    if "/" not in name:
        raise FileNotFoundError(
            f"{option}: no such folder {name} (and {name} is not a Hub id of the form owner/name); tried as a Hub id "
            f"anyway, but {reason}. Check the folder name, or give the Hub id as owner/name (e.g. "
            "openai-community/gpt2)."
        )
    raise FileNotFoundError(
        f"{option}: no such folder {name} in {Path.cwd()}, and as a Hub id: {reason}. Check the path (relative "
        "paths start from the folder you run in), or the Hub id."
    )


ADAPTER_CONFIG = "adapter_config.json"


def check_model_path(path: str, option: str = "--model_name_or_path") -> str:
    """Check a model name before anything is loaded; returns "hub" (a Hub id), "model" (a folder with config.json)
    or "adapter" (a peft adapter folder: adapter_config.json, no config.json). Any other folder is refused with
    what it is not, and the model folders inside it, if any (a run's checkpoints/ folder holds step-N ones)."""
    check_local_path(path, "folder", option)
    folder = Path(path).expanduser()
    if not folder.exists():
        return "hub"
    if not folder.is_dir():
        raise NotADirectoryError(f"{option} {path} is a file, not a model folder; pass the folder that holds "
                                 "config.json (the output_dir of a training run).")
    if (folder / "config.json").is_file():
        return "model"
    if (folder / ADAPTER_CONFIG).is_file():
        return "adapter"
    inside = sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file())
    hint = f" It holds model folders: {', '.join(inside[:5])}; pass one of those." if inside else ""
    raise FileNotFoundError(
        f"{option} {path} is not a model folder (no config.json); give the output_dir of a finished training run "
        f"or one of its checkpoint folders (checkpoints/step-N, checkpoint-N).{hint}"
    )


def adapter_base(adapter: str | os.PathLike, option: str = "--model_name_or_path") -> str:
    """The base model a peft adapter folder was trained on (base_model_name_or_path of adapter_config.json), checked
    like any model name; a base that cannot be found gets an error that says what to pass instead."""
    base = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    merged = Path(adapter).parent
    instead = (f"pass the merged model that finetune saved beside it ({merged}), or "
               if (merged / "config.json").is_file() else "pass a merged model folder, or ")
    if not base:
        raise ValueError(f"{option} {adapter} is a LoRA adapter whose {ADAPTER_CONFIG} names no base model; "
                         f"{instead}the base model with --lora.")
    try:
        check_local_path(base, "folder", f"{option} {adapter} is a LoRA adapter on {base}, but")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error} So the adapter cannot be loaded: {instead}fix base_model_name_or_path in "
                                f"{Path(adapter) / ADAPTER_CONFIG}.") from None
    if Path(base).expanduser().exists() and check_model_path(base, f"{option} {adapter}: its base") != "model":
        raise ValueError(f"{option} {adapter}: its base {base} is not a model folder; {instead}fix "
                         f"base_model_name_or_path in {Path(adapter) / ADAPTER_CONFIG}.")
    return base


def hub_access_problem(token: str | None = None) -> str | None:
    """Why a push cannot reach the Hub now, or None: offline mode, or no token. minigpt.hub.push checks it, and the
    training scripts check it before they train (`--push_to_hub`), not after."""
    if getattr(constants, "HF_HUB_OFFLINE", False):
        return ("HF_HUB_OFFLINE is set, so huggingface_hub may not reach the Hub; unset it (and TRANSFORMERS_OFFLINE) "
                "to push")  # fmt: skip
    if not (token or get_token()):
        return "No Hugging Face token found: run `hf auth login` (with a token that can write) or set HF_TOKEN"
    return None


class PushRefused(PermissionError):
    """--push_to_hub cannot publish after training: no or a bad --hub_model_id, offline mode, or no token."""


def push_problem(hub_model_id: str | None) -> str | None:
    """Why `--push_to_hub` could not publish the finished run as `hub_model_id`, or None: the training scripts ask
    before they train, not after."""
    from huggingface_hub.utils import validate_repo_id

    if not hub_model_id:
        return "--push_to_hub needs --hub_model_id user/name."
    try:
        validate_repo_id(hub_model_id)
    except ValueError as e:  # HFValidationError
        return f"--hub_model_id {hub_model_id!r} is not a Hub repo id ({e}). Use user/name."
    problem = hub_access_problem()
    if problem:
        return (f"--push_to_hub: {problem}; or drop --push_to_hub and publish the finished folder with minigpt-push "
                "OUTPUT_DIR REPO_ID.")  # fmt: skip
    return None
