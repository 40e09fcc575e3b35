"""The causal-LM loss computed from the hidden states chunk by chunk, never holding the full [B, T, V] logits.

`MiniGPTForCausalLM.forward(..., skip_logits=True)` uses it (the argument Trainer passes, and minigpt/train/pretrain.py).
It sits beside the model so that save_pretrained copies it with the modeling code, as a relative import.
"""

import torch
from torch import nn

# Rows of hidden states per loss chunk: chunk x V logits (~64M values: 256 MB in fp32) are all that exist at once.
_LOSS_CHUNK_ELEMENTS = 2**26


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T`, chunk by chunk, with the gradients worked out in the forward pass
    (d loss / d logits = softmax - onehot), so that no [N, V] logits, log-probabilities or their gradient are
    kept for the backward pass; backward only scales the two stored gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, chunk, grad_hidden_needed, grad_weight_needed):
        # hidden (N, C), weight (V, C), labels (N,) in [0, V), scale (N,): 1 / num_items, 0 where ignored
        grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None
        grad_weight = None  # (V, C) fp32, started by the first chunk: no zero-filled pass over a weight-sized buffer
        loss = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h, y, s = hidden[start : start + chunk], labels[start : start + chunk], scale[start : start + chunk]
            logits = h @ weight.t()  # (n, V), in the autocast dtype when autocast is on
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (n, V), fp32 for this chunk only
            rows = torch.arange(y.shape[0], device=y.device)
            loss = loss - (logprobs[rows, y] * s).sum()
            if not (grad_hidden_needed or grad_weight_needed):
                continue
            grad_logits = logprobs.exp_()
            grad_logits[rows, y] -= 1
            grad_logits = grad_logits.to(logits.dtype)  # (n, V), unscaled: s is applied to the small operands
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = (grad_logits @ weight) * s[:, None]
            if grad_weight_needed:
                part = grad_logits.t() @ (h * s[:, None]).to(h.dtype)  # (V, C)
                grad_weight = part.float() if grad_weight is None else grad_weight.add_(part)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_output if grad_hidden is not None else None
        grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.LongTensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.LongTensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """The causal-LM loss of transformers' `ForCausalLMLoss` on `hidden_states @ weight.T`, with the same value
    and gradients, without ever holding the full [B, T, V] logits (or their fp32 copy)."""
    if shift_labels is None:  # tokens < n predict n; the last position has no target
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # (N, C)
    labels = shift_labels.reshape(-1).to(hidden.device)  # (N,)
    valid = labels != ignore_index
    num_items = valid.sum() if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(num_items):
        num_items = num_items.to(hidden.device)
    scale = valid / num_items  # (N,): the mean over targets, or the sum / num_items_in_batch
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(
        hidden,
        weight,
        labels.clamp(min=0) * valid,
        scale,
        max(1, _LOSS_CHUNK_ELEMENTS // weight.shape[0]),
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
    )


def computes_plain_linear(head: nn.Module) -> bool:
    """Whether calling `head(x)` computes exactly `x @ head.weight.T`, so that the chunked loss may read the weight
    instead of calling the head. Anything that lives in the head's call makes it False, and the caller must call the
    head instead: a wrapper class (PEFT's LoRA layers and modules_to_save, quantized Linears), a forward replaced on
    the instance (accelerate's offload and device hooks), forward hooks, a bias, and a weight that is not a plain
    tensor holding its values (a tensor subclass such as torchao's quantized weights or a tensor-parallel DTensor, or
    a meta placeholder that a hook would load at call time)."""
    weight = getattr(head, "weight", None)
    return (
        type(head) is nn.Linear
        and head.bias is None
        and getattr(head.forward, "__func__", None) is nn.Linear.forward  # not replaced on the instance
        and not (head._forward_hooks or head._forward_pre_hooks)  # torch has no public "has hooks" query
        and type(weight) in (nn.Parameter, torch.Tensor)
        and not weight.is_meta
    )
