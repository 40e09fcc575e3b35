"""FSDP for pretraining: which sharding a launch gets, torch's FSDP2 where accelerate cannot switch FSDP on, and
the files a sharded model saves.

accelerate enables FSDP only on accelerators (GPU, XPU, ...). On CPU ranks, `accelerate launch --config_file
fsdp.yaml` gives gloo ranks that accelerate wraps in plain DDP without a word. pretrain.py then applies FSDP2
itself, behind the same flags (`--fsdp`, or the FSDP config's ACCELERATE_USE_FSDP):

- each MiniGPTBlock is one FSDP unit, then the root (embeddings, final norm and the tied LM head) is the last one:
  parameters, gradients and optimizer state are sharded across the processes, each holding about 1/world of them;
- a checkpoint's `fsdp/` folder holds the sharded model and optimizer through torch.distributed.checkpoint (DCP),
  which a resume loads back exactly;
- `model.safetensors` (of every checkpoint and of the final folder) is the full state dict gathered on rank 0 and
  written through a plain MiniGPTForCausalLM. save_pretrained of the sharded module itself would record FSDP's
  generated subclass (`FSDPMiniGPTForCausalLM`) in auto_map and copy torch's files instead of the model code.

A launch asking for a sharding that cannot take effect (FSDP on one process, FSDP1 or parameter offload on CPU,
DeepSpeed that accelerate did not enable) is an error, never a silent fall back to DDP.

Sources: torch's FSDP2 (`torch.distributed.fsdp.fully_shard`, https://docs.pytorch.org/tutorials/intermediate/FSDP_tutorial.html)
and distributed state dicts (`torch.distributed.checkpoint.state_dict`).
"""

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from modeling_minigpt import MiniGPTForCausalLM

SHARDED_DIR = "fsdp"  # a checkpoint's DCP folder under torch-FSDP2
# accelerate's FSDP settings (from an FSDP config file) that the CPU path cannot honour, with their harmless values
UNSUPPORTED_ON_CPU = {"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "false", "FSDP_ACTIVATION_CHECKPOINTING": "false"}


def check_sharding_request(on_cpu: bool, optimizer: str) -> None:
    """Before the Accelerator exists: a DeepSpeed accelerate config on CPU, or without the deepspeed package, is an
    error that says so (accelerate would raise an ImportError from deep inside, or set up unsharded ranks); so is
    FSDP1 under Muon, which would hand the optimizer flattened 1-D shards of the matrices it orthogonalises."""
    env = os.environ
    version = env.get("FSDP_VERSION", "2" if on_cpu else "1")  # unset: accelerate's FSDP1, or FSDP2 on CPU (ours)
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and version != "2" and optimizer == "muon":
        raise SystemExit(
            f"pretrain: error: the accelerate config asks for FSDP_VERSION={version}, which "
            "flattens parameters, and Muon orthogonalises whole weight matrices. Set fsdp_version: 2 "
            "(minigpt/train/configs/accelerate/fsdp.yaml), or pass --optimizer adamw."
        )
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    import importlib.util

    missing = "this run is on CPU" if on_cpu else "the deepspeed package is not installed"
    if on_cpu or importlib.util.find_spec("deepspeed") is None:
        raise SystemExit(
            f"pretrain: error: the accelerate config asks for DeepSpeed, but {missing}; DeepSpeed needs GPUs and "
            "the deepspeed package. On CPU ranks use minigpt/train/configs/accelerate/fsdp.yaml, which shards."
        )


def choose_sharding(accelerator: Accelerator, fsdp_flag: bool, mixed_precision: str, compile: bool) -> str:
    """Which sharding this run uses: "accelerate-fsdp" (accelerate's FSDP, on accelerators), "torch-fsdp2" (this
    module's, on CPU ranks) or "none" (DDP or one process). Raises SystemExit where FSDP or DeepSpeed was asked for,
    by --fsdp or by the accelerate config, and cannot take effect."""
    env = os.environ
    kind = accelerator.distributed_type
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and kind != DistributedType.DEEPSPEED:
        raise SystemExit(
            f"pretrain: error: the accelerate config asks for DeepSpeed, but accelerate set up {kind.value} "
            "(DeepSpeed needs GPUs and the deepspeed package); training would silently be unsharded. Use "
            "minigpt/train/configs/accelerate/fsdp.yaml (sharding on CPU ranks too), or launch without DeepSpeed."
        )
    if kind == DistributedType.FSDP:
        return "accelerate-fsdp"
    wanted = fsdp_flag or env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wanted:
        return "none"
    if kind not in (DistributedType.MULTI_CPU, DistributedType.NO):
        raise SystemExit(
            f"pretrain: error: --fsdp shards CPU ranks; on {kind.value} use accelerate's FSDP "
            "(accelerate launch --config_file minigpt/train/configs/accelerate/fsdp.yaml ...)."
        )
    bad = [f"{k}={env[k]}" for k, ok in UNSUPPORTED_ON_CPU.items() if env.get(k, ok).lower() != ok]
    bad += [f"--mixed_precision {mixed_precision}"] if mixed_precision not in ("no", None) else []
    bad += ["--compile"] if compile else []
    if bad:
        raise SystemExit(
            f"pretrain: error: FSDP on CPU ranks is torch's FSDP2 in float32, without offload, activation "
            f"checkpointing or compilation; this launch asks for {', '.join(bad)}. Set fsdp_version: 2, "
            "fsdp_offload_params: false, fsdp_activation_checkpointing: false and mixed_precision: no."
        )
    if accelerator.num_processes < 2:
        raise SystemExit(
            "pretrain: error: FSDP shards the model across processes, and this launch has one. Launch two or more "
            "(accelerate launch --multi_gpu --num_processes N ... on CPU), or drop --fsdp."
        )
    return "torch-fsdp2"


def shard(model: MiniGPTForCausalLM) -> None:
    """Apply FSDP2 in place: one unit per block, then the root. After it every parameter is a DTensor sharded on
    dim 0 across the default process group; build the optimizer afterwards, over these parameters.
    FSDP_RESHARD_AFTER_FORWARD=false (an FSDP config's fsdp_reshard_after_forward) keeps gathered weights
    between forward and backward, trading memory for one all-gather less per block."""
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    for block in model.model.layers:
        fully_shard(block, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    # the tie must survive sharding (one DTensor under both names), or the head would train as a second matrix
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("fully_shard untied lm_head.weight from model.embed_tokens.weight (an unsupported torch)")


def local_share(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model), counting a tied parameter once."""
    params = list(model.parameters())
    return sum(local(p).numel() for p in params), sum(p.numel() for p in params)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def prepare(accelerator: Accelerator, model: MiniGPTForCausalLM, make_optimizer: Callable, fsdp: bool,
            compile: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer, str]:  # fmt: skip
    """(model, optimizer, sharding) ready to train: the sharding this launch gets (choose_sharding), then torch's FSDP2
    applied here on CPU ranks, or accelerate's prepare (DDP, accelerate's FSDP, one process). `make_optimizer(model)`
    builds the optimizer over the parameters as they will be trained (after sharding)."""
    sharding = choose_sharding(accelerator, fsdp, accelerator.mixed_precision, compile)
    if sharding != "torch-fsdp2":
        model, optimizer = accelerator.prepare(model, make_optimizer(model))
        return model, optimizer, sharding
    shard(model)  # accelerate would wrap the model in DDP: nothing of it is prepared
    optimizer = make_optimizer(model)
    held, total = local_share(model)
    print(f"fsdp: rank {accelerator.process_index} holds {held:,} of {total:,} parameters ({held / total:.1%}) and "
          "their gradients and optimizer state", flush=True)  # fmt: skip
    return model, optimizer, sharding


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every process calls it); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module, sharding: str) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the main process, on CPU ({} on the others under FSDP). Every process calls
    it: gathering the shards is a collective."""
    if sharding == "torch-fsdp2":
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return accelerator.get_state_dict(model)  # DDP: rank 0's copy; accelerate's FSDP gathers


def save_full_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """save_pretrained of a plain MiniGPTForCausalLM holding `state_dict` (the main process only): config.json with
    auto_map, model.safetensors, generation_config.json and the model code, as an unsharded run writes them."""
    plain = MiniGPTForCausalLM(model.config)
    plain.load_state_dict(state_dict)  # strict: a shard left out would be an error here, not a broken folder
    plain.generation_config = model.generation_config
    plain.save_pretrained(folder)


def save_sharded(model: FSDPModule, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process writes its shards of the model and optimizer state to `folder` (a DCP checkpoint)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(model: FSDPModule, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process reads its shards of the model and optimizer state back from `folder` (written by save_sharded)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
