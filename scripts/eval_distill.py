#!/usr/bin/env python
"""Score every model of a scripts/distill.py run on each task's test split (the recipe:
lightarch.training.distillation.report): the teacher, the distilled student(s), the same student trained without
distillation, and the majority class.

Writes into --output_dir (the run's folder): eval.json, eval.md (the table), eval.png (per-task bars), and the
student's model card student/README.md. For a `distill.py --task lm` run: the held-out perplexity of the teacher, the
distilled and the plain student, recomputed from the saved folders, in eval.json / eval.md / eval.png.

    python scripts/eval_distill.py --output_dir outputs/distilled
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class EvalArguments:
    output_dir: str = field(default="outputs/distilled", metadata={"help": "The folder scripts/distill.py wrote."})
    split: str = field(default="test", metadata={"help": "Split to score: test or validation."})
    num_threads: int = field(default=0, metadata={"help": "torch threads (0: the CPUs not busy with other jobs)."})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(EvalArguments, description=__doc__.split("\n\n")[0])
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.split not in ("test", "validation"):
        parser.error(f"--split must be test or validation, got {args.split!r}.")
    if args.num_threads < 0:
        parser.error(f"--num_threads must be >= 0, got {args.num_threads}.")

    import torch
    from lightarch.training.cli import available_cpus, other_running_processes
    from lightarch.training.distillation.language_model import (
        evaluate_lm_run,
        is_lm_run,
    )
    from lightarch.training.distillation.report import (
        evaluate_run,
        results_table,
        write_report,
    )

    torch.set_num_threads(args.num_threads or max(1, available_cpus() - other_running_processes()))
    if is_lm_run(args.output_dir):
        try:
            results = evaluate_lm_run(args.output_dir)
        except (FileNotFoundError, ValueError) as error:
            parser.error(str(error))
        print(results["table"], end="")
        return
    try:
        results = evaluate_run(args.output_dir, args.split)
    except FileNotFoundError as error:
        parser.error(str(error))
    write_report(args.output_dir, results)
    print(results_table(results))
    print(f"student / teacher: mean {100 * results['retention_mean']:.1f}%, worst {100 * results['retention_worst']:.1f}%;"
          f" distillation gain {results['distillation_gain_points']:+.1f} points")


if __name__ == "__main__":
    main()
