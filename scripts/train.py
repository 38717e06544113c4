#!/usr/bin/env python
"""Train a small lightarch SparseMoe causal LM from scratch on CPU (in the spirit of transformers' run_clm.py).

With no arguments it trains the `tiny` preset on the Python standard library's source code, split by file into train
and held-out sets, with a byte-level BPE tokenizer (of the preset's vocab_size) trained on the train split, and
finishes in under ten minutes on two CPU cores. It writes into --output_dir (default outputs/sparse_moe):

    model.safetensors, config.json, generation_config.json, *.py   the model (AutoModelForCausalLM, trust_remote_code)
    tokenizer.json, tokenizer_config.json                          the tokenizer (AutoTokenizer)
    results.json, sample.txt                                       measured results and a greedy completion
    README.md, loss_curves.png, expert_load.png                    model card and plots
    checkpoint-*/                                                  Trainer checkpoints (--resume_from_checkpoint)

The model, tokenizer and results are written into a temporary sibling folder and swapped into place, so a crash never
leaves a half-written model; the card and plots are written after it. The work is lightarch.training.sparse_moe.

Examples:
    python scripts/train.py
    python scripts/train.py --max_steps 600 --output_dir outputs/longer
    python scripts/train.py --preset realtime --output_dir outputs/realtime      # top-2 routing
    python scripts/train.py --config_overrides 'num_experts=16,router_top_p=0.6'
    python scripts/train.py --resume_from_checkpoint True          # continue from the last checkpoint
    python scripts/train.py --train_file corpus.txt --validation_file heldout.txt --block_size 128
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
# OpenMP threads that spin while waiting make torch 4-20x slower when the cores are shared with other processes
# (measured on 2 cores: 0.6 s vs 2.4-15 s per step). Passive waiting is cheap for training's large operations but
# slows many small ones (tiny-model inference: 2.5x), so it is set for this script's own run only, never on import
# (a process spawned by an importer would inherit it). It must be set before torch loads OpenMP.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from transformers.hf_argparser import HfArgumentParser  # noqa: E402  (no torch: --help stays fast)

# Defaults for transformers.TrainingArguments when the command line does not set them. max_steps fits well within
# the time budget on an idle 2-core machine; --time_budget_minutes cuts training short on a busy one.
TRAINING_DEFAULTS = {
    "output_dir": "outputs/sparse_moe",
    "use_cpu": True,
    "max_steps": 600,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 20,
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "logging_steps": 10,
    "logging_first_step": True,
    "eval_strategy": "steps",
    "eval_steps": 0.25,  # a fraction of max_steps: 4 held-out evaluations, the last one at the end
    "save_strategy": "steps",
    "save_steps": 0.25,
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 42,
    "dataloader_num_workers": 0,
}
HELP_OVERRIDES = {
    "resume_from_checkpoint": (
        "Continue an interrupted run: a checkpoint-<step> folder, or True for the last complete checkpoint in "
        "--output_dir. The tokenizer and model config come from the checkpoint; data preparation is deterministic, "
        "so training continues on the same data order from the saved step."
    ),
    "output_dir": (
        "Where the final model, tokenizer, results.json, sample.txt, README.md and plots are written (the model "
        "atomically, first), with Trainer's checkpoint-<step> folders inside it: a new or empty folder, or an earlier "
        "output of this script (its lightarch_output.json); any other folder is refused."
    ),
}
EPILOG = textwrap.fill(
    "Every transformers.TrainingArguments option is accepted as well (--max_steps, --learning_rate, "
    "--resume_from_checkpoint True, --output_dir, ...). Defaults this script changes: "
    + ", ".join(f"{k}={v}" for k, v in TRAINING_DEFAULTS.items())
    + ". --help_all lists every option (slower: it imports transformers' Trainer).",
    width=110,
)


@dataclass
class ModelArguments:
    """The SparseMoe trained from scratch (ignored when resuming: the checkpoint's config is used)."""

    preset: str = field(
        default="tiny",
        metadata={"help": "SparseMoeConfig preset (SparseMoeConfig.presets()): 'tiny' is the main job's model (~1.7M "
                  "parameters, top-p routing), 'realtime' the inference benchmark's (top-2 routing). Its vocab_size "
                  "sizes the BPE tokenizer trained on the corpus."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "SparseMoeConfig fields over the preset: 'key=value,key=value' (values parsed as JSON when "
                  "possible, e.g. 'hidden_size=128,use_qk_norm=true,vocab_size=4096') or a JSON object "
                  "('{\"layer_types\": [\"full_attention\", \"sliding_attention\"]}')."},
    )


@dataclass
class DataArguments:
    """What to train on (lightarch.data.corpus.load_corpus). Default: the Python standard library, split by file."""

    train_file: str | None = field(
        default=None,
        metadata={"help": "A UTF-8 text file to train on instead of the standard library. Without --validation_file "
                  "its last validation_fraction of lines is held out."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "A UTF-8 text file for held-out evaluation (requires --train_file)."}
    )
    source_dir: str | None = field(
        default=None,
        metadata={"help": "Folder whose *.py files form the corpus (default: the standard library, "
                  "sysconfig.get_paths()['stdlib']; site-packages and the codec tables in encodings/ excluded). "
                  "Ignored with --train_file."},
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of the files held out (chosen by a hash of their relative path), in [0, 1). "
                  "With --train_file and no --validation_file: the fraction of lines held out."},
    )
    max_train_files: int = field(
        default=300, metadata={"help": "Use at most this many training files (caps data preparation time)."}
    )
    max_eval_files: int = field(default=12, metadata={"help": "Use at most this many held-out files."})
    max_file_bytes: int = field(
        default=60_000, metadata={"help": "Skip source files larger than this many bytes (0: no limit)."}
    )


@dataclass
class RunArguments:
    """Blocks, tokenizer training, the time budget and the sample completion."""

    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence (>= 2)."})
    tokenizer_min_frequency: int = field(
        default=2, metadata={"help": "Minimum count of a pair for the BPE trainer to merge it."}
    )
    time_budget_minutes: float = field(
        default=9.0,
        metadata={"help": "Wall-clock budget of the whole run (start to saved outputs), in minutes. Training ends "
                  "before max_steps if going on would leave no time for the final evaluation and saving; the step "
                  "reached is checkpointed, and --resume_from_checkpoint True continues it. On an idle 2-core "
                  "machine the default run reaches max_steps well within it. 0 disables it."},
    )
    sample_prompt: str = field(
        default="def fibonacci(n):\n", metadata={"help": "Prompt of the greedy completion saved in sample.txt."}
    )
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Tokens to generate for sample.txt."})


SCRIPT_ARGUMENTS = (ModelArguments, DataArguments, RunArguments)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout (examples) kept, every default shown."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help_all" not in argv:  # answer --help before the slow imports
        HfArgumentParser(SCRIPT_ARGUMENTS, description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter,
                         allow_abbrev=False).parse_known_args(argv)

    import transformers
    from transformers import TrainingArguments, set_seed

    from lightarch import SparseMoeConfig
    from lightarch.data.corpus import check_corpus_options, load_corpus
    from lightarch.training.cli import config_from_preset, script_parser
    from lightarch.training.checkpoints import check_output_dir, resolve_resume
    from lightarch.training.sparse_moe import check_train_options, prepare_data, train_sparse_moe

    parser = script_parser((*SCRIPT_ARGUMENTS, TrainingArguments), __doc__, TRAINING_DEFAULTS, HELP_OVERRIDES)
    parser.formatter_class = HelpFormatter
    if "--help_all" in argv:
        parser.print_help()
        return
    try:
        model_args, data_args, run_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # TrainingArguments.__post_init__ checks
        parser.error(str(error))
    try:
        check_corpus_options(**asdict(data_args))
        config = config_from_preset(SparseMoeConfig, model_args.preset, model_args.config_overrides)
        check_train_options(config, training_args, **asdict(run_args))
        check_output_dir(training_args.output_dir, "train.py", inputs={  # the data files are inputs too
            "--train_file": data_args.train_file, "--validation_file": data_args.validation_file,
            "--source_dir": data_args.source_dir})
        training_args.resume_from_checkpoint = resolve_resume(training_args.resume_from_checkpoint,
                                                              training_args.output_dir)
    except ValueError as error:
        parser.error(str(error))

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    corpus = load_corpus(**asdict(data_args))
    try:
        data = prepare_data(corpus, config.vocab_size, run_args.block_size, run_args.tokenizer_min_frequency,
                            tokenizer_dir=training_args.resume_from_checkpoint)
    except ValueError as error:  # too little data for one block
        parser.error(str(error))
    train_sparse_moe(config, training_args, data, run_args.time_budget_minutes, run_args.sample_prompt,
                     run_args.sample_max_new_tokens, started=PROCESS_START)


if __name__ == "__main__":
    main()
