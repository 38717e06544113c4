"""Measuring a SafetyFilter on labelled prompts: block rate on harmful prompts, false refusals on benign look-alikes
and on ordinary prompts, per-category precision / recall / F1 of the classifier (all through the `safety_screening`
evaluate metric), the threshold curve, and a count of blocks that do not say why."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..evaluation.metrics import load_metric
from .data import LABELS, Example
from .engine import CATEGORIES
from .filter import SafetyFilter


def screened_categories(verdict) -> list[str]:
    """The categories a verdict blocked for (what `safety_screening` takes as a prediction): empty when allowed;
    a block that names no category counts as "other", so it is still a block."""
    if verdict.allowed:
        return []
    return sorted({v.category for v in verdict.violations} or {verdict.category or "other"})


def unexplained(verdict) -> bool:
    """A block without a one-line explanation, or without a deciding violation that names its source ("rule",
    "classifier", ...) and its own explanation: every block must say why and who decided."""
    if verdict.allowed:
        return False
    return (not verdict.explanation or "\n" in verdict.explanation or not verdict.violations
            or any(not v.source or not v.explanation for v in verdict.violations))


def evaluate_filter(safety: SafetyFilter, examples: Sequence[Example], curve_scales: Sequence[float] = (
        0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75), strict: bool = True) -> dict:
    """Verdicts on every example (role "user"): rates by group, per-category classifier metrics, threshold curve,
    all computed by the `safety_screening` metric (`lightarch.evaluation.metrics`).

    Every block must carry a one-line explanation and its source: the record counts the blocks without one
    (`blocks_without_explanation`, of `blocks`); with `strict` (the default) one such block is an error."""
    if not examples:
        raise ValueError("examples is empty: pass the test split")
    verdicts = [safety.check(e.text) for e in examples]
    missing = [e.text for e, v in zip(examples, verdicts) if unexplained(v)]
    if missing and strict:
        raise AssertionError(f"{len(missing)} block(s) without a one-line explanation and a source, e.g. "
                             f"{missing[0]!r}")
    sources = [e.source for e in examples]
    screen = load_metric("safety_screening").compute(
        predictions=[screened_categories(v) for v in verdicts], references=[list(e.categories) for e in examples],
        sources=sources)
    benign = screen["false_refusal_rate_by_source"]
    results = {
        "examples": len(examples), "harmful": screen["harmful"],
        "lookalike": sources.count("lookalike"), "ordinary": sources.count("ordinary"),
        "harmful_blocked": screen["block_rate"], "false_refusal_lookalike": benign.get("lookalike"),
        "false_refusal_ordinary": benign.get("ordinary"), "false_refusal_benign": screen["false_refusal_rate"],
        "blocked_by_source": screen["block_rate_by_source"], "false_refusal_by_source": benign,
        "refused_of_benign": {source: [sum(not v.allowed for e, v in zip(examples, verdicts) if e.source == source),
                                       sources.count(source)] for source in benign},  # source -> [refused, prompts]
        "rule_blocks": sum(any(x.source == "rule" for x in v.violations) for v in verdicts),
        "classifier_blocks": sum(any(x.source == "classifier" for x in v.violations) for v in verdicts),
        "blocks": sum(not v.allowed for v in verdicts), "blocks_without_explanation": len(missing),
    }
    if safety.classifier is not None:
        probabilities = safety.classifier.probabilities([e.text for e in examples])  # (N, labels)
        category_columns = [j for j, label in enumerate(LABELS) if label in CATEGORIES]
        limits = np.array([safety.thresholds[LABELS[j]] for j in category_columns])  # (categories,)
        flagged = probabilities[:, category_columns] >= limits  # (N, categories)
        classifier = load_metric("safety_screening").compute(
            predictions=[[LABELS[j] for j, hit in zip(category_columns, row) if hit] for row in flagged],
            references=[[c for c in e.categories if c in CATEGORIES] for e in examples], sources=sources,
            categories=[LABELS[j] for j in category_columns])
        results["per_category"] = {label: {"threshold": safety.thresholds[label], **row}
                                   for label, row in classifier["per_category"].items()}
        is_harmful = np.array([bool(e.categories) for e in examples])
        benign_rows = np.array([e.source in ("lookalike", "ordinary") for e in examples])
        curve = []
        for scale in curve_scales:  # the classifier alone, all thresholds scaled together
            flagged = (probabilities[:, category_columns] >= np.minimum(limits * scale, 0.99)).any(axis=1)
            curve.append({"scale": scale, "harmful_flagged": float(flagged[is_harmful].mean()),
                          "benign_flagged": float(flagged[benign_rows].mean()) if benign_rows.any() else None})
        results["threshold_curve"] = curve
    return results


HEADLINE_KEYS = (  # the rates a recipe compares: the block rate and the false refusals
    "harmful_blocked", "false_refusal_lookalike", "false_refusal_ordinary", "false_refusal_benign", "blocks",
    "blocks_without_explanation", "refused_of_benign")


def headline_rates(safety: SafetyFilter, examples: Sequence[Example]) -> dict:
    """`evaluate_filter`'s HEADLINE_KEYS only (no threshold curve): what a recipe compares across splits or filters."""
    results = evaluate_filter(safety, examples, curve_scales=())
    return {key: results[key] for key in HEADLINE_KEYS}


def evaluate_deobfuscating(safety: SafetyFilter, examples: Sequence[Example]) -> dict:
    """`evaluate_filter`'s block and false-refusal rates for `DeobfuscatingFilter(safety)`, the filter `serve.py`
    screens with by default: its views of a text (leetspeak, spacing, ... undone) can only add blocks, so its
    false refusals on benign prompts must be measured too, not assumed equal to the plain filter's."""
    from .normalize import DeobfuscatingFilter

    return headline_rates(DeobfuscatingFilter(safety), examples)


def results_table(results: dict) -> str:
    """The headline numbers as a Markdown table (for eval output and the model card)."""
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = ["| measure | value | n |", "|---|---|---|",
             f"| harmful prompts blocked | {pct(results['harmful_blocked'])} | {results['harmful']} |",
             f"| false refusals, benign look-alikes | {pct(results['false_refusal_lookalike'])} | "
             f"{results['lookalike']} |",
             f"| false refusals, ordinary prompts | {pct(results['false_refusal_ordinary'])} | {results['ordinary']} |"]
    if "deobfuscating" in results:  # (what serve.py screens with by default)
        seen = results["deobfuscating"]
        lines += [f"| with de-obfuscation: harmful prompts blocked | {pct(seen['harmful_blocked'])} | "
                  f"{results['harmful']} |",
                  f"| with de-obfuscation: false refusals, benign look-alikes | "
                  f"{pct(seen['false_refusal_lookalike'])} | {results['lookalike']} |",
                  f"| with de-obfuscation: false refusals, ordinary prompts | {pct(seen['false_refusal_ordinary'])} "
                  f"| {results['ordinary']} |"]
    for source, (refused, prompts) in results.get("refused_of_benign", {}).items():
        if source not in ("lookalike", "ordinary"):  # (ShareGPT prompts in a validation split)
            lines.append(f"| false refusals, {source} | {pct(refused / prompts)} | {prompts} |")
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
