#!/usr/bin/env python
"""Train the lightarch multimodal model on the built-in tri-modal data, with and without the alignment loss (CPU).

The data (lightarch.data.multimodal): Fashion-MNIST images, the ten class names spoken by espeak-ng in several
voices, speeds and pitches, and generated questions needing one or two modalities ("<image> what is shown?",
"<audio> what is said?", "<image> <audio> does the voice name what is shown?", "<image> <image> which of the two items
is worn on the feet?", "<image> where is it worn?"). Evaluation uses held-out images (the Fashion-MNIST test file)
and held-out voices. `--dataset synthetic` replaces both with generated images and tones (tests, smoke runs).

Two models are trained the same way (same initialisation, data, order and number of steps) on `transformers.Trainer`:

    aligned        generation loss on the answers + the joint contrastive alignment loss (text-image and text-audio
                   pairs by default: the image-audio pair is never trained, so its retrieval measures ImageBind's
                   emergent alignment)
    no_alignment   generation loss only (`alignment_loss_weight=0`), the ablation

Trainer logs every loss part (generation, alignment, each pair). Each model is then measured on the held-out split
(VQA accuracy per question kind, retrieval R@1, modality alignment error); `scripts/eval_multimodal.py` measures the
saved models again from disk and writes the comparison table and plots.

Writes into --output_dir (default outputs/multimodal); each folder is written atomically (temporary folder, rename):

    aligned/, no_alignment/      model + processor (AutoModelForImageTextToText / AutoProcessor, trust_remote_code),
                                 README.md (model card), results.json, training.png, checkpoint-*/ (resume)
    results.json, results.md     both runs side by side
    training.png                 the loss parts of both runs

Every transformers.TrainingArguments option is accepted; see --help.

    python scripts/train_multimodal.py
    python scripts/train_multimodal.py --max_steps 100 --output_dir outputs/mm_quick
    python scripts/train_multimodal.py --dataset synthetic --max_steps 20 --output_dir outputs/mm_smoke
    python scripts/train_multimodal.py --resume_from_checkpoint True     # continue an interrupted run
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

PROCESS_START = time.perf_counter()  # the time budget counts the imports below too
if __name__ == "__main__":  # spinning OpenMP threads crawl on a shared CPU (before torch; see scripts/train.py)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import HfArgumentParser, TrainingArguments, set_seed  # noqa: E402

import lightarch  # noqa: E402,F401  (registers the lightarch Auto classes)
from lightarch import MultiModalConfig  # noqa: E402
from lightarch import MultiModalForConditionalGeneration, MultiModalProcessor  # noqa: E402
from lightarch.data.multimodal import (
    FASHION_MNIST_DIR,
    QUESTION_KINDS,
    MissingDataError,
    QuestionAlignmentCollator,
    QuestionAlignmentDataset,
    alignment_examples,
    build_tokenizer,
    fashion_mnist_pools,
    generate_questions,
    synthetic_pools,
)
from lightarch.evaluation.multimodal import comparison_table, evaluate_model
from lightarch.training.multimodal_trainer import MultiModalTrainer  # noqa: E402
from lightarch.training.callbacks import TimeBudgetCallback
from lightarch.training.checkpoints import atomic_save_pretrained, last_complete_checkpoint, write_atomically
from lightarch.evaluation.plots import figure_to_png, pyplot
from lightarch.evaluation.model_cards import model_card_template, render_model_card
from lightarch.training.cli import script_parser

logger = logging.getLogger("train_multimodal")
VARIANTS = ("aligned", "no_alignment")
LOSS_PARTS = ("generation_loss", "alignment_loss", "text_image_loss", "text_audio_loss", "image_audio_loss")
KEEP_IN_VARIANT_DIR = ("checkpoint-*", "runs")

# Defaults for transformers.TrainingArguments when the command line does not set them (shown by --help). Both runs
# together fit --time_budget_minutes on an idle 2-core machine; the budget cuts them short (equally) on a busy one.
TRAINING_DEFAULTS = {
    "output_dir": "outputs/multimodal",
    "use_cpu": True,
    "max_steps": 1500,  # 500 steps: VQA 85.8% vs 72.4% without alignment; 1500: 91.0% vs 66.8% (about 11 min for both)
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 30,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "logging_steps": 25,
    "logging_first_step": True,
    "eval_strategy": "no",
    "save_strategy": "steps",
    "save_steps": 0.5,
    "save_total_limit": 1,
    "report_to": "none",
    "seed": 42,
    "dataloader_num_workers": 1,  # the processor (resampling, log-mel) runs beside the training step
    "remove_unused_columns": False,  # the collator reads the raw question / alignment items
}


@dataclass
class ModelArguments:
    """The model (both runs use the same architecture and initialisation)."""

    preset: str = field(default="tiny", metadata={"help": "MultiModalConfig preset (MultiModalConfig.from_preset)."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "JSON object of MultiModalConfig fields to override, sub-configs as nested objects, e.g. "
                  "'{\"audio_seq_length\": 4, \"decoder_config\": {\"num_hidden_layers\": 2}}'."},
    )
    alignment_pairs: str = field(
        default="text_image,text_audio",
        metadata={"help": "Comma-separated pairs whose contrastive loss trains the aligned model (text_image, "
                  "text_audio, image_audio). The default leaves image_audio out: its retrieval then measures "
                  "emergent alignment through text (ImageBind)."},
    )
    alignment_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the alignment loss in the aligned run (the ablation uses 0)."}
    )
    ablation: bool = field(
        default=True, metadata={"help": "Also train the model without the alignment loss (the ablation)."}
    )


@dataclass
class DataArguments:
    """The built-in tri-modal data."""

    dataset: str = field(
        default="fashion_mnist",
        metadata={"help": "fashion_mnist: real images and espeak-ng speech (needs `sudo apt-get install "
                  "dataset-fashion-mnist espeak-ng`); synthetic: generated images and tones (tests, smoke runs).",
                  "choices": ["fashion_mnist", "synthetic"]},
    )
    train_images_per_class: int = field(default=300, metadata={"help": "Training images per class."})
    eval_images_per_class: int = field(default=50, metadata={"help": "Held-out images per class (evaluation)."})
    eval_questions_per_kind: int = field(
        default=100, metadata={"help": f"Held-out questions per kind ({len(QUESTION_KINDS)} kinds) for VQA accuracy."}
    )
    fashion_mnist_dir: str = field(default=str(FASHION_MNIST_DIR), metadata={"help": "Fashion-MNIST IDX folder."})
    espeak_executable: str = field(default="espeak-ng", metadata={"help": "The espeak-ng program."})
    clip_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache of synthesized clips (default $LIGHTARCH_CACHE/espeak-ng or "
                                "~/.cache/lightarch/espeak-ng)."}
    )
    num_threads: int = field(
        default=1,
        metadata={"help": "torch threads of the training process (0: torch's default). The default 1 leaves the "
                  "second core of a 2-core machine to the data worker (--dataloader_num_workers 1); the matrices "
                  "are small and more threads on a shared CPU oversubscribe it."},
    )


@dataclass
class ScriptTrainingArguments(TrainingArguments):
    """transformers.TrainingArguments plus the wall-clock budget of the whole script."""

    time_budget_minutes: float = field(
        default=20.0,
        metadata={"help": "Wall-clock budget of the whole script (data, both runs, measurements, saving), in minutes. "
                  "The aligned run gets half of what is left after data preparation; the ablation then trains the "
                  "same number of steps. A run stopped by the budget is checkpointed (--resume_from_checkpoint True "
                  "continues it). 0 disables it."},
    )


def build_parser() -> HfArgumentParser:
    return script_parser(
        (ModelArguments, DataArguments, ScriptTrainingArguments),
        description=__doc__.split("\n\n")[0],
        training_defaults=TRAINING_DEFAULTS,
        help_overrides={
            "resume_from_checkpoint": (
                "True: continue an interrupted run in --output_dir (a finished run is kept, an unfinished one "
                "continues from its last complete checkpoint)."
            ),
            "output_dir": "Where both models, their cards and the comparison are written (see the description).",
        },
    )


def build_config(model_args: ModelArguments, tokenizer, alignment_loss_weight: float) -> MultiModalConfig:
    """The MultiModalConfig of one run (raises ValueError naming the option at fault)."""
    overrides = {}
    if model_args.config_overrides:
        try:
            overrides = json.loads(model_args.config_overrides)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config_overrides must be a JSON object: {error}") from None
        if not isinstance(overrides, dict):
            raise ValueError("--config_overrides must be a JSON object, e.g. '{\"audio_seq_length\": 4}'.")
    decoder = dict(overrides.pop("decoder_config", {}))
    decoder.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    pairs = [p.strip() for p in model_args.alignment_pairs.split(",") if p.strip()]
    try:
        return MultiModalConfig.from_preset(
            model_args.preset, decoder_config=decoder, alignment_pairs=pairs,
            alignment_loss_weight=alignment_loss_weight,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            audio_token_id=tokenizer.convert_tokens_to_ids("<audio>"), **overrides,
        )
    except (ValueError, TypeError) as error:
        raise ValueError(f"invalid model options: {error} (set them with --preset, --alignment_pairs or "
                         "--config_overrides)") from None
    except Exception as error:  # strict dataclass validation errors
        raise ValueError(f"invalid model options: {error}") from None


def parse_args(argv: list[str] | None = None):
    """Parse and validate; invalid values end the program through `parser.error` naming the option."""
    parser = build_parser()
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:
        parser.error(str(error))

    def check(condition: bool, message: str) -> None:
        if not condition:
            parser.error(message)

    for name in ("train_images_per_class", "eval_images_per_class", "eval_questions_per_kind"):
        check(getattr(data_args, name) >= 1, f"--{name} must be >= 1, got {getattr(data_args, name)}.")
    check(data_args.num_threads >= 0, "--num_threads must be >= 0.")
    check(training_args.max_steps > 0, "--max_steps must be positive (this script trains by steps).")
    check(training_args.per_device_train_batch_size >= 2,
          "--per_device_train_batch_size must be >= 2 (the contrastive loss needs in-batch negatives).")
    check(training_args.time_budget_minutes >= 0, "--time_budget_minutes must be >= 0 (0 disables it).")
    check(model_args.alignment_loss_weight > 0,
          "--alignment_loss_weight must be > 0 (the ablation without alignment is trained by --ablation True).")
    try:
        build_config(model_args, build_tokenizer(), model_args.alignment_loss_weight)
    except ValueError as error:
        parser.error(str(error))
    resume = training_args.resume_from_checkpoint
    if resume is not None and str(resume).lower() in ("false", "no", "0", ""):
        resume = None
    check(resume is None or str(resume).lower() in ("true", "latest"),
          f"--resume_from_checkpoint takes True (continue the run in --output_dir), got {resume!r}: this script "
          "trains two models, each resumes from its own last checkpoint.")
    training_args.resume_from_checkpoint = "true" if resume is not None else None

    output_dir = Path(training_args.output_dir)
    check(not output_dir.exists() or output_dir.is_dir(), f"--output_dir {output_dir} is a file, not a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        ours = (output_dir / "results.json").is_file() or any((output_dir / v).is_dir() for v in VARIANTS)
        check(ours, f"--output_dir {output_dir} is not empty and does not hold a previous run of this script; its "
                    "contents would be replaced. Choose another --output_dir.")
    return model_args, data_args, training_args


def load_pools(data_args: DataArguments, seed: int) -> dict:
    """{"train", "eval"} pools of the chosen data set; a missing apt package ends the program with the fix."""
    if data_args.dataset == "synthetic":
        return synthetic_pools(data_args.train_images_per_class, data_args.eval_images_per_class, seed=seed)
    try:
        return fashion_mnist_pools(data_args.train_images_per_class, data_args.eval_images_per_class,
                                   root=data_args.fashion_mnist_dir, cache_dir=data_args.clip_cache_dir, seed=seed,
                                   executable=data_args.espeak_executable)
    except MissingDataError as error:
        raise SystemExit(f"error: {error}") from None


def plot_losses(histories: dict[str, list[dict]]) -> bytes:
    """PNG: generation loss of each run, and the alignment loss of each pair (solid: aligned; dashed: ablation,
    where alignment is measured but not trained)."""
    plt = pyplot()
    fig, (ax_gen, ax_align) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"aligned": "-", "no_alignment": "--"}
    for variant, history in histories.items():
        points = [(e["step"], e["generation_loss"]) for e in history if "generation_loss" in e]
        if points:
            ax_gen.plot(*zip(*points), styles[variant], lw=1.8, label=variant)
        for part, color in (("text_image_loss", "tab:blue"), ("text_audio_loss", "tab:orange"),
                            ("image_audio_loss", "tab:green")):
            points = [(e["step"], e[part]) for e in history if e.get(part) is not None]
            if points:
                ax_align.plot(*zip(*points), styles[variant], color=color, lw=1.5,
                              label=f"{part.removesuffix('_loss').replace('_', '-')} ({variant})")
    ax_gen.set_yscale("log")
    ax_gen.set_title("Generation loss (answer tokens)")
    ax_align.set_title("Contrastive loss per pair (InfoNCE)")
    for ax in (ax_gen, ax_align):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_to_png(fig)


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def summarize(measured: dict) -> dict:
    """The JSON-friendly part of `evaluate_model`'s result (no embeddings)."""
    return {"vqa": measured["vqa"], "retrieval_r_at_1": measured["retrieval_r_at_1"],
            "alignment_error": measured["alignment_error"]}


def train_variant(variant: str, model_args, data_args, training_args, tokenizer, pools, train_dataset,
                  eval_questions, max_steps: int, deadline: float | None) -> dict:
    """Train one run into `<output_dir>/<variant>`, measure it on the held-out split and save it atomically.

    A finished run found there on resume is loaded instead of retrained (its results.json is returned)."""
    variant_dir = Path(training_args.output_dir) / variant
    resume = None
    if training_args.resume_from_checkpoint:
        if (variant_dir / "results.json").is_file() and (variant_dir / "config.json").is_file():
            logger.info("[%s] finished in an earlier run; keeping it", variant)
            return json.loads((variant_dir / "results.json").read_text(encoding="utf-8"))
        resume = last_complete_checkpoint(variant_dir)
    else:
        for stale in sorted(variant_dir.glob("checkpoint-*")):  # an earlier run's; --resume would pick them up
            shutil.rmtree(stale)

    weight = model_args.alignment_loss_weight if variant == "aligned" else 0.0
    config = build_config(model_args, tokenizer, weight)
    processor = MultiModalProcessor.from_config(config, tokenizer)
    set_seed(training_args.seed)  # the same initialisation for both runs
    model = MultiModalForConditionalGeneration(config)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info("[%s] %s parameters; alignment_loss_weight=%s, trained pairs %s", variant, f"{num_parameters:,}",
                weight, config.alignment_pairs if weight else "none")

    args = dataclasses.replace(training_args, output_dir=str(variant_dir), max_steps=max_steps,
                               resume_from_checkpoint=resume)
    budget = TimeBudgetCallback(deadline, reserve_seconds=30.0)
    trainer = MultiModalTrainer(model=model, args=args, train_dataset=train_dataset,
                                data_collator=QuestionAlignmentCollator(processor, pools["train"]),
                                callbacks=[budget])
    train_start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - train_start
    if budget.stopped_at_step is not None:
        logger.warning("[%s] stopped by the time budget at step %d of %d (--resume_from_checkpoint True continues "
                       "it)", variant, trainer.state.global_step, max_steps)

    logger.info("[%s] measuring on %d held-out questions, %d images, %d clips", variant, len(eval_questions),
                len(pools["eval"].images), len(pools["eval"].clips))
    measured = evaluate_model(model, processor, pools["eval"], eval_questions,
                              training_args.per_device_eval_batch_size, show_progress=not training_args.disable_tqdm)
    history = [{k: v for k, v in e.items()} for e in trainer.state.log_history if "step" in e]
    results = {
        "variant": variant,
        "alignment_loss_weight": weight,
        "alignment_pairs_trained": list(config.alignment_pairs) if weight else [],
        "num_parameters": num_parameters,
        "train_steps": trainer.state.global_step,
        "max_steps": max_steps,
        "stopped_by_time_budget": budget.stopped_at_step is not None,
        "train_seconds": train_seconds,
        "resumed_from": resume,
        "final_losses": final_losses(history),
        "heldout": summarize(measured),
        "history": history,
    }
    logger.info("[%s] held-out VQA accuracy %.3f %s; R@1 %s; alignment error %.3f", variant,
                results["heldout"]["vqa"]["accuracy"],
                {k: round(v, 3) for k, v in results["heldout"]["vqa"]["per_kind"].items()},
                {k: round(v, 3) for k, v in results["heldout"]["retrieval_r_at_1"].items()},
                results["heldout"]["alignment_error"]["error"])
    card = render_model_card(model_card_template("multimodal"),
                             card_values(results, config, data_args, training_args, variant_dir, pools))
    atomic_save_pretrained(variant_dir, model, processor,
                           extra_files={"README.md": card, "results.json": json.dumps(results, indent=2),
                                        "training.png": plot_losses({variant: history})},
                           keep=KEEP_IN_VARIANT_DIR)
    return results


def final_losses(history: list[dict], window: int = 3) -> dict:
    """Mean of the last `window` logged values of each loss part."""
    out = {}
    for part in LOSS_PARTS:
        values = [e[part] for e in history if e.get(part) is not None]
        if values:
            out[part] = sum(values[-window:]) / len(values[-window:])
    return out


def card_values(results: dict, config: MultiModalConfig, data_args, training_args, variant_dir: Path, pools) -> dict:
    """The model card's placeholders."""
    heldout = results["heldout"]
    vqa_rows = ["| question kind | accuracy |", "|---|---|"]
    vqa_rows += [f"| {kind} | {100 * acc:.1f}% |" for kind, acc in heldout["vqa"]["per_kind"].items()]
    vqa_rows.append(f"| **all** | **{100 * heldout['vqa']['accuracy']:.1f}%** |")
    retrieval_rows = ["| query -> gallery | R@1 |", "|---|---|"]
    retrieval_rows += [f"| {d} | {r:.3f} |" for d, r in heldout["retrieval_r_at_1"].items()]
    loss_rows = ["| loss part | final value |", "|---|---|"]
    loss_rows += [f"| {part} | {value:.4f} |" for part, value in results["final_losses"].items()]
    train, evaluation = pools["train"].summary(), pools["eval"].summary()
    data = ("Fashion-MNIST images with espeak-ng speech" if data_args.dataset == "fashion_mnist"
            else "generated images and tones (synthetic fixture)")
    weight = results["alignment_loss_weight"]
    objective = (f"generation loss + {weight:g} x alignment loss (symmetric InfoNCE, learnable temperature, "
                 f"pairs trained: {', '.join(results['alignment_pairs_trained'])}; modality weights "
                 f"{config.alignment_loss_weights})" if weight else
                 "generation loss only (the ablation: alignment losses are computed for the logs, never trained)")
    decoder = config.decoder_config
    return {
        "variant": results["variant"],
        "model_path": variant_dir.as_posix(),
        "num_parameters": f"{results['num_parameters']:,}",
        "decoder": f"{type(decoder).__name__} ({decoder.num_hidden_layers} layers, hidden {decoder.hidden_size})",
        "vision": f"ViT ({config.vision_config.num_hidden_layers} layers, hidden {config.vision_config.hidden_size}, "
                  f"{config.image_seq_length} patch tokens per image)",
        "audio": f"Parakeet encoder ({config.audio_config.num_hidden_layers} layers, hidden "
                 f"{config.audio_config.hidden_size}, {config.audio_seq_length} tokens per clip)",
        "alignment_embed_dim": config.alignment_embed_dim,
        "objective": objective,
        "data": data,
        "train_images": train["images"],
        "train_clips": train["clips"],
        "train_voices": ", ".join(sorted({v.split()[0] for v in train["voices"]})),
        "eval_images": evaluation["images"],
        "eval_clips": evaluation["clips"],
        "eval_voices": ", ".join(sorted({v.split()[0] for v in evaluation["voices"]})),
        "eval_questions": heldout["vqa"]["count"],
        "train_steps": results["train_steps"],
        "train_steps_note": (f" (stopped by the {training_args.time_budget_minutes}-minute budget before "
                             f"{results['max_steps']})" if results["stopped_by_time_budget"] else ""),
        "batch_size": training_args.per_device_train_batch_size,
        "learning_rate": training_args.learning_rate,
        "train_time": format_seconds(results["train_seconds"]),
        "loss_table": "\n".join(loss_rows),
        "vqa_table": "\n".join(vqa_rows),
        "retrieval_table": "\n".join(retrieval_rows),
        "alignment_error": f"{heldout['alignment_error']['error']:.3f}",
    }


def main(argv: list[str] | None = None, started: float | None = None) -> dict:
    started = time.perf_counter() if started is None else started
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    if data_args.num_threads:
        torch.set_num_threads(data_args.num_threads)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # ---- Data: the same questions, alignment triplets and order for both runs ----
    pools = load_pools(data_args, training_args.seed)
    tokenizer = build_tokenizer()
    examples = training_args.max_steps * training_args.per_device_train_batch_size
    per_kind = math.ceil(examples / len(QUESTION_KINDS))
    questions = generate_questions(pools["train"], per_kind, training_args.seed)[:examples]
    train_dataset = QuestionAlignmentDataset(questions, alignment_examples(pools["train"], len(questions),
                                                                           training_args.seed + 1))
    eval_questions = generate_questions(pools["eval"], data_args.eval_questions_per_kind, training_args.seed + 2)
    logger.info("Data (%s): train %s; held-out %s; %d training questions, %d held-out questions", data_args.dataset,
                pools["train"].summary() | {"voices": len(set(pools["train"].clip_voices))},
                pools["eval"].summary() | {"voices": len(set(pools["eval"].clip_voices))}, len(questions),
                len(eval_questions))

    # ---- Both runs: the aligned one gets half the remaining budget, the ablation as many steps ----
    budget = training_args.time_budget_minutes
    end = started + 60 * budget if budget else None
    runs = {}
    variants = VARIANTS if model_args.ablation else VARIANTS[:1]
    max_steps = training_args.max_steps
    for index, variant in enumerate(variants):
        deadline = None
        if end is not None:
            deadline = time.perf_counter() + (end - time.perf_counter()) / (len(variants) - index)
        runs[variant] = train_variant(variant, model_args, data_args, training_args, tokenizer, pools, train_dataset,
                                      eval_questions, max_steps, deadline)
        max_steps = runs[variant]["train_steps"]  # the ablation trains exactly as long as the aligned run

    # ---- The comparison ----
    results = {
        "dataset": data_args.dataset,
        "seed": training_args.seed,
        "data_args": dataclasses.asdict(data_args),
        "data": {"train": pools["train"].summary(), "eval": pools["eval"].summary(),
                 "train_questions": len(questions), "eval_questions": len(eval_questions)},
        "runs": {v: {k: r[k] for k in r if k != "history"} for v, r in runs.items()},
        "run_wall_time_seconds": None,
    }
    if "no_alignment" in runs:
        with_alignment = runs["aligned"]["heldout"]["vqa"]["accuracy"]
        without = runs["no_alignment"]["heldout"]["vqa"]["accuracy"]
        results["vqa_accuracy_gain"] = with_alignment - without
        results["vqa_accuracy_relative_gain"] = (with_alignment - without) / without if without else None
    results["run_wall_time_seconds"] = time.perf_counter() - started
    write_atomically(output_dir / "training.png", plot_losses({v: r["history"] for v, r in runs.items()}))
    table = comparison_table({variant: run["heldout"] for variant, run in results["runs"].items()})
    write_atomically(output_dir / "results.md", "# Multimodal training: held-out results\n\n" + table + "\n")
    write_atomically(output_dir / "results.json", json.dumps(results, indent=2))
    logger.info("Held-out comparison:\n%s", table)
    logger.info("Saved to %s (run took %s)", output_dir, format_seconds(time.perf_counter() - started))
    return results


if __name__ == "__main__":
    main(started=PROCESS_START)
