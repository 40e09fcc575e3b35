"""The project's own `evaluate` metric modules. Load one with `evaluate.load(metric_path("perplexity"))`."""

from pathlib import Path


def metric_path(name: str) -> str:
    """Path of the metric folder `name` (e.g. "perplexity"), for `evaluate.load`."""
    path = Path(__file__).resolve().parent / name
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(f"No metric module {name!r} in {path.parent}; available: {available_metrics()}")
    return str(path)


def available_metrics() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(p.name for p in here.iterdir() if (p / f"{p.name}.py").is_file())
