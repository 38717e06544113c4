"""Data-parallel parity with one process: the worker that `tests/test_parallel_parity.py` launches under torchrun.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \
        --master_port 29511 -m lightarch.training.parallel.parity OUT_DIR [--steps 10] \
        [--engines ddp,fsdp2,zero3,tp,ep] [--kinds sparse_moe_top_k,sparse_moe_top_p] [--resume_at 5]

Several machines (here two simulated nodes of two processes on 127.0.0.1; static rendezvous, so node 0 holds global
ranks 0-1), one command per node: `python -m torch.distributed.run --nnodes 2 --nproc_per_node 2 --node_rank N
--master_addr HOST0 --master_port 29511 -m lightarch.training.parallel.parity OUT --cases sparse_moe_top_k/fsdp2`.

Every rank first trains one-process references (the full global batch, `model(**batch).loss`, AdamW fp32, the
router-bias hook), then the same models under DDP, under FSDP2 (`apply_fsdp2`: each decoder layer, then the
root) and under DeepSpeed ZeRO-3 (`deepspeed.initialize` with the shipped `zero3_cpu.json`, MoE blocks as leaf
modules, the torch AdamW) on its half of each global batch with `data_parallel_moe_loss`, comparing at every step
the global loss and every parameter's full gradient with the reference. With `--resume_at k` each FSDP2 / ZeRO-3
case also writes a sharded checkpoint after k steps (`sharded_checkpoints.save_sharded`, plus the sharded model's
logits and, for FSDP2, a consolidated `save_pretrained` folder) and a second run resumes from it; `--cases
KIND/trainer_zero3` trains through `transformers.Trainer` with DeepSpeed ZeRO-3 (`zero3_trainer`). Engines `tp` /
`ep` train the model loaded with `from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto",
tp_size=N[, ep_size=N]))` from the reference's initial weights (the model's tensor-parallel plan, plus its expert-
parallel plan), every rank on the whole global batch, with the same comparison. Cases: SparseMoe with top-k routing
and the aux-loss-free bias update, SparseMoe with top-p routing, `sparse_moe_shared_qk_norm` (top-k plus a shared
expert and QK norms: every entry of the SparseMoe TP plan), AdaptiveDepth (MoE layers, three exits, estimator); plus
a negative control (DDP backpropagating each rank's own `outputs.loss`) that measures the local-balance-loss error.
The last rank's inputs repeat one token, so its tokens share one hidden state per layer and route to the same
experts: the other experts receive no token on that rank at every step (recorded, to prove the case is exercised).
Collectives time out after 60 s (`init_process_group(timeout=...)`), so a hang fails instead of blocking. Each rank
writes `OUT_DIR/parity-rank{r}.json` (with its torchrun node rank and local rank).
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
from .sharded_checkpoints import load_sharded, save_consolidated, save_sharded
from .sharding import apply_ddp, apply_fsdp2, full_gradient
from .zero3 import deepspeed_config

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
    if kind == "sparse_moe_shared_qk_norm":  # top-k plus a shared expert and QK norms: every entry of the TP plan
        return SparseMoeConfig(**values, router_bias_update_rate=0.01, num_shared_experts=1, use_qk_norm=True)
    if kind == "adaptive_depth":
        values.update(num_hidden_layers=4, exit_layers=[1, 2, 4], estimator_input_layer=1,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
        return AdaptiveDepthConfig(**values)
    raise ValueError(f"unknown model kind {kind!r}: use sparse_moe_top_k, sparse_moe_top_p, "
                     "sparse_moe_shared_qk_norm or adaptive_depth.")


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


def router_biases(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every balanced router's bias by buffer name (a pipeline stage holds only its own routers' biases)."""
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers()
            if name.endswith("e_score_correction_bias")}


def bias_comparison(model: nn.Module, reference: dict) -> dict:
    """`bias_max_diff` (the router biases against `reference["biases"]`, by name) and `biases_moved` (the update
    ran)."""
    biases = router_biases(model)
    return {"bias_max_diff": max([(bias - reference["biases"][name]).abs().max().item()
                                  for name, bias in biases.items()], default=0.0),
            "biases_moved": any(bias.abs().sum() > 0 for bias in biases.values())}


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """|got - expected| / |expected| (Frobenius norms); the absolute norm where `expected` is zero."""
    difference = (got - expected).norm()
    return (difference / expected.norm().clamp(min=1e-12)).item() if expected.norm() > 0 else difference.item()


def trainer_rows(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The global batches as a Trainer's dataset, one row per sequence: with sequential sampling and
    `GLOBAL_BATCH // N` rows per rank, rank r's micro-batch of step k is the r-th chunk of global batch k."""
    return [{"input_ids": ids, "labels": ids.clone()} for batch in batches for ids in batch["input_ids"]]


def trainer_settings(output_dir: str, steps: int, lr: float, world_size: int) -> dict:
    """`TrainingArguments` fields whose N-process Trainer run is `train_reference`'s one-process AdamW loop (constant
    lr, no weight decay, no clipping, sequential sampling, one micro-batch per rank and step, a loss logged at every
    step); the engine's fields (DeepSpeed, backend, saving) are added by the caller."""
    if GLOBAL_BATCH % world_size:
        raise ValueError(f"WORLD_SIZE={world_size} does not divide the global batch of {GLOBAL_BATCH} rows: "
                         "launch 1, 2 or 4 processes.")
    return {"output_dir": output_dir, "per_device_train_batch_size": GLOBAL_BATCH // world_size, "max_steps": steps,
            "learning_rate": lr, "lr_scheduler_type": "constant", "weight_decay": 0.0, "optim": "adamw_torch",
            "max_grad_norm": 0.0, "logging_steps": 1, "report_to": [], "train_sampling_strategy": "sequential",
            "dataloader_drop_last": True, "disable_tqdm": True, "ddp_timeout": COLLECTIVE_TIMEOUT_SECONDS}


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


def _zero3_held_fractions(model: nn.Module) -> dict[str, float]:
    """`_held_fractions` for a ZeRO-3 model: its fp32 partitions; call between `backward` and `step`."""
    from deepspeed.utils import safe_get_local_grad, safe_get_local_optimizer_state

    parameters = list(model.parameters())
    total = sum(p.ds_numel for p in parameters)
    state = [(safe_get_local_optimizer_state(p, "exp_avg"), safe_get_local_optimizer_state(p, "exp_avg_sq"))
             for p in parameters]
    grads = [safe_get_local_grad(p) for p in parameters]
    return {
        "held_parameters": sum(p.ds_tensor.numel() for p in parameters) / total,
        "held_gradients": sum(g.numel() for g in grads if g is not None) / total,
        "held_optimizer_state": sum(a.numel() + b.numel() for a, b in state if a is not None) / (2 * total),
    }


def train_reference(kind: str, batches, lr: float, weight_decay: float = 0.01, micro_batches: int = 1) -> dict:
    """One process over the full global batches: the losses, the gradients at every step, the final biases.
    `micro_batches > 1`: gradient accumulation over that many row chunks of each batch (loss = their mean), the
    one-process equivalent of a pipeline schedule's micro-batches, in its order of operations: one backward per
    micro-batch, then the summed gradients divided by their number (Adam turns a rounding difference in a gradient
    that should be zero into a full step, so the order matters)."""
    model = build_model(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    register_router_bias_hook(optimizer, model)
    losses, grads = [], []
    for batch in batches:
        optimizer.zero_grad()
        if micro_batches == 1:
            loss = model(**batch).loss
            loss.backward()
        else:
            loss = 0.0
            for rows in zip(*(value.chunk(micro_batches) for value in batch.values())):
                micro_loss = model(**dict(zip(batch, rows))).loss
                micro_loss.backward()
                loss = loss + micro_loss.detach() / micro_batches
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter.grad.div_(micro_batches)
        losses.append(loss.item())
        grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
    return {"losses": losses, "grads": grads, "biases": router_biases(model), "state": model.state_dict()}


PLAN_ENGINES = ("tp", "ep")  # the model's own plans, through from_pretrained: every rank trains on the full batch
PIPELINE_ENGINES = {"pp_gpipe": "gpipe", "pp_1f1b": "1f1b"}  # one stage per rank, `PIPELINE_MICRO_BATCHES` each step
PIPELINE_MICRO_BATCHES = 2


def load_with_plan(folder: str | os.PathLike, engine: str) -> nn.Module:
    """`from_pretrained(folder)` under the model's tensor-parallel plan ("tp") or with its expert-parallel plan on top
    ("ep"), over all ranks of the initialized process group (transformers' `DistributedConfig(tp_plan="auto")`)."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    if engine not in PLAN_ENGINES:
        raise ValueError(f"unknown plan engine {engine!r}: use tp or ep.")
    world_size = dist.get_world_size()
    expert_parallel = {"ep_size": world_size} if engine == "ep" else {}
    config = DistributedConfig(tp_plan="auto", tp_size=world_size, **expert_parallel)
    return AutoModelForCausalLM.from_pretrained(folder, distributed_config=config).train()


def _wrap(inner: nn.Module, engine: str, lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`(model to call, optimizer)` under `engine`; the router-bias hook sits on the (base) torch optimizer."""
    if engine == "zero3":  # deepspeed.initialize with the shipped config (its leaf_module flags the MoE blocks)
        import deepspeed

        optimizer = torch.optim.AdamW(inner.parameters(), lr=lr)
        register_router_bias_hook(optimizer, inner)  # ZeRO-3's step calls this optimizer's step on the partitions
        config = deepspeed_config("zero3_cpu", micro_batch_size=GLOBAL_BATCH // dist.get_world_size())
        wrapped, _, _, _ = deepspeed.initialize(model=inner, optimizer=optimizer, config=config)
        return wrapped, optimizer
    if engine not in ("ddp", "fsdp2", *PLAN_ENGINES):
        raise ValueError(f"unknown engine {engine!r}: use ddp, fsdp2, zero3, tp or ep.")
    wrapped = inner if engine in PLAN_ENGINES else apply_ddp(inner) if engine == "ddp" else apply_fsdp2(inner)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=lr)
    register_router_bias_hook(optimizer, inner)
    return wrapped, optimizer


def train_parallel(kind: str, engine: str, batches, lr: float, reference: dict, loss_mode: str = "global",
                   save_at: int | None = None, checkpoint_dir: str | None = None,
                   resume_at: int | None = None, plan_folder: str | None = None) -> dict:
    """The same training under `engine` ("ddp" / "fsdp2" / "zero3" on this rank's shard, "tp" / "ep" on the full
    batch: `load_with_plan(plan_folder, engine)`, the reference's initial weights); differences from `reference`.
    `save_at=k`: after step k-1, write a sharded checkpoint to `checkpoint_dir` (and, for FSDP2, a
    consolidated `save_pretrained` folder beside it); `resume_at=k`: load that checkpoint and train steps k.. only."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    plan = engine in PLAN_ENGINES
    inner = load_with_plan(plan_folder, engine) if plan else build_model(kind)
    config = inner.config
    wrapped, optimizer = _wrap(inner, engine, lr)
    zero3 = engine == "zero3"
    leaf_modules = sum(int(getattr(m, "_z3_leaf", False)) for m in inner.modules())
    if resume_at is not None:
        load_sharded(wrapped, optimizer, checkpoint_dir)
    loss_diffs, grad_rel, grad_abs, zero_token_layers, local_update_differs, losses = [], [], [], 0, 0, []
    held = {}
    for step, batch in enumerate(batches):
        if resume_at is not None and step < resume_at:
            continue
        if step == save_at:
            save_sharded(wrapped, optimizer, checkpoint_dir)
            _save_outputs(wrapped, inner, engine, batch, checkpoint_dir)
        shard = {key: value.chunk(world_size)[rank] for key, value in batch.items()}  # (B / world, T)
        if not zero3:  # DeepSpeed's engine zeroes its gradients in step()
            optimizer.zero_grad()
        if plan:  # tensor / expert parallel: one model over all ranks, every rank feeds the whole batch (B, T)
            with record_routers(inner) as records:
                loss = wrapped(**batch).loss
            global_loss = loss.detach().clone()
        elif loss_mode == "global":
            loss, global_loss, records = data_parallel_moe_loss(wrapped, config, shard)
        else:  # negative control: each rank's own loss, as a plain Trainer would backpropagate it
            with record_routers(inner) as records:
                loss = wrapped(**shard).loss
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            global_loss = global_loss / world_size
        if zero3:
            wrapped.backward(loss)  # reduce-scatters the gradients into each rank's partition
        else:
            loss.backward()
        losses.append(global_loss.item())
        loss_diffs.append(abs(global_loss.item() - reference["losses"][step]))
        for name, parameter in inner.named_parameters():
            grad = full_gradient(parameter)  # a collective under FSDP2: every rank, same order
            expected = reference["grads"][step].get(name)
            grad = torch.zeros_like(parameter.data if expected is None else expected) if grad is None else grad
            expected = torch.zeros_like(grad) if expected is None else expected
            grad_abs.append((grad - expected).abs().max().item())
            grad_rel.append(relative_difference(grad, expected))
        counts = torch.stack([torch.bincount(indices.flatten(), minlength=config.num_experts + 1)[:config.num_experts]
                              for _, indices in records])  # (layers, E) on this rank
        all_counts = [torch.zeros_like(counts) for _ in range(world_size)]
        dist.all_gather(all_counts, counts)
        total = sum(all_counts)
        zero_token_layers += int(((all_counts[-1] == 0) & (total > 0)).any(dim=-1).sum())
        local_update_differs += _local_update_would_differ(inner)
        if step == len(batches) - 1:  # gradients and AdamW state both exist here, under every engine
            held = _zero3_held_fractions(inner) if zero3 else _held_fractions(inner, optimizer)
        if zero3:
            wrapped.step()  # steps `optimizer` on the fp32 partitions
        else:
            optimizer.step()  # the router-bias hook all-reduces the loads here (under every engine)
    if zero3:
        wrapped.destroy()  # removes its hooks from `inner`
    return {"loss_max_diff": max(loss_diffs), "grad_max_rel": max(grad_rel), "grad_max_abs": max(grad_abs),
            **bias_comparison(inner, reference), "zero_token_layer_steps": zero_token_layers, "local_update_would_differ": local_update_differs,
            "leaf_modules": leaf_modules, "losses": losses, "reference_losses": reference["losses"],
            "unchecked_parameters": sorted(set(reference["grads"][0]) - {name for name, _ in inner.named_parameters()}),
            "experts_local_shape": next((list(_local(p).shape) for name, p in inner.named_parameters()
                                         if name.endswith("experts.gate_up_proj")), None), **held}


def train_pipeline(kind: str, engine: str, batches, lr: float, reference: dict) -> dict:
    """The same training as `reference` (accumulating `PIPELINE_MICRO_BATCHES` micro-batches) with one pipeline
    stage per rank (`lightarch.training.parallel.pipeline`) and the `engine`'s schedule; every rank compares the
    gradients of the parameters its stage holds, by name, and the final router biases of its routers."""
    from .pipeline import build_pipeline, pipeline_data_parallel_group, pipeline_stage

    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = build_model(kind)
    total_parameters = sum(p.numel() for p in model.parameters())  # before the stage drops the others
    stage = pipeline_stage(model, rank, world_size)
    micro_batch_shape = (GLOBAL_BATCH // PIPELINE_MICRO_BATCHES, SEQUENCE_LENGTH)
    schedule = build_pipeline(stage, rank, world_size, PIPELINE_MICRO_BATCHES, micro_batch_shape,
                              PIPELINE_ENGINES[engine])
    optimizer = torch.optim.AdamW(stage.parameters(), lr=lr)
    register_router_bias_hook(optimizer, stage, group=pipeline_data_parallel_group(world_size))
    num_experts = stage.model.config.num_experts
    parameters = dict(stage.model.named_parameters())
    loss_diffs, grad_rel, losses, zero_token_records, worst_parameters = [], [], [], 0, []
    for step, batch in enumerate(batches):
        optimizer.zero_grad()
        micro_losses: list[torch.Tensor] = []
        with record_routers(stage) as records:
            if stage.is_first and stage.is_last:
                schedule.step(batch["input_ids"], target=batch["labels"], losses=micro_losses)
            elif stage.is_first:
                schedule.step(batch["input_ids"])
            elif stage.is_last:
                schedule.step(target=batch["labels"], losses=micro_losses)
            else:
                schedule.step()
        loss = torch.stack(micro_losses).mean().detach() if micro_losses else torch.zeros(())
        dist.broadcast(loss, src=world_size - 1)  # the last stage computed it
        losses.append(loss.item())
        loss_diffs.append(abs(loss.item() - reference["losses"][step]))
        step_rel = {}
        for name, parameter in parameters.items():
            expected = reference["grads"][step].get(name, torch.zeros_like(parameter))
            grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            step_rel[name] = relative_difference(grad, expected)
        grad_rel.append(max(step_rel.values()))
        worst_parameters.append(max(step_rel, key=step_rel.get))
        zero_token_records += sum(int((torch.bincount(indices.flatten(), minlength=num_experts + 1)[:num_experts] == 0)
                                      .any()) for _, indices in records)  # (layer, micro-batch) with an idle expert
        optimizer.step()  # the router-bias hook updates this stage's routers from its own loads
    return {"loss_max_diff": max(loss_diffs), "grad_max_rel": max(grad_rel), "losses": losses,
            "reference_losses": reference["losses"], "checked_parameters": sorted(parameters),
            "grad_rel_per_step": grad_rel, "worst_parameter_per_step": worst_parameters,
            "layers": [stage.start, stage.end], "zero_token_records": zero_token_records,
            **bias_comparison(stage.model, reference),
            "held_parameters": sum(p.numel() for p in parameters.values()) / total_parameters}


def _save_outputs(wrapped: nn.Module, inner: nn.Module, engine: str, batch, checkpoint_dir: str) -> None:
    """At the checkpoint: the sharded model's logits on `batch` (every rank runs the forward), and for FSDP2 the
    consolidated folder, so that a single process can check that `from_pretrained` gives the same outputs."""
    with torch.no_grad():
        inner.eval()
        logits = wrapped(input_ids=batch["input_ids"]).logits  # (B, T, V): the full model on every rank
        inner.train()
    if engine == "fsdp2":
        save_consolidated(inner, Path(checkpoint_dir).with_name(Path(checkpoint_dir).name + "-consolidated"))
    if dist.get_rank() == 0:
        torch.save({"input_ids": batch["input_ids"], "logits": logits, "kind": engine},
                   Path(checkpoint_dir).with_name(Path(checkpoint_dir).name + "-outputs.pt"))
    dist.barrier()


def run(out_dir: str, steps: int = 10, lr: float = 1e-3, engines: tuple[str, ...] = ("ddp", "fsdp2"),
        kinds: tuple[str, ...] = ("sparse_moe_top_k", "sparse_moe_top_p", "adaptive_depth"),
        resume_at: int | None = None, cases: tuple[str, ...] | None = None) -> dict:
    """Every case on this rank (see the module docstring); writes and returns this rank's results.

    `cases` ("kind/engine", engine one of ddp, fsdp2, zero3, trainer_zero3, trainer_zero3_local) replaces the
    `kinds` x `engines` product. `trainer_zero3` trains through `DataParallelMoeTrainer` with DeepSpeed ZeRO-3
    (`zero3_trainer`); `trainer_zero3_local` through a plain `Trainer` (each rank's own loss: negative control).
    `resume_at=k` adds, per FSDP2 / ZeRO-3 case, a run that writes sharded checkpoints after step k-1 (under
    `OUT_DIR/checkpoints/`) and a run that resumes from them (`<case>/resumed`, steps k..)."""
    world_size = int(os.environ["WORLD_SIZE"])
    batches = global_batches(steps, world_size)
    if cases is None:
        cases = tuple(f"{kind}/{engine}" for kind in kinds for engine in engines)
    pairs = [tuple(case.split("/")) for case in cases]
    # before any process group exists (the bias update all-reduces once one does); the Trainer's AdamW decays no
    # norm weight, so its reference has no weight decay
    trainer_engines = ("trainer_zero3", "trainer_zero3_local")
    references = {kind: train_reference(kind, batches, lr) for kind, engine in pairs
                  if engine not in trainer_engines and engine not in PIPELINE_ENGINES}
    pipeline_references = {kind: train_reference(kind, batches, lr, micro_batches=PIPELINE_MICRO_BATCHES)
                           for kind, engine in pairs if engine in PIPELINE_ENGINES}
    trainer_references = {kind: train_reference(kind, batches, lr, weight_decay=0.0)
                          for kind, engine in pairs if engine in trainer_engines}
    dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_SECONDS))
    results = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "cases": {},
               "node_rank": int(os.environ.get("GROUP_RANK", "0")),  # torchrun's node (group) rank
               "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}
    plan_folders = {kind: str(Path(out_dir, "initial", kind)) for kind, engine in pairs if engine in PLAN_ENGINES}
    if dist.get_rank() == 0:  # the reference's initial weights, for from_pretrained under the models' plans
        for kind, folder in plan_folders.items():
            build_model(kind).save_pretrained(folder)
    dist.barrier()
    try:
        for kind, engine in pairs:
            if engine in trainer_engines:
                from .zero3_trainer import train_with_trainer

                local = engine == "trainer_zero3_local"  # negative control: a plain Trainer, no resume
                results["cases"][f"{kind}/{engine}"] = train_with_trainer(
                    str(Path(out_dir, f"{engine}-{kind}")), kind, batches, lr, trainer_references[kind],
                    None if local else resume_at, local_loss=local)
                continue
            if engine in PIPELINE_ENGINES:
                results["cases"][f"{kind}/{engine}"] = train_pipeline(kind, engine, batches, lr,
                                                                      pipeline_references[kind])
                continue
            sharded = engine in ("fsdp2", "zero3") and resume_at is not None
            checkpoint_dir = str(Path(out_dir, "checkpoints", f"{kind}-{engine}")) if sharded else None
            results["cases"][f"{kind}/{engine}"] = train_parallel(
                kind, engine, batches, lr, references[kind],
                save_at=resume_at if sharded else None, checkpoint_dir=checkpoint_dir,
                plan_folder=plan_folders.get(kind))
            if sharded:
                results["cases"][f"{kind}/{engine}/resumed"] = train_parallel(
                    kind, engine, batches, lr, references[kind], checkpoint_dir=checkpoint_dir, resume_at=resume_at)
        if ("sparse_moe_top_k", "ddp") in pairs:
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
    parser.add_argument("--engines", default="ddp,fsdp2",
                        help="comma-separated: ddp, fsdp2, zero3, tp, ep, pp_gpipe, pp_1f1b")
    parser.add_argument("--kinds", default="sparse_moe_top_k,sparse_moe_top_p,adaptive_depth")
    parser.add_argument("--resume_at", type=int, default=None,
                        help="also checkpoint FSDP2 / ZeRO-3 runs after this many steps and resume from there")
    parser.add_argument("--cases", default=None,
                        help="comma-separated kind/engine pairs instead of kinds x engines; engines: ddp, fsdp2, "
                             "zero3, tp, ep, trainer_zero3 (Trainer with DeepSpeed ZeRO-3), trainer_zero3_local")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.out_dir, args.steps, args.lr, tuple(args.engines.split(",")), tuple(args.kinds.split(",")),
        args.resume_at, tuple(args.cases.split(",")) if args.cases else None)


if __name__ == "__main__":
    main()
