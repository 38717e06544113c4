"""Train the multimodal model on the built-in tri-modal data (`lightarch.data.multimodal`), with and without the
alignment loss, on CPU.

Two models are trained the same way (same initialisation, data, order and number of steps) on `MultiModalTrainer`:

    aligned        generation loss on the answers + the joint contrastive alignment loss (the `trimodal-qa` preset
                   trains the text-image and text-audio pairs: the image-audio pair is never trained, so its
                   retrieval measures ImageBind's emergent alignment)
    no_alignment   generation loss only (`alignment_loss_weight=0`), the ablation

Each model is measured on the held-out split (VQA accuracy per question kind, retrieval R@1, modality alignment
error, `lightarch.evaluation.multimodal`) and saved into `<output_dir>/<variant>`: model, processor and results.json
atomically first, then the model card (README.md) and training.png. The comparison of both runs (results.json,
results.md, training.png) goes into `output_dir` last.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from transformers import PreTrainedTokenizerBase, TrainingArguments, set_seed

from ..configuration import MultiModalConfig
from ..data.multimodal import (
    AUDIO_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    QUESTION_KINDS,
    ModalityPool,
    MultiModalData,
    Question,
    QuestionAlignmentCollator,
    QuestionAlignmentDataset,
    alignment_examples,
    build_tokenizer,
    generate_questions,
)
from ..evaluation.model_cards import format_seconds, hub_card, model_card_template, render_model_card
from ..evaluation.multimodal import comparison_table, evaluate_model
from ..evaluation.plots import figure_to_png, pyplot
from ..modeling_multimodal import MultiModalForConditionalGeneration
from ..processing_multimodal import MultiModalProcessor
from .callbacks import TimeBudgetCallback
from .checkpoints import (
    atomic_save_pretrained,
    check_output_dir,
    last_complete_checkpoint,
    prepare_output_dir,
    write_atomically,
    writing_beside_saved_model,
)
from .multimodal_trainer import MultiModalTrainer
from .router_bias import RouterBiasUpdateCallback

logger = logging.getLogger(__name__)

SCRIPT = "train_multimodal.py"  # the writer named in the output folders' markers (`check_output_dir`)

VARIANTS = ("aligned", "no_alignment")
LOSS_PARTS = ("generation_loss", "alignment_loss", "text_image_loss", "text_audio_loss", "image_audio_loss")
KEEP_IN_VARIANT_DIR = ("checkpoint-*", "runs")  # carried over when a variant folder is saved again


def resume_requested(training_args: TrainingArguments) -> bool:
    """Whether `--resume_from_checkpoint` asks to continue the run in `output_dir` (True / "true" / "latest"); a
    checkpoint path is refused: each of the two models resumes from its own last checkpoint."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", "0", ""):
        return False
    if str(value).lower() in ("true", "latest"):
        return True
    raise ValueError(f"--resume_from_checkpoint takes True (continue the run in --output_dir), got {value!r}: this "
                     "script trains two models, each resumes from its own last checkpoint.")


def check_multimodal_run(config: MultiModalConfig, training_args: TrainingArguments,
                         tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Raise a ValueError naming the option and the fix if this run cannot work (before any data or training)."""
    tokenizer = tokenizer or build_tokenizer()
    if training_args.max_steps <= 0:
        raise ValueError("--max_steps must be positive (this recipe trains by steps).")
    if training_args.per_device_train_batch_size < 2:
        raise ValueError("--per_device_train_batch_size must be >= 2 (the contrastive loss needs in-batch negatives).")
    if config.alignment_loss_weight <= 0:
        raise ValueError(f"--config_overrides alignment_loss_weight={config.alignment_loss_weight}: the aligned run "
                         "needs a weight > 0 (the ablation without alignment is trained by --ablation True).")
    decoder = config.decoder_config
    if decoder.vocab_size < len(tokenizer):
        raise ValueError(f"--config_overrides decoder_config.vocab_size={decoder.vocab_size}: the tokenizer of the "
                         f"built-in data has {len(tokenizer)} tokens; use at least that many (the `trimodal-qa` preset "
                         "has exactly that).")
    expected = {"decoder_config.pad_token_id": (decoder.pad_token_id, tokenizer.pad_token_id),
                "decoder_config.bos_token_id": (decoder.bos_token_id, tokenizer.bos_token_id),
                "decoder_config.eos_token_id": (decoder.eos_token_id, tokenizer.eos_token_id),
                "image_token_id": (config.image_token_id, tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)),
                "audio_token_id": (config.audio_token_id, tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER))}
    for name, (value, wanted) in expected.items():
        if value != wanted:
            raise ValueError(f"--config_overrides {name}={value}: the tokenizer of the built-in data has {wanted}; use "
                             "the `trimodal-qa` preset (or drop the override).")
    resume_requested(training_args)
    check_output_dir(training_args.output_dir, SCRIPT)
    for variant in VARIANTS:  # each model folder is replaced by its own atomic save
        check_output_dir(Path(training_args.output_dir) / variant, SCRIPT, option=f"--output_dir's {variant}/")


def train_multimodal(config: MultiModalConfig, training_args: TrainingArguments,
                     data: MultiModalData = MultiModalData(), ablation: bool = True, time_budget_minutes: float = 0.0,
                     started: float | None = None) -> dict:
    """Train the aligned model (`config`) and, with `ablation`, the same model with `alignment_loss_weight=0`, each
    into `<training_args.output_dir>/<variant>`, measure both on the held-out split and write the comparison; returns
    the results (also in `<output_dir>/results.json`).

    `time_budget_minutes` > 0 bounds the whole run, counted from `started` (a `time.perf_counter()` value, default
    now): the aligned run gets half of what is left after data preparation and the ablation then trains as many
    steps. A run stopped by the budget is checkpointed; `training_args.resume_from_checkpoint=True` continues an
    interrupted run (a finished variant is kept). Raises `MissingDataError` when the real data is not installed.
    """
    started = time.perf_counter() if started is None else started
    tokenizer = build_tokenizer()
    check_multimodal_run(config, training_args, tokenizer)
    output_dir = prepare_output_dir(training_args.output_dir, SCRIPT)

    # Data: the same questions, alignment triplets and order for both runs.
    pools = data.pools(training_args.seed, show_progress=not training_args.disable_tqdm)
    examples = training_args.max_steps * training_args.per_device_train_batch_size
    per_kind = math.ceil(examples / len(QUESTION_KINDS))
    questions = generate_questions(pools["train"], per_kind, training_args.seed)[:examples]
    train_dataset = QuestionAlignmentDataset(questions, alignment_examples(pools["train"], len(questions),
                                                                           training_args.seed + 1))
    eval_questions = generate_questions(pools["eval"], data.eval_questions_per_kind, training_args.seed + 2)
    logger.info("Data (%s): train %s; held-out %s; %d training questions, %d held-out questions", data.dataset,
                pools["train"].summary() | {"voices": len(set(pools["train"].clip_voices))},
                pools["eval"].summary() | {"voices": len(set(pools["eval"].clip_voices))}, len(questions),
                len(eval_questions))

    # Both runs: the aligned one gets half the remaining budget, the ablation as many steps.
    end = started + 60 * time_budget_minutes if time_budget_minutes else None
    configs = {"aligned": config}
    if ablation:
        configs["no_alignment"] = copy.deepcopy(config)
        configs["no_alignment"].alignment_loss_weight = 0.0
    runs, max_steps = {}, training_args.max_steps
    for index, (variant, variant_config) in enumerate(configs.items()):
        deadline = None if end is None else time.perf_counter() + (end - time.perf_counter()) / (len(configs) - index)
        runs[variant] = train_variant(variant, variant_config, training_args, data, tokenizer, pools, train_dataset,
                                      eval_questions, max_steps, deadline, time_budget_minutes)
        max_steps = runs[variant]["train_steps"]  # the ablation trains exactly as long as the aligned run

    # The comparison.
    results = {
        "dataset": data.dataset,
        "seed": training_args.seed,
        "data_args": dataclasses.asdict(data),  # eval_multimodal reads the data settings from here
        "data": {"train": pools["train"].summary(), "eval": pools["eval"].summary(),
                 "train_questions": len(questions), "eval_questions": len(eval_questions)},
        "runs": {v: {k: r[k] for k in r if k != "history"} for v, r in runs.items()},
    }
    if "no_alignment" in runs:
        with_alignment = runs["aligned"]["heldout"]["vqa"]["accuracy"]
        without = runs["no_alignment"]["heldout"]["vqa"]["accuracy"]
        results["vqa_accuracy_gain"] = with_alignment - without
        results["vqa_accuracy_relative_gain"] = (with_alignment - without) / without if without else None
    results["run_wall_time_seconds"] = time.perf_counter() - started
    table = comparison_table({variant: run["heldout"] for variant, run in results["runs"].items()})
    write_atomically(output_dir / "results.json", json.dumps(results, indent=2))
    write_atomically(output_dir / "results.md", "# Multimodal training: held-out results\n\n" + table + "\n")
    write_atomically(output_dir / "training.png", plot_losses({v: r["history"] for v, r in runs.items()}))
    logger.info("Held-out comparison:\n%s", table)
    logger.info("Saved to %s (run took %s)", output_dir, format_seconds(time.perf_counter() - started))
    return results


def train_variant(variant: str, config: MultiModalConfig, training_args: TrainingArguments, data: MultiModalData,
                  tokenizer: PreTrainedTokenizerBase, pools: dict[str, ModalityPool],
                  train_dataset: QuestionAlignmentDataset, eval_questions: list[Question], max_steps: int,
                  deadline: float | None, time_budget_minutes: float = 0.0) -> dict:
    """Train one run into `<output_dir>/<variant>` for `max_steps` (or until `deadline`), measure it on the held-out
    split and save it (model first, then card and plot). On resume, a finished run found there is kept (its
    results.json is returned; a missing card or plot is written again)."""
    variant_dir = Path(training_args.output_dir) / variant
    prepare_output_dir(variant_dir, SCRIPT, keep=KEEP_IN_VARIANT_DIR)  # its checkpoints are this script's
    checkpoint = None
    if resume_requested(training_args):
        if (variant_dir / "results.json").is_file() and (variant_dir / "config.json").is_file():
            logger.info("[%s] finished in an earlier run; keeping it", variant)
            results = json.loads((variant_dir / "results.json").read_text(encoding="utf-8"))
            if not ((variant_dir / "README.md").is_file() and (variant_dir / "training.png").is_file()):
                write_card_and_plot(variant_dir, results, MultiModalConfig.from_pretrained(variant_dir))
            return results
        checkpoint = last_complete_checkpoint(variant_dir)
    else:
        for stale in sorted(variant_dir.glob("checkpoint-*")):  # an earlier run's; a resume would pick them up
            shutil.rmtree(stale)

    processor = MultiModalProcessor.from_config(config, tokenizer)
    set_seed(training_args.seed)  # the same initialisation for both runs
    model = MultiModalForConditionalGeneration(config)
    num_parameters = sum(p.numel() for p in model.parameters())
    weight = config.alignment_loss_weight
    logger.info("[%s] %s parameters; alignment_loss_weight=%s, trained pairs %s", variant, f"{num_parameters:,}",
                weight, config.alignment_pairs if weight else "none")

    args = dataclasses.replace(training_args, output_dir=str(variant_dir), max_steps=max_steps,
                               resume_from_checkpoint=checkpoint)
    budget = TimeBudgetCallback(deadline, reserve_seconds=30.0)
    trainer = MultiModalTrainer(model=model, args=args, train_dataset=train_dataset,
                                data_collator=QuestionAlignmentCollator(processor, pools["train"]),
                                callbacks=[budget, RouterBiasUpdateCallback()])
    train_start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - train_start
    if budget.stopped_at_step is not None:
        logger.warning("[%s] stopped by the time budget at step %d of %d (--resume_from_checkpoint True continues "
                       "it)", variant, trainer.state.global_step, max_steps)

    logger.info("[%s] measuring on %d held-out questions, %d images, %d clips", variant, len(eval_questions),
                len(pools["eval"].images), len(pools["eval"].clips))
    measured = evaluate_model(model, processor, pools["eval"], eval_questions,
                              training_args.per_device_eval_batch_size, show_progress=not training_args.disable_tqdm)
    history = [dict(e) for e in trainer.state.log_history if "step" in e]
    results = {
        "variant": variant,
        "alignment_loss_weight": weight,
        "alignment_pairs_trained": list(config.alignment_pairs) if weight else [],
        "num_parameters": num_parameters,
        "train_steps": trainer.state.global_step,
        "max_steps": max_steps,
        "stopped_by_time_budget": budget.stopped_at_step is not None,
        "time_budget_minutes": time_budget_minutes,
        "train_seconds": train_seconds,
        "resumed_from": checkpoint,
        "batch_size": training_args.per_device_train_batch_size,
        "learning_rate": training_args.learning_rate,
        "data": {"dataset": data.dataset, "train": pools["train"].summary(), "eval": pools["eval"].summary()},
        "final_losses": final_losses(history),
        "heldout": {k: measured[k] for k in ("vqa", "retrieval_r_at_1", "alignment_error")},
        "history": history,
    }
    logger.info("[%s] held-out VQA accuracy %.3f %s; R@1 %s; alignment error %.3f", variant,
                results["heldout"]["vqa"]["accuracy"],
                {k: round(v, 3) for k, v in results["heldout"]["vqa"]["per_kind"].items()},
                {k: round(v, 3) for k, v in results["heldout"]["retrieval_r_at_1"].items()},
                results["heldout"]["alignment_error"]["error"])
    folder = atomic_save_pretrained(variant_dir, model, processor,
                                    extra_files={"results.json": json.dumps(results, indent=2)},
                                    keep=KEEP_IN_VARIANT_DIR, script=SCRIPT)
    write_card_and_plot(folder, results, config, variant_dir.as_posix())
    return results


def final_losses(history: list[dict], window: int = 3) -> dict:
    """Mean of the last `window` logged values of each loss part."""
    out = {}
    for part in LOSS_PARTS:
        values = [e[part] for e in history if e.get(part) is not None]
        if values:
            out[part] = sum(values[-window:]) / len(values[-window:])
    return out


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


def render_card(results: dict, config: MultiModalConfig, model_path: str) -> str:
    """The model card (README.md) of one trained variant, from `train_variant`'s results."""
    heldout = results["heldout"]
    vqa_rows = ["| question kind | accuracy |", "|---|---|"]
    vqa_rows += [f"| {kind} | {100 * acc:.1f}% |" for kind, acc in heldout["vqa"]["per_kind"].items()]
    vqa_rows.append(f"| **all** | **{100 * heldout['vqa']['accuracy']:.1f}%** |")
    retrieval_rows = ["| query -> gallery | R@1 |", "|---|---|"]
    retrieval_rows += [f"| {d} | {r:.3f} |" for d, r in heldout["retrieval_r_at_1"].items()]
    loss_rows = ["| loss part | final value |", "|---|---|"]
    loss_rows += [f"| {part} | {value:.4f} |" for part, value in results["final_losses"].items()]
    data = results["data"]
    train, evaluation = data["train"], data["eval"]
    weight = results["alignment_loss_weight"]
    objective = (f"generation loss + {weight:g} x alignment loss (symmetric InfoNCE, learnable temperature, "
                 f"pairs trained: {', '.join(results['alignment_pairs_trained'])}; modality weights "
                 f"{config.alignment_loss_weights})" if weight else
                 "generation loss only (the ablation: alignment losses are computed for the logs, never trained)")
    decoder = config.decoder_config
    values = {
        "variant": results["variant"],
        "model_path": model_path,
        "num_parameters": f"{results['num_parameters']:,}",
        "decoder": f"{type(decoder).__name__} ({decoder.num_hidden_layers} layers, hidden {decoder.hidden_size})",
        "vision": f"ViT ({config.vision_config.num_hidden_layers} layers, hidden {config.vision_config.hidden_size}, "
                  f"{config.image_seq_length} patch tokens per image)",
        "audio": f"Parakeet encoder ({config.audio_config.num_hidden_layers} layers, hidden "
                 f"{config.audio_config.hidden_size}, {config.audio_seq_length} tokens per clip)",
        "alignment_embed_dim": config.alignment_embed_dim,
        "objective": objective,
        "data": ("Fashion-MNIST images with espeak-ng speech" if data["dataset"] == "fashion_mnist"
                 else "generated images and tones (synthetic fixture)"),
        "train_images": train["images"],
        "train_clips": train["clips"],
        "train_voices": ", ".join(sorted({v.split()[0] for v in train["voices"]})),
        "eval_images": evaluation["images"],
        "eval_clips": evaluation["clips"],
        "eval_voices": ", ".join(sorted({v.split()[0] for v in evaluation["voices"]})),
        "eval_questions": heldout["vqa"]["count"],
        "train_steps": results["train_steps"],
        "train_steps_note": (f" (stopped by the {results['time_budget_minutes']}-minute budget before "
                             f"{results['max_steps']})" if results["stopped_by_time_budget"] else ""),
        "batch_size": results["batch_size"],
        "learning_rate": results["learning_rate"],
        "train_time": format_seconds(results["train_seconds"]),
        "loss_table": "\n".join(loss_rows),
        "vqa_table": "\n".join(vqa_rows),
        "retrieval_table": "\n".join(retrieval_rows),
        "alignment_error": f"{heldout['alignment_error']['error']:.3f}",
    }
    return render_model_card(model_card_template("multimodal"), values)


def write_card_and_plot(folder: str | os.PathLike, results: dict, config: MultiModalConfig,
                        model_path: str | None = None) -> None:
    """README.md (the model card; its snippet loads `model_path`, default `folder`) and training.png into a saved
    variant folder; a failure is logged with the folder (the model in it is complete) and re-raised."""
    folder = Path(folder)
    with writing_beside_saved_model(folder, "the model card or the training plot"):
        card = render_card(results, config, model_path or folder.as_posix())
        write_atomically(folder / "README.md", hub_card(card, results, model_name=folder.name))
        write_atomically(folder / "training.png", plot_losses({results["variant"]: results["history"]}))


__all__ = ["KEEP_IN_VARIANT_DIR", "LOSS_PARTS", "VARIANTS", "check_multimodal_run", "final_losses", "plot_losses",
           "render_card", "resume_requested", "train_multimodal", "train_variant", "write_card_and_plot"]
