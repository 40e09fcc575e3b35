"""LoRA through peft for fine-tuning: which Linear layers it may adapt (never the tied LM head), the adapter built with
every target name checked, and an adapter folder loaded to train further."""

import logging
import warnings

import torch

logger = logging.getLogger("minigpt.train.finetune")

DEFAULT_LORA_TARGETS = "qkv_proj,o_proj,up_proj,down_proj"


def tied_output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head when it shares its weight with the token embeddings (MiniGPT's lm_head by default), else None."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embeddings is not None and head.weight is embeddings.weight
    return head if tied else None


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the Linear layers LoRA may adapt, the names target_modules match against. A tied
    LM head is left out: it is the embedding matrix, and an adapter on it would be a second, untied head that
    merge_and_unload folds into the embeddings (peft's "all-linear" leaves it out for the same reason)."""
    head = tied_output_layer(model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})  # fmt: skip


def apply_lora(model, target_modules: str | list[str] = DEFAULT_LORA_TARGETS, r: int = 8, alpha: int = 16,
               dropout: float = 0.0):
    """Wrap `model` in a peft LoRA model. Every target name must match a module: peft alone only fails when none
    does, so a typo among several names would silently leave that layer untrained. The tied LM head is refused."""
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    if target_modules != "all-linear":
        head = tied_output_layer(model)
        tied = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if head is not None and m is head}
        names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()} - tied
        missing = [t for t in target_modules if t not in names]
        if missing or not target_modules:
            why = ""
            if tied & set(missing):
                why = f" ({', '.join(sorted(tied))} is the LM head, tied to the token embeddings)"
            raise ValueError(
                f"LoRA target modules {missing or target_modules} match no module of {type(model).__name__} that "
                f"LoRA can adapt{why}. Its linear layers are {linear_module_names(model)}; list some of those, or "
                "pass 'all-linear'."
            )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft (0.21.2, the newest) reads model.is_gradient_checkpointing in PeftModel.__init__, a property that
        # transformers 5.24 deprecates with a FutureWarning on every LoRA run. Nothing on our side calls it; drop
        # this filter once peft reads is_activation_checkpointing.
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def load_adapter(model, adapter: str):
    """`model` (the adapter's base) with the LoRA adapter of folder `adapter` loaded to train further.

    A fine-tune started from an adapter folder continues to train that adapter, as peft users expect of
    PeftModel.from_pretrained(base, adapter, is_trainable=True). Not AutoModelForCausalLM.from_pretrained(adapter):
    transformers (with peft installed) does load an adapter folder that way, base and all, but for inference, with
    every weight frozen, so Trainer would train nothing ("element 0 of tensors does not require grad")."""
    from peft import PeftModel

    with warnings.catch_warnings():  # the same peft FutureWarning as in apply_lora
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    logger.info("continuing to train the LoRA adapter %s (its r, alpha and targets; the --lora_* options are unused)",
                adapter)
    return model
