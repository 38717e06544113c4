"""Modality alignment error: how often an item sits nearer another class than its own in another modality.

For an ordered pair of modalities (A, B), each item of A is assigned the class whose centroid in B (the unit-length
mean of B's aligned embeddings of that class) is most cosine-similar to the item's aligned embedding; the error of
A->B is the fraction of A's items assigned a class other than their own. The modality alignment error is the mean
of the per-pair errors over all ordered pairs given: 0 when every item is nearest its own class in every other
modality, about 1 - 1/C for unrelated embedding spaces with C classes (lightarch's multimodal target: < 0.1).

Inputs are per item: the class of the nearest centroid in the other modality (`predictions`), the item's own class
(`references`) and the pair's name (`pairs`, e.g. "image->text"), so batches combine like any other metric.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: per item, the class of the nearest class centroid in the other modality (int).
    references: per item, its own class (int).
    pairs: per item, the ordered modality pair it was measured in (string, e.g. "image->audio").
Returns:
    error: mean over pairs of the per-pair misassignment rate; pairs: pair -> error; count: items scored.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ModalityAlignmentError(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64"),
                                        "pairs": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, pairs):
        misses: dict = {}
        for predicted, own, pair in zip(predictions, references, pairs):
            misses.setdefault(pair, []).append(predicted != own)
        per_pair = {pair: float(np.mean(group)) for pair, group in misses.items()}
        return {"error": float(np.mean(list(per_pair.values()))) if per_pair else 0.0, "pairs": per_pair,
                "count": len(predictions)}
