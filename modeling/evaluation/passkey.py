"""Passkey retrieval accuracy by prompt length and key depth."""

from __future__ import annotations

import random

import torch

from ..data.passkey import NUM_DIGITS, PasskeyTask


def score(predicted: str, passkey: str) -> dict[str, float]:
    """`exact`: 1.0 when all digits match (nothing more, nothing less); `digits`: fraction of positions right."""
    predicted = predicted[: len(passkey) + 1]
    exact = float(predicted == passkey)
    digits = sum(p == t for p, t in zip(predicted, passkey)) / len(passkey)
    return {"exact": exact, "digits": digits}


@torch.no_grad()
def evaluate_passkey(model, task: PasskeyTask, lengths, depths, samples: int, seed: int = 0,
                     max_batch_tokens: int = 65536, progress=None, distractors: int = 0) -> dict:
    """Greedy exact-match accuracy for every (length, depth) cell, `samples` prompts each (with `distractors` other
    numbers in each prompt's filler).

    Prompts of one cell share a length, so they are batched without padding (at most `max_batch_tokens` prompt
    tokens per `generate` call); the model's chunked prefill (`prefill_chunk_size`) bounds memory. The prompts of a
    cell depend only on (seed, length, depth). `progress` is called with the number of prompts done.

    Returns {"cells": {length: {depth: {exact, digits, count, achieved_depth, predictions}}},
             "overall": {length: {exact, digits, count}}} (keys as strings, JSON-ready).
    """
    model.eval()
    device = next(model.parameters()).device
    pad_token_id = task.tokenizer.pad_token_id
    cells, overall = {}, {}
    for length in lengths:
        row = {}
        for depth in depths:
            rng = random.Random(f"passkey-{seed}-{length}-{depth}")
            prompts = [task.build(length, depth, rng=rng, distractors=distractors) for _ in range(samples)]
            batch_size = max(1, max_batch_tokens // length)
            predictions, exact, digits = [], [], []
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                input_ids = torch.tensor([p.input_ids for p in batch], device=device)
                output = model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NUM_DIGITS,
                    min_new_tokens=NUM_DIGITS, do_sample=False, pad_token_id=pad_token_id,
                )
                for prompt, generated in zip(batch, output[:, length:]):
                    predicted = task.passkey_from_ids(generated)
                    result = score(predicted, prompt.passkey)
                    predictions.append({"passkey": prompt.passkey, "predicted": predicted})
                    exact.append(result["exact"])
                    digits.append(result["digits"])
                if progress is not None:
                    progress(len(batch))
            row[str(depth)] = {
                "exact": sum(exact) / len(exact),
                "digits": sum(digits) / len(digits),
                "count": len(exact),
                "achieved_depth": sum(p.depth for p in prompts) / len(prompts),
                "predictions": predictions,
            }
        cells[str(length)] = row
        overall[str(length)] = {
            "exact": sum(c["exact"] * c["count"] for c in row.values()) / sum(c["count"] for c in row.values()),
            "digits": sum(c["digits"] * c["count"] for c in row.values()) / sum(c["count"] for c in row.values()),
            "count": sum(c["count"] for c in row.values()),
        }
    return {"cells": cells, "overall": overall}
