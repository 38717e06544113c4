"""The main job: a SparseMoe causal LM trained from scratch with `transformers.Trainer` (`scripts/train.py` is its
command line, in the spirit of transformers' run_clm.py).

- `prepare_data`: the byte-level BPE trained on the corpus's train split (`lightarch.data.corpus.load_corpus`; by
  default the Python standard library split by file), both splits cut into blocks;
- `train_sparse_moe`: trains (router statistics per step, a wall-clock budget, the DeepSeek-V3 bias update), measures
  held-out perplexity against a unigram baseline, saves the model, tokenizer and results.json atomically, then renders
  the model card and plots into the saved folder (a failure there never loses the model).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

from ..data.corpus import BlockDataset, TextCorpus, token_blocks, tokenize_documents
from ..data.tokenizers import SPECIAL_TOKENS, train_bpe_tokenizer
from ..evaluation.model_cards import code_fence, format_seconds, hub_card, model_card_template, render_model_card
from ..evaluation.parameters import parameter_counts
from ..evaluation.perplexity import unigram_perplexity
from ..evaluation.plots import plot_expert_load, plot_loss_curves
from ..modeling_sparse_moe import SparseMoeForCausalLM
from .callbacks import MoeStatsCallback, TimeBudgetCallback
from .checkpoints import (
    atomic_save_pretrained,
    check_output_dir,
    prepare_output_dir,
    resolve_resume,
    resume_or_start_fresh,
    write_atomically,
    writing_beside_saved_model,
)
from .router_bias import RouterBiasUpdateCallback

logger = logging.getLogger(__name__)

SCRIPT = "train.py"  # the writer named in the output folder's marker (`check_output_dir`)
# Entries of an existing output_dir that a new final save keeps (everything else there is replaced).
KEEP_IN_OUTPUT_DIR = ("checkpoint-*", "runs")  # Trainer's checkpoints and TensorBoard logs
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, and the special tokens
SAMPLE_PROMPT = "def fibonacci(n):\n"  # the greedy completion saved in sample.txt and shown in the card


@dataclass
class SparseMoeData:
    """What the model trains and is evaluated on: the corpus, its tokenizer and both splits as blocks."""

    corpus: TextCorpus
    tokenizer: object  # a PreTrainedTokenizerFast
    train_dataset: BlockDataset
    eval_dataset: BlockDataset
    block_size: int


def check_train_options(
    config,
    training_args: TrainingArguments,
    block_size: int,
    tokenizer_min_frequency: int,
    time_budget_minutes: float,
    sample_prompt: str,
    sample_max_new_tokens: int,
) -> None:
    """Everything about a run that can be checked before data preparation; a ValueError names the option and the fix.

    `config` is the SparseMoeConfig to train (its `vocab_size` sizes the BPE tokenizer).
    """

    def check(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(message)

    check(block_size >= 2, f"--block_size must be >= 2 (one input and one target), got {block_size}.")
    check(config.max_position_embeddings >= block_size,
          f"--block_size {block_size} exceeds the model's max_position_embeddings ({config.max_position_embeddings}); "
          "lower --block_size or raise it with --config_overrides max_position_embeddings=N.")
    check(config.vocab_size >= MIN_VOCAB_SIZE,
          f"vocab_size {config.vocab_size} (from --preset / --config_overrides) is too small for the byte-level BPE: "
          f"it needs >= {MIN_VOCAB_SIZE} tokens (256 bytes + {len(SPECIAL_TOKENS)} special tokens).")
    check(tokenizer_min_frequency >= 1, f"--tokenizer_min_frequency must be >= 1, got {tokenizer_min_frequency}.")
    check(time_budget_minutes >= 0, f"--time_budget_minutes must be >= 0, got {time_budget_minutes}.")
    check(bool(sample_prompt), "--sample_prompt must not be empty.")
    check(sample_max_new_tokens >= 1, f"--sample_max_new_tokens must be >= 1, got {sample_max_new_tokens}.")
    check(training_args.max_steps > 0 or training_args.num_train_epochs > 0,
          "--max_steps (or --num_train_epochs) must be positive.")
    check(training_args.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be >= 1.")
    check(training_args.per_device_eval_batch_size >= 1, "--per_device_eval_batch_size must be >= 1.")
    for name in ("logging_steps", "eval_steps", "save_steps"):
        value = getattr(training_args, name)
        check(value is None or value > 0,
              f"--{name} must be > 0 (a number of steps, or a fraction of max_steps below 1), got {value}.")
    resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    check_output_dir(training_args.output_dir, SCRIPT)


def prepare_data(corpus: TextCorpus, vocab_size: int, block_size: int, tokenizer_min_frequency: int = 2,
                 tokenizer_dir: str | os.PathLike | None = None) -> SparseMoeData:
    """Tokenize the corpus into blocks of `block_size` tokens: with the tokenizer saved in `tokenizer_dir` (a
    checkpoint being resumed), or a byte-level BPE of `vocab_size` tokens trained on the train split only.

    Raises ValueError naming `--block_size` when a split has fewer tokens than one block.
    """
    logger.info("Corpus: %d train texts (%s chars), %d held-out texts (%s chars)",
                len(corpus.train_texts), human(sum(map(len, corpus.train_texts))),
                len(corpus.eval_texts), human(sum(map(len, corpus.eval_texts))))
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        logger.info("Loading the tokenizer from %s", tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        logger.info("Training a byte-level BPE tokenizer (vocab %d) on the train split", vocab_size)
        tokenizer = train_bpe_tokenizer(corpus.train_texts, vocab_size, tokenizer_min_frequency)
    train_dataset = BlockDataset(token_blocks(
        tokenize_documents(tokenizer, corpus.train_texts, desc="Tokenizing train"), block_size))
    eval_dataset = BlockDataset(token_blocks(
        tokenize_documents(tokenizer, corpus.eval_texts, desc="Tokenizing held-out"), block_size))
    for name, dataset in (("training", train_dataset), ("held-out", eval_dataset)):
        if len(dataset) == 0:
            raise ValueError(f"the {name} data has fewer tokens than one block (--block_size {block_size}); lower "
                             "--block_size or add data.")
    logger.info("Blocks of %d tokens: %d train (%s tokens), %d held-out (%s tokens)", block_size, len(train_dataset),
                human(train_dataset.num_tokens), len(eval_dataset), human(eval_dataset.num_tokens))
    return SparseMoeData(corpus, tokenizer, train_dataset, eval_dataset, block_size)


def train_sparse_moe(
    config,
    training_args: TrainingArguments,
    data: SparseMoeData,
    time_budget_minutes: float = 0.0,
    sample_prompt: str = SAMPLE_PROMPT,
    sample_max_new_tokens: int = 64,
    started: float | None = None,
) -> dict:
    """Train a `SparseMoeForCausalLM` of `config` (its vocabulary and special tokens set from the tokenizer) on `data`
    and write `training_args.output_dir`; returns the results (also saved as results.json).

    `training_args.resume_from_checkpoint` (a checkpoint folder, or 'true' for the last one) continues a run: the
    model config then comes from the checkpoint. Without it, checkpoints of an earlier run in output_dir are removed.
    `time_budget_minutes` (0: none) ends training early, with a checkpoint, when going on would overrun the budget
    counted from `started` (a `time.perf_counter()` value; default: now). The model, tokenizer, results.json and
    sample.txt are saved atomically first; README.md (the model card), loss_curves.png and expert_load.png after.
    """
    started = time.perf_counter() if started is None else started
    output_dir = Path(training_args.output_dir)
    prepare_output_dir(output_dir, SCRIPT, keep=KEEP_IN_OUTPUT_DIR)  # this script's folder, or a usage error
    resume = resume_or_start_fresh(training_args.resume_from_checkpoint, output_dir)
    training_args.resume_from_checkpoint = resume

    tokenizer = data.tokenizer
    if resume:
        config = AutoConfig.from_pretrained(resume)
        logger.info("Model config taken from the checkpoint %s", resume)
    else:
        config = copy.deepcopy(config)
        config.vocab_size = len(tokenizer)
        config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
    tokenizer.model_max_length = config.max_position_embeddings  # what `truncation=True` cuts to
    model = SparseMoeForCausalLM(config)
    stats = MoeStatsCallback(model)
    try:
        if resume and not stats.load_checkpoint(resume):
            logger.warning("%s has no router statistics; the plots start at the resumed step.", resume)
        logger.info("SparseMoe: %s parameters, %d layers %s, %d experts, routing %s",
                    human(parameter_counts(model)["total"]), config.num_hidden_layers, config.layer_types,
                    config.num_experts, config.router_mode)
        tokens_per_step = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                           * max(1, training_args.world_size) * data.block_size)
        budget = TimeBudgetCallback(
            started + 60 * time_budget_minutes if time_budget_minutes else None,
            eval_step_equivalents=data.eval_dataset.num_tokens / tokens_per_step,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=data.train_dataset,
            eval_dataset=data.eval_dataset,
            processing_class=tokenizer,
            data_collator=default_data_collator,
            callbacks=[stats, budget, RouterBiasUpdateCallback()],
        )
        train_result = trainer.train(resume_from_checkpoint=resume)
        global_step = trainer.state.global_step
        if budget.stopped_at_step is not None:
            logger.warning("Stopped by the time budget (%s minutes) at step %d of %d; --resume_from_checkpoint True "
                           "continues it.", time_budget_minutes, global_step, trainer.state.max_steps)
        if not stats.eval_history or stats.eval_history[-1]["step"] != global_step:
            trainer.evaluate()
        final = stats.eval_history[-1]

        baseline_ppl = unigram_perplexity(data.train_dataset.blocks, data.eval_dataset.blocks, config.vocab_size)
        params = parameter_counts(model, final["experts_per_token"])
        layer_labels = [f"layer {i} ({config.layer_types[i].split('_')[0]})" for i in stats.moe_layer_indices]
        sample = generate_sample(model, tokenizer, sample_prompt, sample_max_new_tokens)
        window = min(20, len(stats.train_history)) or 1
        final_train_loss = (sum(e["loss"] for e in stats.train_history[-window:]) / window
                            if stats.train_history else train_result.training_loss)
        logger.info("Held-out perplexity %.2f (loss %.4f); unigram baseline %.2f", final["perplexity"], final["loss"],
                    baseline_ppl)
        logger.info("Sample:\n%s", sample)
        results = {
            "heldout_loss": final["loss"],
            "heldout_perplexity": final["perplexity"],
            "unigram_perplexity": baseline_ppl,
            "final_train_loss": final_train_loss,
            "final_train_loss_window": window,
            "train_steps": global_step,
            "max_steps": trainer.state.max_steps,
            "stopped_by_time_budget": budget.stopped_at_step is not None,
            "train_time_seconds": stats.train_seconds,
            "run_wall_time_seconds": time.perf_counter() - started,
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
                "train_files": len(data.corpus.train_files), "eval_files": len(data.corpus.eval_files),
                "train_tokens": data.train_dataset.num_tokens, "eval_tokens": data.eval_dataset.num_tokens,
                "block_size": data.block_size, "vocab_size": config.vocab_size,
            },
            "sample_prompt": sample_prompt,
            "sample": sample,
        }
        # Save first: a failure while drawing the plots or rendering the card must never lose the model.
        atomic_save_pretrained(
            output_dir, model, tokenizer,
            extra_files={"results.json": json.dumps(results, indent=2),
                         "sample.txt": sample if sample.endswith("\n") else sample + "\n"},
            keep=KEEP_IN_OUTPUT_DIR, script=SCRIPT,
        )
        logged_loss = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and "step" in e]
        with writing_beside_saved_model(output_dir, "the model card or plots"):
            write_plots(output_dir, stats, config, math.log(baseline_ppl), logged_loss, layer_labels)
            card = render_model_card(model_card_template("sparse_moe"), card_values(
                results, config, data.corpus, data.block_size, training_args, output_dir, params,
                time_budget_minutes))
            write_atomically(output_dir / "README.md", hub_card(card, results, model_name=output_dir.name))
    finally:
        stats.remove_hooks()
    logger.info("Saved the model, tokenizer, card and plots to %s (run took %s)", output_dir,
                format_seconds(time.perf_counter() - started))
    return results


def write_plots(output_dir: Path, stats: MoeStatsCallback, config, baseline_loss: float,
                logged_loss: list[tuple[int, float]], layer_labels: list[str]) -> None:
    """loss_curves.png (train / held-out loss, routing over training) and expert_load.png (held-out expert load)."""
    final = stats.eval_history[-1]
    write_atomically(output_dir / "loss_curves.png", plot_loss_curves(
        stats.train_history, stats.eval_history, baseline_loss, logged_loss, layer_labels))
    write_atomically(output_dir / "expert_load.png", plot_expert_load(
        final["expert_load"], final["experts_per_token"], layer_labels,
        config.experts_per_token_limit if config.router_mode == "top_p" else None))


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


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def card_values(results: dict, config, corpus: TextCorpus, block_size: int, training_args: TrainingArguments,
                output_dir: Path, params: dict, time_budget_minutes: float) -> dict:
    """The placeholders of the `sparse_moe` model-card template."""
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
    model_name = f"lightarch SparseMoe {human(params['total'])} ({corpus.short})"
    return {
        "model_name": model_name,
        "model_path": output_dir.as_posix(),
        # YAML header values: JSON strings are valid YAML whatever characters the names hold.
        "model_name_yaml": json.dumps(model_name),
        "dataset_type_yaml": json.dumps(corpus.dataset_type),
        "dataset_name_yaml": json.dumps(corpus.dataset_name),
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "layer_types_summary": f"{sliding} sliding-window and {config.num_hidden_layers - sliding} full-attention "
        f"layers ({', '.join(t.split('_')[0] for t in config.layer_types)})",
        "sliding_window": config.sliding_window,
        "block_size": block_size,
        "num_experts": config.num_experts,
        "moe_intermediate_size": config.moe_intermediate_size,
        "router_mode": config.router_mode,
        "routing_description": routing,
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "params_total": f"{params['total']:,}",
        "params_active_mean": f"{params['active_mean']:,}",
        "params_active_max": f"{params['active_max']:,}",
        "vocab_size": config.vocab_size,
        "data_description": corpus.description,
        "data_short": corpus.short,
        "heldout_description": corpus.heldout,
        "train_files": plural(results["data"]["train_files"], "file"),
        "eval_files": plural(results["data"]["eval_files"], "file"),
        "train_tokens": f"{results['data']['train_tokens']:,}",
        "eval_tokens": f"{results['data']['eval_tokens']:,}",
        "train_blocks": results["data"]["train_tokens"] // block_size,
        "eval_blocks": results["data"]["eval_tokens"] // block_size,
        "optimizer": getattr(training_args.optim, "value", training_args.optim),
        "learning_rate": training_args.learning_rate,
        "lr_scheduler": getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
        "warmup_steps": training_args.warmup_steps,
        "weight_decay": training_args.weight_decay,
        "batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "train_steps": results["train_steps"],
        "train_steps_note": (f" (stopped by the {time_budget_minutes}-minute time budget before max_steps "
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


__all__ = ["SparseMoeData", "check_train_options", "prepare_data", "train_sparse_moe"]
