"""lightarch's metrics as local `evaluate` modules, shipped inside the package.

`evaluate.load("accuracy")` needs the Hub; a folder holding a script that subclasses `evaluate.Metric` loads offline
with `evaluate.load(folder)` and has `add_batch`, `compute` and `evaluate.combine`. Each sub-folder here is one such
module (self-contained, so it can also be pushed to the Hub as a metric Space as it is):

- `perplexity`: exp(mean next-token NLL) from causal-LM logits + labels, or from a model run on token blocks.
- `exact_match`: fraction of predictions equal to their reference (optionally case / whitespace normalised).
- `passkey_accuracy`: passkey retrieval: all digits right (`exact`) and the fraction of digit positions right.
- `vqa_accuracy`: exact match after lower-casing and word / punctuation splitting (the multimodal answers).
- `retrieval_recall`: recall@k: the fraction of queries whose class is among the top-k retrieved classes.
- `modality_alignment_error`: the mean over ordered modality pairs of the fraction of items nearer another class's
  centroid than their own class's (what `lightarch.evaluation.multimodal` reports).
- `safety_screening`: block rate on harmful prompts, false-refusal rate on benign ones (overall and per source), and
  per-category precision / recall / F1, from predicted and reference category sets (`lightarch.safety.evaluation`).
- `distillation_retention`: student / teacher score per task, the mean and the worst task
  (`lightarch.training.distillation.report`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

METRICS = ("perplexity", "exact_match", "passkey_accuracy", "vqa_accuracy", "retrieval_recall",
           "modality_alignment_error", "safety_screening", "distillation_retention")


def metric_path(name: str) -> str:
    """The folder of the shipped metric `name` (what `evaluate.load` takes), from a checkout or an installed wheel."""
    if name not in METRICS:
        raise ValueError(f"metric {name!r} is not one of lightarch's metrics; choose one of {', '.join(METRICS)}.")
    folder = Path(str(resources.files(__name__).joinpath(name)))
    if not (folder / f"{name}.py").is_file():
        raise FileNotFoundError(f"metric {name!r}: {folder / (name + '.py')} is missing from the installed package "
                                "(reinstall lightarch; pyproject's package-data must list 'metrics/*/*.py').")
    return str(folder)


def load_metric(name: str, **kwargs):
    """`evaluate.load(metric_path(name), **kwargs)`, kept in memory by default (no cache files or locks shared
    between processes that evaluate at the same time)."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["METRICS", "load_metric", "metric_path"]
