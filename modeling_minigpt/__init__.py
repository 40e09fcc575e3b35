"""MiniGPT, a GPT-style decoder as a transformers plugin.

Importing this package registers MiniGPT with AutoConfig, AutoModel, AutoModelForCausalLM and the three task-head
Auto classes, and marks the classes for `register_for_auto_class`, so that `save_pretrained` copies the two modeling
files next to the weights. The config's `auto_map` names every class, so a checkpoint loads through each Auto class
with `trust_remote_code=True` where this package is absent, whichever head saved it.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from . import modeling_minigpt
from .configuration_minigpt import MiniGPTConfig
from .modeling_minigpt import (
    MiniGPTForCausalLM,
    MiniGPTForQuestionAnswering,
    MiniGPTForSequenceClassification,
    MiniGPTForTokenClassification,
    MiniGPTModel,
    MiniGPTPreTrainedModel,
)

AutoConfig.register(MiniGPTConfig.model_type, MiniGPTConfig, exist_ok=True)
MiniGPTConfig.register_for_auto_class()
for auto_class, model_class in (
    (AutoModel, MiniGPTModel),
    (AutoModelForCausalLM, MiniGPTForCausalLM),
    (AutoModelForSequenceClassification, MiniGPTForSequenceClassification),
    (AutoModelForTokenClassification, MiniGPTForTokenClassification),
    (AutoModelForQuestionAnswering, MiniGPTForQuestionAnswering),
):
    auto_class.register(MiniGPTConfig, model_class, exist_ok=True)
    model_class.register_for_auto_class(auto_class.__name__)

__all__ = ["MiniGPTConfig", *modeling_minigpt.__all__]
