#!/usr/bin/env python
"""Train a lightarch adaptive-depth model on generated arithmetic with an easy / hard split (CPU, minutes).

Easy questions are one step (`7*8=`), hard ones two steps with precedence (`7+2*3=`); see
`lightarch.data.arithmetic`. Training runs on `transformers.Trainer` in two phases:

1. joint: every exit's LM loss (weights `--exit_loss_weights`) plus the complexity estimator's loss, whose target
   is the earliest exit that already answers right;
2. estimator: the backbone frozen, the estimator retrained on the final exits' answers.

Then the thresholds of the `"estimator"` and `"confidence"` policies are calibrated on held-out calibration
questions (the cheapest threshold whose accuracy stays within `--easy_tolerance` / `--hard_tolerance` of full depth)
and stored in the saved config (`exit_policy="estimator"`). Hard calibration and test questions never appear in
training; their prompts are saved in `heldout.json` for `scripts/bench_adaptive.py`.

Writes into --output_dir (default outputs/adaptive_depth), atomically (temporary folder, then rename):

    model.safetensors, config.json, *.py, tokenizer files    the model (AutoModelForCausalLM, trust_remote_code)
    README.md, results.json, heldout.json                    model card, measurements, the held-out questions
    training.png                                             per-exit loss curves and per-exit calibration accuracy

Every transformers.TrainingArguments option is accepted (they configure phase 1); see --help.

    python scripts/train_adaptive.py
    python scripts/train_adaptive.py --max_steps 500 --estimator_steps 100 --output_dir outputs/quick
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed  # noqa: E402

import lightarch  # noqa: E402,F401  (registers the lightarch Auto classes)
from lightarch import AdaptiveDepthConfig  # noqa: E402
from lightarch import AdaptiveDepthForCausalLM  # noqa: E402
from lightarch.data.arithmetic import (
    SPLITS,
    PadCollator,
    ProblemDataset,
    all_problems,
    build_tokenizer,
    sample_problems,
)
from lightarch.evaluation.adaptive_depth import (
    choose_threshold,
    confidence_operating_point,
    estimator_operating_point,
    exit_measurements,
    threshold_grid,
)
from lightarch.training.checkpoints import atomic_save_pretrained
from lightarch.evaluation.plots import figure_to_png, pyplot
from lightarch.evaluation.model_cards import model_card_template, render_model_card
from lightarch.training.cli import script_parser

logger = logging.getLogger("train_adaptive")

# Defaults for transformers.TrainingArguments (phase 1) when the command line does not set them (shown by --help).
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


@dataclass
class ModelArguments:
    """The decoder and its exits."""

    hidden_size: int = field(default=128, metadata={"help": "Width of the residual stream."})
    num_hidden_layers: int = field(default=8, metadata={"help": "Decoder layers (the deep path)."})
    num_attention_heads: int = field(default=4, metadata={"help": "Query heads per attention layer."})
    num_key_value_heads: int = field(default=2, metadata={"help": "Key/value heads (grouped-query attention)."})
    intermediate_size: int = field(default=256, metadata={"help": "Hidden width of the dense SwiGLU MLPs."})
    num_experts: int = field(
        default=0,
        metadata={"help": "0: dense layers (fastest on CPU). N > 0: every layer a mixture of N experts "
                  "(top-k routing, --num_experts_per_tok, expert width --moe_intermediate_size)."},
    )
    num_experts_per_tok: int = field(default=2, metadata={"help": "Experts per token when --num_experts > 0."})
    moe_intermediate_size: int = field(default=128, metadata={"help": "Hidden width of each expert."})
    exit_layers: str = field(
        default="2,4,6,8",
        metadata={"help": "Comma-separated exit depths, strictly increasing, ending with --num_hidden_layers."},
    )
    exit_loss_weights: str | None = field(
        default=None,
        metadata={"help": "Comma-separated loss weight per exit. Default: 2 for the first exit (it must answer the "
                  "easy questions alone), 1 for the others."},
    )
    estimator_input_layer: int = field(
        default=1, metadata={"help": "The estimator reads the hidden states after this many layers (0: embeddings)."}
    )
    estimator_hidden_size: int = field(default=64, metadata={"help": "Width of the estimator's MLP."})
    estimator_loss_weight: float = field(default=0.1, metadata={"help": "Weight of the estimator loss in phase 1."})
    estimator_target: str = field(
        default="correct",
        metadata={"help": "'correct': earliest exit whose answer is right; 'loss': earliest exit within "
                  "--estimator_loss_tolerance nats of the last exit's loss.", "choices": ["correct", "loss"]},
    )
    estimator_loss_tolerance: float = field(default=0.1, metadata={"help": "Tolerance of --estimator_target loss."})


@dataclass
class DataArguments:
    """The generated question suite."""

    train_examples: int = field(
        default=128_000, metadata={"help": "Generated training questions (phase 1 uses max_steps x batch of them)."}
    )
    hard_fraction: float = field(default=0.6, metadata={"help": "Fraction of training questions that are hard."})
    heldout_hard: int = field(
        default=1500,
        metadata={"help": "Hard questions held out of training: the first --calibration_hard calibrate the "
                  "thresholds, the rest are the test set of bench_adaptive.py."},
    )
    calibration_hard: int = field(default=500, metadata={"help": "Held-out hard questions used for calibration."})
    calibration_easy: int = field(
        default=150, metadata={"help": "Easy questions (of the 300) used for calibration; the rest are the test set."}
    )
    num_threads: int = field(
        default=1,
        metadata={"help": "torch threads (0: torch's default). The default 1: this model's matrices are small, and "
                  "on a CPU shared with other jobs more threads oversubscribe it (measured 8x slower products)."},
    )


@dataclass
class AdaptiveArguments:
    """Phase 2 and threshold calibration."""

    estimator_steps: int = field(default=200, metadata={"help": "Phase 2 steps (backbone frozen); 0 skips it."})
    estimator_learning_rate: float = field(default=3e-3, metadata={"help": "Learning rate of phase 2."})
    estimator_batch_size: int = field(default=128, metadata={"help": "Batch size of phase 2."})
    easy_tolerance: float = field(
        default=0.005, metadata={"help": "Calibration: allowed easy accuracy drop against full depth (0.005 = 0.5 pt)."}
    )
    hard_tolerance: float = field(
        default=0.0, metadata={"help": "Calibration: allowed hard accuracy drop against full depth."}
    )
    time_budget_minutes: float = field(
        default=15.0,
        metadata={"help": "Wall-clock budget of the whole run: phase 1 stops early (logged and recorded in "
                  "results.json) when continuing would leave less than --reserve_minutes for phase 2, calibration "
                  "and saving. 0 disables it."},
    )
    reserve_minutes: float = field(
        default=2.5, metadata={"help": "Time kept for phase 2, calibration and saving under --time_budget_minutes."}
    )
    calibration_threshold_steps: int = field(
        default=41,
        metadata={"help": "Calibration tries this many evenly spaced thresholds in [0, 1] (plus a few in (0.9, 1))."},
    )


def build_parser() -> HfArgumentParser:
    return script_parser((ModelArguments, DataArguments, AdaptiveArguments, TrainingArguments),
                         description=__doc__.split("\n\n")[0], training_defaults=TRAINING_DEFAULTS)


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None


def build_config(model_args: ModelArguments, tokenizer) -> AdaptiveDepthConfig:
    """The AdaptiveDepthConfig for the options (raises ValueError naming the field at fault)."""
    exits = _int_list(model_args.exit_layers, "--exit_layers")
    weights = [2.0] + [1.0] * (len(exits) - 1) if exits else None
    if model_args.exit_loss_weights:
        try:
            weights = [float(x) for x in model_args.exit_loss_weights.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--exit_loss_weights must be comma-separated numbers, got "
                             f"{model_args.exit_loss_weights!r}") from None
    dense = model_args.num_experts == 0
    kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=model_args.hidden_size, intermediate_size=model_args.intermediate_size,
        num_hidden_layers=model_args.num_hidden_layers, num_attention_heads=model_args.num_attention_heads,
        num_key_value_heads=model_args.num_key_value_heads, max_position_embeddings=32,
        first_k_dense_layers=model_args.num_hidden_layers if dense else 0,
        num_experts=1 if dense else model_args.num_experts,
        num_experts_per_tok=1 if dense else model_args.num_experts_per_tok,
        max_experts_per_token=1 if dense else model_args.num_experts_per_tok,
        moe_intermediate_size=model_args.moe_intermediate_size, router_mode="top_k",
        exit_layers=exits, exit_loss_weights=weights,
        estimator_input_layer=model_args.estimator_input_layer,
        estimator_hidden_size=model_args.estimator_hidden_size,
        estimator_loss_weight=model_args.estimator_loss_weight, estimator_target=model_args.estimator_target,
        estimator_loss_tolerance=model_args.estimator_loss_tolerance,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    try:
        return AdaptiveDepthConfig(**kwargs)
    except ValueError as error:
        raise ValueError(f"invalid model options: {error} (set them with the --<name> option of the same name)")
    except Exception as error:  # strict dataclass type errors
        raise ValueError(f"invalid model options: {error}") from None


def parse_args(argv: list[str] | None = None):
    """Parse and validate; invalid values end the program through `parser.error` naming the option."""
    parser = build_parser()
    try:
        model_args, data_args, adaptive_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:
        parser.error(str(error))

    def check(condition: bool, message: str) -> None:
        if not condition:
            parser.error(message)

    check(data_args.num_threads >= 0, "--num_threads must be >= 0.")
    check(data_args.train_examples >= 1, "--train_examples must be >= 1.")
    check(0.0 <= data_args.hard_fraction <= 1.0, f"--hard_fraction must be in [0, 1], got {data_args.hard_fraction}.")
    check(1 <= data_args.calibration_hard < data_args.heldout_hard <= 4500,
          "--calibration_hard must be >= 1 and below --heldout_hard, which is at most 4500 (half the hard space).")
    check(1 <= data_args.calibration_easy < 300, "--calibration_easy must be in [1, 299] (300 easy questions exist).")
    check(adaptive_args.estimator_steps >= 0, "--estimator_steps must be >= 0.")
    check(adaptive_args.estimator_batch_size >= 1, "--estimator_batch_size must be >= 1.")
    check(adaptive_args.calibration_threshold_steps >= 2, "--calibration_threshold_steps must be >= 2.")
    check(adaptive_args.time_budget_minutes >= 0, "--time_budget_minutes must be >= 0 (0 disables it).")
    budget = adaptive_args.time_budget_minutes
    check(budget == 0 or 0 <= adaptive_args.reserve_minutes < budget,
          "--reserve_minutes must be >= 0 and below --time_budget_minutes.")
    for name in ("easy_tolerance", "hard_tolerance"):
        check(0.0 <= getattr(adaptive_args, name) <= 1.0, f"--{name} must be in [0, 1].")
    check(training_args.max_steps > 0, "--max_steps must be positive.")
    try:
        build_config(model_args, build_tokenizer())
    except ValueError as error:
        parser.error(str(error))
    output_dir = Path(training_args.output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()):
        check((output_dir / "results.json").is_file(),
              f"--output_dir {output_dir} is not empty and does not hold a previous run of this script; its contents "
              "would be replaced. Choose another --output_dir.")
    return model_args, data_args, adaptive_args, training_args


def split_heldout(data_args: DataArguments, seed: int) -> dict[str, dict[str, list[str]]]:
    """Calibration and test prompts per split. Hard ones are held out of training; easy ones are all trained on."""
    import random

    rng = random.Random(seed + 1)
    hard = rng.sample([p.prompt for p in all_problems("hard")], data_args.heldout_hard)
    easy = [p.prompt for p in all_problems("easy")]
    rng.shuffle(easy)
    return {
        "calibration": {"easy": easy[: data_args.calibration_easy], "hard": hard[: data_args.calibration_hard]},
        "test": {"easy": easy[data_args.calibration_easy :], "hard": hard[data_args.calibration_hard :]},
    }


def problems_from_prompts(prompts: dict[str, list[str]]) -> dict[str, list]:
    by_prompt = {p.prompt: p for split in SPLITS for p in all_problems(split)}
    return {split: [by_prompt[prompt] for prompt in prompts[split]] for split in SPLITS}


class DeadlineCallback(TrainerCallback):
    """Stops training at a wall-clock deadline (`time.perf_counter()` value), so a run fits its time budget on a
    machine of any speed or load."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.deadline is not None and time.perf_counter() > self.deadline and not control.should_training_stop:
            control.should_training_stop = True
            self.stopped_at = state.global_step
            logger.warning("Time budget reached: phase 1 stops at step %d of %d.", state.global_step, state.max_steps)
        return control


class ExitLossTrainer(Trainer):
    """Trainer that also logs each exit's LM loss and the estimator's loss (means since the last log)."""

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


def calibrate(model, tokenizer, problems: dict[str, list], easy_tolerance: float, hard_tolerance: float,
              threshold_steps: int = 41) -> dict:
    """Per-exit accuracy, the full-depth accuracy, the threshold sweeps of both policies and the chosen thresholds."""
    exit_layers = list(model.config.exit_layers)
    measured = {split: exit_measurements(model, problems[split], tokenizer) for split in SPLITS}
    full = {split: measured[split]["correct"][:, -1].float().mean().item() for split in SPLITS}
    tolerance = {"easy": easy_tolerance, "hard": hard_tolerance}
    grid = threshold_grid(threshold_steps)
    estimator_points = [
        {"threshold": t, **{s: estimator_operating_point(measured[s], exit_layers, t) for s in SPLITS}} for t in grid
    ]
    confidence_points = [
        {"threshold": t, **{s: confidence_operating_point(model, problems[s], tokenizer, t) for s in SPLITS}}
        for t in grid
    ]
    return {
        "exit_accuracy": {s: measured[s]["correct"].float().mean(0).tolist() for s in SPLITS},
        "full_accuracy": full,
        "estimator": choose_threshold(estimator_points, full, tolerance),
        "confidence": choose_threshold(confidence_points, full, tolerance),
        "estimator_sweep": estimator_points,
        "confidence_sweep": confidence_points,
    }


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


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    model_args, data_args, adaptive_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    if data_args.num_threads:
        torch.set_num_threads(data_args.num_threads)
    output_dir = Path(training_args.output_dir)
    tokenizer = build_tokenizer()

    heldout = split_heldout(data_args, training_args.seed)
    excluded = set(heldout["calibration"]["hard"]) | set(heldout["test"]["hard"])
    train_problems = sample_problems(data_args.train_examples, data_args.hard_fraction, training_args.seed, excluded)
    calibration = problems_from_prompts(heldout["calibration"])
    logger.info("Training questions: %d (%d hard); %d hard questions held out", len(train_problems),
                sum(p.split == "hard" for p in train_problems), len(excluded))

    config = build_config(model_args, tokenizer)
    model = AdaptiveDepthForCausalLM(config)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info("AdaptiveDepth: %d parameters, %d layers, exits %s", num_parameters, config.num_hidden_layers,
                config.exit_layers)

    # ---- Phase 1: every exit and the estimator, jointly ----
    collator = PadCollator(tokenizer.pad_token_id)
    budget = adaptive_args.time_budget_minutes
    deadline = DeadlineCallback(started + 60 * (budget - adaptive_args.reserve_minutes) if budget else None)
    trainer = ExitLossTrainer(model=model, args=training_args, train_dataset=ProblemDataset(train_problems, tokenizer),
                              data_collator=collator, exit_layers=list(config.exit_layers), callbacks=[deadline])
    phase1_start = time.perf_counter()
    trainer.train()
    phase1_seconds = time.perf_counter() - phase1_start
    history = list(trainer.history)

    # ---- Phase 2: the estimator alone, backbone frozen ----
    phase2_seconds = 0.0
    if adaptive_args.estimator_steps:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("model.estimator."))
        phase2_dir = tempfile.mkdtemp(prefix="train_adaptive_phase2_")  # nothing is saved there (save_strategy="no")
        phase2_args = TrainingArguments(
            output_dir=phase2_dir, use_cpu=True, max_steps=adaptive_args.estimator_steps,
            per_device_train_batch_size=adaptive_args.estimator_batch_size,
            learning_rate=adaptive_args.estimator_learning_rate, lr_scheduler_type="cosine", warmup_steps=20,
            logging_steps=training_args.logging_steps, save_strategy="no", eval_strategy="no", report_to="none",
            seed=training_args.seed + 1, disable_tqdm=training_args.disable_tqdm, dataloader_num_workers=0,
        )
        estimator_problems = sample_problems(adaptive_args.estimator_steps * adaptive_args.estimator_batch_size,
                                             data_args.hard_fraction, training_args.seed + 2, excluded)
        phase2 = ExitLossTrainer(model=model, args=phase2_args,
                                 train_dataset=ProblemDataset(estimator_problems, tokenizer), data_collator=collator,
                                 exit_layers=list(config.exit_layers))
        phase2_start = time.perf_counter()
        phase2.train()
        phase2_seconds = time.perf_counter() - phase2_start
        shutil.rmtree(phase2_dir, ignore_errors=True)
        history += [{**e, "step": e["step"] + trainer.state.global_step} for e in phase2.history]
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    model.eval()

    # ---- Calibrate the thresholds on held-out calibration questions ----
    logger.info("Calibrating thresholds on %d easy / %d hard held-out questions",
                len(calibration["easy"]), len(calibration["hard"]))
    calibrated = calibrate(model, tokenizer, calibration, adaptive_args.easy_tolerance, adaptive_args.hard_tolerance,
                           adaptive_args.calibration_threshold_steps)
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
        "num_parameters": num_parameters,
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "exit_layers",
                                                    "exit_loss_weights", "estimator_input_layer",
                                                    "estimator_target", "first_k_dense_layers", "num_experts")},
        "phase1_steps": trainer.state.global_step,
        "phase1_max_steps": training_args.max_steps,
        "phase1_stopped_by_time_budget": deadline.stopped_at is not None,
        "phase2_steps": adaptive_args.estimator_steps,
        "phase1_seconds": phase1_seconds,
        "phase2_seconds": phase2_seconds,
        "train_examples": len(train_problems),
        "calibration": {k: v for k, v in calibrated.items() if not k.endswith("_sweep")},
        "calibration_sweeps": {k: v for k, v in calibrated.items() if k.endswith("_sweep")},
        "thresholds": {"estimator": model.config.estimator_threshold,
                       "confidence": model.config.confidence_threshold},
        "history": history,
        "run_wall_time_seconds": None,
    }
    png = plot_training(history, calibrated, list(config.exit_layers))
    results["run_wall_time_seconds"] = time.perf_counter() - started
    card = render_model_card(model_card_template("adaptive_depth"),
                             card_values(results, config, training_args, data_args, output_dir))
    atomic_save_pretrained(
        output_dir, model, tokenizer,
        extra_files={"README.md": card, "results.json": json.dumps(results, indent=2),
                     "heldout.json": json.dumps(heldout, indent=1), "training.png": png},
    )
    logger.info("Saved to %s (run took %s)", output_dir, format_seconds(time.perf_counter() - started))
    return results


def card_values(results: dict, config: AdaptiveDepthConfig, training_args, data_args, output_dir: Path) -> dict:
    """The model card's placeholders (bench_adaptive.py adds the test-set table to the card it writes)."""
    cal = results["calibration"]
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
    return {
        "model_path": output_dir.as_posix(),
        "num_parameters": f"{results['num_parameters']:,}",
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "exit_layers": ", ".join(map(str, config.exit_layers)),
        "first_exit": config.exit_layers[0],
        "exit_loss_weights": ", ".join(f"{w:g}" for w in config.exit_loss_weights),
        "estimator_input_layer": config.estimator_input_layer,
        "ffn": "dense SwiGLU" if config.first_k_dense_layers == config.num_hidden_layers
        else f"mixture of {config.num_experts} experts",
        "train_examples": f"{results['train_examples']:,}",
        "hard_percent": f"{data_args.hard_fraction:.0%}",
        "heldout_hard": data_args.heldout_hard,
        "calibration_hard": data_args.calibration_hard,
        "calibration_easy": data_args.calibration_easy,
        "phase1_steps": (f"{results['phase1_steps']} of {results['phase1_max_steps']} planned; the time budget "
                         "stopped it" if results["phase1_stopped_by_time_budget"] else results["phase1_steps"]),
        "phase2_steps": results["phase2_steps"],
        "batch_size": training_args.per_device_train_batch_size,
        "learning_rate": training_args.learning_rate,
        "train_time": format_seconds(results["phase1_seconds"] + results["phase2_seconds"]),
        "estimator_threshold": f"{config.estimator_threshold:.4g}",
        "confidence_threshold": f"{config.confidence_threshold:.4g}",
        "exit_accuracy_table": "\n".join(rows),
        "policy_table": "\n".join(policy_rows),
    }


if __name__ == "__main__":
    main()
