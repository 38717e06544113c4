"""The DP-SGD training loss of a lightarch model: the model's own loss, made a mean of per-example terms.

DP-SGD bounds what one example can change by clipping each example's gradient. That bound holds only if each
example's gradient depends on that example alone, i.e. the batch loss is a mean of per-example losses. Two parts of a
lightarch loss are not, as the models compute them:

- the routers' balance loss (Switch) and z-loss are computed over the whole batch: one example's expert load enters
  every other example's gradient. Under DP they are computed per sequence (each example's own load, mean
  probability and z-loss, exactly what the model computes on that example alone) and averaged: DeepSeek-V3's
  sequence-wise balance loss. The batch-level term is subtracted from the model's loss, so its gradient is exactly
  zero (autograd adds +1 and -1 at the same node), not just small.
- a token-mean language-model loss couples examples through the token count when examples have different numbers of
  labelled tokens; then `private_loss` refuses the batch (packed blocks, `lightarch.data.corpus.BlockDataset`, have
  equal counts).

With both, the per-example gradient is the gradient of the example's loss alone, the router's weights included:
their sensitivity is bounded by the clipping norm like any other parameter's. (The DeepSeek-V3 bias update is not a
gradient and is refused under DP: see `lightarch.training.privacy.trainer`.)
"""

from __future__ import annotations

import torch
from torch import nn

from ...layers import Router
from ...modeling_sparse_moe import router_aux_loss, router_statistics


def check_equal_label_counts(labels: torch.Tensor | None) -> None:
    """A token-mean LM loss is a mean of per-example losses only if every example has as many labelled tokens."""
    if labels is None or labels.dim() < 2 or labels.shape[0] == 0:
        return
    counts = (labels[:, 1:] != -100).sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(
            f"labels: under DP-SGD every example needs the same number of labelled tokens (got {counts.tolist()}): "
            "the model's token-mean loss would make one example's gradient depend on the others; train on packed "
            "blocks (lightarch.data.corpus.BlockDataset) or equal-length examples without -100 padding."
        )


def per_sequence_aux_loss(config, router_outputs: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of each sequence's own auxiliary router loss (balance + z), as `router_aux_loss`.

    router_outputs: per MoE layer, (logits (B*T, E), selected experts (B*T, slots)) as the router returned them.
    """
    return per_sequence_aux_losses(config, router_outputs, batch_size, attention_mask).mean()


def per_sequence_aux_losses(config, router_outputs: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence's own auxiliary router loss, (B,): the per-example terms ghost clipping needs."""
    losses = []
    for example in range(batch_size):
        logits = tuple(layer_logits.reshape(batch_size, -1, layer_logits.shape[-1])[example]
                       for layer_logits, _ in router_outputs)  # (T, E) per layer
        indices = tuple(selected.reshape(batch_size, -1, selected.shape[-1])[example]
                        for _, selected in router_outputs)  # (T, slots) per layer
        mask = attention_mask[example:example + 1] if isinstance(attention_mask, torch.Tensor) else None
        losses.append(router_aux_loss(config, router_statistics(logits, indices, config.num_experts, mask)))
    return torch.stack(losses)  # (B,)


def forward_with_router_outputs(model: nn.Module, inputs: dict) -> tuple:
    """`model(**inputs)` and, per router call, (logits (B*T, E), selected experts (B*T, slots)) as returned."""
    routers = [module for module in model.modules() if isinstance(module, Router)]
    router_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [router.register_forward_hook(lambda module, args, output: router_outputs.append((output[0], output[2])))
               for router in routers]
    try:
        outputs = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, router_outputs


def private_loss(model: nn.Module, inputs: dict, return_outputs: bool = False):
    """The model's loss on `inputs` with every term a mean over examples (see the module docstring).

    `model` is the lightarch model (or a wrapper whose `modules()` reach its routers). Returns the loss, or
    `(loss, outputs)` with `return_outputs=True`.
    """
    check_equal_label_counts(inputs.get("labels"))
    outputs, router_outputs = forward_with_router_outputs(model, inputs)
    loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
    aux_loss = outputs.get("aux_loss") if isinstance(outputs, dict) else None
    if aux_loss is not None and router_outputs:
        batch_size = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
        config = getattr(model, "config", None) or model._module.config
        per_sequence = per_sequence_aux_loss(config, router_outputs, batch_size, inputs.get("attention_mask"))
        loss = loss - aux_loss + per_sequence.to(loss.dtype)
    return (loss, outputs) if return_outputs else loss


__all__ = [
    "check_equal_label_counts",
    "forward_with_router_outputs",
    "per_sequence_aux_loss",
    "per_sequence_aux_losses",
    "private_loss",
]
