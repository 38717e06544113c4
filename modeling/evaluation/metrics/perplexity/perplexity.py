"""Perplexity of a causal language model: exp(mean next-token negative log-likelihood).

Two ways in, one figure:
- logits + labels: `compute(predictions=logits (B, T, V), references=labels (B, T))`, labels as given to a
  transformers causal LM: shifted inside (logits at t predict labels at t + 1), -100 ignored.
- a model: `compute(model=model, references=input_ids (B, T), batch_size=8)` runs the model on the blocks (no
  gradient) and scores them the same way.

`add_batch` reduces each sequence to (summed NLL, target count) before storing it, so batches of logits do not pile
up in memory; the result is the token-weighted perplexity over everything added.
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: logits (batch, seq_len, vocab) of a causal LM (numpy array, torch tensor or nested lists).
    references: labels (batch, seq_len): token ids, -100 for positions to ignore; the input ids of the blocks when
        `model` is given.
    model: optional causal LM (its forward takes `input_ids` and returns `.logits`); replaces `predictions`.
    batch_size: blocks per forward pass when `model` is given (default 8).
Returns:
    perplexity: exp(nll), nll: mean negative log-likelihood per target token (nats), tokens: target tokens scored.
"""


def _sequence_nll(logits: np.ndarray, labels: np.ndarray) -> tuple[list[float], list[int]]:
    """Per sequence: summed NLL of labels[:, 1:] under logits[:, :-1], and how many targets were not -100."""
    logits = np.asarray(logits, dtype=np.float64)  # (B, T, V)
    labels = np.asarray(labels, dtype=np.int64)  # (B, T)
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"perplexity: predictions must be logits (batch, seq_len, vocab) and references labels "
                         f"(batch, seq_len); got {logits.shape} and {labels.shape}.")
    logits, targets = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    keep = targets != -100
    picked = np.take_along_axis(log_probs, np.where(keep, targets, 0)[..., None], axis=-1)[..., 0]  # (B, T-1)
    return (-(picked * keep).sum(axis=1)).tolist(), keep.sum(axis=1).tolist()


def _model_nll(model, input_ids, batch_size: int) -> tuple[list[float], list[int]]:
    """Per block: summed NLL of the model's next-token predictions (cross entropy in float32, no gradient)."""
    import torch

    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long) if not torch.is_tensor(input_ids) else input_ids
    device = next(model.parameters()).device
    sums, counts = [], []
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)  # (b, T)
            logits = model(input_ids=batch).logits.float()  # (b, T, V)
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none",
                                                    ignore_index=-100)  # (b, T-1)
            sums += nll.sum(dim=1).double().tolist()
            counts += (targets != -100).sum(dim=1).tolist()
    return sums, counts


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            # What is stored per sequence: its summed NLL and its number of targets (see add_batch).
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("int64")}),
        )

    def add_batch(self, *, predictions=None, references=None, model=None, batch_size: int = 8):
        """Score one batch (logits + labels, or `model` on the blocks in `references`) and store its sums."""
        if model is not None:
            if predictions is not None:
                raise ValueError("perplexity: give either predictions (logits) or model, not both.")
            sums, counts = _model_nll(model, references, batch_size)
        else:
            sums, counts = _sequence_nll(predictions, references)
        super().add_batch(predictions=sums, references=counts)

    def compute(self, *, predictions=None, references=None, model=None, batch_size: int = 8, **kwargs):
        """Perplexity over every batch added so far and this one (if given)."""
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references, model=model, batch_size=batch_size)
        return super().compute(**kwargs)

    def _compute(self, predictions, references):
        tokens = int(np.sum(references))
        nll = float(np.sum(predictions)) / max(tokens, 1)
        return {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens}
