"""The DeepSeek-V3 auxiliary-loss-free bias update, registered where training is set up.

A router with `router_bias_update_rate > 0` selects experts by `probs + e_score_correction_bias` and counts the
tokens each expert receives; after every optimizer step its bias must move towards equal load
(`update_router_biases` in `lightarch.layers`). Nothing does that by itself: register it once per training run.

- With `transformers.Trainer`: `Trainer(..., callbacks=[RouterBiasUpdateCallback()])`.
- With a custom loop: `register_router_bias_hook(optimizer, model)` after building the optimizer.

Both find the routers by walking the model's modules (through any wrapper), never through the optimizer's
parameters, which engines such as FSDP, DeepSpeed and Opacus flatten, shard or re-create.
Without either, the biases stay where they are (a balanced router that trains for long without an update logs one
warning). The biases are buffers of the base model, not part of a LoRA adapter: when fine-tuning adapters with the
router frozen, leave the update out so that the adapter alone reproduces the fine-tuned model.
"""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback

from ..layers import update_router_biases


class RouterBiasUpdateCallback(TrainerCallback):
    """Updates the bias of every balanced router in the Trainer's model after each optimizer step.

    Runs on `on_optimizer_step`, so under gradient accumulation the loads of all micro-batches of one step are
    counted together, as in DeepSeek-V3. A model without balanced routers makes it a no-op.
    """

    def on_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is not None:
            update_router_biases(model)


def register_router_bias_hook(optimizer: Optimizer, model: nn.Module, group=None) -> RemovableHandle:
    """After each `optimizer.step()`, update the bias of every balanced router in `model`. For custom loops.

    The optimizer is only the clock: its parameters need not be the model's (FSDP, DeepSpeed and Opacus train
    flattened, sharded or wrapped copies). `group`: the process group whose loads are summed (default: every rank;
    a pipeline stage passes its data-parallel group). Returns the hook's handle: `handle.remove()` stops the updates.
    """

    def update_after_step(optimizer: Optimizer, args, kwargs) -> None:
        update_router_biases(model, group=group)

    return optimizer.register_step_post_hook(update_after_step)


__all__ = ["RouterBiasUpdateCallback", "register_router_bias_hook"]
