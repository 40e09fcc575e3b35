"""The project's own `evaluate` metric modules. Load one with `load_metric("perplexity")`, which is
`evaluate.load(metric_path("perplexity"))`.

evaluate copies a metric module's file alone into its cache (under HF_HOME) and imports it from there, so a module
cannot import a sibling file; it imports `metric_info` below from this package, which is installed.
"""

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


def load_metric(name: str, **kwargs):
    """`evaluate.load` of the metric module `name`; kwargs go to evaluate.load (e.g. keep_in_memory=True)."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


def metric_info(description: str, citation: str = "", **features: str):
    """The `evaluate.MetricInfo` of one of our modules: `description` is its docstring, and each keyword names an
    input and its datasets dtype, e.g. metric_info(__doc__, nll="float64", num_tokens="int64")."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=", ".join(f"{name} ({dtype})" for name, dtype in features.items()),
        features=datasets.Features({name: datasets.Value(dtype) for name, dtype in features.items()}),
    )
