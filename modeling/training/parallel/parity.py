"""Data-parallel parity with one process: the worker that `tests/test_parallel_parity.py` launches under torchrun.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \
        --master_port 29511 -m lightarch.training.parallel.parity OUT_DIR [--steps 10]

Every rank first trains one-process references (the full global batch, `model(**batch).loss`, AdamW fp32, the
router-bias hook), then the same models under DDP and under FSDP2 (`apply_fsdp2`: each decoder layer, then the
root) on its half of each global batch with `data_parallel_moe_loss`, comparing at every step the global loss and
every parameter's full gradient with the reference. Cases: SparseMoe with top-k routing and the aux-loss-free bias
update, SparseMoe with top-p routing, AdaptiveDepth (MoE layers, three exits, estimator); plus a negative control
(DDP backpropagating each rank's own `outputs.loss`) that measures the local-balance-loss error. Rank 1's inputs
repeat one token, so its tokens share one hidden state per layer and route to the same experts: the other experts
receive no token on rank 1 at every step (recorded, to prove the case is exercised). Collectives time out after
60 s (`init_process_group(timeout=...)`), so a hang fails instead of blocking. Each rank writes
`OUT_DIR/parity-rank{r}.json`.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ...configuration import AdaptiveDepthConfig, SparseMoeConfig
from ...modeling_adaptive_depth import AdaptiveDepthForCausalLM
from ...modeling_sparse_moe import SparseMoeForCausalLM
from ..router_bias import register_router_bias_hook
from .moe_loss import data_parallel_moe_loss, record_routers
from .sharding import apply_ddp, apply_fsdp2, full_gradient

GLOBAL_BATCH, SEQUENCE_LENGTH, VOCAB = 4, 12, 97
COLLECTIVE_TIMEOUT_SECONDS = 60


def tiny_config(kind: str) -> SparseMoeConfig:
    """A 3-layer SparseMoe (first layer dense) or a 4-layer AdaptiveDepth with MoE layers from layer 1."""
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                  num_experts_per_tok=2, max_experts_per_token=3, sliding_window=4, first_k_dense_layers=1,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  router_aux_loss_coef=0.1, router_z_loss_coef=0.01, initializer_range=0.2)
    if kind == "sparse_moe_top_k":
        return SparseMoeConfig(**values, router_bias_update_rate=0.01)
    if kind == "sparse_moe_top_p":
        return SparseMoeConfig(**values, router_mode="top_p", router_top_p=0.6)
    if kind == "adaptive_depth":
        values.update(num_hidden_layers=4, exit_layers=[1, 2, 4], estimator_input_layer=1,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
        return AdaptiveDepthConfig(**values)
    raise ValueError(f"unknown model kind {kind!r}: use sparse_moe_top_k, sparse_moe_top_p or adaptive_depth.")


def global_batches(steps: int, world_size: int) -> list[dict[str, torch.Tensor]]:
    """One global batch per step, `GLOBAL_BATCH` rows split evenly over ranks; the last rank's rows repeat a token."""
    generator = torch.Generator().manual_seed(1234)
    batches = []
    rows_per_rank = GLOBAL_BATCH // world_size
    for step in range(steps):
        ids = torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQUENCE_LENGTH), generator=generator)  # (B, T)
        ids[-rows_per_rank:] = 3 + step  # one repeated token: every token of these rows routes alike
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


def build_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    config = tiny_config(kind)
    model_class = AdaptiveDepthForCausalLM if kind == "adaptive_depth" else SparseMoeForCausalLM
    return model_class(config).train()


def router_biases(model: nn.Module) -> list[torch.Tensor]:
    return [m.e_score_correction_bias.detach().clone() for m in model.modules()
            if hasattr(m, "e_score_correction_bias")]


def _local_update_would_differ(model: nn.Module) -> int:
    """Routers whose bias step `sign(mean - load)` from this rank's own loads differs from the global one's."""
    differ = 0
    for router in model.modules():
        if getattr(router, "bias_update_rate", 0) > 0 and hasattr(router, "tokens_per_expert"):
            local = router.tokens_per_expert.clone()
            total = local.clone()
            dist.all_reduce(total)
            differ += int(not torch.equal(torch.sign(local.mean() - local), torch.sign(total.mean() - total)))
    return differ


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _held_fractions(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The share of the parameters (and of AdamW's exp_avg / exp_avg_sq, and of the gradients) this rank stores."""
    parameters = list(model.parameters())
    total = sum(p.numel() for p in parameters)
    state = [optimizer.state[p] for p in parameters if p in optimizer.state]
    return {
        "held_parameters": sum(_local(p).numel() for p in parameters) / total,
        "held_gradients": sum(_local(p.grad).numel() for p in parameters if p.grad is not None) / total,
        "held_optimizer_state": sum(_local(s["exp_avg"]).numel() + _local(s["exp_avg_sq"]).numel()
                                    for s in state) / (2 * total),
    }


def train_reference(kind: str, batches, lr: float) -> dict:
    """One process over the full global batches: the losses, the gradients at every step, the final biases."""
    model = build_model(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    register_router_bias_hook(optimizer, model)
    losses, grads = [], []
    for batch in batches:
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
    return {"losses": losses, "grads": grads, "biases": router_biases(model), "state": model.state_dict()}


def train_parallel(kind: str, engine: str, batches, lr: float, reference: dict, loss_mode: str = "global") -> dict:
    """The same training under `engine` ("ddp" / "fsdp2") on this rank's shard; differences from `reference`."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    inner = build_model(kind)
    config = inner.config
    wrapped = apply_ddp(inner) if engine == "ddp" else apply_fsdp2(inner)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=lr)
    register_router_bias_hook(optimizer, inner)
    loss_diffs, grad_rel, grad_abs, zero_token_layers, local_update_differs, losses = [], [], [], 0, 0, []
    for step, batch in enumerate(batches):
        shard = {key: value.chunk(world_size)[rank] for key, value in batch.items()}  # (B / world, T)
        optimizer.zero_grad()
        if loss_mode == "global":
            loss, global_loss, records = data_parallel_moe_loss(wrapped, config, shard)
        else:  # negative control: each rank's own loss, as a plain Trainer would backpropagate it
            with record_routers(inner) as records:
                loss = wrapped(**shard).loss
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            global_loss = global_loss / world_size
        loss.backward()
        losses.append(global_loss.item())
        loss_diffs.append(abs(global_loss.item() - reference["losses"][step]))
        for name, parameter in inner.named_parameters():
            grad = full_gradient(parameter)  # a collective under FSDP2: every rank, same order
            expected = reference["grads"][step].get(name)
            grad = torch.zeros_like(parameter.data if expected is None else expected) if grad is None else grad
            expected = torch.zeros_like(grad) if expected is None else expected
            grad_abs.append((grad - expected).abs().max().item())
            grad_rel.append(((grad - expected).norm() / expected.norm().clamp(min=1e-12)).item()
                            if expected.norm() > 0 else (grad - expected).norm().item())
        counts = torch.stack([torch.bincount(indices.flatten(), minlength=config.num_experts + 1)[:config.num_experts]
                              for _, indices in records])  # (layers, E) on this rank
        all_counts = [torch.zeros_like(counts) for _ in range(world_size)]
        dist.all_gather(all_counts, counts)
        total = sum(all_counts)
        zero_token_layers += int(((all_counts[-1] == 0) & (total > 0)).any(dim=-1).sum())
        local_update_differs += _local_update_would_differ(inner)
        optimizer.step()  # the router-bias hook all-reduces the loads here
    biases = router_biases(inner)
    held = _held_fractions(inner, optimizer)
    bias_diff = max([(a - b).abs().max().item() for a, b in zip(biases, reference["biases"])], default=0.0)
    return {"loss_max_diff": max(loss_diffs), "grad_max_rel": max(grad_rel), "grad_max_abs": max(grad_abs),
            "bias_max_diff": bias_diff, "biases_moved": any(b.abs().sum() > 0 for b in biases),
            "zero_token_layer_steps": zero_token_layers, "local_update_would_differ": local_update_differs,
            "losses": losses, "reference_losses": reference["losses"], **held}


def run(out_dir: str, steps: int = 10, lr: float = 1e-3) -> dict:
    """Every case on this rank (see the module docstring); writes and returns this rank's results."""
    world_size = int(os.environ["WORLD_SIZE"])
    batches = global_batches(steps, world_size)
    kinds = ["sparse_moe_top_k", "sparse_moe_top_p", "adaptive_depth"]
    references = {kind: train_reference(kind, batches, lr) for kind in kinds}  # before any process group exists
    dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_SECONDS))
    results = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "cases": {}}
    try:
        for kind in kinds:
            for engine in ("ddp", "fsdp2"):
                results["cases"][f"{kind}/{engine}"] = train_parallel(kind, engine, batches, lr, references[kind])
        results["cases"]["sparse_moe_top_k/ddp/local_loss"] = train_parallel(
            "sparse_moe_top_k", "ddp", batches, lr, references["sparse_moe_top_k"], loss_mode="local")
    finally:
        Path(out_dir, f"parity-rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
        dist.destroy_process_group()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.out_dir, args.steps, args.lr)


if __name__ == "__main__":
    main()
