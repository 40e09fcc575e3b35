"""Where MiniGPT meets transformers' own machinery across versions: the two names of the KV-cache argument, and the
built-in class-name tables. A sibling of modeling_minigpt.py, imported relatively, so it travels with checkpoints."""

import functools
from collections.abc import Callable

from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache` (the old name stays,
# deprecated, until 5.40); 5.17 to 5.23 know only `past_key_values`. Every forward here takes `cache`, and one
# decorator maps the other name onto it: with transformers' own deprecation warning where `cache` is the current
# name (as its built-in models do), silently where `past_key_values` still is. Given both, `cache` wins, as in
# transformers' models, except where it is empty and `past_key_values` is not: PEFT's prefix tuning passes its prefix
# as `past_key_values` while transformers >= 5.24's generate passes its own new, empty `cache`, and the prefix is what
# the caller means (GPT-2 keeps the empty cache there and silently generates without the prefix).
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _holds_tokens(cache: Cache | None) -> bool:
    return cache is not None and cache.get_seq_length() > 0


def accepts_both_cache_names(forward: Callable) -> Callable:
    if CACHE_NAME == "cache":
        forward = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def forward_taking_both_names(*args, **kwargs):
        cache, past_key_values = kwargs.get("cache"), kwargs.get("past_key_values")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            if _holds_tokens(past_key_values) and not _holds_tokens(cache):
                del kwargs["cache"]  # the prefix PEFT passes beside generate's new cache
            elif CACHE_NAME == "past_key_values":  # transformers >= 5.24 warns and keeps `cache`; so does this
                logger.warning_once("Both `past_key_values` and `cache` are set; using `cache`.")
                del kwargs["past_key_values"]
        if CACHE_NAME == "past_key_values":
            past_key_values = kwargs.pop("past_key_values", None)
            if past_key_values is not None:
                kwargs["cache"] = past_key_values
        return forward(*args, **kwargs)

    return forward_taking_both_names


def add_to_transformers_name_tables(model_type: str, classes: dict) -> None:
    """Add each class's name under `model_type` to the transformers table named by its key.

    Some behaviour is keyed on a model's class *name* in transformers' built-in tables, which `AutoModelFor*.register`
    does not reach: Trainer shifts the labels for label smoothing only for the names in
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (any other model is smoothed against unshifted labels, so it learns to copy its
    input), refuses a bare base model by MODEL_MAPPING_NAMES, and the model card and `transformers serve` read the task
    from them. modeling_minigpt.py calls this at import, so that a checkpoint loaded with trust_remote_code registers
    too. A table maps a model_type to a class name; "minigpt" is in no built-in CONFIG_MAPPING_NAMES, so the lazy Auto
    mappings built on these tables skip the entry."""
    from transformers.models.auto import modeling_auto

    for table, cls in classes.items():
        getattr(modeling_auto, table).setdefault(model_type, cls.__name__)
