#!/usr/bin/env python
"""Audit differential privacy with canaries: train the same SparseMoe for the same steps with and without DP-SGD on
the standard-library corpus with random secrets inserted 1, 4 and 16 times, then measure each secret's exposure
(Carlini et al.'s secret sharer) and a loss-based membership-inference test (TPR at 1% FPR, AUC) against secrets
never inserted. Writes audit.json, audit.md (table) and audit.png into --output_dir (default outputs/privacy_audit).

The work is lightarch.training.privacy (audit, recipe.audit_privacy).

Examples:
    python scripts/audit_privacy.py
    python scripts/audit_privacy.py --target_epsilon 8 --max_steps 600 --canaries_per_group 50
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from dataclasses import asdict, dataclass, field

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see scripts/train.py

from transformers.hf_argparser import HfArgumentParser

TRAINING_DEFAULTS = {
    "output_dir": "outputs/privacy_audit",
    "use_cpu": True,
    "max_steps": 300,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 32,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 10,
    "max_grad_norm": 1.0,
    "logging_steps": 20,
    "report_to": "none",
    "seed": 42,
    "dataloader_num_workers": 0,
}
HELP_OVERRIDES = {
    "max_grad_norm": "Per-example clipping norm of the DP run (the non-DP run clips its batch gradient to it).",
    "output_dir": "Where audit.json, audit.md and audit.png go: a new or empty folder, or an earlier audit.",
}
EPILOG = textwrap.fill(
    "Every transformers.TrainingArguments option is accepted as well (both runs use them). Defaults this script "
    "changes: " + ", ".join(f"{k}={v}" for k, v in TRAINING_DEFAULTS.items()) + ".", width=110,
)


@dataclass
class AuditArguments:
    """The model, the guarantee of the DP run, and the canaries."""

    preset: str = field(default="tiny", metadata={"help": "SparseMoeConfig preset (SparseMoeConfig.presets())."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "SparseMoeConfig fields over the preset: 'key=value,key=value' or JSON."}
    )
    target_epsilon: float = field(default=8.0, metadata={"help": "Epsilon of the DP run (delta = 1/N)."})
    noise_multiplier: float | None = field(
        default=None, metadata={"help": "Noise multiplier of the DP run instead of calibrating to --target_epsilon."}
    )
    canaries_per_group: int = field(default=20, metadata={"help": "Secrets inserted 1x, 4x and 16x, each."})
    non_members: int = field(default=200, metadata={"help": "Secrets never inserted (membership inference)."})
    references: int = field(default=1000, metadata={"help": "Random secrets ranking each canary (exposure)."})
    digits: int = field(default=9, metadata={"help": "Digits per secret."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training block."})
    max_train_files: int = field(default=300, metadata={"help": "Standard-library files to train on."})
    max_eval_files: int = field(default=12, metadata={"help": "Held-out files."})
    max_file_bytes: int = field(default=60_000, metadata={"help": "Skip files larger than this (0: no limit)."})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept, every default shown."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    HfArgumentParser((AuditArguments,), description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter,
                     allow_abbrev=False).parse_known_args(argv)  # --help before the slow imports

    import transformers
    from lightarch import SparseMoeConfig
    from lightarch.data.corpus import load_corpus
    from lightarch.training.cli import config_from_preset, script_parser
    from lightarch.training.privacy import PrivacyArguments, check_privacy_arguments
    from lightarch.training.privacy.audit import make_canaries
    from lightarch.training.privacy.recipe import audit_privacy
    from transformers import TrainingArguments, set_seed

    parser = script_parser((AuditArguments, TrainingArguments), __doc__, TRAINING_DEFAULTS, HELP_OVERRIDES)
    parser.formatter_class = HelpFormatter
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        audit_args, training_args = parsed
    except ValueError as error:
        parser.error(str(error))
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    options = asdict(audit_args)
    try:
        config = config_from_preset(SparseMoeConfig, options.pop("preset"), options.pop("config_overrides"))
        privacy = PrivacyArguments(target_epsilon=options.pop("target_epsilon"),
                                   noise_multiplier=options.pop("noise_multiplier"),
                                   per_sample_max_grad_norm=training_args.max_grad_norm)
        check_privacy_arguments(privacy)
        canaries = make_canaries(options.pop("canaries_per_group"), options.pop("non_members"),
                                 options.pop("references"), options.pop("digits"), seed=training_args.seed)
        if options["block_size"] < 2:
            raise ValueError(f"--block_size must be >= 2, got {options['block_size']}.")
    except ValueError as error:
        parser.error(str(error))

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    corpus = load_corpus(max_train_files=options["max_train_files"], max_eval_files=options["max_eval_files"],
                         max_file_bytes=options["max_file_bytes"])
    try:
        audit_privacy(config, training_args, privacy, corpus, options["block_size"], canaries, seed=training_args.seed)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
