#!/usr/bin/env python
"""Train a small lightarch SparseMoe causal LM from scratch on CPU (in the spirit of transformers' run_clm.py).

With no arguments it trains on the Python standard library's source code, split by file into train and held-out
sets, with a byte-level BPE tokenizer trained on the train split, and finishes in under ten minutes on two CPU
cores. It writes into --output_dir (default outputs/sparse_moe):

    model.safetensors, config.json, generation_config.json, *.py   the model (AutoModelForCausalLM, trust_remote_code)
    tokenizer.json, tokenizer_config.json                          the tokenizer (AutoTokenizer)
    README.md, results.json                                        model card and measured results
    loss_curves.png, expert_load.png, sample.txt                   plots and a greedy completion
    checkpoint-*/                                                  Trainer checkpoints (--resume_from_checkpoint)

The final files are written into a temporary sibling folder and swapped into place, so a crash never leaves a
half-written model. Every transformers.TrainingArguments option is accepted; see --help.

Examples:
    python scripts/train.py
    python scripts/train.py --max_steps 600 --output_dir outputs/longer
    python scripts/train.py --resume_from_checkpoint True          # continue from the last checkpoint
    python scripts/train.py --train_file corpus.txt --validation_file heldout.txt --block_size 128
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

PROCESS_START = time.perf_counter()  # the time budget counts the imports below too
# OpenMP threads that spin while waiting make torch 4-20x slower when the cores are shared with other processes
# (measured on 2 cores: 0.6 s vs 2.4-15 s per step). Passive waiting is cheap for training's large operations but
# slows many small ones (tiny-model inference: 2.5x), so it is set for this script's own run only, never on import
# (a process spawned by an importer would inherit it). It must be set before torch loads OpenMP.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import lightarch  # noqa: E402,F401  (registers the lightarch Auto classes)
from lightarch import SparseMoeConfig  # noqa: E402
from lightarch import SparseMoeForCausalLM  # noqa: E402
from lightarch.data.corpus import (
    BlockDataset,
    token_blocks,
    list_source_files,
    read_text_files,
    split_by_file,
    split_text_tail,
    tokenize_documents,
)
from lightarch.training.callbacks import MoeStatsCallback, TimeBudgetCallback
from lightarch.training.checkpoints import atomic_save_pretrained, last_complete_checkpoint
from lightarch.evaluation.model_cards import code_fence, model_card_template, render_model_card
from lightarch.evaluation.parameters import parameter_counts
from lightarch.training.cli import parse_config_overrides, script_parser
from lightarch.evaluation.plots import plot_expert_load, plot_loss_curves
from lightarch.data.tokenizers import train_bpe_tokenizer
from lightarch.evaluation.perplexity import unigram_perplexity

logger = logging.getLogger("train")

# Not source code worth learning from: installed packages, bytecode caches, and encodings/ (codec tables).
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__", "encodings")
# Entries of an existing output_dir that a new final save keeps (everything else there is replaced).
KEEP_IN_OUTPUT_DIR = ("checkpoint-*", "runs")  # Trainer's checkpoints and TensorBoard logs

# Defaults for transformers.TrainingArguments when the command line does not set them (shown by --help).
# max_steps fits well within the time budget on an idle 2-core machine; --time_budget_minutes cuts training short
# on a busy one.
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


@dataclass
class ModelArguments:
    """The SparseMoe architecture trained from scratch (ignored when resuming: the checkpoint's config is used)."""

    hidden_size: int = field(default=96, metadata={"help": "Width of the residual stream."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Number of decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Query heads per attention layer."})
    num_key_value_heads: int = field(
        default=2, metadata={"help": "Key/value heads (grouped-query attention); must divide num_attention_heads."}
    )
    full_attention_interval: int = field(
        default=4,
        metadata={
            "help": "Hybrid attention: every N-th layer (N, 2N, ...) uses full attention, the others sliding-window "
            "attention. 4 gives 3 sliding : 1 full; 1 makes every layer full attention."
        },
    )
    sliding_window: int = field(default=64, metadata={"help": "Tokens a sliding-attention layer looks back over."})
    max_position_embeddings: int = field(
        default=1024, metadata={"help": "Longest sequence the model accepts (must be >= block_size)."}
    )
    num_experts: int = field(default=8, metadata={"help": "Routed experts per MoE layer."})
    moe_intermediate_size: int = field(default=128, metadata={"help": "Hidden width of each SwiGLU expert."})
    num_shared_experts: int = field(
        default=0, metadata={"help": "Experts every token uses in addition to the routed ones (DeepSeekMoE)."}
    )
    first_k_dense_layers: int = field(
        default=0, metadata={"help": "The first K layers use a dense SwiGLU MLP instead of experts."}
    )
    intermediate_size: int = field(
        default=384, metadata={"help": "Hidden width of the dense MLP of the first_k_dense_layers layers."}
    )
    router_mode: str = field(
        default="top_p",
        metadata={
            "help": "Routing: 'top_p' (dynamic: a token takes experts in order of probability until their mass "
            "reaches router_top_p, at most max_experts_per_token) or 'top_k' (always num_experts_per_tok).",
            "choices": ["top_p", "top_k"],
        },
    )
    router_top_p: float = field(default=0.5, metadata={"help": "Probability mass to cover in top_p routing, (0, 1]."})
    max_experts_per_token: int = field(default=3, metadata={"help": "Upper bound on experts per token (top_p)."})
    num_experts_per_tok: int = field(default=2, metadata={"help": "Experts per token in top_k routing."})
    router_aux_loss_coef: float = field(
        default=0.01, metadata={"help": "Weight of the Switch-Transformer load-balancing loss added to the loss."}
    )
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "Weight of the ST-MoE router z-loss."})
    router_bias_update_rate: float = field(
        default=0.0,
        metadata={"help": "DeepSeek-V3 auxiliary-loss-free balancing: per-step bias update rate (0 disables it)."},
    )
    tie_word_embeddings: bool = field(
        default=False, metadata={"help": "Share the input embedding matrix with the output projection."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Further SparseMoeConfig fields, applied last: 'key=value,key=value' (values parsed as JSON "
            "when possible, e.g. 'rms_norm_eps=1e-5,use_qk_norm=true') or a JSON object "
            "('{\"layer_types\": [\"full_attention\", \"sliding_attention\"]}')."
        },
    )


@dataclass
class DataArguments:
    """What to train on. Default: the Python standard library's *.py files, split by file."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "A UTF-8 text file to train on instead of the standard library. Without --validation_file "
            "its last validation_fraction of lines is held out."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "A UTF-8 text file for held-out evaluation (requires --train_file)."}
    )
    source_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder whose *.py files form the corpus (default: the standard library, "
            "sysconfig.get_paths()['stdlib']; site-packages and the codec tables in encodings/ excluded). "
            "Ignored with --train_file."
        },
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of the files held out (chosen by a hash of their relative path), in [0, 1). "
            "With --train_file and no --validation_file: the fraction of lines held out."
        },
    )
    max_train_files: int = field(
        default=300, metadata={"help": "Use at most this many training files (caps data preparation time)."}
    )
    max_eval_files: int = field(default=12, metadata={"help": "Use at most this many held-out files."})
    max_file_bytes: int = field(
        default=60_000, metadata={"help": "Skip source files larger than this many bytes (0: no limit)."}
    )
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence (>= 2)."})
    vocab_size: int = field(
        default=2048,
        metadata={"help": "Size of the byte-level BPE vocabulary trained on the train split (>= 259: 256 bytes + 3 "
                  "special tokens)."},
    )
    tokenizer_min_frequency: int = field(
        default=2, metadata={"help": "Minimum count of a pair for the BPE trainer to merge it."}
    )


@dataclass
class ScriptTrainingArguments(TrainingArguments):
    """transformers.TrainingArguments (all of them) plus a training time budget and the sample completion."""

    time_budget_minutes: float = field(
        default=9.0,
        metadata={
            "help": "Wall-clock budget of the whole run (start to saved outputs), in minutes. Training ends before "
            "max_steps if going on would leave no time for the final evaluation and saving; the step reached is "
            "checkpointed, and --resume_from_checkpoint True continues it. On an idle 2-core machine the default "
            "run reaches max_steps well within it. 0 disables it."
        },
    )
    sample_prompt: str = field(
        default="def fibonacci(n):\n", metadata={"help": "Prompt of the greedy completion saved in sample.txt."}
    )
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Tokens to generate for sample.txt."})


def build_parser() -> HfArgumentParser:
    return script_parser(
        (ModelArguments, DataArguments, ScriptTrainingArguments),
        description=__doc__.split("\n\n")[0],
        training_defaults=TRAINING_DEFAULTS,
        help_overrides={
            "resume_from_checkpoint": (
                "Continue an interrupted run: a checkpoint-<step> folder, or True for the last complete checkpoint "
                "in --output_dir. The tokenizer and model config come from the checkpoint; data preparation is "
                "deterministic, so training continues on the same data order from the saved step."
            ),
            "output_dir": (
                "Where the final model, tokenizer, README.md, results.json, plots and sample.txt are written "
                "(atomically), with Trainer's checkpoint-<step> folders inside it."
            ),
        },
    )


def build_config(model_args: ModelArguments, vocab_size: int, block_size: int, special_ids: dict) -> SparseMoeConfig:
    """The SparseMoeConfig for the model arguments (raises ValueError naming the option at fault)."""
    interval = model_args.full_attention_interval
    if interval < 1:
        raise ValueError(f"--full_attention_interval must be >= 1, got {interval}.")
    layer_types = [
        "full_attention" if (i + 1) % interval == 0 else "sliding_attention"
        for i in range(model_args.num_hidden_layers)
    ]
    kwargs = {
        name: getattr(model_args, name)
        for name in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "sliding_window",
            "max_position_embeddings", "num_experts", "moe_intermediate_size", "num_shared_experts",
            "first_k_dense_layers", "intermediate_size", "router_mode", "router_top_p", "max_experts_per_token",
            "num_experts_per_tok", "router_aux_loss_coef", "router_z_loss_coef", "router_bias_update_rate",
            "tie_word_embeddings",
        )
    }
    kwargs.update(vocab_size=vocab_size, layer_types=layer_types, **special_ids)
    if model_args.config_overrides:
        try:
            overrides = parse_config_overrides(model_args.config_overrides)
        except ValueError as error:
            raise ValueError(f"--config_overrides: {error}") from None
        known = SparseMoeConfig().to_dict()
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"--config_overrides: unknown SparseMoeConfig field(s) {unknown}.")
        kwargs.update(overrides)
    if kwargs["max_position_embeddings"] < block_size:
        raise ValueError(
            f"--max_position_embeddings ({kwargs['max_position_embeddings']}) must be >= --block_size ({block_size})."
        )
    try:
        return SparseMoeConfig(**kwargs)
    except (ValueError, TypeError) as error:
        raise ValueError(f"invalid model options: {error} (each field is set by the option of the same name, "
                         "e.g. --num_key_value_heads, or by --config_overrides)") from None
    except Exception as error:  # strict dataclass validation errors
        raise ValueError(f"invalid model options: {error}") from None


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint: None / 'false' -> None; 'true' / 'latest' -> last complete checkpoint; else path."""
    if value is None or value.strip().lower() in ("", "false", "no", "0", "none"):
        return None
    if value.strip().lower() in ("true", "yes", "1", "latest", "last"):
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(
                f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in --output_dir {output_dir}. "
                "Pass a checkpoint path, or drop the option to start from scratch."
            )
        return checkpoint
    if not (Path(value) / "trainer_state.json").is_file():
        raise ValueError(
            f"--resume_from_checkpoint {value}: not a complete Trainer checkpoint (no trainer_state.json). "
            "Pass a checkpoint-<step> folder, or True for the last one in --output_dir."
        )
    return value


def parse_args(argv: list[str] | None = None):
    """Parse and validate everything that can be checked before any data preparation or training.

    Invalid values end the program through `parser.error` (exit code 2, a message naming the option).
    """
    parser = build_parser()
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # TrainingArguments.__post_init__ checks
        parser.error(str(error))

    def check(condition: bool, message: str) -> None:
        if not condition:
            parser.error(message)

    check(data_args.block_size >= 2, f"--block_size must be >= 2 (one input and one target), got {data_args.block_size}.")
    check(0.0 <= data_args.validation_fraction < 1.0,
          f"--validation_fraction must be in [0, 1), got {data_args.validation_fraction}.")
    check(data_args.vocab_size >= 259, f"--vocab_size must be >= 259 (256 bytes + 3 special tokens), got {data_args.vocab_size}.")
    check(data_args.max_train_files >= 1, f"--max_train_files must be >= 1, got {data_args.max_train_files}.")
    check(data_args.max_eval_files >= 1, f"--max_eval_files must be >= 1, got {data_args.max_eval_files}.")
    check(data_args.max_file_bytes >= 0, f"--max_file_bytes must be >= 0, got {data_args.max_file_bytes}.")
    check(data_args.tokenizer_min_frequency >= 1,
          f"--tokenizer_min_frequency must be >= 1, got {data_args.tokenizer_min_frequency}.")
    check(training_args.sample_max_new_tokens >= 1,
          f"--sample_max_new_tokens must be >= 1, got {training_args.sample_max_new_tokens}.")
    check(bool(training_args.sample_prompt), "--sample_prompt must not be empty.")
    if data_args.train_file is not None:
        check(Path(data_args.train_file).is_file(), f"--train_file {data_args.train_file}: no such file.")
    if data_args.validation_file is not None:
        check(data_args.train_file is not None, "--validation_file requires --train_file.")
        check(Path(data_args.validation_file).is_file(), f"--validation_file {data_args.validation_file}: no such file.")
    if data_args.train_file is None:
        source_dir = data_args.source_dir or sysconfig.get_paths()["stdlib"]
        check(Path(source_dir).is_dir(), f"--source_dir {source_dir}: no such folder.")
    if data_args.validation_file is None:
        check(data_args.validation_fraction > 0,
              "--validation_fraction must be > 0 to hold out data for evaluation (or pass --validation_file).")
    check(training_args.max_steps > 0 or training_args.num_train_epochs > 0,
          "--max_steps (or --num_train_epochs) must be positive.")
    check(training_args.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be >= 1.")
    check(training_args.time_budget_minutes >= 0,
          f"--time_budget_minutes must be >= 0, got {training_args.time_budget_minutes}.")
    check(training_args.per_device_eval_batch_size >= 1, "--per_device_eval_batch_size must be >= 1.")
    for name in ("logging_steps", "eval_steps", "save_steps"):
        value = getattr(training_args, name)
        check(value is None or value > 0,
              f"--{name} must be > 0 (a number of steps, or a fraction of max_steps below 1), got {value}.")

    try:
        build_config(model_args, data_args.vocab_size, data_args.block_size,
                     {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
        resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    except ValueError as error:
        parser.error(str(error))
    training_args.resume_from_checkpoint = resume

    output_dir = Path(training_args.output_dir)
    check(not output_dir.exists() or output_dir.is_dir(), f"--output_dir {output_dir} is a file, not a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        ours = (output_dir / "results.json").is_file() or any(output_dir.glob("checkpoint-*"))
        check(ours, f"--output_dir {output_dir} is not empty and does not hold a previous run of this script; "
                    "its contents would be replaced. Choose another --output_dir.")
    return model_args, data_args, training_args


def load_corpus(data_args: DataArguments) -> dict:
    """Train and held-out texts plus a description of where they came from."""
    if data_args.train_file is not None:
        text = Path(data_args.train_file).read_text(encoding="utf-8")
        if data_args.validation_file is not None:
            train_text, eval_text = text, Path(data_args.validation_file).read_text(encoding="utf-8")
            heldout = f"Held out: `{Path(data_args.validation_file).name}`."
        else:
            train_text, eval_text = split_text_tail(text, data_args.validation_fraction)
            heldout = f"Held out: the last {data_args.validation_fraction:.0%} of the lines of the training file."
        return {
            "train_texts": [train_text], "eval_texts": [eval_text] if eval_text.strip() else [],
            "train_files": [data_args.train_file], "eval_files": [data_args.validation_file or data_args.train_file],
            "description": f"The text file `{Path(data_args.train_file).name}`.",
            "short": f"the text file {Path(data_args.train_file).name}", "heldout": heldout,
            "dataset_type": "text", "dataset_name": Path(data_args.train_file).name,
        }

    root = data_args.source_dir or sysconfig.get_paths()["stdlib"]
    paths = list_source_files(root, "*.py", exclude_dirs=STDLIB_EXCLUDED_DIRS)
    train_paths, eval_paths = split_by_file(paths, data_args.validation_fraction)
    max_bytes = data_args.max_file_bytes or None
    train_texts, train_used = read_text_files(root, train_paths, data_args.max_train_files, max_bytes)
    eval_texts, eval_used = read_text_files(root, eval_paths, data_args.max_eval_files, max_bytes)
    is_stdlib = data_args.source_dir is None
    name = f"Python {sys.version_info.major}.{sys.version_info.minor} standard library" if is_stdlib else Path(root).name
    description = (
        f"Source code of the {name} (`*.py` files under `{root}`"
        + (", site-packages and the codec tables in `encodings/` excluded" if is_stdlib else "")
        + f"). Of its {len(paths)} files, {len(eval_paths)} ({data_args.validation_fraction:.0%}, chosen by a hash of "
        f"the relative path) are held out. Files over {data_args.max_file_bytes} bytes are skipped and the first "
        f"{data_args.max_train_files} training / {data_args.max_eval_files} held-out files in hash order are used."
    )
    return {
        "train_texts": train_texts, "eval_texts": eval_texts, "train_files": train_used, "eval_files": eval_used,
        "description": description, "short": f"{name} source code", "dataset_type": "python-source",
        "dataset_name": f"{name} (*.py, split by file)",
        "heldout": "No held-out file is in the training split, and the tokenizer never saw them.",
    }


def human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy completion of `prompt` (decoded without special tokens, prompt included).

    Trailing whitespace is left for the model to generate: byte-level BPE merges a newline with the indentation
    that follows it, so a prompt cut after a bare newline ends in a token the model rarely saw there.
    """
    model.eval()
    inputs = tokenizer(prompt.rstrip() or prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def main(argv: list[str] | None = None, started: float | None = None) -> dict:
    """Run the script with `argv` (default: sys.argv[1:]); returns the results (also in results.json).

    `started`: `time.perf_counter()` at the start of the run, for the time budget (default: now).
    """
    started = time.perf_counter() if started is None else started
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    stale = sorted(output_dir.glob("checkpoint-*")) if resume is None else []
    if stale:  # they would mix with this run's checkpoints (and --resume_from_checkpoint True would pick them)
        logger.warning("Starting from scratch: removing %d checkpoint(s) of an earlier run in %s (to continue that "
                       "run instead, pass --resume_from_checkpoint True).", len(stale), output_dir)
        for folder in stale:
            shutil.rmtree(folder)

    # ---- Data and tokenizer ----
    corpus = load_corpus(data_args)
    logger.info("Corpus: %d train texts (%s chars), %d held-out texts (%s chars)", len(corpus["train_texts"]),
                human(sum(map(len, corpus["train_texts"]))), len(corpus["eval_texts"]),
                human(sum(map(len, corpus["eval_texts"]))))
    if resume and (Path(resume) / "tokenizer.json").is_file():
        logger.info("Loading the tokenizer from %s", resume)
        tokenizer = AutoTokenizer.from_pretrained(resume)
    else:
        logger.info("Training a byte-level BPE tokenizer (vocab %d) on the train split", data_args.vocab_size)
        tokenizer = train_bpe_tokenizer(corpus["train_texts"], data_args.vocab_size, data_args.tokenizer_min_frequency)
    train_dataset = BlockDataset(token_blocks(
        tokenize_documents(tokenizer, corpus["train_texts"], desc="Tokenizing train"), data_args.block_size))
    eval_dataset = BlockDataset(token_blocks(
        tokenize_documents(tokenizer, corpus["eval_texts"], desc="Tokenizing held-out"), data_args.block_size))
    if len(train_dataset) == 0 or len(eval_dataset) == 0:
        raise SystemExit(
            f"error: the {'training' if len(train_dataset) == 0 else 'held-out'} data has fewer tokens than one "
            f"block (--block_size {data_args.block_size}); lower --block_size or add data."
        )
    logger.info("Blocks of %d tokens: %d train (%s tokens), %d held-out (%s tokens)", data_args.block_size,
                len(train_dataset), human(train_dataset.num_tokens), len(eval_dataset), human(eval_dataset.num_tokens))

    # ---- Model ----
    if resume:
        config = AutoConfig.from_pretrained(resume)
        logger.info("Resuming from %s (model config taken from the checkpoint)", resume)
    else:
        special_ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                       "eos_token_id": tokenizer.eos_token_id}
        config = build_config(model_args, len(tokenizer), data_args.block_size, special_ids)
    tokenizer.model_max_length = config.max_position_embeddings  # what `truncation=True` cuts to
    model = SparseMoeForCausalLM(config)
    stats = MoeStatsCallback(model)
    if resume and not stats.load_checkpoint(resume):
        logger.warning("%s has no router statistics; the plots start at the resumed step.", resume)
    logger.info("SparseMoe: %s parameters, %d layers %s, %d experts, routing %s",
                human(parameter_counts(model)["total"]), config.num_hidden_layers, config.layer_types,
                config.num_experts, config.router_mode)

    # ---- Train ----
    tokens_per_step = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                       * max(1, training_args.world_size) * data_args.block_size)
    budget = TimeBudgetCallback(
        started + 60 * training_args.time_budget_minutes if training_args.time_budget_minutes else None,
        eval_step_equivalents=eval_dataset.num_tokens / tokens_per_step,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=[stats, budget],
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    global_step = trainer.state.global_step
    if budget.stopped_at_step is not None:
        logger.warning("Stopped by the time budget (--time_budget_minutes %s) at step %d of %d; "
                       "--resume_from_checkpoint True continues it.", training_args.time_budget_minutes, global_step,
                       trainer.state.max_steps)
    if not stats.eval_history or stats.eval_history[-1]["step"] != global_step:
        trainer.evaluate()
    final = stats.eval_history[-1]

    # ---- Measure ----
    baseline_ppl = unigram_perplexity(train_dataset.blocks, eval_dataset.blocks, config.vocab_size)
    heldout_ppl = final["perplexity"]
    params = parameter_counts(model, final["experts_per_token"])
    layer_labels = [f"layer {i} ({config.layer_types[i].split('_')[0]})" for i in stats.moe_layer_indices]
    sample = generate_sample(model, tokenizer, training_args.sample_prompt, training_args.sample_max_new_tokens)
    window = min(20, len(stats.train_history)) or 1
    final_train_loss = (sum(e["loss"] for e in stats.train_history[-window:]) / window
                        if stats.train_history else train_result.training_loss)
    logger.info("Held-out perplexity %.2f (loss %.4f); unigram baseline %.2f", heldout_ppl, final["loss"], baseline_ppl)
    logger.info("Sample:\n%s", sample)

    results = {
        "heldout_loss": final["loss"],
        "heldout_perplexity": heldout_ppl,
        "unigram_perplexity": baseline_ppl,
        "final_train_loss": final_train_loss,
        "final_train_loss_window": window,
        "train_steps": global_step,
        "max_steps": trainer.state.max_steps,
        "stopped_by_time_budget": budget.stopped_at_step is not None,
        "train_time_seconds": stats.train_seconds,
        "run_wall_time_seconds": None,  # filled in below
        "tokens_seen": global_step * tokens_per_step,
        "resumed_from": resume,
        "num_parameters": params["total"],
        "active_parameters_per_token_mean": params["active_mean"],
        "active_parameters_per_token_max": params["active_max"],
        "experts_per_token": dict(zip(layer_labels, final["experts_per_token"])),
        "experts_per_token_mean": sum(final["experts_per_token"]) / max(1, len(final["experts_per_token"])),
        "expert_load": dict(zip(layer_labels, final["expert_load"])),
        "eval_history": [{k: e[k] for k in ("step", "loss", "perplexity")} for e in stats.eval_history],
        "train_loss_history": [[e["step"], e["loss"]] for e in stats.train_history],
        "data": {
            "train_files": len(corpus["train_files"]), "eval_files": len(corpus["eval_files"]),
            "train_tokens": train_dataset.num_tokens, "eval_tokens": eval_dataset.num_tokens,
            "block_size": data_args.block_size, "vocab_size": config.vocab_size,
        },
        "sample_prompt": training_args.sample_prompt,
        "sample": sample,
    }

    # ---- Outputs ----
    logged_loss = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and "step" in e]
    loss_png = plot_loss_curves(stats.train_history, stats.eval_history, math.log(baseline_ppl), logged_loss,
                                layer_labels)
    load_png = plot_expert_load(final["expert_load"], final["experts_per_token"], layer_labels,
                                config.experts_per_token_limit if config.router_mode == "top_p" else None)
    results["run_wall_time_seconds"] = time.perf_counter() - started
    card = render_model_card(model_card_template("sparse_moe"),
                             card_values(results, config, corpus, data_args, training_args, output_dir, params))
    atomic_save_pretrained(
        output_dir, model, tokenizer,
        extra_files={
            "README.md": card,
            "results.json": json.dumps(results, indent=2),
            "loss_curves.png": loss_png,
            "expert_load.png": load_png,
            "sample.txt": sample if sample.endswith("\n") else sample + "\n",
        },
        keep=KEEP_IN_OUTPUT_DIR,
    )
    stats.remove_hooks()
    logger.info("Saved the model, tokenizer, card and plots to %s (run took %s)", output_dir,
                format_seconds(time.perf_counter() - started))
    return results


def card_values(results, config, corpus, data_args, training_args, output_dir, params) -> dict:
    """The model card's placeholders."""
    layer_rows = ["| MoE layer | Mean experts per token | Expert load (fraction of selections) |", "|---|---|---|"]
    for label, ept in results["experts_per_token"].items():
        load = ", ".join(f"{x:.2f}" for x in results["expert_load"][label])
        layer_rows.append(f"| {label} | {ept:.2f} | {load} |")
    sliding = config.layer_types.count("sliding_attention")
    if config.router_mode == "top_p":
        routing = (f"A token takes experts in order of router probability until their mass reaches "
                   f"{config.router_top_p}, at least 1 and at most {config.max_experts_per_token}; "
                   f"the selected weights are renormalised.")
    else:
        routing = f"Every token uses its {config.num_experts_per_tok} most probable experts."
    if config.num_shared_experts:
        routing += f" Plus {config.num_shared_experts} shared expert(s) every token uses."
    model_name = f"lightarch SparseMoe {human(params['total'])} ({corpus['short']})"
    return {
        "model_name": model_name,
        "model_path": output_dir.as_posix(),
        # YAML header values: JSON strings are valid YAML whatever characters the names hold.
        "model_name_yaml": json.dumps(model_name),
        "dataset_type_yaml": json.dumps(corpus["dataset_type"]),
        "dataset_name_yaml": json.dumps(corpus["dataset_name"]),
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "layer_types_summary": f"{sliding} sliding-window and {config.num_hidden_layers - sliding} full-attention "
        f"layers ({', '.join(t.split('_')[0] for t in config.layer_types)})",
        "sliding_window": config.sliding_window,
        "block_size": data_args.block_size,
        "num_experts": config.num_experts,
        "moe_intermediate_size": config.moe_intermediate_size,
        "router_mode": config.router_mode,
        "routing_description": routing,
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "params_total": f"{params['total']:,}",
        "params_active_mean": f"{params['active_mean']:,}",
        "params_active_max": f"{params['active_max']:,}",
        "vocab_size": config.vocab_size,
        "data_description": corpus["description"],
        "data_short": corpus["short"],
        "heldout_description": corpus["heldout"],
        "train_files": plural(results["data"]["train_files"], "file"),
        "eval_files": plural(results["data"]["eval_files"], "file"),
        "train_tokens": f"{results['data']['train_tokens']:,}",
        "eval_tokens": f"{results['data']['eval_tokens']:,}",
        "train_blocks": results["data"]["train_tokens"] // data_args.block_size,
        "eval_blocks": results["data"]["eval_tokens"] // data_args.block_size,
        "optimizer": training_args.optim.value if hasattr(training_args.optim, "value") else training_args.optim,
        "learning_rate": training_args.learning_rate,
        "lr_scheduler": getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
        "warmup_steps": training_args.warmup_steps,
        "weight_decay": training_args.weight_decay,
        "batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "train_steps": results["train_steps"],
        "train_steps_note": (f" (stopped by the {training_args.time_budget_minutes}-minute time budget before max_steps "
                             f"{results['max_steps']})" if results["stopped_by_time_budget"] else ""),
        "tokens_seen": f"{results['tokens_seen']:,}",
        "seed": training_args.seed,
        "device": str(training_args.device),
        "train_time": format_seconds(results["train_time_seconds"]),
        "heldout_loss": f"{results['heldout_loss']:.4f}",
        "heldout_perplexity": f"{results['heldout_perplexity']:.2f}",
        "unigram_perplexity": f"{results['unigram_perplexity']:.2f}",
        "final_train_loss": f"{results['final_train_loss']:.4f}",
        "train_loss_window": results["final_train_loss_window"],
        "experts_per_token_mean": f"{results['experts_per_token_mean']:.2f}",
        "routing_table": "\n".join(layer_rows),
        "sample_prompt_repr": repr(results["sample_prompt"]).replace("`", "'"),
        "sample_block": code_fence(results["sample"], "python"),
    }


if __name__ == "__main__":
    main(started=PROCESS_START)
