"""How MiniGPT's command-line tools talk to the shell: the commands they print ("continue: ...", "try: ..."), and
their one ending (run_cli): a line for bad input, a line for Ctrl-C, never a traceback.

`python -m minigpt.train.pretrain` works only where `python` is the interpreter MiniGPT is installed in; after
`make demo` that is .venv's, which a new shell has not activated. A printed command therefore names the console
script where the shell finds this installation's (`minigpt-pretrain`), else its path (`.venv/bin/minigpt-pretrain`),
else this interpreter with -m (a clone that is not installed).
"""

import argparse
import shlex
import shutil
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path


def command(module: str) -> str:
    """The shell command that runs `module` (e.g. "minigpt.train.pretrain") with this installation."""
    scripts = [ep.name for ep in entry_points(group="console_scripts") if ep.value.split(":")[0] == module]
    bin_dir = Path(sys.executable).parent
    for name in scripts:
        installed = bin_dir / name
        if installed.is_file():
            found = shutil.which(name)
            return name if found and Path(found).resolve() == installed.resolve() else _shell_path(installed)
    return f"{_shell_path(Path(sys.executable))} -m {module}"


def _shell_path(path: Path) -> str:
    """`path` as the shell takes it: relative to the working folder when inside it, quoted where needed."""
    path = Path(path).absolute()
    try:
        relative = path.relative_to(Path.cwd())
        text = str(relative) if relative.parts and relative.parts[0] != ".." else str(path)
        text = text if "/" in text else f"./{text}"  # a bare name would be looked up on PATH instead
    except ValueError:
        text = str(path)
    return shlex.quote(text)


def run_cli(
    prog: str,
    main: Callable,
    argv: list[str] | None = None,
    errors: tuple[type[BaseException], ...] = (ValueError, OSError),
    status: int = 1,
    not_started: str = "",
) -> None:
    """The ending of every console script: `main(argv)`, whose return value would otherwise become the exit status.

    Bad input (`errors`, whose messages name the fix) ends in one line `prog: error: ...` and exit `status`;
    Ctrl-C in one line `prog: interrupted ...` and 130, with the KeyboardInterrupt's own text (where the run got to)
    or else `not_started`. Errors the tools raise as SystemExit themselves (argparse's usage, pretraining's
    checks) pass through as they are."""
    try:
        main(argv)
    except errors as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error  # str(KeyError) quotes it
        line = f"{prog}: error: {one_line(message)}"
        if status == 1:
            raise SystemExit(line) from None  # Python prints it on stderr and exits 1
        print(line, file=sys.stderr)
        raise SystemExit(status) from None
    except KeyboardInterrupt as error:
        raise SystemExit(interrupted(prog, f" {error}" if str(error) else not_started)) from None


def one_line_usage(parser: argparse.ArgumentParser, prog: str) -> argparse.ArgumentParser:
    """`parser` with its usage errors (an unknown flag, a bad value) as one line `prog: error: ...`, exit 2, like every
    other error of the tools, instead of the whole usage above it; --help still shows the usage."""
    parser.error = lambda message: parser.exit(2, f"{prog}: error: {message}\n")  # argparse's documented override
    return parser


def interrupted(prog: str, detail: str = "") -> int:
    """Ctrl-C in a command-line tool: one line on stderr instead of a KeyboardInterrupt traceback; returns 130, the
    exit status of a process ended by SIGINT (128 + 2), for `raise SystemExit(interrupted(...))`."""
    print(f"{prog}: interrupted{detail}", file=sys.stderr, flush=True)
    return 130


def one_line(error) -> str:
    """An error message on one line (transformers' Hub errors span several), for `tool: error: ...`."""
    return " ".join(str(error).split())
