"""Serve a MiniGPT folder with transformers' own OpenAI-compatible server (`transformers serve`), which cannot start it
by itself.

    minigpt-serve runs/tiny --port 8000                          # /v1/completions, /v1/chat/completions, /v1/models
    python -m minigpt.serve runs/tiny --continuous-batching      # many requests at once, in one paged batch
    minigpt-serve --help                                         # every option of `transformers serve`

Why: `transformers serve` finds the model class by its name in transformers' own namespace,
`getattr(transformers, config.architectures[0])`, so a plugin model such as MiniGPTForCausalLM fails at start, even
with --trust-remote-code. This command imports modeling_minigpt (which registers MiniGPT with the Auto classes), sets
each of its classes (modeling_minigpt.__all__) as an attribute of the `transformers` module, and then runs the same
command `transformers serve` runs, in this process: the `serve` command of transformers' command-line app
(transformers.cli.transformers.app, whose callback is transformers.cli.serve.Serve), given the arguments as they
are. Every option is transformers' (--port, --continuous-batching, --cb-*, --device, --dtype, ...), with one other
default: --host is 127.0.0.1 (transformers': localhost), so that the server is reachable from this machine only
unless --host says otherwise.

Where transformers loads the model in a process of its own (5.25 spawns it), that process starts a fresh interpreter,
which runs this module again as multiprocessing's main module (`python -m minigpt.serve`, or the `minigpt-serve`
script that imports it): the classes are set at import time for that reason, not only in main().

/v1/chat/completions needs a chat template in the folder's tokenizer (tokenizer.chat_template). transformers' server
needs its own extras: `pip install "transformers[serving]"` (fastapi, uvicorn, openai).
"""

import importlib
import sys
from pathlib import Path

import click
import transformers

import modeling_minigpt  # registers MiniGPT with AutoConfig and the AutoModel classes
from minigpt.commands import one_line, run_cli
from minigpt.sources import check_model_path

PROG = "serve"
DEFAULT_HOST = "127.0.0.1"


def expose_minigpt_classes() -> None:
    """Make MiniGPT's classes reachable as `transformers.<name>`, where transformers' server looks its models up.

    They are set on the module that sys.modules holds once transformers.processing_utils is imported: that import runs
    transformers/__init__.py a second time (direct_transformers_import), which puts a new module object there, so an
    attribute set on the `transformers` imported before it would be lost to every later `import transformers`."""
    importlib.import_module("transformers.processing_utils")
    module = sys.modules["transformers"]
    for name in modeling_minigpt.__all__:
        setattr(module, name, getattr(modeling_minigpt, name))


expose_minigpt_classes()  # at import: also in the model's process, which imports this module as its main (above)


def serve_command() -> tuple[click.Command, dict]:
    """The click command behind `transformers serve`, the `serve` command of transformers' own command-line app, and the
    context settings that app gives its commands (-h for --help, the width of the help)."""
    try:
        from transformers.cli.transformers import app
    except ImportError as error:
        raise ImportError(
            f"transformers {transformers.__version__} has no `transformers serve` ({error}); install "
            'transformers >= 5.17 with its serving extras: pip install "transformers[serving]".'
        ) from None
    if not isinstance(app, click.Group):  # a typer app (huggingface_hub's CLI framework builds a click group)
        import typer

        app = typer.main.get_command(app)
    command = app.commands.get("serve")
    if command is None:
        raise ImportError(f"transformers {transformers.__version__}'s command-line app has no `serve` command.")
    return command, dict(app.context_settings)


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` as `transformers serve` does (MODEL first, then its options), check the model name, and run the
    server until it is stopped (Ctrl-C or SIGTERM)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command, settings = serve_command()
    # default_map: the defaults this command changes, which an option on the command line still overrides
    settings["default_map"] = {**settings.get("default_map", {}), "host": DEFAULT_HOST}
    try:
        with command.make_context(f"minigpt-{PROG}", argv, **settings) as ctx:
            model = ctx.params.get("force_model")
            # checked: a folder, or a Hub id; passed on as it is: transformers' "repo@revision" and "repo:file.gguf"
            checked = model is not None and (Path(model).expanduser().exists() or not any(c in model for c in "@:"))
            if checked and check_model_path(model, "MODEL") == "adapter":
                raise ValueError(
                    f"MODEL {model} is a LoRA adapter; transformers' server loads full models only: serve the merged "
                    "model that minigpt-finetune saves beside it."
                )
            command.invoke(ctx)
    except click.exceptions.Exit as done:  # --help, or the server stopped
        if done.exit_code:
            raise SystemExit(done.exit_code) from None
    except click.exceptions.Abort:
        raise KeyboardInterrupt from None
    except click.ClickException as error:  # a usage error (an unknown option, a bad value): one line, as argparse's
        print(f"{PROG}: error: {one_line(error.format_message())}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None


def cli(argv: list[str] | None = None) -> None:
    """The `minigpt-serve` console script."""
    # RuntimeError: how transformers 5.25 reports a model its process failed to load ("OSError: no file named
    # model.safetensors ..."), after that process has logged the traceback
    run_cli(PROG, main, argv, errors=(ValueError, OSError, ImportError, RuntimeError))


if __name__ == "__main__":
    cli()
