"""Perplexity of a causal LM on token blocks, and the unigram baseline it is compared with."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token cross entropy) over `blocks` (no auxiliary router loss)."""
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size]
        logits = model(input_ids=batch).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(total / max(count, 1))


def unigram_perplexity(train_blocks: torch.Tensor, eval_blocks: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model (counts from the train tokens) on the held-out targets.

    Targets are the tokens the language model predicts: every block position but the first.
    """
    counts = torch.bincount(train_blocks.reshape(-1), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    targets = eval_blocks[:, 1:].reshape(-1)
    return math.exp(-log_probs[targets].mean().item())
