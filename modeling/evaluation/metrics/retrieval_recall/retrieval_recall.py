"""Retrieval recall@k: the fraction of queries with a relevant item among the top k retrieved.

Each query gives its retrieved items' labels in rank order (best first) and its own label; a hit at k is the query's
label among the first k retrieved. With class labels and one gallery item per class, R@1 is zero-shot
classification accuracy.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: per query, the labels of the retrieved items in rank order (list of ints, best first).
    references: per query, the relevant label (int).
    k: an int or a list of ints (default [1]); each k must be >= 1.
Returns:
    recall@k for each k (e.g. "recall@1"), and count: queries scored.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, k=1):
        ks = [k] if isinstance(k, int) else list(k)
        if not ks or any(not isinstance(n, int) or n < 1 for n in ks):
            raise ValueError(f"retrieval_recall: k must be an int >= 1 or a list of them, got {k!r}.")
        results = {}
        for n in ks:
            hits = [reference in list(ranked)[:n] for ranked, reference in zip(predictions, references)]
            results[f"recall@{n}"] = float(np.mean(hits)) if hits else 0.0
        results["count"] = len(references)
        return results
