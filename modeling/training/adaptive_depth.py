"""Train an adaptive-depth model on the easy / hard arithmetic suite (`lightarch.data.arithmetic`), on CPU.

The default model (`AdaptiveDepthConfig.from_preset("arithmetic")`) is a dense 8-layer decoder with exits after
layers 2, 4, 6 and 8 and a complexity estimator. Training runs on `transformers.Trainer` in two phases:

1. joint: every exit's LM loss (weights `config.exit_loss_weights`) plus the estimator's loss, whose target is the
   earliest exit that already answers right;
2. estimator: the backbone frozen, the estimator retrained on the final exits' answers, on hard questions held out
   of phase 1 (`SuiteSizes.estimator_hard`), so it learns where the exits fail on questions they have not seen.

Then the thresholds of the `"estimator"` and `"confidence"` policies are calibrated on held-out calibration questions
(the cheapest threshold whose accuracy stays within a tolerance of full depth) and stored in the saved config
(`exit_policy="estimator"`). Hard calibration and test questions never appear in training; their prompts are saved
in `heldout.json` for `lightarch.evaluation.benchmarks.adaptive_depth`.

`train_adaptive` saves the model, the tokenizer, results.json and heldout.json atomically first, then the model card
(README.md) and training.png next to them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed

from ..configuration import AdaptiveDepthConfig
from ..data.arithmetic import (
    SPLITS,
    PadCollator,
    ProblemDataset,
    SuiteSizes,
    build_tokenizer,
    problems_from_prompts,
    sample_problems,
    split_heldout,
)
from ..evaluation.adaptive_depth import calibrate
from ..evaluation.model_cards import format_seconds, hub_card, model_card_template, render_model_card
from ..evaluation.plots import figure_to_png, pyplot
from ..modeling_adaptive_depth import AdaptiveDepthForCausalLM
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

SCRIPT = "train_adaptive.py"  # the writer named in the output folder's marker (`check_output_dir`)


@dataclass(frozen=True)
class AdaptiveSchedule:
    """Phase 2, threshold calibration and the wall-clock budget of `train_adaptive`.

    - `estimator_steps` (0 skips phase 2), `estimator_learning_rate`, `estimator_batch_size`: phase 2;
    - `easy_tolerance`, `hard_tolerance`: the accuracy a calibrated threshold may lose against full depth per split;
    - `calibration_threshold_steps`: evenly spaced thresholds in [0, 1] tried (plus a few in (0.9, 1));
    - `time_budget_minutes` (0, the default: none): phase 1 stops early when going on would leave less than
      `reserve_minutes` for phase 2, calibration and saving. Off by default so that a run's result never depends on
      the machine's load.
    """

    estimator_steps: int = 600
    estimator_learning_rate: float = 1e-2
    estimator_batch_size: int = 128
    easy_tolerance: float = 0.005
    hard_tolerance: float = 0.005
    calibration_threshold_steps: int = 41
    time_budget_minutes: float = 0.0
    reserve_minutes: float = 2.5

    def __post_init__(self) -> None:
        if self.estimator_steps < 0:
            raise ValueError(f"--estimator_steps must be >= 0 (0 skips phase 2), got {self.estimator_steps}.")
        if self.estimator_batch_size < 1:
            raise ValueError(f"--estimator_batch_size must be >= 1, got {self.estimator_batch_size}.")
        if self.calibration_threshold_steps < 2:
            raise ValueError(f"--calibration_threshold_steps must be >= 2, got {self.calibration_threshold_steps}.")
        for name in ("easy_tolerance", "hard_tolerance"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.time_budget_minutes < 0:
            raise ValueError(f"--time_budget_minutes must be >= 0 (0 disables it), got {self.time_budget_minutes}.")
        if self.time_budget_minutes and not 0 <= self.reserve_minutes < self.time_budget_minutes:
            raise ValueError(f"--reserve_minutes must be >= 0 and below --time_budget_minutes "
                             f"({self.time_budget_minutes}), got {self.reserve_minutes}.")


class ExitLossTrainer(Trainer):
    """Trainer that also logs each exit's LM loss and the estimator's loss (means since the last log), and keeps
    every training log in `history`."""

    def __init__(self, *args, exit_layers: list[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exit_layers = exit_layers
        self._sums: dict[str, float] = {}
        self._count = 0
        self.history: list[dict] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            for depth, value in zip(self.exit_layers, outputs.exit_losses.tolist()):
                self._sums[f"loss_exit_{depth}"] = self._sums.get(f"loss_exit_{depth}", 0.0) + value
            self._sums["estimator_loss"] = self._sums.get("estimator_loss", 0.0) + outputs.estimator_loss.item()
            self._count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._count:
            logs.update({k: round(v / self._count, 4) for k, v in self._sums.items()})
            self._sums, self._count = {}, 0
        if "loss" in logs or "estimator_loss" in logs:
            self.history.append({"step": self.state.global_step, **logs})
        super().log(logs, *args, **kwargs)


def check_adaptive_run(config: AdaptiveDepthConfig, training_args: TrainingArguments,
                       tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Raise a ValueError naming the option and the fix if this run cannot work (before any training)."""
    tokenizer = tokenizer or build_tokenizer()
    if training_args.max_steps <= 0:
        raise ValueError("--max_steps must be positive (phase 1 trains by steps).")
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"--config_overrides vocab_size={config.vocab_size}: the arithmetic tokenizer has "
                         f"{len(tokenizer)} tokens; use at least that many (the `arithmetic` preset has exactly that).")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(config, name) != getattr(tokenizer, name):
            raise ValueError(f"--config_overrides {name}={getattr(config, name)}: the arithmetic tokenizer's is "
                             f"{getattr(tokenizer, name)}; drop the override (the `arithmetic` preset has it right).")
    check_output_dir(training_args.output_dir, SCRIPT)
    resume = resume_or_start_fresh(training_args.resume_from_checkpoint, training_args.output_dir, remove_stale=False)
    if resume:
        check_resume_config(config, resume)


def _train_estimator(model: AdaptiveDepthForCausalLM, training_args: TrainingArguments, schedule: AdaptiveSchedule,
                     problems, tokenizer, collator) -> tuple[list[dict], float]:
    """Phase 2: the estimator alone, backbone frozen. Returns its training logs and seconds."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("model.estimator."))
    scratch = tempfile.mkdtemp(prefix="train_adaptive_phase2_")  # nothing is saved there (save_strategy="no")
    try:
        args = TrainingArguments(
            output_dir=scratch, use_cpu=training_args.use_cpu, max_steps=schedule.estimator_steps,
            per_device_train_batch_size=schedule.estimator_batch_size,
            learning_rate=schedule.estimator_learning_rate, lr_scheduler_type="cosine", warmup_steps=20,
            logging_steps=training_args.logging_steps, save_strategy="no", eval_strategy="no", report_to="none",
            seed=training_args.seed + 1, disable_tqdm=training_args.disable_tqdm, dataloader_num_workers=0,
        )
        trainer = ExitLossTrainer(model=model, args=args, train_dataset=ProblemDataset(problems, tokenizer),
                                  data_collator=collator, exit_layers=list(model.config.exit_layers),
                                  callbacks=[RouterBiasUpdateCallback()])
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    return trainer.history, seconds


def train_adaptive(config: AdaptiveDepthConfig, training_args: TrainingArguments, sizes: SuiteSizes = SuiteSizes(),
                   schedule: AdaptiveSchedule = AdaptiveSchedule()) -> dict:
    """Train `config` in two phases on the arithmetic suite, calibrate the exit thresholds on held-out questions and
    save into `training_args.output_dir`; returns the results (also in results.json).

    The model (with the calibrated thresholds in its config), the tokenizer, results.json and heldout.json are saved
    atomically first; the card and the plot are written after, so a failure there never loses the model (it is
    logged with the folder and re-raised). `training_args.resume_from_checkpoint` (a checkpoint folder, or 'true' for
    the last one in `output_dir`; set `--save_strategy steps` to write them) continues phase 1 (with the same model
    options); phase 2 and the calibration then run as usual.
    """
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    check_adaptive_run(config, training_args, tokenizer)
    prepare_output_dir(training_args.output_dir, SCRIPT)
    resume = resume_or_start_fresh(training_args.resume_from_checkpoint, training_args.output_dir)
    set_seed(training_args.seed)

    heldout = split_heldout(sizes, training_args.seed)
    excluded = set(heldout["calibration"]["hard"]) | set(heldout["test"]["hard"]) | set(heldout["estimator"]["hard"])
    train_problems = sample_problems(sizes.train_examples, sizes.hard_fraction, training_args.seed, excluded)
    calibration = problems_from_prompts(heldout["calibration"])
    logger.info("Training questions: %d (%d hard); %d hard questions held out", len(train_problems),
                sum(p.split == "hard" for p in train_problems), len(excluded))

    model = AdaptiveDepthForCausalLM(config)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info("AdaptiveDepth: %d parameters, %d layers, exits %s", num_parameters, config.num_hidden_layers,
                config.exit_layers)

    # Phase 1: every exit and the estimator, jointly.
    collator = PadCollator(tokenizer.pad_token_id)
    budget = TimeBudgetCallback(started + 60 * schedule.time_budget_minutes if schedule.time_budget_minutes else None,
                                reserve_seconds=60 * schedule.reserve_minutes)
    trainer = ExitLossTrainer(model=model, args=training_args, train_dataset=ProblemDataset(train_problems, tokenizer),
                              data_collator=collator, exit_layers=list(config.exit_layers),
                              callbacks=[budget, RouterBiasUpdateCallback()])
    phase1_start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    phase1_seconds = time.perf_counter() - phase1_start
    if budget.stopped_at_step is not None:
        logger.warning("Time budget reached: phase 1 stopped at step %d of %d.", budget.stopped_at_step,
                       training_args.max_steps)
    history = list(trainer.history)

    # Phase 2: the estimator alone, on hard questions the backbone never saw (`estimator_hard`; without them, fresh
    # draws of the training questions), calibration and test questions still excluded.
    phase2_seconds = 0.0
    if schedule.estimator_steps:
        estimator_hard = heldout["estimator"]["hard"] or None
        estimator_problems = sample_problems(schedule.estimator_steps * schedule.estimator_batch_size,
                                             sizes.hard_fraction, training_args.seed + 2,
                                             excluded - set(estimator_hard or ()), hard_prompts=estimator_hard)
        phase2_history, phase2_seconds = _train_estimator(model, training_args, schedule, estimator_problems,
                                                          tokenizer, collator)
        history += [{**e, "step": e["step"] + trainer.state.global_step} for e in phase2_history]
    model.eval()

    # Calibrate the thresholds on the held-out calibration questions.
    logger.info("Calibrating thresholds on %d easy / %d hard held-out questions",
                len(calibration["easy"]), len(calibration["hard"]))
    calibrated = calibrate(model, tokenizer, calibration, schedule.easy_tolerance, schedule.hard_tolerance,
                           schedule.calibration_threshold_steps)
    model.config.exit_policy = "estimator"
    model.config.estimator_threshold = float(calibrated["estimator"]["threshold"])
    model.config.confidence_threshold = float(calibrated["confidence"]["threshold"])
    for split in SPLITS:
        logger.info("%s: exit accuracy %s; full %.3f; estimator (t=%.4f) %.3f at %.2f layers; confidence (t=%.4f) "
                    "%.3f at %.2f layers", split,
                    [round(a, 3) for a in calibrated["exit_accuracy"][split]], calibrated["full_accuracy"][split],
                    model.config.estimator_threshold, calibrated["estimator"][split]["accuracy"],
                    calibrated["estimator"][split]["mean_layers"], model.config.confidence_threshold,
                    calibrated["confidence"][split]["accuracy"], calibrated["confidence"][split]["mean_layers"])

    results = {
        "seed": training_args.seed,
        "num_parameters": num_parameters,
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "exit_layers",
                                                    "exit_loss_weights", "estimator_input_layer",
                                                    "estimator_target", "first_k_dense_layers", "num_experts")},
        "phase1_steps": trainer.state.global_step,
        "phase1_max_steps": training_args.max_steps,
        "phase1_resumed_from": resume,
        "phase1_stopped_by_time_budget": budget.stopped_at_step is not None,
        "phase2_steps": schedule.estimator_steps,
        "phase1_seconds": phase1_seconds,
        "phase2_seconds": phase2_seconds,
        "train_examples": len(train_problems),
        "data": asdict(sizes),
        "schedule": asdict(schedule),
        "batch_size": training_args.per_device_train_batch_size,
        "learning_rate": training_args.learning_rate,
        "calibration": {k: v for k, v in calibrated.items() if not k.endswith("_sweep")},
        "calibration_sweeps": {k: v for k, v in calibrated.items() if k.endswith("_sweep")},
        "thresholds": {"estimator": model.config.estimator_threshold,
                       "confidence": model.config.confidence_threshold},
        "history": history,
    }
    results["run_wall_time_seconds"] = time.perf_counter() - started
    folder = atomic_save_pretrained(training_args.output_dir, model, tokenizer, extra_files={
        "results.json": json.dumps(results, indent=2), "heldout.json": json.dumps(heldout, indent=1)}, script=SCRIPT)
    logger.info("Saved to %s (run took %s)", folder, format_seconds(time.perf_counter() - started))
    write_card_and_plot(folder, results, model.config, Path(training_args.output_dir).as_posix())
    return results


def plot_training(history: list[dict], calibration: dict, exit_layers: list[int]) -> bytes:
    """PNG: per-exit train loss over steps, and per-exit accuracy on the calibration questions per split."""
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for depth in exit_layers:
        points = [(e["step"], e[f"loss_exit_{depth}"]) for e in history if f"loss_exit_{depth}" in e]
        if points:
            ax_loss.plot(*zip(*points), lw=1.5, label=f"exit {depth}")
    estimator = [(e["step"], e["estimator_loss"]) for e in history if "estimator_loss" in e]
    if estimator:
        ax_loss.plot(*zip(*estimator), "k--", lw=1, label="estimator (phase 1 then 2)")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("cross-entropy on answer tokens")
    ax_loss.set_title("Training loss per exit")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    width = 0.38
    for i, split in enumerate(SPLITS):
        values = [100 * v for v in calibration["exit_accuracy"][split]]
        positions = [j + (i - 0.5) * width for j in range(len(exit_layers))]
        ax_acc.bar(positions, values, width, label=split)
        for x, v in zip(positions, values):
            ax_acc.text(x, v + 1, f"{v:.0f}", ha="center", fontsize=8)
    ax_acc.set_xticks(range(len(exit_layers)), [f"exit {d}" for d in exit_layers])
    ax_acc.set_ylim(0, 110)
    ax_acc.set_ylabel("exact-match accuracy (%)")
    ax_acc.set_title("Accuracy of each exit (calibration questions)")
    ax_acc.legend(fontsize=8)
    ax_acc.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return figure_to_png(fig)


def render_card(results: dict, config: AdaptiveDepthConfig, model_path: str) -> str:
    """The model card (README.md) of a trained model, from `train_adaptive`'s results (the test-set table comes from
    the benchmark, `scripts/bench_adaptive.py`)."""
    cal = results["calibration"]
    data = results["data"]
    rows = ["| split | " + " | ".join(f"exit {d}" for d in config.exit_layers) + " |",
            "|---" * (len(config.exit_layers) + 1) + "|"]
    for split in SPLITS:
        rows.append(f"| {split} | " + " | ".join(f"{100 * a:.1f}%" for a in cal["exit_accuracy"][split]) + " |")
    policy_rows = ["| policy | threshold | easy accuracy | easy mean layers | hard accuracy | hard mean layers |",
                   "|---|---|---|---|---|---|",
                   f"| full | - | {100 * cal['full_accuracy']['easy']:.1f}% | {config.num_hidden_layers} | "
                   f"{100 * cal['full_accuracy']['hard']:.1f}% | {config.num_hidden_layers} |"]
    for policy in ("estimator", "confidence"):
        point = cal[policy]
        policy_rows.append(
            f"| {policy} | {point['threshold']:.4g} | {100 * point['easy']['accuracy']:.1f}% | "
            f"{point['easy']['mean_layers']:.2f} | {100 * point['hard']['accuracy']:.1f}% | "
            f"{point['hard']['mean_layers']:.2f} |")
    values = {
        "model_path": model_path,
        "num_parameters": f"{results['num_parameters']:,}",
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "exit_layers": ", ".join(map(str, config.exit_layers)),
        "first_exit": config.exit_layers[0],
        "exit_loss_weights": ", ".join(f"{w:g}" for w in config.exit_loss_weights),
        "estimator_input_layer": config.estimator_input_layer,
        "estimator_objective": config.estimator_objective,
        "estimator_features": ", ".join(config.estimator_features),
        "estimator_hard": data.get("estimator_hard", 0),
        "easy_tolerance": f"{100 * results['schedule']['easy_tolerance']:g} pt",
        "hard_tolerance": f"{100 * results['schedule']['hard_tolerance']:g} pt",
        "ffn": "dense SwiGLU" if config.first_k_dense_layers == config.num_hidden_layers
        else f"mixture of {config.num_experts} experts",
        "train_examples": f"{results['train_examples']:,}",
        "hard_percent": f"{data['hard_fraction']:.0%}",
        "heldout_hard": data["heldout_hard"],
        "calibration_hard": data["calibration_hard"],
        "calibration_easy": data["calibration_easy"],
        "phase1_steps": (f"{results['phase1_steps']} of {results['phase1_max_steps']} planned; the time budget "
                         "stopped it" if results["phase1_stopped_by_time_budget"] else results["phase1_steps"]),
        "phase2_steps": results["phase2_steps"],
        "batch_size": results["batch_size"],
        "learning_rate": results["learning_rate"],
        "train_time": format_seconds(results["phase1_seconds"] + results["phase2_seconds"]),
        "estimator_threshold": f"{config.estimator_threshold:.4g}",
        "confidence_threshold": f"{config.confidence_threshold:.4g}",
        "exit_accuracy_table": "\n".join(rows),
        "policy_table": "\n".join(policy_rows),
    }
    return render_model_card(model_card_template("adaptive_depth"), values)


def write_card_and_plot(folder: str | os.PathLike, results: dict, config: AdaptiveDepthConfig,
                        model_path: str | None = None) -> None:
    """README.md (the model card; its snippets load `model_path`, default `folder`) and training.png into a saved
    model folder; a failure is logged with the folder (the model in it is complete) and re-raised."""
    folder = Path(folder)
    with writing_beside_saved_model(folder, "the model card or the training plot"):
        card = render_card(results, config, model_path or folder.as_posix())
        write_atomically(folder / "README.md", hub_card(card, results, model_name=folder.name))
        write_atomically(folder / "training.png",
                         plot_training(results["history"], results["calibration"], list(config.exit_layers)))


__all__ = ["AdaptiveSchedule", "ExitLossTrainer", "check_adaptive_run", "plot_training", "render_card",
           "train_adaptive", "write_card_and_plot"]
