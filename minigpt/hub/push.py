"""Publish a MiniGPT checkpoint folder to the Hugging Face Hub, with a model card, loadable anywhere.

    python -m minigpt.hub.push out/pretrain/final alice/minigpt-shakespeare [--private] [--revision dev]
                       [--commit-message "..."] [--license ID] [--dataset ID] [--dry-run]

What gets pushed: the safetensors weights, config.json (with `auto_map`) and the modeling code, the tokenizer,
generation_config.json, a generated README.md (see minigpt/hub/model_card.py), images such as the loss curve and the
training summaries. Optimizer/scheduler/RNG states, Trainer's trainer_state.json, pickles and sub-folders (Trainer's
checkpoint-N/) stay local; the card is built from the local folder, so it still reads them.

The files are staged in a temporary folder, so the checkpoint folder is never modified by a failed push. After a
successful push, the generated README.md (and any repaired config.json/code) is written back to the folder, so it
matches the repository. The token comes from `token=`, HF_TOKEN or `hf auth login`, and is never printed.
"""

import argparse
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from minigpt.commands import one_line_usage, run_cli
from minigpt.folders import check_minigpt_folder, has_remote_code, write_model_code
from minigpt.hub.model_card import build_model_card, is_generated
from minigpt.sources import hub_access_problem
from modeling_minigpt import MiniGPTConfig

# Top-level files that are published, by suffix; anything else (optimizer.pt, training_args.bin, ...) stays local.
PUSHED_SUFFIXES = (
    ".safetensors",
    ".json",
    ".jsonl",
    ".py",
    ".txt",
    ".jinja",
    ".model",
    ".png",
    ".jpg",
    ".jpeg",
    ".svg",
)
# Top-level files of a published suffix that stay local all the same. trainer_state.json is Trainer's resume state
# (log history, callback states, best_model_checkpoint as a path on the trainer's machine): it only makes sense next
# to the optimizer, scheduler and RNG files that stay local, Trainer's own hub_strategy="end" push leaves the
# checkpoints' copies behind, and the card already gives what a reader needs from it (it is read from the local
# folder: losses, steps, tokens seen). The metrics files (train/eval/all_results.json) and training_summary.json,
# the facts behind the card, are published.
LOCAL_FILES = ("trainer_state.json",)
DEFAULT_COMMIT_MESSAGE = "Upload MiniGPT checkpoint with minigpt/hub/push.py"


def stage_files(folder: Path, stage: Path) -> tuple[list[str], list[str]]:
    """Fill `stage` with the files to publish: weights as symlinks (big, never written to), the rest as copies.
    Returns (published names, names left out)."""
    pushed, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name == "README.md":  # the card is decided by push_folder
            continue
        if (path.name.startswith(".") or path.is_dir() or path.suffix.lower() not in PUSHED_SUFFIXES
                or path.name in LOCAL_FILES):  # fmt: skip
            skipped.append(path.name + ("/" if path.is_dir() else ""))
            continue
        if path.suffix == ".safetensors":
            os.symlink(path.resolve(), stage / path.name)
        else:
            shutil.copyfile(path, stage / path.name)
        pushed.append(path.name)
    return pushed, skipped


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    license: str | None = None,
    datasets: list[str] | None = None,
) -> str:
    """Publish the MiniGPT checkpoint in `folder` as the Hub model repo `repo_id` (created if missing, on branch
    `revision` if given) and return the repo's URL. `dry_run` prints the files and the card and uses no network."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a valid repo id ({e}); use 'name' or 'namespace/name'.") from None
    folder = Path(folder)
    config = check_minigpt_folder(folder)

    api = None
    if not dry_run:
        problem = hub_access_problem(token)
        if problem:
            raise PermissionError(f"{problem}; or use --dry-run to see what would be pushed.")
        token = token or get_token()
        api = HfApi(token=token)
        if "/" not in repo_id:  # the Hub puts a bare name under the token's user; the card needs the full id
            with _explain_auth_errors(repo_id, folder):
                repo_id = f"{api.whoami()['name']}/{repo_id}"

    with tempfile.TemporaryDirectory(prefix="minigpt-push-") as tmp:
        stage = Path(tmp)
        pushed, skipped = stage_files(folder, stage)
        repaired = [] if has_remote_code(folder, config) else write_model_code(MiniGPTConfig.from_pretrained(stage), stage)
        pushed = sorted(set(pushed) | set(repaired))

        readme = folder / "README.md"
        keep_readme = readme.is_file() and not is_generated(readme.read_text())
        if keep_readme:
            shutil.copyfile(readme, stage / "README.md")
        else:
            card = build_model_card(stage, repo_id, license=license, datasets=datasets, revision=revision,
                                    records=folder)
            card.save(stage / "README.md")
        pushed = sorted(set(pushed) | {"README.md"})

        url = f"{api.endpoint if api else constants.ENDPOINT}/{repo_id}"
        url += f"/tree/{revision}" if revision and revision != "main" else ""
        if dry_run:
            _print_plan(stage, repo_id, revision, private, pushed, skipped, repaired, keep_readme)
            return url

        with _explain_auth_errors(repo_id, folder):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=stage,
                revision=revision,
                commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            )

        # The push succeeded: bring the folder in line with the repository (card, repaired config and code).
        for name in ([] if keep_readme else ["README.md"]) + repaired:
            try:
                shutil.copyfile(stage / name, folder / name)
            except OSError as e:  # a read-only folder: the push itself is done, so only say so
                warnings.warn(f"Pushed to {url}, but could not write {name} back into {folder}: {e}", stacklevel=2)
    return url


@contextmanager
def _explain_auth_errors(repo_id: str, folder: Path):
    """Turn the Hub's 401/403 into a PermissionError that says what to do (and never shows the token)."""
    try:
        yield
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status not in (401, 403):
            raise
        reason = e.response.headers.get("X-Error-Message") or e.response.reason_phrase
        if status == 401:
            fix = (
                "The token was rejected: create a token with write access at "
                "https://huggingface.co/settings/tokens, then run `hf auth login` or set HF_TOKEN."
            )
        else:
            fix = (
                f"Your token may not write to the namespace {repo_id.split('/')[0]!r}: push to a namespace you "
                "own or belong to, ask its owners for write access, or log in with a token that has write "
                "permission (`hf auth login` or HF_TOKEN)."
            )
        raise PermissionError(
            f"The Hub refused to publish {repo_id} (HTTP {status}: {reason}). {fix} Nothing was changed in {folder}."
        ) from None


def _print_plan(stage, repo_id, revision, private, pushed, skipped, repaired, keep_readme):
    print(f"[dry run] would push to {repo_id} (branch {revision or 'main'}, {'private' if private else 'public'}):")
    for name in pushed:
        size = (stage / name).stat().st_size
        note = " (repaired: auto_map/code were missing)" if name in repaired else ""
        note += " (your own README.md, kept)" if name == "README.md" and keep_readme else ""
        print(f"  {name:40s} {size:>12,d} bytes{note}")
    if skipped:
        print(f"[dry run] left out (training state, sub-folders, other files): {', '.join(skipped)}")
    print("[dry run] README.md:")
    print((stage / "README.md").read_text())


def main(argv: list[str] | None = None):
    parser = one_line_usage(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), "push")
    parser.add_argument("folder", help="checkpoint folder written by save_pretrained (config.json, model.safetensors)")
    parser.add_argument("repo_id", help="Hub repo id, 'namespace/name' or 'name' (then under your user)")
    parser.add_argument("--private", action="store_true", help="create the repo as private (if it doesn't exist)")
    parser.add_argument("--revision", "--branch", dest="revision", help="branch to push to (created from main)")
    parser.add_argument("--commit-message", default=None, help=f"default: {DEFAULT_COMMIT_MESSAGE!r}")
    parser.add_argument("--license", default=None,
                        help="Hub license id for the card metadata (mit, apache-2.0, cc-by-4.0, ...); default: "
                        "'other', with a note that no license was chosen yet")
    parser.add_argument("--dataset", action="append", default=None, help="Hub dataset id for the card; repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print the file list and the card; no network")
    args = parser.parse_args(argv)
    url = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
        license=args.license,
        datasets=args.dataset,
    )
    if not args.dry_run:
        print(f"pushed {args.folder} to {url}")


def cli(argv: list[str] | None = None) -> None:
    """The `minigpt-push` console script."""
    run_cli("push", main, argv, errors=(PermissionError, ValueError, FileNotFoundError))


if __name__ == "__main__":
    cli()
