#!/usr/bin/env python
"""Measure a trained safety filter on its test split (never used for training or threshold choice): harmful prompts
blocked, false refusals on benign look-alikes and ordinary prompts, per-category precision / recall, threshold curve.

Writes eval.json, eval.md and eval_per_category.png / eval_threshold_curve.png beside the filter in --model_dir
(or into --output_dir). --rules_only measures the rules engine without the classifier; --builtin_rules measures the
folder's classifier and thresholds with the shipped rule files in place of the folder's (a rule change, no retraining).

    python scripts/eval_safety.py --model_dir outputs/safety
    python scripts/eval_safety.py --model_dir outputs/safety --rules_only
    python scripts/eval_safety.py --model_dir outputs/safety --builtin_rules --output_dir /tmp/eval_new_rules
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class SafetyEvalArguments:
    model_dir: str = field(default="outputs/safety", metadata={"help": "A folder written by train_safety.py."})
    output_dir: str = field(default="", metadata={"help": "Where to write eval.*; empty: --model_dir."})
    split: str = field(default="test", metadata={"help": "Which saved split to measure: test or validation."})
    rules_only: bool = field(default=False, metadata={"help": "Measure the rules engine alone (no classifier)."})
    builtin_rules: bool = field(default=False, metadata={
        "help": "Use the rule files shipped with lightarch instead of the folder's rules/ (classifier and "
                "thresholds stay the folder's): what a rule change does without retraining."})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(SafetyEvalArguments, description=__doc__.split("\n\n")[0])
    args, unknown = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False,
                                                       return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.split not in ("test", "validation"):
        parser.error(f"--split {args.split!r}: use test or validation")

    import json
    from pathlib import Path

    from lightarch.safety.evaluation import evaluate_filter, plot_results, results_table
    from lightarch.safety.recipe import evaluation_filter, load_splits
    from lightarch.training.checkpoints import write_atomically

    try:
        splits = load_splits(args.model_dir)
        safety = evaluation_filter(args.model_dir, args.rules_only, args.builtin_rules)
    except FileNotFoundError as error:
        parser.error(str(error))
    results = evaluate_filter(safety, splits[args.split])
    out = Path(args.output_dir or args.model_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "eval_rules_only" if args.rules_only else "eval"
    prefix += "_builtin_rules" if args.builtin_rules else ""
    write_atomically(out / f"{prefix}.json", json.dumps(results, indent=1))
    write_atomically(out / f"{prefix}.md", results_table(results) + "\n")
    for name, png in plot_results(results).items():
        write_atomically(out / f"{prefix}_{name}", png)
    print(results_table(results))


if __name__ == "__main__":
    main()
