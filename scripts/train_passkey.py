#!/usr/bin/env python
"""Train a small hybrid SparseMoe from scratch on passkey retrieval, on CPU (the recipe: lightarch.training.passkey).

The default model is the `passkey` preset: 993K parameters, three rotary sliding layers with a 32-token window and one
global NoPE layer with Llama 4 attention temperature tuning (iRoPE); --preset and --config_overrides change it.
Examples are generated on the fly (a 5-digit key hidden at a random depth in filler text, the loss on the answer
digits and the key's echo), with a length curriculum from --min_length to --max_length.

The defaults take about 5 CPU-minutes (--time_budget_minutes stops training earlier if the machine is slower), then
measure greedy exact-match accuracy at --max_length and save into --output_dir (default outputs/passkey), the model
first, atomically:

    model.safetensors, config.json, *.py            the model (AutoModelForCausalLM, trust_remote_code)
    tokenizer.json, tokenizer_config.json           the tiny word-level tokenizer (AutoTokenizer)
    results.json, README.md, training.png           measured results, model card, loss / length curves

    python scripts/train_passkey.py
    python scripts/train_passkey.py --max_steps 2000 --time_budget_minutes 40 --output_dir outputs/passkey_long
    python scripts/train_passkey.py --config_overrides 'no_rope_layers=null'   # rotary on the global layer too
    python scripts/eval_long_context.py --model outputs/passkey
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from dataclasses import dataclass, field, fields

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# TrainingArguments defaults this script changes (listed by --help).
TRAINING_DEFAULTS = {
    "output_dir": "outputs/passkey",
    "use_cpu": True,
    "max_steps": 1500,
    "per_device_train_batch_size": 1,  # each streamed item is a whole batch of about --tokens_per_batch tokens
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 30,
    "weight_decay": 0.05,
    "max_grad_norm": 1.0,
    "adam_beta2": 0.98,
    "logging_steps": 25,
    "logging_first_step": True,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "dataloader_num_workers": 0,
    "disable_tqdm": False,
}
EPILOG = textwrap.fill(
    "Every transformers.TrainingArguments option is accepted as well (--max_steps, --learning_rate, --seed, "
    "--output_dir, ...). Defaults this script changes: " + ", ".join(f"{k}={v}" for k, v in TRAINING_DEFAULTS.items())
    + ". --help_all lists every option (slower: it imports transformers' Trainer).",
    width=110,
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout (examples) kept, every default shown."""


@dataclass
class PasskeyArguments:
    preset: str = field(
        default="passkey",
        metadata={"help": "SparseMoeConfig preset, the architecture (SparseMoeConfig.presets() lists them); "
                          "'passkey' is the 993K-parameter iRoPE hybrid this task was tuned on. The vocabulary size "
                          "and special-token ids must be the passkey tokenizer's, as in 'passkey'."},
    )
    config_overrides: str = field(
        default="",
        metadata={"help": "SparseMoeConfig fields over the preset, 'key=value,...' (JSON values), e.g. "
                          "'sliding_window=64,floor_scale=64' or 'no_rope_layers=null' (rotary global layer)."},
    )
    min_length: int = field(default=96, metadata={"help": "Shortest training example, tokens (prompt + answer)."})
    max_length: int = field(
        default=256, metadata={"help": "Longest training example, tokens (prompt + answer); the final accuracy is "
                                       "measured at this length."}
    )
    curriculum_fraction: float = field(
        default=0.6,
        metadata={"help": "The maximum length grows linearly from --min_length to --max_length over this fraction of "
                          "the steps; each batch's length is uniform between --min_length and that maximum."},
    )
    length_multiple: int = field(default=16, metadata={"help": "Batch lengths are rounded to a multiple of this."})
    tokens_per_batch: int = field(
        default=2048,
        metadata={"help": "Tokens per optimizer step (per accumulation step): a batch of length L holds "
                          "max(1, tokens_per_batch // L) examples, so every step costs about the same "
                          "(--per_device_train_batch_size must stay 1)."},
    )
    label_key_echo: bool = field(
        default=True, metadata={"help": "Also train on the key's second occurrence inside the key line."}
    )
    edge_depth_fraction: float = field(
        default=0.2,
        metadata={"help": "Fraction of examples with the key at exactly depth 0.0 or 1.0 (half each) instead of a "
                          "uniform depth: two cases a uniform depth almost never gives."},
    )
    distractors: int = field(
        default=4,
        metadata={"help": "Up to this many other 5-digit numbers in each example's filler ('The sky is 40817.'), so "
                          "the model learns to return the number after 'pass key'; the final evaluation uses N. "
                          "0 = the classic task."},
    )
    eval_samples: int = field(
        default=10, metadata={"help": "Prompts per depth for the final accuracy at --max_length (5 depths)."}
    )
    time_budget_minutes: float = field(
        default=13.0,
        metadata={"help": "Stop training (and still evaluate and save) before the next step would pass this much "
                          "wall time; 0 = no limit. The default --max_steps takes about 5 CPU-minutes."},
    )
    num_threads: int = field(
        default=0,
        metadata={"help": "torch threads; 0 = the available CPUs minus the other processes running at start (at "
                          "least 1): threads waiting for descheduled siblings slow small ops down badly."},
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help_all" not in argv:  # answer --help before the slow imports
        HfArgumentParser(PasskeyArguments, description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter,
                         allow_abbrev=False).parse_known_args(argv)

    import torch
    from transformers import TrainingArguments

    from lightarch import SparseMoeConfig
    from lightarch.data.passkey import PasskeyCurriculum
    from lightarch.training.cli import available_cpus, config_from_preset, other_running_processes, script_parser
    from lightarch.training.passkey import check_passkey_run, train_passkey

    parser = script_parser((PasskeyArguments, TrainingArguments), __doc__, TRAINING_DEFAULTS)
    parser.formatter_class = HelpFormatter
    if "--help_all" in argv:
        parser.print_help()
        return
    try:
        args, training_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
        config = config_from_preset(SparseMoeConfig, args.preset, args.config_overrides)
        curriculum = PasskeyCurriculum(**{f.name: getattr(args, f.name) for f in fields(PasskeyCurriculum)})
        check_passkey_run(config, training_args, curriculum, args.eval_samples)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    torch.set_num_threads(args.num_threads or max(1, available_cpus() - other_running_processes()))
    train_passkey(config, training_args, curriculum, eval_samples=args.eval_samples,
                  time_budget_minutes=args.time_budget_minutes)


if __name__ == "__main__":
    main()
