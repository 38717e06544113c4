"""DeepSpeed ZeRO-3 for lightarch decoders: the shipped config, MoE leaf modules, and the CPU launch that works.

ZeRO-3 partitions every parameter, gradient and AdamW state over the ranks and gathers a module's parameters
right before its forward. An MoE block must be a *leaf module* (`deepspeed.utils.set_z3_leaf_modules`): its
parameters are then gathered together, once, whatever experts the rank's tokens pick, so a rank whose tokens
skip an expert issues the same collectives as the others instead of hanging. The shipped config
(`configs/zero3_cpu.json`, `deepspeed_config_path("zero3_cpu")`) names `SparseMoeBlock` in
`zero_optimization.leaf_module.classes`, so DeepSpeed flags the blocks itself at `deepspeed.initialize`
(through `TrainingArguments(deepspeed=...)` too); `set_moe_leaf_modules` does the same for a config without it.

The CPU trap: without `use_cpu=True`, on a machine without a GPU, accelerate picks no backend and counts one
process while DeepSpeed counts the launcher's `WORLD_SIZE`, and DeepSpeed stops on "train_batch_size is not equal to
micro_batch_per_gpu * gradient_acc_step * world_size". With `use_cpu=True` (and `ddp_backend="gloo"`) accelerate
initializes gloo over every rank and the Trainer still runs DeepSpeed. `zero3_training_arguments` sets both;
the launch is

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29512 your_train.py

(`python -m lightarch.training.parallel.zero3_trainer OUT` is the checked example). Measured: a run that leaves
its DeepSpeed engine and gloo group to the interpreter's exit can abort there after training finished ("terminate
called without an active exception", exit code -6, intermittent); the example creates the group itself
(`torch.distributed.init_process_group("gloo")`, which accelerate and DeepSpeed reuse), calls
`trainer.model_wrapped.destroy()` after training and `destroy_process_group()` at the end, and exits cleanly
(every launch since). No optimizer section in the
config: the Trainer passes its torch AdamW (DeepSpeedCPUAdam would compile a C++ op first). On CPU, DeepSpeed
compiles its small shared-memory collective op once per machine on first use (needs `ninja` and a C++ compiler;
cached under `~/.cache/torch_extensions`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from torch import nn

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# lightarch's MoE block (`lightarch.layers.SparseMoeBlock`, also in remote-code copies): matched by class name.
MOE_LEAF_CLASS_NAMES = ("SparseMoeBlock",)


def deepspeed_config_path(name: str = "zero3_cpu") -> Path:
    """The path of a shipped DeepSpeed JSON config (`configs/<name>.json`), for `TrainingArguments(deepspeed=...)`."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"`name`={name!r} is not a shipped DeepSpeed config: use one of {shipped} or pass a path.")
    return path


def deepspeed_config(name: str = "zero3_cpu", *, micro_batch_size: int | None = None,
                     gradient_accumulation_steps: int = 1, world_size: int | None = None,
                     gradient_clipping: float = 0.0) -> dict:
    """A shipped config as a dict; with `micro_batch_size` its Trainer "auto" fields are filled for
    `deepspeed.initialize` in a custom loop (the Trainer fills them itself from its arguments)."""
    config = json.loads(deepspeed_config_path(name).read_text())
    if micro_batch_size is None:
        return config
    if world_size is None:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_initialized() else 1
    resolved = copy.deepcopy(config)
    resolved.update(train_micro_batch_size_per_gpu=micro_batch_size,
                    gradient_accumulation_steps=gradient_accumulation_steps,
                    train_batch_size=micro_batch_size * gradient_accumulation_steps * world_size,
                    gradient_clipping=gradient_clipping)
    return resolved


def set_moe_leaf_modules(model: nn.Module) -> list[nn.Module]:
    """Flag every MoE block of `model` as a ZeRO-3 leaf module (before `deepspeed.initialize`); returns them.

    Only needed with a DeepSpeed config that does not list the block in `zero_optimization.leaf_module`.
    """
    from deepspeed.utils import set_z3_leaf_modules

    return set_z3_leaf_modules(model, list(MOE_LEAF_CLASS_NAMES), raise_if_not_found=False)


def zero3_training_arguments(output_dir: str, deepspeed: str | dict | None = None, **kwargs):
    """`TrainingArguments` that run DeepSpeed ZeRO-3 (default: the shipped `zero3_cpu.json`) on this machine.

    Without a CUDA device it sets `use_cpu=True` and `ddp_backend="gloo"` (see the module docstring: otherwise
    accelerate and DeepSpeed disagree on the world size). Other `kwargs` go to `TrainingArguments` unchanged.
    """
    import torch
    from transformers import TrainingArguments

    if not torch.cuda.is_available():
        if kwargs.get("use_cpu") is False:
            raise ValueError("`use_cpu`=False without a CUDA device: DeepSpeed on CPU needs use_cpu=True (accelerate "
                             "then initializes gloo on every rank); drop the argument.")
        if kwargs.get("ddp_backend") not in (None, "gloo"):
            raise ValueError(f"`ddp_backend`={kwargs['ddp_backend']!r} on CPU: use 'gloo' (or leave it unset).")
        kwargs.update(use_cpu=True, ddp_backend="gloo")
    return TrainingArguments(output_dir=output_dir, deepspeed=str(deepspeed_config_path()) if deepspeed is None
                             else deepspeed, **kwargs)


__all__ = ["CONFIG_DIR", "MOE_LEAF_CLASS_NAMES", "deepspeed_config", "deepspeed_config_path",
           "set_moe_leaf_modules", "zero3_training_arguments"]
