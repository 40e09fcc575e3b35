"""MiniGPT, a GPT-style decoder as a transformers plugin.

Importing this package registers MiniGPT with AutoConfig, AutoModel and AutoModelForCausalLM, and marks the
classes for `register_for_auto_class`, so that `save_pretrained` writes `auto_map` into config.json and copies
the two modeling files next to the weights (loadable with `trust_remote_code=True` where this package is absent).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_minigpt import MiniGPTConfig
from .modeling_minigpt import MiniGPTForCausalLM, MiniGPTModel, MiniGPTPreTrainedModel

AutoConfig.register(MiniGPTConfig.model_type, MiniGPTConfig, exist_ok=True)
AutoModel.register(MiniGPTConfig, MiniGPTModel, exist_ok=True)
AutoModelForCausalLM.register(MiniGPTConfig, MiniGPTForCausalLM, exist_ok=True)

MiniGPTConfig.register_for_auto_class()
MiniGPTModel.register_for_auto_class("AutoModel")
MiniGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MiniGPTConfig", "MiniGPTPreTrainedModel", "MiniGPTModel", "MiniGPTForCausalLM"]
