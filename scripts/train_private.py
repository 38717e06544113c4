#!/usr/bin/env python
"""Train a small lightarch SparseMoe causal LM from scratch with differential privacy (DP-SGD, Opacus) on CPU.

The data and tokenizer are scripts/train.py's (the Python standard library split by file, a byte-level BPE trained on
the train split); every training block is one example of the guarantee. Each step draws a Poisson batch (expected
size --per_device_train_batch_size), clips every example's gradient to --max_grad_norm, adds Gaussian noise and
steps; the noise is calibrated so that epsilon after --max_steps is at most --target_epsilon (or given by
--noise_multiplier). It writes into --output_dir (default outputs/private):

    model.safetensors, config.json, *.py, tokenizer.json    the model and tokenizer
    results.json                                            epsilon, delta, accountant, steps, ..., held-out loss
    README.md                                               model card stating the privacy guarantee
    checkpoint-*/privacy_accountant.json                    the accountant's state (--resume_from_checkpoint True)

The work is lightarch.training.privacy (PrivateTrainer, train_private).

Examples:
    python scripts/train_private.py
    python scripts/train_private.py --target_epsilon 3 --max_steps 400
    python scripts/train_private.py --noise_multiplier 1.0 --max_grad_norm 0.5
    python scripts/train_private.py --per_device_train_batch_size 256 --max_physical_batch_size 32
    python scripts/train_private.py --grad_sample_mode ghost
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field

PROCESS_START = time.perf_counter()  # the time budget counts the imports too
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see scripts/train.py

from transformers.hf_argparser import HfArgumentParser

TRAINING_DEFAULTS = {
    "output_dir": "outputs/private",
    "use_cpu": True,
    "max_steps": 300,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 32,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 10,
    "max_grad_norm": 1.0,
    "logging_steps": 10,
    "logging_first_step": True,
    "eval_strategy": "no",
    "save_strategy": "steps",
    "save_steps": 0.25,
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 42,
    "dataloader_num_workers": 0,
}
HELP_OVERRIDES = {
    "max_grad_norm": "DP-SGD's per-example clipping norm C (every example's gradient is clipped to this L2 norm "
                     "before the noise is added). Trainer's own clipping is off.",
    "per_device_train_batch_size": "Expected batch size: each example joins each batch with probability "
                                   "batch size / number of training blocks (Poisson sampling).",
    "resume_from_checkpoint": "Continue a run: a checkpoint-<step> folder or True for the last one; the accountant "
                              "continues from the checkpoint's privacy_accountant.json.",
    "output_dir": "Where the model, results.json and README.md go: a new or empty folder, or an earlier output of "
                  "this script (its lightarch_output.json).",
}
EPILOG = textwrap.fill(
    "Every transformers.TrainingArguments option is accepted as well. Defaults this script changes: "
    + ", ".join(f"{k}={v}" for k, v in TRAINING_DEFAULTS.items())
    + ". --help_all lists every option (slower: it imports transformers' Trainer).",
    width=110,
)


@dataclass
class ModelArguments:
    """The SparseMoe trained from scratch (the aux-loss-free bias update and router jitter are switched off)."""

    preset: str = field(default="tiny", metadata={"help": "SparseMoeConfig preset (SparseMoeConfig.presets())."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "SparseMoeConfig fields over the preset: 'key=value,key=value' or JSON."}
    )


@dataclass
class PrivacyOptions:
    """The guarantee (lightarch.training.privacy.PrivacyArguments)."""

    target_epsilon: float = field(
        default=8.0, metadata={"help": "Epsilon of the whole run; the noise is calibrated to reach at most this."}
    )
    target_delta: float | None = field(
        default=None, metadata={"help": "Delta, in (0, 1); default 1 / (number of training blocks)."}
    )
    noise_multiplier: float | None = field(
        default=None, metadata={"help": "Use this noise multiplier instead of calibrating to --target_epsilon."}
    )
    max_physical_batch_size: int | None = field(
        default=None, metadata={"help": "Run each Poisson batch in chunks of at most this many blocks (memory)."}
    )
    accountant: str = field(default="rdp", metadata={"help": "Opacus accountant: rdp, prv or gdp."})
    grad_sample_mode: str = field(
        default="hooks", metadata={"help": "hooks (per-sample gradients) or ghost (ghost / fast gradient clipping: "
                                   "per-example norms only, less memory; the same step, noise and epsilon)."}
    )


@dataclass
class RunArguments:
    """Data size and the time budget."""

    block_size: int = field(default=128, metadata={"help": "Tokens per training block (one private example)."})
    max_train_files: int = field(default=300, metadata={"help": "Use at most this many standard-library files."})
    max_eval_files: int = field(default=12, metadata={"help": "Held-out files."})
    max_file_bytes: int = field(default=60_000, metadata={"help": "Skip files larger than this (0: no limit)."})
    source_dir: str | None = field(
        default=None, metadata={"help": "Folder whose *.py files form the corpus (default: the standard library)."}
    )
    time_budget_minutes: float = field(
        default=9.0, metadata={"help": "Wall-clock budget of the run in minutes (fewer steps: a smaller epsilon); "
                               "0 disables it."}
    )


SCRIPT_ARGUMENTS = (ModelArguments, PrivacyOptions, RunArguments)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept, every default shown."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help_all" not in argv:  # answer --help before the slow imports
        HfArgumentParser(SCRIPT_ARGUMENTS, description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter,
                         allow_abbrev=False).parse_known_args(argv)

    import transformers
    from lightarch import SparseMoeConfig
    from lightarch.data.corpus import load_corpus
    from lightarch.training.checkpoints import resolve_resume
    from lightarch.training.cli import config_from_preset, script_parser
    from lightarch.training.privacy import PrivacyArguments, check_privacy_arguments
    from lightarch.training.privacy.recipe import train_private
    from lightarch.training.sparse_moe import prepare_data
    from transformers import TrainingArguments, set_seed

    parser = script_parser((*SCRIPT_ARGUMENTS, TrainingArguments), __doc__, TRAINING_DEFAULTS, HELP_OVERRIDES)
    parser.formatter_class = HelpFormatter
    if "--help_all" in argv:
        parser.print_help()
        return
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        model_args, privacy_options, run_args, training_args = parsed
    except ValueError as error:
        parser.error(str(error))
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    try:
        config = config_from_preset(SparseMoeConfig, model_args.preset, model_args.config_overrides)
        privacy = PrivacyArguments(**asdict(privacy_options), per_sample_max_grad_norm=training_args.max_grad_norm)
        check_privacy_arguments(privacy)
        training_args.max_grad_norm = 0.0  # the clipping is per example, inside DP-SGD
        if run_args.block_size < 2:
            raise ValueError(f"--block_size must be >= 2, got {run_args.block_size}.")
        training_args.resume_from_checkpoint = resolve_resume(training_args.resume_from_checkpoint,
                                                              training_args.output_dir)
    except ValueError as error:
        parser.error(str(error))

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    corpus = load_corpus(source_dir=run_args.source_dir, max_train_files=run_args.max_train_files,
                         max_eval_files=run_args.max_eval_files, max_file_bytes=run_args.max_file_bytes)
    try:
        data = prepare_data(corpus, config.vocab_size, run_args.block_size,
                            tokenizer_dir=training_args.resume_from_checkpoint)
        train_private(config, training_args, privacy, data, run_args.time_budget_minutes, started=PROCESS_START)
    except ValueError as error:  # too little data, or a setting that voids the guarantee
        parser.error(str(error))


if __name__ == "__main__":
    main()
