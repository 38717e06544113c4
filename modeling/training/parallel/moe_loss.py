"""The router's auxiliary loss over the global batch, for data-parallel MoE training (DDP, FSDP2, ZeRO).

A lightarch MoE model adds `router_aux_loss_coef * balance + router_z_loss_coef * z` to its loss, computed from the
tokens of one forward. The Switch balance loss `E * sum_e load_e * mean_prob_e` is a product of two batch means, so
under data parallelism the mean over ranks of each rank's balance loss is NOT the balance loss of the global batch:
the engines average the gradients of per-rank losses, and per-rank balance terms give a different gradient
(measured with FSDP2 on 2 gloo ranks, the tiny SparseMoe of the tests, router_aux_loss_coef=0.01: 4-step losses
off by 1.3e-5 / 4.1e-5 / 1.5e-3 at lr 5e-5 / 1e-3 / 1e-2, router gradients by 24-108% relative; the 3e-4 of
`DistributedConfig(fsdp_size=2)` in NOTES.md is of this kind; see also `local_balance_loss_gap`).

`data_parallel_moe_loss` fixes it without touching the model: it replaces the model's local `aux_loss` by a per-rank
surrogate whose mean over ranks has the value and the gradient of the global one. The loads (`load_e`, no gradient:
they come from a top-k / top-p selection) and the token count are all-reduced; the probability sums stay local and
are divided by the global token count and multiplied by the world size, so that averaging over ranks (what DDP /
FSDP do to gradients) gives `E * sum_e load_e * sum_ranks(prob_sum_e) / N`, exactly the one-process value.
The remaining loss terms (LM loss, exit losses, estimator loss) are per-rank means; they average to the global mean
when every rank holds the same number of label tokens and inputs, which is checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ...layers import Router


@contextmanager
def record_routers(model: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record `(router_logits, selected_experts)` of every `Router` call in `model` (any wrapper), in call order.

    Forward hooks on the routers themselves: works for every lightarch MoE head, also those whose output does not
    carry the router indices, and through FSDP2 / DDP wrappers.
    """
    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args, output) -> None:
        router_logits, _weights, selected_experts = output  # (T, E), (T, k), (T, k)
        records.append((router_logits, selected_experts))

    handles = [module.register_forward_hook(hook) for module in model.modules() if isinstance(module, Router)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _world() -> tuple[int, bool]:
    initialized = dist.is_available() and dist.is_initialized()
    return (dist.get_world_size() if initialized else 1), initialized


def global_router_aux_loss(
    records: list[tuple[torch.Tensor, torch.Tensor]],
    num_experts: int,
    aux_loss_coef: float,
    z_loss_coef: float,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(surrogate, value)`: this rank's share of the global-batch router loss, and the global loss itself.

    `surrogate` is what this rank adds to its loss (its mean over ranks has the global loss's gradient); `value`
    (detached, equal on every rank) is `aux_loss_coef * balance + z_loss_coef * z` of the whole global batch, the
    number one process would report. One MoE layer per record; `token_mask` `(T,)` weights padding out (1 = real).
    Every rank must call this (it all-reduces), also one whose batch routes no token to some expert.
    """
    world_size, initialized = _world()
    device = records[0][0].device
    num_rows = records[0][0].shape[0]
    mask = torch.ones(num_rows, device=device) if token_mask is None else token_mask.reshape(-1).float().to(device)
    with torch.no_grad():
        loads = torch.stack([  # (layers, E): selections per expert, padding masked
            (nn.functional.one_hot(indices, num_experts + 1)[..., :num_experts].sum(dim=1).float() * mask[:, None])
            .sum(dim=0)
            for _, indices in records
        ])
        num_tokens = mask.sum().reshape(1)
        if initialized:
            packed = torch.cat([loads.reshape(-1), num_tokens])
            dist.all_reduce(packed)
            loads, num_tokens = packed[:-1].reshape(loads.shape), packed[-1:]
        global_tokens = num_tokens.clamp(min=1.0)
        load_fractions = loads / loads.sum(dim=-1, keepdim=True).clamp(min=1.0)  # (layers, E)
    balance_terms, z_terms = [], []
    for (logits, _), load in zip(records, load_fractions):
        probs = torch.softmax(logits.float(), dim=-1) * mask[:, None]  # (T, E)
        balance_terms.append(num_experts * torch.sum(load * probs.sum(dim=0)) / global_tokens[0])
        z = torch.logsumexp(logits.float(), dim=-1) ** 2 * mask  # (T,)
        z_terms.append(z.sum() / global_tokens[0])
    surrogate = world_size * (aux_loss_coef * torch.stack(balance_terms).mean()
                              + z_loss_coef * torch.stack(z_terms).mean())
    value = surrogate.detach().clone()
    if initialized:
        dist.all_reduce(value)
    return surrogate, value / world_size


def data_parallel_moe_loss(
    model: nn.Module, config, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """`(loss_to_backward, global_loss, router_records)` for one data-parallel step of a lightarch model.

    Runs `model(**batch)` (with `labels`), removes the model's local router `aux_loss` from its loss and adds the
    global-batch surrogate of `global_router_aux_loss`. `global_loss` (detached, the same on every rank) equals the
    loss of one process over the concatenated global batch. Every rank must hold the same number of label tokens
    and inputs (the per-rank means of the other loss terms then average to the global mean); checked.
    """
    if "labels" not in batch:
        raise ValueError("`batch` needs `labels`: the data-parallel loss is the model's training loss.")
    world_size, initialized = _world()
    if initialized:
        labels = batch["labels"]
        counts = torch.tensor([float(labels.shape[0]), float((labels[..., 1:] != -100).sum())])
        gathered = [torch.zeros_like(counts) for _ in range(world_size)]
        dist.all_gather(gathered, counts)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise ValueError(f"every rank needs the same number of inputs and label tokens, got "
                             f"{[g.tolist() for g in gathered]}: split the global batch evenly (pad with -100 labels "
                             "only where every rank has the same count).")
    with record_routers(model) as records:
        outputs = model(**batch)
    loss = outputs.loss
    global_loss_parts = loss.detach().clone()
    if records:
        mask = batch.get("attention_mask")
        rows_per_input = records[0][0].shape[0] // mask.shape[0] if mask is not None else 0
        token_mask = mask[:, -rows_per_input:].reshape(-1) if mask is not None else None  # (B * T,)
        surrogate, value = global_router_aux_loss(records, config.num_experts, config.router_aux_loss_coef,
                                                  config.router_z_loss_coef, token_mask)
        loss = loss - outputs.aux_loss + surrogate
        global_loss_parts = global_loss_parts - outputs.aux_loss.detach()
    else:
        value = torch.zeros((), dtype=loss.dtype)
    if initialized:
        dist.all_reduce(global_loss_parts)
        global_loss_parts = global_loss_parts / world_size
    return loss, (global_loss_parts + value).detach(), records


def local_balance_loss_gap(model: nn.Module, batch: dict[str, torch.Tensor], world_size: int) -> float:
    """How far the mean of per-shard model losses is from the full-batch loss, in one process (no torch.distributed).

    Splits `batch` into `world_size` equal shards along the batch dimension: the difference is what a data-parallel
    run that backpropagates each rank's own `outputs.loss` (e.g. a Trainer with `DistributedConfig(fsdp_size=2)`)
    optimizes instead of the one-process loss. Zero for a dense model; nonzero with a router balance loss.
    """
    with torch.no_grad():
        full = model(**batch).loss.item()
        shards = [model(**{k: v.chunk(world_size)[i] for k, v in batch.items()}).loss.item()
                  for i in range(world_size)]
    return sum(shards) / world_size - full


__all__ = ["data_parallel_moe_loss", "global_router_aux_loss", "local_balance_loss_gap", "record_routers"]
