"""Privacy audit of a trained language model with canaries (`scripts/audit_privacy.py`).

Random secrets ("the secret number is 4 8 1 ...") are inserted into the training text 1, 4 and 16 times; after
training, each secret's log-perplexity under the model (the sum of the negative log-likelihoods of its tokens, given
the fixed prefix) is compared with:

- random secrets of the same format that were never inserted (references): the **exposure** of Carlini et al.'s
  secret sharer, `log2(#candidates) - log2(rank)`, estimated from `N` references as
  `log2(N + 1) - log2(1 + #(references at most as perplexing))` (at most `log2(N + 1)` bits; a secret the model
  never saw averages about log2(e) = 1.44 bits);
- non-member canaries of the same format: a loss-based **membership-inference** test (score = minus the
  log-perplexity), summarised by its AUC and its true-positive rate at 1% false positives.

A model trained with DP-SGD should keep every group near chance (exposure ~1.44 bits, AUC ~0.5, TPR ~1%); a model of
the same architecture and steps trained without DP memorises the frequent canaries.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

CANARY_PREFIX = "the secret number is"
REPEATS = (1, 4, 16)


@dataclass
class CanarySet:
    """Inserted secrets by number of insertions, never-inserted secrets of the same format, and references."""

    members: dict[int, list[str]]  # repeats -> secrets inserted that many times
    non_members: list[str]
    references: list[str]
    prefix: str = CANARY_PREFIX

    def text(self, secret: str) -> str:
        return f"{self.prefix} {secret}\n"


def random_secret(rng: random.Random, digits: int) -> str:
    return " ".join(str(rng.randrange(10)) for _ in range(digits))


def make_canaries(per_group: int = 20, non_members: int = 200, references: int = 1000, digits: int = 9,
                  repeats: tuple[int, ...] = REPEATS, seed: int = 0) -> CanarySet:
    """Distinct random `digits`-digit secrets: `per_group` for each insertion count, plus the two control sets."""
    if per_group < 1 or non_members < 1 or references < 1 or digits < 1:
        raise ValueError("per_group, non_members, references and digits must all be >= 1.")
    total = per_group * len(repeats) + non_members + references
    if total > 10 ** digits // 2:
        raise ValueError(f"digits={digits} gives too few distinct secrets for {total} canaries; use more digits.")
    rng = random.Random(seed)
    secrets: list[str] = []
    seen: set[str] = set()
    while len(secrets) < total:
        secret = random_secret(rng, digits)
        if secret not in seen:
            seen.add(secret)
            secrets.append(secret)
    members = {r: secrets[i * per_group:(i + 1) * per_group] for i, r in enumerate(repeats)}
    start = per_group * len(repeats)
    return CanarySet(members, secrets[start:start + non_members], secrets[start + non_members:])


def insert_canaries(texts: list[str], canaries: CanarySet, seed: int = 0) -> list[str]:
    """The training documents with every member canary added `repeats` times, each copy its own document, at
    random positions (the originals keep their order)."""
    copies = [canaries.text(secret) for repeats, group in canaries.members.items() for secret in group
              for _ in range(repeats)]
    rng = random.Random(seed)
    documents = list(texts)
    for copy in copies:
        documents.insert(rng.randrange(len(documents) + 1), copy)
    return documents


@torch.no_grad()
def secret_log_perplexity(model, tokenizer, canaries: CanarySet, secrets: list[str], batch_size: int = 64
                          ) -> torch.Tensor:
    """Sum of the NLLs (nats) of each secret's tokens given the prefix: (len(secrets),). Tokens that hold any
    character of the secret are scored (a BPE token may join the space before it)."""
    model.eval()
    scores = []
    start_of_secret = len(canaries.prefix)
    for start in range(0, len(secrets), batch_size):
        texts = [canaries.text(secret).rstrip("\n") for secret in secrets[start:start + batch_size]]
        encoded = tokenizer(texts, return_offsets_mapping=True, padding=True, return_tensors="pt")
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        scored = (encoded["offset_mapping"][..., 1] > start_of_secret) & attention_mask.bool()  # (B, T)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:],
                                                reduction="none")  # (B, T-1): token t+1 given tokens <= t
        scores.append((nll * scored[:, 1:]).sum(1))
    return torch.cat(scores)


def exposure(canary_scores: torch.Tensor, reference_scores: torch.Tensor) -> torch.Tensor:
    """Carlini et al.'s exposure in bits, estimated by rank among the references (lower log-perplexity = better)."""
    at_most = (reference_scores[None, :] <= canary_scores[:, None]).sum(1).double()  # references ranked ahead
    return math.log2(reference_scores.numel() + 1) - torch.log2(1.0 + at_most)


def membership_metrics(member_scores: torch.Tensor, non_member_scores: torch.Tensor, fpr: float = 0.01) -> dict:
    """Loss-based membership inference (score = -log-perplexity): AUC and the TPR at `fpr` false positives."""
    members, others = -member_scores.double(), -non_member_scores.double()
    greater = (members[:, None] > others[None, :]).double().mean()
    ties = (members[:, None] == others[None, :]).double().mean()
    # Threshold: the smallest score above all but `fpr` of the non-members (at most fpr of them are flagged).
    allowed = math.floor(fpr * others.numel())
    ranked = torch.sort(others, descending=True).values
    threshold = ranked[allowed] if allowed < ranked.numel() else ranked[-1] - 1
    return {"auc": float(greater + 0.5 * ties), "tpr_at_fpr": float((members > threshold).double().mean()),
            "fpr": fpr, "achieved_fpr": float((others > threshold).double().mean())}


def audit_model(model, tokenizer, canaries: CanarySet, fpr: float = 0.01) -> dict:
    """Exposure and membership inference per insertion count: {"1": {...}, "4": {...}, "16": {...}}."""
    references = secret_log_perplexity(model, tokenizer, canaries, canaries.references)
    non_members = secret_log_perplexity(model, tokenizer, canaries, canaries.non_members)
    results = {}
    for repeats, group in canaries.members.items():
        scores = secret_log_perplexity(model, tokenizer, canaries, group)
        bits = exposure(scores, references)
        results[str(repeats)] = {
            "canaries": len(group),
            "exposure_mean": float(bits.mean()),
            "exposure_max": float(bits.max()),
            "exposure_ceiling": math.log2(references.numel() + 1),
            "log_perplexity_mean": float(scores.mean()),
            **membership_metrics(scores, non_members, fpr),
        }
    results["non_member_log_perplexity_mean"] = float(non_members.mean())
    return results


def audit_table(audits: dict[str, dict]) -> str:
    """A Markdown table: one row per model and insertion count."""
    lines = ["| model | inserted | exposure mean (bits) | exposure max | TPR at 1% FPR | AUC |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, audit in audits.items():
        for repeats in (key for key in audit if key.isdigit()):
            row = audit[repeats]
            lines.append(f"| {name} | {repeats}x | {row['exposure_mean']:.2f} | {row['exposure_max']:.2f} | "
                         f"{100 * row['tpr_at_fpr']:.1f}% | {row['auc']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_audit(audits: dict[str, dict]) -> bytes:
    """Exposure and TPR at 1% FPR by insertion count, one line per model, as PNG bytes."""
    from ...evaluation.plots import figure_to_png, pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, audit in audits.items():
        repeats = [key for key in audit if key.isdigit()]
        xs = [int(r) for r in repeats]
        left.plot(xs, [audit[r]["exposure_mean"] for r in repeats], marker="o", label=name)
        right.plot(xs, [100 * audit[r]["tpr_at_fpr"] for r in repeats], marker="o", label=name)
    for axis, title in ((left, "mean exposure (bits)"), (right, "TPR at 1% FPR (%)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(REPEATS), [f"{r}x" for r in REPEATS])
        axis.set_xlabel("times inserted")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    right.axhline(1.0, color="grey", linestyle=":", label="chance")
    right.legend()
    return figure_to_png(fig)


def write_audit(output_dir: Path, audits: dict[str, dict], extra: dict) -> None:
    """audit.json, audit.md (the table) and audit.png into `output_dir`."""
    from ..checkpoints import write_atomically

    write_atomically(output_dir / "audit.json", json.dumps({"audits": audits, **extra}, indent=2))
    write_atomically(output_dir / "audit.md", audit_table(audits))
    write_atomically(output_dir / "audit.png", plot_audit(audits))


__all__ = [
    "CANARY_PREFIX",
    "CanarySet",
    "audit_model",
    "audit_table",
    "exposure",
    "insert_canaries",
    "make_canaries",
    "membership_metrics",
    "plot_audit",
    "secret_log_perplexity",
    "write_audit",
]
