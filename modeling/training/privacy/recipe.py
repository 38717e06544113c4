"""DP-SGD training of a SparseMoe causal LM from scratch (`scripts/train_private.py`), on the main job's data.

The data and tokenizer are the main job's (`lightarch.training.sparse_moe.prepare_data`: byte-level BPE on the
train split, both splits cut into blocks); the model is trained by `PrivateTrainer`, evaluated on the held-out
blocks, saved atomically with results.json, then given a model card (`model_cards/private.md`) stating epsilon,
delta, the accountant, sampling rate, steps, noise multiplier and clipping norm.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

from transformers import AutoConfig, Trainer, TrainingArguments, default_data_collator

from ...data.corpus import BlockDataset, token_blocks, tokenize_documents
from ...evaluation.model_cards import format_seconds, hub_card, model_card_template, render_model_card
from ...evaluation.parameters import parameter_counts
from ...modeling_sparse_moe import SparseMoeForCausalLM
from ..callbacks import TimeBudgetCallback
from ..checkpoints import (
    atomic_save_pretrained,
    prepare_output_dir,
    resume_or_start_fresh,
    write_atomically,
    writing_beside_saved_model,
)
from .accounting import independent_epsilon
from .audit import CanarySet, audit_model, audit_table, insert_canaries, write_audit
from .trainer import PrivacyArguments, PrivateTrainer

logger = logging.getLogger(__name__)

SCRIPT = "train_private.py"
AUDIT_SCRIPT = "audit_privacy.py"
KEEP_IN_OUTPUT_DIR = ("checkpoint-*", "runs")


def private_config(config, tokenizer=None):
    """A copy of `config` fit for DP-SGD: the aux-loss-free bias update and router jitter switched off (the first
    is a non-private release of expert counts, the second not reproducible per example), vocabulary and special
    tokens from `tokenizer`. Each change is logged."""
    config = copy.deepcopy(config)
    if getattr(config, "router_bias_update_rate", 0) > 0:
        logger.warning("router_bias_update_rate=%s switched off under DP (a release of each batch's expert counts); "
                       "the per-sequence balance loss balances the experts.", config.router_bias_update_rate)
        config.router_bias_update_rate = 0.0
    if getattr(config, "router_jitter_noise", 0) > 0:
        logger.warning("router_jitter_noise=%s switched off under DP.", config.router_jitter_noise)
        config.router_jitter_noise = 0.0
    if tokenizer is not None:
        config.vocab_size = len(tokenizer)
        config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
    return config


def train_language_model(config, training_args: TrainingArguments, train_dataset, eval_dataset=None, tokenizer=None,
                         privacy: PrivacyArguments | None = None, callbacks=(), resume: str | None = None):
    """Train a `SparseMoeForCausalLM(config)` with DP-SGD (`privacy`) or, with `privacy=None`, the same model
    and steps without it (the audit's baseline). Returns the trainer (its `model` is trained)."""
    model = SparseMoeForCausalLM(config)
    common = {"model": model, "args": training_args, "train_dataset": train_dataset, "eval_dataset": eval_dataset,
              "processing_class": tokenizer, "data_collator": default_data_collator, "callbacks": list(callbacks)}
    trainer = PrivateTrainer(**common, privacy=privacy) if privacy is not None else Trainer(**common)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def card_values(results: dict, config, output_dir: Path) -> dict:
    """The `model_cards/private.md` placeholders."""
    privacy = results["privacy"]
    return {
        "model_name": output_dir.name,
        "epsilon": f"{privacy['epsilon']:.3f}",
        "delta": f"{privacy['delta']:.3g}",
        "accountant": privacy["accountant"].upper(),
        "independent_epsilon": f"{results['independent_epsilon']:.3f}",
        "sample_rate": f"{privacy['sample_rate']:.5g}",
        "expected_batch_size": privacy["expected_batch_size"],
        "steps": privacy["steps"],
        "noise_multiplier": f"{privacy['noise_multiplier']:.4f}",
        "max_grad_norm": privacy["per_sample_max_grad_norm"],
        "target": (f"calibrated to a target epsilon of {privacy['target_epsilon']}" if privacy["target_epsilon"]
                   else "given (not calibrated)"),
        "train_examples": results["data"]["train_blocks"],
        "block_size": results["data"]["block_size"],
        "heldout_loss": f"{results['heldout_loss']:.4f}",
        "heldout_perplexity": f"{results['heldout_perplexity']:.2f}",
        "params_total": f"{results['num_parameters']:,}",
        "num_layers": config.num_hidden_layers,
        "num_experts": config.num_experts,
        "router_mode": config.router_mode,
        "train_time": format_seconds(results["train_time_seconds"]),
        "stopped_note": (" (stopped early by the time budget: fewer steps than planned, so a smaller epsilon)"
                         if results["stopped_by_time_budget"] else ""),
    }


def train_private(config, training_args: TrainingArguments, privacy: PrivacyArguments, data,
                  time_budget_minutes: float = 0.0, started: float | None = None) -> dict:
    """Train `config` with DP-SGD on `data` (a `lightarch.training.sparse_moe.SparseMoeData`) into
    `training_args.output_dir`; returns the results (also results.json). `training_args.max_grad_norm` must be 0:
    the clipping norm is `privacy.per_sample_max_grad_norm`."""
    started = time.perf_counter() if started is None else started
    output_dir = Path(training_args.output_dir)
    prepare_output_dir(output_dir, SCRIPT, keep=KEEP_IN_OUTPUT_DIR)
    resume = resume_or_start_fresh(training_args.resume_from_checkpoint, output_dir)
    training_args.resume_from_checkpoint = resume
    tokenizer = data.tokenizer
    config = AutoConfig.from_pretrained(resume) if resume else private_config(config, tokenizer)
    tokens_per_step = training_args.per_device_train_batch_size * data.block_size
    budget = TimeBudgetCallback(started + 60 * time_budget_minutes if time_budget_minutes else None,
                                eval_step_equivalents=data.eval_dataset.num_tokens / tokens_per_step)
    train_start = time.perf_counter()
    trainer = train_language_model(config, training_args, data.train_dataset, data.eval_dataset, tokenizer,
                                   privacy=privacy, callbacks=[budget], resume=resume)
    train_seconds = time.perf_counter() - train_start
    metrics = trainer.evaluate()
    report = trainer.privacy_report()
    independent = independent_epsilon(report["noise_multiplier"], report["sample_rate"], report["steps"],
                                      report["delta"], "rdp" if report["accountant"] == "rdp" else "pld")
    model = trainer.model
    results = {
        "privacy": report,
        "independent_epsilon": independent,
        "independent_accountant": "dp-accounting " + ("RDP" if report["accountant"] == "rdp" else "PLD"),
        "heldout_loss": metrics["eval_loss"],
        "heldout_perplexity": math.exp(metrics["eval_loss"]),
        "train_steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "stopped_by_time_budget": budget.stopped_at_step is not None,
        "train_time_seconds": train_seconds,
        "run_wall_time_seconds": time.perf_counter() - started,
        "resumed_from": resume,
        "num_parameters": parameter_counts(model)["total"],
        "data": {"train_blocks": len(data.train_dataset), "eval_blocks": len(data.eval_dataset),
                 "block_size": data.block_size, "vocab_size": config.vocab_size},
        "log_history": trainer.state.log_history,
    }
    logger.info("epsilon %.3f (delta %.3g, %s; dp-accounting %.3f) after %d steps; held-out loss %.4f",
                report["epsilon"], report["delta"], report["accountant"], independent, report["steps"],
                metrics["eval_loss"])
    atomic_save_pretrained(output_dir, model, tokenizer, extra_files={"results.json": json.dumps(results, indent=2)},
                           keep=KEEP_IN_OUTPUT_DIR, script=SCRIPT)
    with writing_beside_saved_model(output_dir, "the model card"):
        card = render_model_card(model_card_template("private"), card_values(results, config, output_dir))
        write_atomically(output_dir / "README.md", hub_card(card, results, model_name=output_dir.name))
    logger.info("Saved the model, tokenizer, results and card to %s (run took %s)", output_dir,
                format_seconds(time.perf_counter() - started))
    return results


def audit_privacy(config, training_args: TrainingArguments, privacy: PrivacyArguments, corpus, block_size: int,
                  canaries: CanarySet, seed: int = 0) -> dict:
    """Train the same model for the same steps with and without DP-SGD on `corpus`'s training text with `canaries`
    inserted, audit both (`lightarch.training.privacy.audit`) and write audit.json, audit.md and audit.png into
    `training_args.output_dir`. The tokenizer is trained on the canary-free text (so it cannot memorise them)."""
    from ..sparse_moe import prepare_data

    output_dir = prepare_output_dir(training_args.output_dir, AUDIT_SCRIPT, keep=())
    data = prepare_data(corpus, config.vocab_size, block_size)
    tokenizer = data.tokenizer
    texts = insert_canaries(corpus.train_texts, canaries, seed)
    train_dataset = BlockDataset(token_blocks(tokenize_documents(tokenizer, texts, desc="Tokenizing with canaries"),
                                              block_size))
    config = private_config(config, tokenizer)
    audits, runs = {}, {}
    for name, run_privacy in (("non-DP", None), ("DP", privacy)):
        args = dataclasses.replace(training_args, output_dir=str(output_dir / name), save_strategy="no",
                                   eval_strategy="no", max_grad_norm=training_args.max_grad_norm if run_privacy
                                   is None else 0.0, resume_from_checkpoint=None)
        started = time.perf_counter()
        trainer = train_language_model(config, args, train_dataset, data.eval_dataset, tokenizer, privacy=run_privacy)
        runs[name] = {"heldout_loss": trainer.evaluate()["eval_loss"], "steps": trainer.state.global_step,
                      "train_seconds": time.perf_counter() - started}
        if run_privacy is not None:
            runs[name]["privacy"] = trainer.privacy_report()
        audits[name] = audit_model(trainer.model, tokenizer, canaries)
        logger.info("%s: held-out loss %.4f, audit %s", name, runs[name]["heldout_loss"], audits[name])
    extra = {"runs": runs, "canaries": {"per_group": len(next(iter(canaries.members.values()))),
                                        "non_members": len(canaries.non_members),
                                        "references": len(canaries.references), "prefix": canaries.prefix},
             "train_blocks": len(train_dataset), "block_size": block_size}
    write_audit(output_dir, audits, extra)
    logger.info("Audit:\n%s", audit_table(audits))
    return {"audits": audits, **extra}


__all__ = ["audit_privacy", "private_config", "train_language_model", "train_private"]
