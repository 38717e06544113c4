"""Offline distillation: a teacher's top-k logits computed once, stored as safetensors, trained from without the
teacher.

What is stored, per position (a causal LM: every token of every row; a classifier: every row): the k largest raw
teacher logits (`values`, float32, descending), their vocabulary ids (`indices`, int16 when the vocabulary fits, else
int32), the log-sum-exp of the full `logits / temperature` (`logsumexp`) and the log of the probability mass of
every other token (`tail_log_mass`, -inf at k = vocab), so that the teacher's distribution over the k tokens and the
rest is exact at that temperature:
    log p_t(i) = values_i / T - logsumexp        log m_t = tail_log_mass  (= log(1 - sum_i p_t(i)))
The tail is stored rather than recomputed as 1 - sum_i p_t(i): in float32 that difference is rounding noise (~1e-7)
when the top k hold nearly all the mass, and a noise tail against a student tail of 0 would add a spurious loss.

The tail approximation ("other bucket"): teacher and student are compared as distributions over k + 1 outcomes, the
teacher's k tokens and one bucket holding the rest of the vocabulary (the student's bucket is its probability of every
token not in the teacher's top k). With k = vocab the bucket is empty and the loss is exactly the full one. With a
smaller k it is a lower bound (merging outcomes never increases an f-divergence: forward KL, reverse KL, JSD), short
of the full forward KL by exactly m_t * KL(teacher tail || student tail) (both renormalized over the tail), which is
at most m_t * log max_i(p_t(i) / m_t / (p_s(i) / m_s)) over the tail (tests/test_distillation_topk.py checks it).
DistillKit instead drops the tail (`MissingProbabilityHandling.ZERO`, a sum over the top k only) or spreads it evenly
over the other tokens (`SYMMETRIC_UNIFORM`); TRL's GKDTrainer has no offline mode. The bucket keeps the student from
being rewarded for mass it puts outside the teacher's top k, and needs one stored number per position.

Files in the folder: `teacher_topk.safetensors` (values, indices, logsumexp, tail_log_mass, lengths) and `teacher_topk.json` (the
manifest: teacher, k, temperature, vocab size, the dataset's length and fingerprint, the tail approximation). The
stored rows are padded to the dataset's longest row; positions past a row's length are zeros (the loss masks them).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .losses import distillation_divergence

TOPK_FILE = "teacher_topk.safetensors"
MANIFEST_FILE = "teacher_topk.json"
FORMAT_VERSION = 1
TAIL_APPROXIMATION = "other-bucket: k teacher tokens + one bucket for the rest of the vocabulary (exact at k = vocab)"
BATCH_KEYS = ("teacher_topk_values", "teacher_topk_indices", "teacher_logsumexp", "teacher_tail_log_mass")
MIN_LOG_MASS = -1e4  # an empty bucket's log-probability: exp() is exactly 0, and 0 * (a - b) stays finite


def dataset_fingerprint(dataset) -> str:
    """sha256 over every row's `input_ids` (int64, in order, with its length): the stored logits belong to exactly
    this data in this order."""
    digest = hashlib.sha256()
    for index in range(len(dataset)):
        ids = torch.as_tensor(dataset[index]["input_ids"], dtype=torch.long).reshape(-1)
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def _row_length(row: dict) -> int:
    mask = row.get("attention_mask")
    ids = torch.as_tensor(row["input_ids"])
    return int(torch.as_tensor(mask).sum()) if mask is not None else ids.shape[-1]


def _pad_rows(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows -> right-padded input_ids / attention_mask [B, T]."""
    longest = max(torch.as_tensor(row["input_ids"]).shape[-1] for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = (torch.as_tensor(row["attention_mask"])
                                         if row.get("attention_mask") is not None else 1)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _vocab_size(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    getter = getattr(model, "get_output_embeddings", None)
    if getter is not None and getter() is not None:
        return int(config.vocab_size)
    return int(config.num_labels)


@dataclass
class TeacherTopK:
    """A teacher's top-k logits over a dataset (see the module docstring): `values` / `indices` [N, (L,) k],
    `logsumexp` and `tail_log_mass` [N, (L,)], `lengths` [N] (real positions per row), `manifest` (teacher, k,
    temperature, vocab_size, dataset length and fingerprint)."""

    values: torch.Tensor
    indices: torch.Tensor
    logsumexp: torch.Tensor
    tail_log_mass: torch.Tensor
    lengths: torch.Tensor
    manifest: dict

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    def __len__(self) -> int:
        return self.values.shape[0]

    def row(self, index: int) -> dict[str, torch.Tensor]:
        """The stored entries of dataset row `index` (padded to the longest row)."""
        return {"teacher_topk_values": self.values[index], "teacher_topk_indices": self.indices[index].long(),
                "teacher_logsumexp": self.logsumexp[index], "teacher_tail_log_mass": self.tail_log_mass[index]}

    def check(self, dataset=None, vocab_size: int | None = None, temperature: float | None = None) -> None:
        """ValueError naming what differs when these logits do not belong to `dataset` (length, fingerprint), a
        student with `vocab_size` outputs, or a loss at `temperature`."""
        manifest = self.manifest
        if vocab_size is not None and vocab_size != manifest["vocab_size"]:
            raise ValueError(f"The stored teacher logits are over {manifest['vocab_size']} outputs (teacher "
                             f"{manifest['teacher']!r}), but the student has {vocab_size}: train the student with the "
                             "teacher's tokenizer / labels, or store the logits of a teacher that matches it.")
        if temperature is not None and not math.isclose(temperature, manifest["temperature"], rel_tol=1e-6):
            raise ValueError(f"The stored teacher logits were normalized at temperature {manifest['temperature']} "
                             f"(their logsumexp), but the loss uses temperature={temperature}: set temperature="
                             f"{manifest['temperature']}, or store them again at {temperature}.")
        if dataset is not None:
            if len(dataset) != manifest["dataset_length"]:
                raise ValueError(f"The stored teacher logits cover {manifest['dataset_length']} rows, but the training "
                                 f"dataset has {len(dataset)}: store them for this dataset "
                                 "(compute_teacher_topk), or pass the dataset they were computed on.")
            fingerprint = dataset_fingerprint(dataset)
            if fingerprint != manifest["dataset_fingerprint"]:
                raise ValueError(f"The stored teacher logits were computed on other data (dataset fingerprint "
                                 f"{manifest['dataset_fingerprint'][:12]}..., this dataset's {fingerprint[:12]}...): "
                                 "the same rows in the same order are needed; store them again for this dataset.")

    def save(self, folder: str | Path) -> Path:
        """`teacher_topk.safetensors` + `teacher_topk.json` in `folder` (written atomically)."""
        from safetensors.torch import save

        from ..checkpoints import write_atomically

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index_dtype = torch.int16 if self.manifest["vocab_size"] <= 2**15 else torch.int32
        tensors = {"values": self.values.float().contiguous(), "indices": self.indices.to(index_dtype).contiguous(),
                   "logsumexp": self.logsumexp.float().contiguous(),
                   "tail_log_mass": self.tail_log_mass.float().contiguous(), "lengths": self.lengths.long().contiguous()}
        write_atomically(folder / TOPK_FILE, save(tensors))
        write_atomically(folder / MANIFEST_FILE, json.dumps(self.manifest, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TeacherTopK:
        """The logits `save` wrote; FileNotFoundError / ValueError naming the folder when it holds none."""
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (TOPK_FILE, MANIFEST_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} has no {name}: store the teacher's logits there first "
                                        "(compute_teacher_topk(...).save(folder)).")
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder / MANIFEST_FILE}: format_version {manifest.get('format_version')!r}, this "
                             f"library reads {FORMAT_VERSION}; store the logits again.")
        tensors = load_file(str(folder / TOPK_FILE))
        return cls(tensors["values"], tensors["indices"].long(), tensors["logsumexp"], tensors["tail_log_mass"],
                   tensors["lengths"], manifest)


@torch.no_grad()
def compute_teacher_topk(teacher: nn.Module, dataset, k: int, temperature: float = 1.0, batch_size: int = 16,
                         teacher_name: str = "", pad_id: int = 0) -> TeacherTopK:
    """Run `teacher` once over `dataset` (rows with `input_ids` [T] and optional `attention_mask`) and keep its top-k
    logits and log-sum-exp at `temperature` (the temperature the student's loss will use)."""
    from tqdm.auto import tqdm

    vocab_size = _vocab_size(teacher)
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, {vocab_size}] (the teacher's outputs), got {k}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if len(dataset) == 0:
        raise ValueError("dataset is empty: nothing to store the teacher's logits for.")
    teacher.eval()
    device = next(teacher.parameters()).device
    rows = [dataset[i] for i in range(len(dataset))]
    longest = max(torch.as_tensor(row["input_ids"]).shape[-1] for row in rows)
    values, indices, lse, tails = [], [], [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="Teacher top-k", leave=False):
        batch = _pad_rows(rows[start : start + batch_size], pad_id)
        logits = teacher(**{key: v.to(device) for key, v in batch.items()}).logits.float().cpu()  # [b, (T,) V]
        top = logits.topk(k, dim=-1)  # [b, (T,) k], descending
        scaled = logits / temperature
        row_lse = torch.logsumexp(scaled, dim=-1)  # [b, (T,)]
        row_tail = torch.logsumexp(scaled.scatter(-1, top.indices, float("-inf")), dim=-1) - row_lse  # log m_t
        top_values, top_indices = top.values, top.indices
        if logits.dim() == 3 and logits.shape[1] < longest:  # pad positions to the dataset's longest row
            pad = longest - logits.shape[1]
            top_values, top_indices = F.pad(top_values, (0, 0, 0, pad)), F.pad(top_indices, (0, 0, 0, pad))
            row_lse, row_tail = F.pad(row_lse, (0, pad)), F.pad(row_tail, (0, pad))
        values.append(top_values)
        indices.append(top_indices)
        lse.append(row_lse)
        tails.append(row_tail)
    manifest = {
        "format_version": FORMAT_VERSION, "teacher": teacher_name or type(teacher).__name__, "k": k,
        "temperature": temperature, "vocab_size": vocab_size, "dataset_length": len(dataset),
        "dataset_fingerprint": dataset_fingerprint(dataset), "max_length": longest,
        "token_level": values[0].dim() == 3, "tail_approximation": TAIL_APPROXIMATION,
    }
    lengths = torch.tensor([_row_length(row) for row in rows])
    return TeacherTopK(torch.cat(values), torch.cat(indices), torch.cat(lse), torch.cat(tails), lengths, manifest)


def topk_distillation_divergence(
    student_logits: torch.Tensor,
    topk_values: torch.Tensor,
    topk_indices: torch.Tensor,
    teacher_logsumexp: torch.Tensor,
    teacher_tail_log_mass: torch.Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`distillation_divergence` against stored top-k teacher logits, with the tail as one bucket (module docstring).

    student_logits [B, (T,) V]; topk_values / topk_indices [B, (T,) k] (raw teacher logits and their ids);
    teacher_logsumexp [B, (T,)], the log-sum-exp of the teacher's full logits / `temperature`;
    teacher_tail_log_mass [B, (T,)], the log of the teacher's probability outside the top k (None: log(1 - the top
    k's mass), which float32 rounding makes a noise tail of ~1e-7 when k = V); mask as in `distillation_divergence`.
    Exact at k = V, a lower bound below it. Returns a scalar (x temperature^2)."""
    if topk_values.shape != topk_indices.shape or topk_values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"topk_values {tuple(topk_values.shape)} and topk_indices {tuple(topk_indices.shape)} must "
                         f"be the student's logits {tuple(student_logits.shape)} with k in the last dimension.")
    if teacher_logsumexp.shape != student_logits.shape[:-1]:
        raise ValueError(f"teacher_logsumexp must have shape {tuple(student_logits.shape[:-1])}, got "
                         f"{tuple(teacher_logsumexp.shape)}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    indices = topk_indices.long()
    student_log_probs = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [B, (T,) V]
    student_top = student_log_probs.gather(-1, indices)  # [B, (T,) k]
    student_tail = torch.logsumexp(student_log_probs.scatter(-1, indices, float("-inf")), dim=-1)  # [B, (T,)]
    teacher_top = topk_values.to(dtype) / temperature - teacher_logsumexp.to(dtype).unsqueeze(-1)  # [B, (T,) k]
    if teacher_tail_log_mass is None:
        teacher_tail = torch.log((-torch.expm1(torch.logsumexp(teacher_top, dim=-1))).clamp(min=0.0))  # log(1 - mass)
    else:
        teacher_tail = teacher_tail_log_mass.to(dtype)
    student_buckets = torch.cat([student_top, student_tail.clamp(min=MIN_LOG_MASS).unsqueeze(-1)], dim=-1)
    teacher_buckets = torch.cat([teacher_top, teacher_tail.clamp(min=MIN_LOG_MASS).unsqueeze(-1)], dim=-1)
    # Both are log-probabilities over k + 1 outcomes already: temperature 1 here, the T^2 factor applied once.
    return distillation_divergence(student_buckets, teacher_buckets, beta, 1.0, mask) * temperature**2


class TopKDataset(torch.utils.data.Dataset):
    """`dataset` with each row's stored top-k entries (`TeacherTopK.row`) added under `BATCH_KEYS`."""

    def __init__(self, dataset, topk: TeacherTopK) -> None:
        self.dataset, self.topk = dataset, topk

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], **self.topk.row(index)}


class TopKCollator:
    """Wraps a collator: the stored top-k entries are taken out of the rows before `collator` sees them (it need
    not know them) and stacked beside its batch ([B, L, k], L the dataset's longest row; the trainer trims them to
    the batch's length)."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        stored = {key: torch.stack([row[key] for row in rows]) for key in BATCH_KEYS}
        batch = self.collator([{k: v for k, v in row.items() if k not in BATCH_KEYS} for row in rows])
        return {**batch, **stored}


__all__ = ["TeacherTopK", "TopKCollator", "TopKDataset", "compute_teacher_topk", "dataset_fingerprint",
           "topk_distillation_divergence"]
