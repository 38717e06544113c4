"""Training past one machine (issue 17): data-parallel glue that engines (DDP, FSDP2, DeepSpeed ZeRO-3) need for
lightarch models, and a paper scaling model (`planner`) for ZeRO / FSDP / TP / PP / EP.

- `data_parallel_moe_loss`: each rank's loss whose gradient average equals one process over the global batch
  (the router balance loss over globally all-reduced loads); `DataParallelMoeTrainer` uses it in a Trainer.
- `apply_fsdp2` / `apply_ddp`: shard or replicate a lightarch decoder from outside the model.
- `zero3_training_arguments` / `deepspeed_config_path("zero3_cpu")`: DeepSpeed ZeRO-3 through the Trainer, on CPU
  too (the shipped `configs/zero3_cpu.json` makes the MoE blocks leaf modules); `set_moe_leaf_modules`.
- `save_sharded` / `load_sharded` / `save_consolidated` / `consolidate_zero3_checkpoint`: sharded checkpoints of
  FSDP2 (torch.distributed.checkpoint) and ZeRO-3 (DeepSpeed, `zero_to_fp32`) runs, resumed or consolidated.
- `python -m lightarch.training.parallel.parity OUT` under torchrun: parity with one process
  (`--engines ddp,fsdp2,zero3,tp,ep`, `--cases KIND/trainer_zero3`, `--resume_at K`; `tp` / `ep`: the models' own
  tensor- / expert-parallel plans through `from_pretrained(distributed_config=...)`), also over several nodes.
- `accelerate launch --config_file configs/accelerate_cpu.yaml -m lightarch.training.parallel.accelerate_trainer OUT`:
  a Trainer run launched by accelerate on CPU (DDP over gloo; `configs/accelerate_cpu_multinode.yaml` for 2 nodes).
- `pipeline_stage` / `build_pipeline`: a SparseMoe decoder cut into pipeline stages from its pipeline plan, trained
  with `torch.distributed.pipelining`'s GPipe or 1F1B schedule (the router auxiliary loss carried across stages).
- `lightarch.training.parallel.planner`: memory, compute and communication per step; `scripts/plan_parallel.py`.
"""

from .moe_loss import (
    data_parallel_moe_loss,
    global_router_aux_loss,
    local_balance_loss_gap,
    record_routers,
)
from .pipeline import (
    SparseMoePipelineStage,
    build_pipeline,
    pipeline_data_parallel_group,
    pipeline_loss_fn,
    pipeline_stage,
)
from .sharded_checkpoints import (
    consolidate_zero3_checkpoint,
    load_sharded,
    save_consolidated,
    save_sharded,
)
from .sharding import apply_ddp, apply_fsdp2, decoder_layers, full_gradient
from .trainer import DataParallelMoeTrainer
from .zero3 import (
    deepspeed_config,
    deepspeed_config_path,
    set_moe_leaf_modules,
    zero3_training_arguments,
)

__all__ = [
    "DataParallelMoeTrainer",
    "SparseMoePipelineStage",
    "apply_ddp",
    "apply_fsdp2",
    "build_pipeline",
    "consolidate_zero3_checkpoint",
    "data_parallel_moe_loss",
    "decoder_layers",
    "deepspeed_config",
    "deepspeed_config_path",
    "full_gradient",
    "global_router_aux_loss",
    "load_sharded",
    "local_balance_loss_gap",
    "pipeline_data_parallel_group",
    "pipeline_loss_fn",
    "pipeline_stage",
    "record_routers",
    "save_consolidated",
    "save_sharded",
    "set_moe_leaf_modules",
    "zero3_training_arguments",
]
