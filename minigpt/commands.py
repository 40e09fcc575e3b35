"""How to run MiniGPT's tools from the user's shell, for the commands a tool prints ("continue: ...", "try: ...").

`python -m minigpt.train.pretrain` works only where `python` is the interpreter MiniGPT is installed in; after
`make demo` that is .venv's, which a new shell has not activated. A printed command therefore names the console
script where the shell finds this installation's (`minigpt-pretrain`), else its path (`.venv/bin/minigpt-pretrain`),
else this interpreter with -m (a clone that is not installed).
"""

import shlex
import shutil
import sys
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
