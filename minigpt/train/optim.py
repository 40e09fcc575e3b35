"""Pretraining's optimizers, built by configure_optimizer from --optimizer:

    muon   (the default) Muon for the 2-D weight matrices inside the transformer blocks, AdamW for the rest (token and
           position embeddings, the tied LM head, biases, norms): the recipe of modded-nanogpt's speedrun and nanochat.
    adamw  AdamW for everything, nanoGPT's recipe (the default before Muon).

Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/) keeps a Nesterov momentum of each matrix's gradient and
replaces the update by its nearest semi-orthogonal matrix, computed with a Newton-Schulz iteration. torch.optim.Muon
runs that iteration in bfloat16 only, which is fast on GPUs and 3x slower than float32 on CPUs without bfloat16 matrix
units; MuonAdamW below is the same update with the iteration's dtype chosen per device (bfloat16 on accelerators,
float32 on CPU), and one optimizer object for both rules, so accelerate, the checkpoints and the non-finite checks see
one optimizer as before. Its state is torch's: "momentum_buffer" for Muon's matrices, AdamW's "step", "exp_avg" and
"exp_avg_sq" for the rest. tests/test_optim.py checks both rules against torch.optim.Muon and torch.optim.AdamW.
"""

import torch
from torch.optim.adamw import adamw
from torch.distributed.tensor import DTensor, distribute_tensor

# the quintic's coefficients and the norm floor, as torch.optim.Muon and Keller Jordan's reference use them
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def orthogonalize(update: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Newton-Schulz quintic iteration on a 2-D matrix, in `dtype`: about U V^T for update = U S V^T (singular
    values pushed into roughly [0.7, 1.2], which trains as well as exact orthogonalisation). The same operations as
    torch.optim.Muon's, which always uses bfloat16."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    x = x / x.norm().clamp(min=NS_EPS)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def orthogonalize_whole(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """orthogonalize() of the whole matrix, also when `update` is a DTensor shard (FSDP2): the shards are gathered,
    every process orthogonalises the same whole matrix, and each keeps its own shard of the result."""
    if not isinstance(update, DTensor):
        return orthogonalize(update, steps, dtype)
    whole = orthogonalize(update.full_tensor(), steps, dtype)
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)  # no communication


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the param groups with use_muon=True, AdamW for the others. Each group carries its own hyperparameters
    (lr, weight_decay; momentum, nesterov, ns_steps for Muon; betas, eps for AdamW). `ns_dtype` is where the
    Newton-Schulz iteration runs; `fused` picks torch's fused AdamW kernel."""

    def __init__(self, param_groups: list[dict], ns_dtype: torch.dtype = torch.float32, fused: bool = False):
        super().__init__(param_groups, defaults={})
        self.ns_dtype, self.fused = ns_dtype, fused
        for group in self.param_groups:
            for p in group["params"] if group["use_muon"] else ():
                if p.dim() != 2:
                    raise ValueError(f"Muon updates 2-D matrices; a parameter of shape {tuple(p.shape)} was given.")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                self._muon(group, params)
            elif params:
                self._adamw(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        """torch.optim.Muon's update, with adjust_lr_fn "original" (the rate times sqrt(max(1, rows / columns)))."""
        lr, momentum = group["lr"], group["momentum"]
        for p in params:  # 2-D, checked at construction; FSDP1, which flattens them, is refused before any work
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
            update = orthogonalize_whole(update, group["ns_steps"], self.ns_dtype)
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        """torch.optim.AdamW's update, through torch's functional adamw, with AdamW's state layout."""
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if self.fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif self.fused and state["step"].device != p.device:  # loaded from a checkpoint: the fused kernel
                state["step"] = state["step"].to(p.device)  # wants the step count beside the parameter
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states], fused=self.fused or None, foreach=None if self.fused else False,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False,
        )  # fmt: skip


def split_parameters(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter names by the rule that trains them under --optimizer muon: "muon" for every 2-D weight inside the
    transformer blocks, "adamw_decay" for the other 2-D weights (embeddings; the LM head is tied to the token
    embedding and named once), "adamw" for biases and norms. Each parameter appears exactly once."""
    names = {"muon": [], "adamw_decay": [], "adamw": []}
    for name, p in model.named_parameters():  # tied weights appear once
        in_blocks = ".layers." in f".{name}"
        names["muon" if in_blocks and p.dim() == 2 else "adamw_decay" if p.dim() >= 2 else "adamw"].append(name)
    return names


def group_settings(args) -> list[dict]:
    """Each param group's hyperparameters, from the arguments alone, in the order configure_optimizer builds the groups.
    A resume applies them again over the checkpoint's groups (apply_arguments), so its overrides take effect."""
    betas = (args.adam_beta1, args.adam_beta2)
    if args.optimizer == "adamw":  # decayed 2-D weights, then biases and norms: the order of older checkpoints
        return [{"lr": args.learning_rate, "betas": betas, "weight_decay": args.weight_decay},
                {"lr": args.learning_rate, "betas": betas, "weight_decay": 0.0}]  # fmt: skip
    adam = {"use_muon": False, "lr": args.learning_rate, "betas": betas, "eps": 1e-8}
    return [
        {"use_muon": True, "lr": args.muon_learning_rate, "momentum": args.muon_momentum, "nesterov": True,
         "ns_steps": NS_STEPS, "weight_decay": args.weight_decay},
        {**adam, "weight_decay": args.weight_decay},  # embeddings (and an untied LM head)
        {**adam, "weight_decay": 0.0},  # biases and norms
    ]  # fmt: skip


def configure_optimizer(model: torch.nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer --optimizer names, over `model`'s parameters as they will be trained (after any sharding). Weight
    decay applies to 2-D weights only. The rates set here are the peaks; the loop sets each step's (set_rates)."""
    fused = device.type in ("cuda", "cpu")  # torch's fused AdamW exists for both since torch 2.4
    params, split = dict(model.named_parameters()), split_parameters(model)
    if args.optimizer == "adamw":
        names = [[n for n in params if n not in split["adamw"]], split["adamw"]]
    else:
        names = [split["muon"], split["adamw_decay"], split["adamw"]]
    groups = [{"params": [params[n] for n in group], **settings}
              for group, settings in zip(names, group_settings(args))]  # fmt: skip
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, fused=fused)
    return MuonAdamW(groups, ns_dtype=torch.float32 if device.type == "cpu" else torch.bfloat16, fused=fused)


def apply_arguments(optimizer: torch.optim.Optimizer, args) -> None:
    """After a resume loaded the checkpoint's optimizer state, which brings back the saved groups: each group's
    hyperparameters from this run's arguments (an override of --muon_momentum, --weight_decay or the betas takes
    effect, as the resume prints), the state (moments, momentum buffers) as loaded."""
    for group, settings in zip(optimizer.param_groups, group_settings(args), strict=True):
        group.update(settings)


def set_rates(optimizer: torch.optim.Optimizer, lr: float, args) -> dict[str, float]:
    """Set this step's rates from `lr`, the schedule's AdamW rate: Muon's groups get --muon_learning_rate scaled by
    the same factor. Read from the arguments each step, never from the groups, which a resume restores. Returns the
    rates by the names the log gives them: {"lr"} and, under Muon, {"muon_lr"}."""
    muon_lr = lr * args.muon_learning_rate / args.learning_rate
    for group in optimizer.param_groups:
        group["lr"] = muon_lr if group.get("use_muon") else lr
    return {"lr": lr, "muon_lr": muon_lr} if args.optimizer == "muon" else {"lr": lr}
