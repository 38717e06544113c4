"""What the torch and the ONNX Runtime safety classifiers share: the tokenization of a batch of texts and the
{label: probability} view of the scores, so both give SafetyFilter the same inputs for the same text."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Per-label probabilities of a multi-label head's logits (float32, any shape)."""
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float32)))).astype(np.float32)


class ProbabilityClassifier:
    """Base of SafetyClassifier (torch) and OnnxSafetyClassifier: subclasses set `tokenizer`, `max_length`, `labels`
    and `return_tensors` ("pt" / "np"), and implement `batch_probabilities`."""

    tokenizer = None
    max_length: int = 128
    labels: list[str] = []
    return_tensors: str = "np"

    def batch_probabilities(self, encoded) -> np.ndarray:
        """Sigmoid probabilities of one tokenized batch, (batch, len(labels))."""
        raise NotImplementedError

    def encoded_batches(self, texts: Sequence[str], batch_size: int) -> Iterator:
        """Tokenized batches of `batch_size` texts, padded to the longest in the batch, cut at `max_length`."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string: pass [text]")
        for start in range(0, len(texts), batch_size):
            yield self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors=self.return_tensors)

    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Sigmoid probabilities, shape (len(texts), len(labels))."""
        rows = [self.batch_probabilities(batch) for batch in self.encoded_batches(texts, batch_size)]
        return np.concatenate(rows) if rows else np.zeros((0, len(self.labels)), np.float32)

    def predict(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """One {label: probability} per text."""
        return [dict(zip(self.labels, map(float, row))) for row in self.probabilities(texts)]
