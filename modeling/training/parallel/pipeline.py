"""Pipeline parallelism for SparseMoe decoders with `torch.distributed.pipelining` (GPipe or 1F1B schedules).

The model's pipeline plan says where it can be cut: `config.base_model_pp_plan` names the base model's embedding,
layer list and final norm in order, and the causal LM's `_pp_plan` its head. `pipeline_stage(model, s, S)` keeps
on stage `s` of `S` the embedding (first stage), a contiguous run of decoder layers (split as transformers'
`PipelineStage.layer_range_for_rank` does: the remainder to the first stages) and the final norm and LM head (last
stage); every other module becomes an `nn.Identity`, so parameter names stay those of the full model (a stage's
`state_dict` is a slice of the one-process checkpoint, and gradients compare by name).

The router's auxiliary loss crosses stages exactly. A lightarch MoE model balances each layer on its own and
averages over the MoE layers (`router_statistics`), so every stage computes its own layers' share,
`(aux_coef * sum balance_l + z_coef * sum z_l) / num_moe_layers`, and adds it to a one-element tensor that travels
down the pipeline beside the hidden states; the last stage's loss is the LM loss plus that tensor. Backward then
sends d(loss)/d(aux) = 1 back through every stage, which applies it to its own routers: the gradient of one
process, with no extra collective. The schedules compute the loss per micro-batch and average the gradients over
micro-batches (`scale_grads=True`), which is one process's gradient accumulation over the same micro-batches (the
balance loss of a micro-batch is the balance loss of its tokens, as under Trainer's gradient accumulation).

The aux-loss-free router bias: each router lives on one stage and sees every micro-batch, so its update needs the
loads of the same stage on the other data-parallel replicas only: `register_router_bias_hook(optimizer, stage,
group=pipeline_data_parallel_group(...))` (the default, every rank, would add up different layers' loads).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ...modeling_sparse_moe import SparseMoeForCausalLM, router_aux_loss, router_statistics
from .moe_loss import record_routers

SCHEDULES = ("gpipe", "1f1b")


def stage_layer_range(stage_index: int, num_stages: int, num_layers: int) -> tuple[int, int]:
    """[start, end) of the decoder layers on `stage_index`: as transformers' `layer_range_for_rank`, the first
    `num_layers % num_stages` stages take one layer more."""
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"stage_index must be in [0, {num_stages}), got {stage_index}")
    if num_stages > num_layers:
        raise ValueError(f"num_stages={num_stages} is more than the model's {num_layers} decoder layers: use at most "
                         f"{num_layers} stages.")
    per_stage, remainder = divmod(num_layers, num_stages)
    start = stage_index * per_stage + min(stage_index, remainder)
    return start, start + per_stage + (stage_index < remainder)


def _plan_modules(model: SparseMoeForCausalLM) -> tuple[str, str, str, str]:
    """(embedding, layer list, final norm, LM head) attribute names from the model's pipeline plans."""
    base_plan = list(getattr(model.config, "base_model_pp_plan", None) or {})
    # the instance's `_pp_plan` also holds the base model's entries, prefixed ("model.layers"): the head is the rest
    head_plan = [name for name in (getattr(model, "_pp_plan", None) or {}) if "." not in name]
    if len(base_plan) != 3 or len(head_plan) != 1:
        raise ValueError(f"{type(model).__name__} has no pipeline plan of the form embedding / layers / norm + head "
                         f"(base_model_pp_plan={base_plan}, _pp_plan={head_plan}).")
    embed, layers, norm = base_plan
    return embed, layers, norm, head_plan[0]


class SparseMoePipelineStage(nn.Module):
    """One pipeline stage of a `SparseMoeForCausalLM` (the model itself, cut in place: see the module docstring).

    forward: first stage `input_ids (B, T)`, other stages `(hidden (B, T, H), aux (1,))`; returns `(hidden, aux)`,
    or `(logits (B, T, V), aux)` on the last stage, where `aux` is the router auxiliary loss of the layers so far.
    """

    def __init__(self, model: SparseMoeForCausalLM, stage_index: int, num_stages: int) -> None:
        super().__init__()
        if type(model).__name__ != "SparseMoeForCausalLM":  # by name: a remote-code copy of the class is fine too
            raise TypeError(f"pipeline_stage supports SparseMoeForCausalLM, got {type(model).__name__}: an "
                            "AdaptiveDepth model's exits and estimator add losses inside the stack that this stage "
                            "does not carry yet; train it with FSDP2, ZeRO-3, TP or EP.")
        embed_name, layers_name, norm_name, head_name = _plan_modules(model)
        base = model.model
        num_layers = len(getattr(base, layers_name))
        self.start, self.end = stage_layer_range(stage_index, num_stages, num_layers)
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        layers = getattr(base, layers_name)
        for index in range(num_layers):
            if not self.start <= index < self.end:
                layers[index] = nn.Identity()  # frees the layer; names of the kept ones are unchanged
        if not self.is_first:
            setattr(base, embed_name, nn.Identity())
        if not self.is_last:
            setattr(base, norm_name, nn.Identity())
            setattr(model, head_name, nn.Identity())
        self.model = model  # `stage.model.<name>` is the one-process parameter `<name>`
        self.layers_name, self.embed_name, self.norm_name, self.head_name = layers_name, embed_name, norm_name, head_name
        self.num_moe_layers = model.config.num_hidden_layers - model.config.first_k_dense_layers

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.model.model
        if self.is_first:
            (input_ids,) = inputs
            hidden_states = getattr(base, self.embed_name)(input_ids)  # (B, T, H)
            aux = hidden_states.new_zeros(1)
        else:
            hidden_states, aux = inputs  # (B, T, H), (1,)
        sequence_length = hidden_states.shape[1]
        position_ids = torch.arange(sequence_length, device=hidden_states.device).unsqueeze(0)  # (1, T)
        masks = base._attention_masks(hidden_states, None, position_ids, None, False, None)
        position_embeddings = base.rotary_emb(hidden_states, position_ids)
        layer_types = base.config.layer_types
        layers = getattr(base, self.layers_name)
        with record_routers(self) as records:
            for index in range(self.start, self.end):
                hidden_states = layers[index](hidden_states, attention_mask=masks[layer_types[index]],
                                              position_embeddings=position_embeddings, position_ids=position_ids,
                                              cache=None, use_cache=False)
        if records:  # this stage's MoE layers: their share of the mean over all MoE layers
            stats = router_statistics(tuple(r[0] for r in records), tuple(r[1] for r in records),
                                      self.model.config.num_experts)
            aux = aux + router_aux_loss(self.model.config, stats) * (len(records) / self.num_moe_layers)
        if not self.is_last:
            return hidden_states, aux
        hidden_states = getattr(base, self.norm_name)(hidden_states)
        return getattr(self.model, self.head_name)(hidden_states), aux  # (B, T, V), (1,)


def pipeline_stage(model: SparseMoeForCausalLM, stage_index: int, num_stages: int) -> SparseMoePipelineStage:
    """Cut `model` in place to stage `stage_index` of `num_stages` (every rank builds the full model with the same
    weights, e.g. `from_pretrained`, then keeps its stage). See the module docstring."""
    return SparseMoePipelineStage(model, stage_index, num_stages)


def pipeline_loss_fn(model: SparseMoeForCausalLM):
    """The last stage's loss of one micro-batch: the model's causal-LM loss on the logits plus the carried router
    auxiliary loss, as `model(input_ids, labels=labels).loss` computes it in one process."""
    vocab_size = model.config.vocab_size

    def loss_fn(output: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logits, aux = output
        return model.loss_function(logits=logits, labels=labels, vocab_size=vocab_size) + aux.sum()

    return loss_fn


def build_pipeline(stage_module: SparseMoePipelineStage, stage_index: int, num_stages: int, n_microbatches: int,
                   micro_batch_shape: tuple[int, int], schedule: str = "gpipe",
                   group: dist.ProcessGroup | None = None):
    """A `torch.distributed.pipelining` schedule (`"gpipe"` or `"1f1b"`) over `stage_module` on its device, for
    micro-batches of `micro_batch_shape` (rows, tokens). Call `schedule.step(input_ids)` on the first stage,
    `schedule.step(target=labels, losses=losses)` on the last, `schedule.step()` on the others, then each stage's
    optimizer step.

    The stage's input and output shapes are given to `PipelineStage` up front: without them it infers them by running
    the stage once on empty tensors, in training mode, and the routers would count those tokens into their loads
    (the aux-loss-free bias update then moves on tokens that do not exist)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    parameter = next(stage_module.parameters())
    device, dtype = parameter.device, parameter.dtype
    config = stage_module.model.config
    rows, tokens = micro_batch_shape
    hidden = torch.empty(rows, tokens, config.hidden_size, dtype=dtype, device=device)  # (b, T, H)
    aux = torch.empty(1, dtype=dtype, device=device)
    inputs = ((torch.empty(rows, tokens, dtype=torch.long, device=device),) if stage_module.is_first
              else (hidden.requires_grad_(), aux.clone().requires_grad_()))
    outputs = ((torch.empty(rows, tokens, config.vocab_size, dtype=dtype, device=device), aux.clone())
               if stage_module.is_last else (torch.empty_like(hidden), aux.clone()))
    outputs = tuple(output.requires_grad_() for output in outputs)  # so that their gradients are sent back
    stage = PipelineStage(stage_module, stage_index, num_stages, device, input_args=inputs, output_args=outputs,
                          group=group)
    schedule_class = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    return schedule_class(stage, n_microbatches, loss_fn=pipeline_loss_fn(stage_module.model))


def pipeline_data_parallel_group(pipeline_size: int) -> dist.ProcessGroup:
    """The data-parallel group of this rank's stage when ranks are laid out as `rank = replica * pipeline_size +
    stage` (every rank must call this, in the same order): the ranks holding the same stage. With one replica it is
    this rank alone, so a router-bias all-reduce over it is a no-op."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size % pipeline_size:
        raise ValueError(f"WORLD_SIZE={world_size} is not a multiple of pipeline_size={pipeline_size}.")
    mine = None
    for stage in range(pipeline_size):
        group = dist.new_group(list(range(stage, world_size, pipeline_size)))
        if rank % pipeline_size == stage:
            mine = group
    return mine


__all__ = ["SCHEDULES", "SparseMoePipelineStage", "build_pipeline", "pipeline_data_parallel_group",
           "pipeline_loss_fn", "pipeline_stage", "stage_layer_range"]
