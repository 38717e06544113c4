"""Train a small hybrid SparseMoe from scratch on passkey retrieval (`lightarch.data.passkey`), on CPU.

The default model (`SparseMoeConfig.from_preset("passkey")`) mixes rotary sliding-window layers (local structure, the
copy circuit) with one global layer without position encoding (NoPE) that has to find the key line anywhere in the
prompt: the iRoPE recipe of Llama 4 / SmolLM3. The global layer matches by content only, so a prompt longer than any
seen in training gives it no unseen rotary angle, only more filler to ignore; Llama 4 temperature tuning sharpens its
queries at far positions. The sliding window is small (32 tokens) so that already in short training prompts the key
is out of the window and only the global layer can fetch it.

Examples are generated on the fly (`CurriculumDataset`): a 5-digit key hidden at a random depth in filler text,
followed by the question and the answer digits. The loss is on the answer digits only plus, by default, the key's
second occurrence inside the key line ("71432. Remember it. 71432 is ..."): a short-range copy that shapes the
representations the global layer's retrieval then builds on. No loss on the filler: it is predictable and would
drown the ~10 useful targets per example. A length curriculum grows the longest training length over the first
`curriculum_fraction` of the steps.

`train_passkey` trains, measures greedy exact-match accuracy at the longest training length, and saves the model,
the tokenizer and results.json atomically, then the model card (README.md) and training.png next to them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments, set_seed

from ..configuration import SparseMoeConfig
from ..data.passkey import CurriculumDataset, PasskeyCurriculum, PasskeyTask, build_tokenizer, collate_whole_batch
from ..evaluation.model_cards import hub_card, model_card_template, render_model_card
from ..evaluation.passkey import accuracy_table, evaluate_passkey
from ..evaluation.plots import figure_to_png, pyplot
from ..modeling_sparse_moe import SparseMoeForCausalLM
from .callbacks import TimeBudgetCallback
from .checkpoints import (
    atomic_save_pretrained,
    check_output_dir,
    check_resume_config,
    prepare_output_dir,
    resume_or_start_fresh,
    write_atomically,
    writing_beside_saved_model,
)
from .router_bias import RouterBiasUpdateCallback

logger = logging.getLogger(__name__)

SCRIPT = "train_passkey.py"  # the writer named in the output folder's marker (`check_output_dir`)

EVAL_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class TrainingMonitor(TrainerCallback):
    """Records the loss and the curriculum's length cap at every logging step, and the training wall / CPU time."""

    def __init__(self, dataset: CurriculumDataset) -> None:
        self.dataset = dataset
        self.history: list[dict] = []
        self.train_seconds = self.train_cpu_seconds = 0.0
        self._start = self._cpu_start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds = time.perf_counter() - self._start
        self.train_cpu_seconds = time.process_time() - self._cpu_start

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.history.append({"step": state.global_step, "loss": logs["loss"],
                                 "length_cap": self.dataset.length_cap(state.global_step),
                                 "seconds": time.perf_counter() - self._start})


def check_passkey_run(config: SparseMoeConfig, training_args: TrainingArguments, curriculum: PasskeyCurriculum,
                      eval_samples: int = 10, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Raise a ValueError naming the option and the fix if this run cannot work (before any training)."""
    tokenizer = tokenizer or build_tokenizer()
    if eval_samples < 1:
        raise ValueError(f"--eval_samples must be >= 1, got {eval_samples}.")
    if training_args.max_steps <= 0:
        raise ValueError("--max_steps must be positive (the training data is an endless stream).")
    if training_args.per_device_train_batch_size != 1:
        raise ValueError("--per_device_train_batch_size must be 1: each streamed item is a whole batch; set "
                         "--tokens_per_batch instead.")
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"--config_overrides vocab_size={config.vocab_size}: the passkey tokenizer has "
                         f"{len(tokenizer)} tokens; use at least that many (the `passkey` preset has exactly that).")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(config, name) != getattr(tokenizer, name):
            raise ValueError(f"--config_overrides {name}={getattr(config, name)}: the passkey tokenizer's is "
                             f"{getattr(tokenizer, name)}; drop the override (the `passkey` preset has it right).")
    CurriculumDataset(PasskeyTask(tokenizer), curriculum, total_batches=1, seed=0)  # checks --min_length
    check_output_dir(training_args.output_dir, SCRIPT)
    resume = resume_or_start_fresh(training_args.resume_from_checkpoint, training_args.output_dir, remove_stale=False)
    if resume:
        check_resume_config(config, resume)


def position_encoding_summary(config: SparseMoeConfig) -> str:
    """E.g. "rotary (base 10000.0) on the sliding layers, none (NoPE) on the global layers"."""
    rotary = config.no_rope_layers or [1] * config.num_hidden_layers
    kinds = {"sliding": set(), "global": set()}
    for layer_type, uses_rope in zip(config.layer_types, rotary):
        kinds["sliding" if layer_type == "sliding_attention" else "global"].add(uses_rope)
    theta = config.rope_parameters["rope_theta"]
    parts = []
    for name, values in kinds.items():
        if values:
            text = " / ".join(f"rotary (base {theta})" if v else "none (NoPE)" for v in sorted(values, reverse=True))
            parts.append(f"{text} on the {name} layers")
    summary = ", ".join(parts)
    if config.attn_temperature_tuning and 0 in rotary:
        summary += (f"; Llama 4 attention temperature tuning on NoPE layers (floor_scale {config.floor_scale}, "
                    f"attn_scale {config.attn_scale})")
    return summary


def plot_training(history: list[dict]) -> bytes:
    """PNG: training loss (log scale) and the curriculum's longest length by optimizer step."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], "o-", ms=3, color="tab:blue", label="train loss (labelled digits)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(steps, [h["length_cap"] for h in history], "--", color="tab:gray", label="max training length")
    twin.set_ylabel("max training length (tokens)")
    lines, labels = (a + b for a, b in zip(ax.get_legend_handles_labels(), twin.get_legend_handles_labels()))
    ax.legend(lines, labels, fontsize=8, loc="upper right")
    ax.set_title("Passkey training")
    fig.tight_layout()
    return figure_to_png(fig)


def render_card(results: dict, config: SparseMoeConfig) -> str:
    """The model card (README.md) of a trained passkey model, from `train_passkey`'s results."""
    data = results["data"]
    values = {
        "max_length": data["max_length"],
        "min_length": data["min_length"],
        "edge_percent": f"{100 * data['edge_depth_fraction']:.0f}",
        "distractors": (f"up to {data['distractors']} other 5-digit numbers in the filler of each example "
                        "(as many as fit), so the key is the number after \"pass key\", not the only one"
                        if data["distractors"] else "no other numbers in the filler"),
        "layer_types": ", ".join(t.split("_")[0] for t in config.layer_types),
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "sliding_window": config.sliding_window,
        "num_experts": config.num_experts,
        "top_k": config.num_experts_per_tok,
        "position_encoding": position_encoding_summary(config),
        "num_parameters": f"{results['num_parameters']:,}",
        "steps": results["train_steps"],
        "train_minutes": f"{results['train_time_seconds'] / 60:.1f}",
        "train_cpu_minutes": f"{results['train_cpu_seconds'] / 60:.1f}",
        "threads": results["torch_num_threads"],
        "accuracy": f"{100 * results['accuracy_at_max_length']:.0f}",
        "eval_samples": results["eval_prompts_at_max_length"],
        "eval_distractors": data["distractors"],
        "accuracy_table": results["accuracy_table_md"],
        "final_loss": f"{results['final_train_loss']:.4f}",
    }
    return render_model_card(model_card_template("passkey"), values)


def train_passkey(config: SparseMoeConfig, training_args: TrainingArguments,
                  curriculum: PasskeyCurriculum = PasskeyCurriculum(), eval_samples: int = 10,
                  time_budget_minutes: float = 0.0) -> dict:
    """Train `config` on the passkey stream, measure accuracy at `curriculum.max_length` (`eval_samples` prompts per
    depth, 5 depths), save into `training_args.output_dir`; returns the results (also in results.json).

    The model, tokenizer and results.json are saved atomically first; the card and the plot are written after, so a
    failure there never loses the model (it is logged with the folder and re-raised). `time_budget_minutes` > 0
    stops training before the next step would pass that much wall time (the run still evaluates and saves).
    `training_args.resume_from_checkpoint` (a checkpoint folder, or 'true' for the last one in `output_dir`; set
    `--save_strategy steps` to write them) continues a run (with the same model options).
    """
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    check_passkey_run(config, training_args, curriculum, eval_samples, tokenizer)
    prepare_output_dir(training_args.output_dir, SCRIPT)
    resume = resume_or_start_fresh(training_args.resume_from_checkpoint, training_args.output_dir)
    set_seed(training_args.seed)
    load_at_start = list(os.getloadavg())
    task = PasskeyTask(tokenizer)
    model = SparseMoeForCausalLM(config)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info("SparseMoe %s parameters, layers %s, window %s, %d threads; training lengths %d..%d",
                f"{num_parameters:,}", config.layer_types, config.sliding_window, torch.get_num_threads(),
                curriculum.min_length, curriculum.max_length)

    batches = training_args.max_steps * training_args.gradient_accumulation_steps
    dataset = CurriculumDataset(task, curriculum, batches, training_args.seed)
    monitor = TrainingMonitor(dataset)
    budget = TimeBudgetCallback(time.perf_counter() + 60 * time_budget_minutes if time_budget_minutes > 0 else None,
                                reserve_seconds=0.0)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                      data_collator=collate_whole_batch, callbacks=[monitor, budget, RouterBiasUpdateCallback()])
    train_output = trainer.train(resume_from_checkpoint=resume)
    if budget.stopped_at_step is not None:
        logger.warning("Time budget of %.1f min reached: stopped after %d of %d steps.", time_budget_minutes,
                       budget.stopped_at_step, training_args.max_steps)

    # Accuracy at the longest training length, greedy generation with the model's chunked prefill.
    eval_started = time.perf_counter()
    evaluation = evaluate_passkey(model, task, [curriculum.max_length], EVAL_DEPTHS, eval_samples,
                                  seed=training_args.seed + 1, distractors=curriculum.distractors)
    at_max = evaluation["overall"][str(curriculum.max_length)]
    logger.info("Exact-match accuracy at %d tokens: %.1f%% (%d prompts, %.0f s)", curriculum.max_length,
                100 * at_max["exact"], at_max["count"], time.perf_counter() - eval_started)

    window = min(4, len(monitor.history)) or 1
    results = {
        "train_steps": trainer.state.global_step,
        "max_steps": training_args.max_steps,
        "resumed_from": resume,
        "stopped_by_time_budget": budget.stopped_at_step is not None,
        "train_time_seconds": monitor.train_seconds,
        # CPU time of this process (all threads): with 1 thread, the wall time the same training takes on a
        # dedicated core; on a shared machine the wall time above is longer.
        "train_cpu_seconds": monitor.train_cpu_seconds,
        "load_average_at_start": load_at_start,
        "train_loss_mean": train_output.training_loss,
        "final_train_loss": (sum(h["loss"] for h in monitor.history[-window:]) / window
                             if monitor.history else train_output.training_loss),
        "accuracy_at_max_length": at_max["exact"],
        "digit_accuracy_at_max_length": at_max["digits"],
        "eval_prompts_at_max_length": at_max["count"],
        "accuracy_by_depth_at_max_length": {d: cell["exact"] for d, cell in
                                            evaluation["cells"][str(curriculum.max_length)].items()},
        "accuracy_table_md": accuracy_table(evaluation, [curriculum.max_length], EVAL_DEPTHS),
        "num_parameters": num_parameters,
        "torch_num_threads": torch.get_num_threads(),
        "load_average_at_end": list(os.getloadavg()),
        "data": asdict(curriculum),
        "eval_samples": eval_samples,
        "time_budget_minutes": time_budget_minutes,
        "training_arguments": training_args.to_sanitized_dict(),
        "loss_history": monitor.history,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    results["run_wall_time_seconds"] = time.perf_counter() - started
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder = atomic_save_pretrained(training_args.output_dir, model, tokenizer,
                                    extra_files={"results.json": json.dumps(results, indent=2, default=str)},
                                    script=SCRIPT)
    logger.info("Trained %d steps in %.1f min wall, %.1f min CPU (%s); accuracy %.0f%% at %d tokens; saved to %s",
                results["train_steps"], monitor.train_seconds / 60, monitor.train_cpu_seconds / 60,
                "stopped by the time budget" if results["stopped_by_time_budget"] else "all steps",
                100 * at_max["exact"], curriculum.max_length, folder)
    write_card_and_plot(folder, results, config)
    return results


def write_card_and_plot(folder: str | os.PathLike, results: dict, config: SparseMoeConfig) -> None:
    """README.md (the model card) and training.png into a saved model folder; a failure is logged with the folder
    (the model in it is complete) and re-raised."""
    folder = Path(folder)
    with writing_beside_saved_model(folder, "the model card or the training plot"):
        write_atomically(folder / "README.md", hub_card(render_card(results, config), results, model_name=folder.name))
        if results["loss_history"]:
            write_atomically(folder / "training.png", plot_training(results["loss_history"]))


__all__ = ["TrainingMonitor", "check_passkey_run", "plot_training", "position_encoding_summary", "render_card",
           "train_passkey", "write_card_and_plot"]
