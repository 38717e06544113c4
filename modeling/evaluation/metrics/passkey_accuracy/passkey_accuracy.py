"""Passkey retrieval accuracy: is the generated pass key exactly right, and how many of its digits are.

A prediction is cut to one character more than its pass key before comparing, so that trailing generated text is
ignored but an extra digit still breaks the exact match (the Landmark Attention / LongLoRA passkey test).
"""

import datasets
import evaluate

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings (the decoded new tokens).
    references: list of the true pass keys (digit strings).
Returns:
    exact: fraction of predictions whose first len(key) + 1 characters are exactly the key;
    digits: mean fraction of key positions predicted right; count: predictions scored.
"""


def score(predicted: str, passkey: str) -> dict:
    """One prediction: `exact` 1.0 when all digits match (nothing more, nothing less), `digits` positions right."""
    predicted = predicted[: len(passkey) + 1]
    return {"exact": float(predicted == passkey),
            "digits": sum(p == t for p, t in zip(predicted, passkey)) / max(len(passkey), 1)}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PasskeyAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [score(p, r) for p, r in zip(predictions, references)]
        count = len(scores)
        return {"exact": sum(s["exact"] for s in scores) / max(count, 1),
                "digits": sum(s["digits"] for s in scores) / max(count, 1), "count": count}
