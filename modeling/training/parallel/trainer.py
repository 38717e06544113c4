"""A `transformers.Trainer` whose data-parallel loss is the one-process loss of the global batch (MoE models).

A plain Trainer backpropagates each rank's `outputs.loss`; its router balance loss is then a per-rank product of
batch means, whose average over ranks is not the global one (`lightarch.training.parallel.moe_loss`).
`DataParallelMoeTrainer` computes the training loss with `data_parallel_moe_loss` instead, under any engine the
Trainer runs (DDP, FSDP, DeepSpeed ZeRO); in one process it is the model's own loss. Its logged `loss` (the mean over
ranks) is the global-batch loss. Evaluation keeps the Trainer's own loss.
"""

from __future__ import annotations

from transformers import Trainer

from .moe_loss import data_parallel_moe_loss


class DataParallelMoeTrainer(Trainer):
    """`Trainer` with the global-batch router loss; every rank needs equally many inputs and label tokens per step."""

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Training: `data_parallel_moe_loss` (all-reduced router loads); evaluation: the Trainer's own loss."""
        if return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss, _global_loss, _records = data_parallel_moe_loss(model, self.model.config, inputs)
        return loss


__all__ = ["DataParallelMoeTrainer"]
