"""DeepSpeed ZeRO-3 through `TrainingArguments(deepspeed=...)` on CPU equals one process: the checked launch.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \\
        --master_port 29513 -m lightarch.training.parallel.zero3_trainer OUT_DIR [--kind sparse_moe_top_p]

Every rank first trains the one-process reference of `parity` (full global batch, AdamW fp32 without weight decay,
the router-bias update), then a `DataParallelMoeTrainer` with `zero3_training_arguments` (the shipped
`configs/zero3_cpu.json`, `use_cpu=True`, gloo) on the same global batches (sequential sampling: rank r's micro-batch
of step k is the r-th chunk of global batch k), with `RouterBiasUpdateCallback`. It records the Trainer's logged
losses, what the Trainer wrapped (engine class, ZeRO stage, MoE leaf modules, this rank's share of the parameters
and of the AdamW state), saves the model with `trainer.save_model` (ZeRO-3 gathers it into one safetensors file)
and the reference model's logits on a fixed input. Writes `OUT_DIR/zero3-trainer-rank{r}.json`.
`parity --cases KIND/trainer_zero3 --resume_at 5` runs the same check inside the parity launch, plus a Trainer
checkpoint at step 5 (DeepSpeed's sharded files) and a second Trainer resumed from it; `KIND/trainer_zero3_local`
is the negative control (a plain `Trainer`: each rank backpropagates its own router balance loss).
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..router_bias import RouterBiasUpdateCallback
from . import parity
from .trainer import DataParallelMoeTrainer
from .zero3 import zero3_training_arguments


class _EngineProbe(TrainerCallback):
    """What the Trainer trains under ZeRO-3, read at the last step (gradients and AdamW state exist)."""

    def __init__(self) -> None:
        self.found: dict = {}

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        if state.global_step != state.max_steps:
            return
        from deepspeed.utils import safe_get_local_optimizer_state

        parameters = list(model.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in parameters)
        states = [safe_get_local_optimizer_state(p, "exp_avg") for p in parameters]
        self.found = {
            "partitioned": all(hasattr(p, "ds_tensor") for p in parameters),
            "held_parameters": sum(p.ds_tensor.numel() for p in parameters if hasattr(p, "ds_tensor")) / total,
            "held_optimizer_state": sum(s.numel() for s in states if s is not None) / total,
            "leaf_modules": [type(m).__name__ for m in model.modules() if getattr(m, "_z3_leaf", False)],
        }


def train_with_trainer(out_dir: str, kind: str, batches: list[dict[str, torch.Tensor]], lr: float,
                       reference: dict, resume_at: int | None = None, local_loss: bool = False) -> dict:
    """The ZeRO-3 Trainer run on this rank, compared with `reference` (`parity.train_reference(...,
    weight_decay=0.0)`); saves the model and the reference's logits under `out_dir`. Collective.

    `resume_at=k`: the run also saves a Trainer checkpoint at step k (DeepSpeed's sharded files), and a second
    Trainer resumes from it (`resume_from_checkpoint`); its losses are returned as `resumed_losses`.
    `local_loss=True`: a plain `Trainer` (each rank's own `outputs.loss`), the negative control."""
    rows = parity.trainer_rows(batches)
    settings = {**parity.trainer_settings(str(Path(out_dir, "trainer")), len(batches), lr,
                                          int(os.environ["WORLD_SIZE"])),
                "save_strategy": "no" if resume_at is None else "steps", "save_steps": resume_at or 500}
    args = zero3_training_arguments(**settings)
    probe = _EngineProbe()
    trainer_class = Trainer if local_loss else DataParallelMoeTrainer
    trainer = trainer_class(model=parity.build_model(kind), args=args, train_dataset=rows,
                            callbacks=[RouterBiasUpdateCallback(), probe])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    engine = trainer.model_wrapped
    result = {
        "rank": trainer.args.process_index, "world_size": trainer.args.world_size,
        "accelerate_processes": trainer.accelerator.num_processes,
        "engine": type(engine).__name__, "zero_stage": engine.zero_optimization_stage(),
        "losses": losses, "reference_losses": reference["losses"],
        "loss_max_diff": max(abs(a - b) for a, b in zip(losses, reference["losses"])),
        **parity.bias_comparison(trainer.model, reference),
        **probe.found,
    }
    trainer.save_model(str(Path(out_dir, "saved")))  # collective: ZeRO-3 gathers the 16-bit (here fp32) weights
    if result["rank"] == 0:
        model = parity.build_model(kind)
        model.load_state_dict(reference["state"])
        input_ids = batches[0]["input_ids"]
        with torch.no_grad():
            logits = model.eval()(input_ids=input_ids).logits  # (B, T, V)
        torch.save({"input_ids": input_ids, "logits": logits}, Path(out_dir, "reference-outputs.pt"))
    torch.distributed.barrier()
    engine.destroy()  # its hooks and buffers go now, not at interpreter exit
    if resume_at is not None:
        checkpoint = Path(args.output_dir, f"checkpoint-{resume_at}")
        # new arguments: a second Accelerator may not take a DeepSpeed plugin, new arguments reset the state
        again = DataParallelMoeTrainer(model=parity.build_model(kind), args=zero3_training_arguments(**settings),
                                       train_dataset=rows, callbacks=[RouterBiasUpdateCallback()])
        again.train(resume_from_checkpoint=str(checkpoint))
        again.model_wrapped.destroy()
        result.update({
            "resumed_losses": [entry["loss"] for entry in again.state.log_history
                               if "loss" in entry and entry["step"] > resume_at],
            "resumed_biases_max_diff": parity.bias_comparison(again.model, reference)["bias_max_diff"],
            "checkpoint_files": sorted(str(f.relative_to(checkpoint)) for f in checkpoint.rglob("*") if f.is_file()),
        })
    return result


def run(out_dir: str, kind: str = "sparse_moe_top_p", steps: int = 10, lr: float = 1e-3) -> dict:
    """Reference, then the ZeRO-3 Trainer run, on this rank; writes and returns this rank's results."""
    batches = parity.global_batches(steps, int(os.environ["WORLD_SIZE"]))
    reference = parity.train_reference(kind, batches, lr, weight_decay=0.0)  # before any process group exists
    # our own gloo group (accelerate and DeepSpeed reuse it), destroyed at the end: a group left to the
    # interpreter's exit aborts it ("terminate called without an active exception")
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=parity.COLLECTIVE_TIMEOUT_SECONDS))
    try:
        result = train_with_trainer(out_dir, kind, batches, lr, reference)
        Path(out_dir, f"zero3-trainer-rank{result['rank']}.json").write_text(json.dumps(result, indent=1))
    finally:
        torch.distributed.destroy_process_group()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--kind", default="sparse_moe_top_p", help="sparse_moe_top_k or sparse_moe_top_p")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.out_dir, args.kind, args.steps, args.lr)


if __name__ == "__main__":
    main()
