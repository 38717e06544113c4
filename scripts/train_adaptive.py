#!/usr/bin/env python
"""Train a lightarch adaptive-depth model on generated arithmetic with an easy / hard split, on CPU (the recipe:
lightarch.training.adaptive_depth).

The default model is the `arithmetic` preset of AdaptiveDepthConfig: a dense 8-layer decoder (1.2M parameters) with
exits after layers 2, 4, 6 and 8 and a complexity estimator; --preset and --config_overrides change it. Easy questions
are one step (`7*8=`), hard ones two steps with precedence (`7+2*3=`). Phase 1 trains every exit and the estimator
jointly, phase 2 the estimator alone (backbone frozen); then the thresholds of the "estimator" and "confidence"
policies are calibrated on held-out questions and stored in the saved config (`exit_policy="estimator"`).

Writes into --output_dir (default outputs/adaptive_depth), the model first, atomically:

    model.safetensors, config.json, *.py, tokenizer files    the model (AutoModelForCausalLM, trust_remote_code)
    results.json, heldout.json                               measurements, the held-out questions (bench_adaptive.py)
    README.md, training.png                                  model card, per-exit losses and calibration accuracy

    python scripts/train_adaptive.py
    python scripts/train_adaptive.py --max_steps 500 --estimator_steps 100 --output_dir outputs/quick
    python scripts/train_adaptive.py --config_overrides 'num_hidden_layers=4,exit_layers=[1,2,4],exit_loss_weights=null'
    python scripts/bench_adaptive.py --model_dir outputs/adaptive_depth
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field, fields

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# TrainingArguments defaults this script changes (phase 1; listed by --help).
TRAINING_DEFAULTS = {
    "output_dir": "outputs/adaptive_depth",
    "use_cpu": True,
    "max_steps": 1000,
    "per_device_train_batch_size": 128,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 100,
    "weight_decay": 0.05,
    "max_grad_norm": 1.0,
    "logging_steps": 100,
    "logging_first_step": True,
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "dataloader_num_workers": 0,
}
EPILOG = ("Every transformers.TrainingArguments option is accepted too; they configure phase 1 (--help_all lists "
          "them all; slow). Defaults this script changes: "
          + ", ".join(f"{k}={v}" for k, v in TRAINING_DEFAULTS.items()) + ".")


@dataclass
class AdaptiveArguments:
    preset: str = field(
        default="arithmetic",
        metadata={"help": "AdaptiveDepthConfig preset, the architecture (AdaptiveDepthConfig.presets() lists them); "
                          "'arithmetic' is the 1.2M-parameter dense 8-layer model with exits 2,4,6,8. The vocabulary "
                          "size and special-token ids must be the arithmetic tokenizer's, as in 'arithmetic'."},
    )
    config_overrides: str = field(
        default="",
        metadata={"help": "AdaptiveDepthConfig fields over the preset, 'key=value,...' (JSON values), e.g. "
                          "'num_hidden_layers=4,exit_layers=[1,2,4],exit_loss_weights=[2,1,1]'."},
    )
    train_examples: int = field(
        default=128_000, metadata={"help": "Generated training questions (phase 1 uses max_steps x batch of them)."}
    )
    hard_fraction: float = field(default=0.6, metadata={"help": "Fraction of training questions that are hard."})
    heldout_hard: int = field(
        default=2000,
        metadata={"help": "Hard questions held out of training: the first --calibration_hard calibrate the "
                          "thresholds, the rest are the test set of bench_adaptive.py."},
    )
    calibration_hard: int = field(default=1000, metadata={"help": "Held-out hard questions used for calibration."})
    calibration_easy: int = field(
        default=150, metadata={"help": "Easy questions (of the 300) used for calibration; the rest are the test set."}
    )
    estimator_hard: int = field(
        default=1000,
        metadata={"help": "More hard questions held out of phase 1, on which phase 2 trains the estimator (it learns "
                          "where the exits fail on questions the backbone never saw)."},
    )
    estimator_steps: int = field(default=600, metadata={"help": "Phase 2 steps (backbone frozen); 0 skips it."})
    estimator_learning_rate: float = field(default=1e-2, metadata={"help": "Learning rate of phase 2."})
    estimator_batch_size: int = field(default=128, metadata={"help": "Batch size of phase 2."})
    easy_tolerance: float = field(
        default=0.005, metadata={"help": "Calibration: allowed easy accuracy drop against full depth (0.005 = 0.5 pt)."}
    )
    hard_tolerance: float = field(
        default=0.005,
        metadata={"help": "Calibration: allowed hard accuracy drop against full depth (the accuracy budget; 0 asks "
                          "for no loss at all on the calibration questions, which pushes thresholds to ~1)."}
    )
    calibration_threshold_steps: int = field(
        default=41,
        metadata={"help": "Calibration tries this many evenly spaced thresholds in [0, 1] (plus a few in (0.9, 1))."},
    )
    time_budget_minutes: float = field(
        default=0.0,
        metadata={"help": "Wall-clock budget of the whole run: phase 1 stops early (logged and recorded in "
                          "results.json) when continuing would leave less than --reserve_minutes for phase 2, "
                          "calibration and saving. 0 (the default) disables it: a run stopped by the clock trains "
                          "fewer steps on a loaded machine, and its result then depends on the load."},
    )
    reserve_minutes: float = field(
        default=2.5, metadata={"help": "Time kept for phase 2, calibration and saving under --time_budget_minutes."}
    )
    num_threads: int = field(
        default=1,
        metadata={"help": "torch threads (0: torch's default). The default 1: this model's matrices are small, and "
                          "on a CPU shared with other jobs more threads oversubscribe it (measured 8x slower "
                          "products)."},
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    description = __doc__.split("\n\n")[0]
    fast = HfArgumentParser(AdaptiveArguments, description=description, epilog=EPILOG)
    fast.add_argument("--help_all", action="store_true", help="List every option, TrainingArguments included.")
    if "--help_all" not in argv:
        fast.parse_args_into_dataclasses(args=argv, return_remaining_strings=True, look_for_args_file=False)

    import torch
    from transformers import TrainingArguments

    from lightarch import AdaptiveDepthConfig
    from lightarch.data.arithmetic import SuiteSizes
    from lightarch.training.adaptive_depth import AdaptiveSchedule, check_adaptive_run, train_adaptive
    from lightarch.training.cli import config_from_preset, script_parser

    parser = script_parser((AdaptiveArguments, TrainingArguments), description, TRAINING_DEFAULTS)
    parser.add_argument("--help_all", action="help", help="List every option, TrainingArguments included.")
    try:
        args, training_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
        if args.num_threads < 0:
            raise ValueError(f"--num_threads must be >= 0 (0: torch's default), got {args.num_threads}.")
        config = config_from_preset(AdaptiveDepthConfig, args.preset, args.config_overrides)
        sizes = SuiteSizes(**{f.name: getattr(args, f.name) for f in fields(SuiteSizes)})
        schedule = AdaptiveSchedule(**{f.name: getattr(args, f.name) for f in fields(AdaptiveSchedule)})
        check_adaptive_run(config, training_args)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    train_adaptive(config, training_args, sizes, schedule)


if __name__ == "__main__":
    main()
