"""Apply data parallelism to a lightarch decoder from outside the model (torchtitan's `parallelize` pattern).

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every decoder layer as its own unit, then the root (embeddings,
exit norms, estimator, final norm, LM head): one all-gather per layer in forward and one reduce-scatter per layer in
backward, with tied embeddings kept in the root unit. DDP replicates the model and all-reduces gradients.
Both average gradients over ranks, so the loss each rank backpropagates must be its share of the global loss
(`lightarch.training.parallel.data_parallel_moe_loss`).
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (`model.model.layers` for every lightarch head); a one-line error otherwise."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"`model` ({type(model).__name__}) has no `model.layers` ModuleList: pass a lightarch "
                         "decoder (SparseMoe / AdaptiveDepth head).")
    return layers


def apply_fsdp2(model: nn.Module, **fully_shard_kwargs) -> nn.Module:
    """Shard `model` in place with FSDP2: each decoder layer, then the root. Needs an initialized process group.

    `fully_shard_kwargs` go to every `fully_shard` call (e.g. `mesh=`, `reshard_after_forward=`,
    `mp_policy=`). Returns the model (its class becomes an `FSDPModule` subclass; parameters become DTensors).
    """
    from torch.distributed.fsdp import fully_shard

    if not torch.distributed.is_initialized():
        raise RuntimeError("apply_fsdp2 needs torch.distributed initialized: launch with torchrun and call "
                           "torch.distributed.init_process_group first.")
    for layer in decoder_layers(model):
        fully_shard(layer, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def apply_ddp(model: nn.Module, **ddp_kwargs) -> nn.Module:
    """Wrap `model` in `DistributedDataParallel` (CPU / gloo or any device). Needs an initialized process group."""
    if not torch.distributed.is_initialized():
        raise RuntimeError("apply_ddp needs torch.distributed initialized: launch with torchrun and call "
                           "torch.distributed.init_process_group first.")
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def full_gradient(parameter: nn.Parameter) -> torch.Tensor | None:
    """The whole gradient of a (possibly FSDP2- or ZeRO-3-sharded) parameter; a collective for sharded ones (call
    on every rank, in the same order). Under ZeRO-3, call it between `engine.backward` and `engine.step`."""
    if hasattr(parameter, "ds_id"):  # a DeepSpeed ZeRO-3 partitioned parameter
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(parameter)
    grad = parameter.grad
    if grad is None:
        return None
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


__all__ = ["apply_ddp", "apply_fsdp2", "decoder_layers", "full_gradient"]
