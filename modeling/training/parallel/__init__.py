"""Training past one machine (issue 17): data-parallel glue that engines (DDP, FSDP2) need for lightarch models,
and a paper scaling model (`planner`) for ZeRO / FSDP / TP / PP / EP.

- `data_parallel_moe_loss`: each rank's loss whose gradient average equals one process over the global batch
  (the router balance loss over globally all-reduced loads).
- `apply_fsdp2` / `apply_ddp`: shard or replicate a lightarch decoder from outside the model.
- `python -m lightarch.training.parallel.parity OUT` under torchrun: parity with one process.
- `lightarch.training.parallel.planner`: memory, compute and communication per step; `scripts/plan_parallel.py`.
"""

from .moe_loss import (
    data_parallel_moe_loss,
    global_router_aux_loss,
    local_balance_loss_gap,
    record_routers,
)
from .sharding import apply_ddp, apply_fsdp2, decoder_layers, full_gradient

__all__ = [
    "apply_ddp",
    "apply_fsdp2",
    "data_parallel_moe_loss",
    "decoder_layers",
    "full_gradient",
    "global_router_aux_loss",
    "local_balance_loss_gap",
    "record_routers",
]
