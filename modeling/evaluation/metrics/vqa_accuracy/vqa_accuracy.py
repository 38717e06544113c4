"""VQA accuracy for short generated answers: exact match after normalisation, overall and per question kind.

Normalisation: lower-case, then split into the words (inner hyphens kept), placeholders and punctuation marks that
lightarch's word-level tokenizer sees, joined by single spaces ("T-shirt ." == "t-shirt."). Every question has one
reference answer (the generated questions of `lightarch.data.multimodal`), so this is the exact-match form of VQA
accuracy, not the 10-annotator min(#humans / 3, 1) form of VQA v2.
"""

import re

import datasets
import evaluate
import numpy as np

_WORD_PATTERN = r"<image>|<audio>|\w+(?:-\w+)*|[^\w\s]"  # as lightarch.data.multimodal.split_words
_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated answers.
    references: list of reference answers.
    kinds: list of question kinds (strings), one per question; "" when there are none.
Returns:
    accuracy: fraction of normalised answers equal to the normalised reference; per_kind: kind -> accuracy;
    count: answers scored.
"""


def normalize(text: str) -> str:
    """'  The T-shirt.' -> 'the t-shirt .'"""
    return " ".join(re.findall(_WORD_PATTERN, text.lower()))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string"),
                                        "kinds": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, kinds):
        per_kind: dict = {}
        for prediction, reference, kind in zip(predictions, references, kinds):
            per_kind.setdefault(kind, []).append(normalize(prediction) == normalize(reference))
        hits = [hit for group in per_kind.values() for hit in group]
        return {"accuracy": float(np.mean(hits)) if hits else 0.0,
                "per_kind": {kind: float(np.mean(group)) for kind, group in per_kind.items() if kind},
                "count": len(hits)}
