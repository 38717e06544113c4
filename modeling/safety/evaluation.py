"""Measuring a SafetyFilter on labelled prompts: block rate on harmful prompts, false refusals on benign look-alikes
and on ordinary prompts, per-category precision / recall of the classifier, and the threshold curve."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .data import LABELS, Example, label_vector
from .engine import CATEGORIES
from .filter import SafetyFilter


def _rate(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


def evaluate_filter(safety: SafetyFilter, examples: Sequence[Example], curve_scales: Sequence[float] = (
        0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)) -> dict:
    """Verdicts on every example (role "user"): rates by group, per-category classifier metrics, threshold curve.

    Every block must carry a one-line explanation: one without is an error (the promise of explained verdicts)."""
    if not examples:
        raise ValueError("examples is empty: pass the test split")
    verdicts = [safety.check(e.text) for e in examples]
    for example, verdict in zip(examples, verdicts):
        if not verdict.allowed and (not verdict.explanation or "\n" in verdict.explanation or not verdict.violations):
            raise AssertionError(f"block without a one-line explanation: {example.text!r}")
    harmful = [not v.allowed for e, v in zip(examples, verdicts) if e.categories]
    lookalike = [not v.allowed for e, v in zip(examples, verdicts) if e.source == "lookalike"]
    ordinary = [not v.allowed for e, v in zip(examples, verdicts) if e.source == "ordinary"]
    by_source: dict[str, list[bool]] = {}
    for e, v in zip(examples, verdicts):
        if e.categories:
            by_source.setdefault(e.source, []).append(not v.allowed)
    results = {
        "examples": len(examples), "harmful": len(harmful), "lookalike": len(lookalike), "ordinary": len(ordinary),
        "harmful_blocked": _rate(harmful), "false_refusal_lookalike": _rate(lookalike),
        "false_refusal_ordinary": _rate(ordinary),
        "blocked_by_source": {s: _rate(flags) for s, flags in sorted(by_source.items())},
        "rule_blocks": sum(any(x.source == "rule" for x in v.violations) for v in verdicts),
        "classifier_blocks": sum(any(x.source == "classifier" for x in v.violations) for v in verdicts),
    }
    if safety.classifier is not None:
        probabilities = safety.classifier.probabilities([e.text for e in examples])  # (N, labels)
        targets = np.array([label_vector(e) for e in examples]) > 0.5
        per_category = {}
        for j, label in enumerate(LABELS):
            if label not in CATEGORIES:
                continue
            predicted = probabilities[:, j] >= safety.thresholds[label]
            tp = int((predicted & targets[:, j]).sum())
            per_category[label] = {"support": int(targets[:, j].sum()), "threshold": safety.thresholds[label],
                                   "precision": tp / max(1, int(predicted.sum())),
                                   "recall": tp / max(1, int(targets[:, j].sum()))}
        results["per_category"] = per_category
        is_harmful = np.array([bool(e.categories) for e in examples])
        benign = np.array([e.source in ("lookalike", "ordinary") for e in examples])
        category_columns = [j for j, label in enumerate(LABELS) if label in CATEGORIES]
        limits = np.array([safety.thresholds[LABELS[j]] for j in category_columns])
        curve = []
        for scale in curve_scales:  # the classifier alone, all thresholds scaled together
            flagged = (probabilities[:, category_columns] >= np.minimum(limits * scale, 0.99)).any(axis=1)
            curve.append({"scale": scale, "harmful_flagged": float(flagged[is_harmful].mean()),
                          "benign_flagged": float(flagged[benign].mean()) if benign.any() else None})
        results["threshold_curve"] = curve
    return results


def results_table(results: dict) -> str:
    """The headline numbers as a Markdown table (for eval output and the model card)."""
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = ["| measure | value | n |", "|---|---|---|",
             f"| harmful prompts blocked | {pct(results['harmful_blocked'])} | {results['harmful']} |",
             f"| false refusals, benign look-alikes | {pct(results['false_refusal_lookalike'])} | "
             f"{results['lookalike']} |",
             f"| false refusals, ordinary prompts | {pct(results['false_refusal_ordinary'])} | {results['ordinary']} |"]
    for source, rate in results["blocked_by_source"].items():
        lines.append(f"| blocked: {source} | {pct(rate)} | |")
    if "per_category" in results:
        lines += ["", "| category | threshold | precision | recall | support |", "|---|---|---|---|---|"]
        for label, row in results["per_category"].items():
            lines.append(f"| {label} | {row['threshold']:.2f} | {row['precision']:.3f} | {row['recall']:.3f} | "
                         f"{row['support']} |")
    return "\n".join(lines)


def plot_results(results: dict) -> dict[str, bytes]:
    """PNG bytes: per-category precision / recall bars and the threshold curve (empty without a classifier)."""
    from lightarch.evaluation.plots import figure_to_png, pyplot

    if "per_category" not in results:
        return {}
    plt = pyplot()
    labels = list(results["per_category"])
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.bar(x - 0.2, [results["per_category"][k]["precision"] for k in labels], 0.4, label="precision")
    ax.bar(x + 0.2, [results["per_category"][k]["recall"] for k in labels], 0.4, label="recall")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("classifier per category (test split)")
    pngs = {"per_category.png": figure_to_png(fig)}
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    curve = results["threshold_curve"]
    ax.plot([c["benign_flagged"] for c in curve], [c["harmful_flagged"] for c in curve], marker="o")
    for c in curve:
        ax.annotate(f"x{c['scale']}", (c["benign_flagged"], c["harmful_flagged"]), fontsize=7)
    ax.set_xlabel("benign flagged (false refusals)")
    ax.set_ylabel("harmful flagged")
    ax.set_title("classifier thresholds scaled")
    pngs["threshold_curve.png"] = figure_to_png(fig)
    return pngs
