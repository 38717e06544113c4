"""`accelerate launch` with the shipped CPU config: a lightarch Trainer run on N processes equals one process.

    OMP_NUM_THREADS=1 accelerate launch --config_file modeling/training/parallel/configs/accelerate_cpu.yaml \\
        --main_process_port 29514 -m lightarch.training.parallel.accelerate_trainer OUT_DIR [--kind sparse_moe_top_k]

The shipped YAMLs (`configs/accelerate_cpu.yaml`, one machine; `configs/accelerate_cpu_multinode.yaml`, two
machines) say `distributed_type: MULTI_GPU` with `use_cpu: true`: that is what makes `accelerate launch` start the
processes itself (through torchrun's elastic agent) on a GPU-less machine. `distributed_type: MULTI_CPU` starts ONE
process (accelerate's `simple_launcher`) and expects `mpirun` (`--mpirun_hostfile`) to start the others. Inside each
process `TrainingArguments(use_cpu=True, ddp_backend="gloo")` makes accelerate's state MULTI_CPU over gloo, so the
Trainer trains with plain DDP. No FSDP is claimed on this path: accelerate turns FSDP on for GPU backends only, and
its `ParallelismConfig` is refused on CPU (NOTES.md); what shards on CPU is FSDP2 (`parity --engines fsdp2`),
`DistributedConfig(fsdp_size=...)`, or DeepSpeed ZeRO-3 (`zero3_trainer`).

Every rank first trains `parity`'s one-process reference (the full global batch, AdamW fp32 without weight decay,
the router-bias update), then a `DataParallelMoeTrainer` (or, with `--local_loss`, a plain `Trainer`: each rank's
own balance loss, the negative control) on the same global batches, sequential sampling (rank r's micro-batch of
step k is the r-th chunk of global batch k), with `RouterBiasUpdateCallback`. Writes
`OUT_DIR/accelerate-rank{r}.json`: the logged losses against the reference's, what accelerate set up (distributed
type, backend, process count, the wrapper class) and the router-bias difference.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from ..router_bias import RouterBiasUpdateCallback
from . import parity
from .trainer import DataParallelMoeTrainer


def trainer_arguments(output_dir: str, steps: int, lr: float, world_size: int) -> TrainingArguments:
    """CPU `TrainingArguments` whose N-process run is the one-process AdamW loop of `parity.train_reference`
    (`parity.trainer_settings`), over gloo, saving nothing."""
    return TrainingArguments(**parity.trainer_settings(output_dir, steps, lr, world_size), use_cpu=True,
                             ddp_backend="gloo", save_strategy="no")


def run(out_dir: str, kind: str = "sparse_moe_top_k", steps: int = 10, lr: float = 1e-3,
        local_loss: bool = False) -> dict:
    """Reference, then the Trainer run on this rank (collective); writes and returns this rank's results."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    batches = parity.global_batches(steps, world_size)
    reference = parity.train_reference(kind, batches, lr, weight_decay=0.0)  # before any process group exists
    rows = parity.trainer_rows(batches)
    distributed = world_size > 1
    if distributed:  # our own group (accelerate reuses it), destroyed below, not at the interpreter's exit
        torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=parity.COLLECTIVE_TIMEOUT_SECONDS))
    try:
        args = trainer_arguments(str(Path(out_dir, f"trainer-{kind}")), steps, lr, world_size)
        trainer_class = Trainer if local_loss else DataParallelMoeTrainer
        trainer = trainer_class(model=parity.build_model(kind), args=args, train_dataset=rows,
                                callbacks=[RouterBiasUpdateCallback()])
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        state = trainer.accelerator.state
        result = {
            "rank": trainer.args.process_index, "world_size": trainer.args.world_size,
            "node_rank": int(os.environ.get("GROUP_RANK", "0")), "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
            "launched_by_accelerate": "ACCELERATE_MIXED_PRECISION" in os.environ,
            "distributed_type": str(state.distributed_type).split(".")[-1], "backend": state.backend,
            "accelerate_processes": trainer.accelerator.num_processes, "wrapper": type(trainer.model_wrapped).__name__,
            "trainer": trainer_class.__name__, "kind": kind,
            "losses": losses, "reference_losses": reference["losses"],
            "loss_max_diff": max(abs(a - b) for a, b in zip(losses, reference["losses"])),
            **parity.bias_comparison(trainer.model, reference),
        }
        Path(out_dir, f"accelerate-rank{result['rank']}.json").write_text(json.dumps(result, indent=1))
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--kind", default="sparse_moe_top_k",
                        help="sparse_moe_top_k, sparse_moe_top_p or adaptive_depth")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--local_loss", action="store_true",
                        help="a plain Trainer (each rank's own balance loss): the negative control")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.out_dir, args.kind, args.steps, args.lr, args.local_loss)


if __name__ == "__main__":
    main()
