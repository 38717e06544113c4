"""Exact match: the fraction of predictions equal to their reference string.

`compute(predictions, references, ignore_case=False, ignore_whitespace=False)`: with `ignore_case` both sides are
lower-cased; with `ignore_whitespace` runs of whitespace collapse to one space and the ends are stripped.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted strings.
    references: list of reference strings, one per prediction.
    ignore_case: compare lower-cased strings (default False).
    ignore_whitespace: collapse whitespace runs and strip both ends before comparing (default False).
Returns:
    exact_match: fraction in [0, 1] of predictions equal to their reference; count: predictions scored.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, ignore_case: bool = False, ignore_whitespace: bool = False):
        def norm(text: str) -> str:
            text = text.lower() if ignore_case else text
            return " ".join(text.split()) if ignore_whitespace else text

        hits = [norm(p) == norm(r) for p, r in zip(predictions, references)]
        return {"exact_match": float(np.mean(hits)) if hits else 0.0, "count": len(hits)}
