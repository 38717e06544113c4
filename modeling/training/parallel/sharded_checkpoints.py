"""Sharded checkpoints of an FSDP2 or DeepSpeed ZeRO-3 run: resume from them, and consolidate them for one process.

The engines do the work; these functions only pick the right call for the engine:
- FSDP2: `torch.distributed.checkpoint` (DCP) saves each rank's shards of the model and AdamW state
  (`get_state_dict` / `set_state_dict` translate between DTensors and the checkpoint's global layout), and
  `get_model_state_dict(full_state_dict=True)` gathers the whole model for a `save_pretrained` on rank 0.
- ZeRO-3: `DeepSpeedEngine.save_checkpoint` / `load_checkpoint` (one file of partitions per rank), and DeepSpeed's
  own `zero_to_fp32` rebuilds the full fp32 state dict from those files in one process, without torch.distributed.
A consolidated folder is an ordinary `save_pretrained` folder (safetensors): `from_pretrained` loads it anywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ZERO3_TAG = "sharded"


def is_zero3_engine(model: nn.Module) -> bool:
    """True for a `deepspeed.DeepSpeedEngine` (checked by duck type: no DeepSpeed import for FSDP2 users)."""
    return hasattr(model, "save_checkpoint") and hasattr(model, "zero_optimization_stage")


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, directory: str | Path) -> None:
    """Every rank writes its shards of `model` (FSDP2 module or ZeRO-3 engine) and its optimizer state. Collective."""
    directory = Path(directory)
    if is_zero3_engine(model):
        model.save_checkpoint(str(directory), tag=ZERO3_TAG)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, [] if optimizer is None else optimizer)
    state = {"model": model_state} if optimizer is None else {"model": model_state, "optimizer": optimizer_state}
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, directory: str | Path) -> None:
    """Load `save_sharded`'s checkpoint into a freshly built, identically sharded `model` (and `optimizer`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"`directory`={str(directory)!r} does not exist: pass the folder save_sharded wrote.")
    if is_zero3_engine(model):
        load_path, _ = model.load_checkpoint(str(directory), tag=ZERO3_TAG,
                                             load_optimizer_states=optimizer is not None)
        if load_path is None:
            raise ValueError(f"`directory`={str(directory)!r} holds no ZeRO checkpoint tagged {ZERO3_TAG!r}.")
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, [] if optimizer is None else optimizer)
    state = {"model": model_state} if optimizer is None else {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))  # fills the DTensor shards in place
    set_state_dict(model, [] if optimizer is None else optimizer, model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}))


def save_consolidated(model: nn.Module, directory: str | Path) -> None:
    """Gather a sharded FSDP2 `model` and write it (safetensors, config) with `save_pretrained` on rank 0. Collective.

    For ZeRO-3 use `consolidate_zero3_checkpoint` on `save_sharded`'s folder (one process, no gathering run).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    if is_zero3_engine(model):
        raise ValueError("`model` is a DeepSpeed engine: save_sharded it, then consolidate_zero3_checkpoint(folder).")
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        # FSDP2 swaps the class for a subclass defined in torch: save through the model's own class, so that the
        # folder carries the model's remote-code files and `auto_map`, not torch's FSDP modules.
        from torch.distributed.fsdp import FSDPModule

        own_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
        unsharded = own_class(model.config)
        unsharded.load_state_dict(state)
        unsharded.save_pretrained(str(directory))
    if dist.is_initialized():
        dist.barrier()


def consolidate_zero3_checkpoint(checkpoint_dir: str | Path, model: nn.Module, output_dir: str | Path,
                                 tag: str | None = ZERO3_TAG) -> nn.Module:
    """Rebuild the full fp32 weights of a ZeRO-3 `save_sharded` folder with DeepSpeed's `zero_to_fp32`, load them
    into `model` (an unsharded model of the same config, e.g. built with `from_config`) and `save_pretrained` it.

    Runs in one process (it reads every rank's partition file). `tag=None` reads the folder's `latest` file (a
    Trainer `checkpoint-N` folder). Returns `model`, loaded.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or [key for key in missing if key not in tied]:
        raise ValueError(f"`model` ({type(model).__name__}) does not match the checkpoint: missing {missing}, "
                         f"unexpected {unexpected}; build it from the trained run's config.")
    model.save_pretrained(str(output_dir))
    return model


__all__ = ["ZERO3_TAG", "consolidate_zero3_checkpoint", "is_zero3_engine", "load_sharded", "save_consolidated",
           "save_sharded"]
