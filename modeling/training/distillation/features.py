"""Intermediate-feature alignment between a teacher and a student of different widths and depths.

A layer map pairs student layers with teacher layers (1-based layer numbers; 0 is the embedding output), and a
learned linear projection per pair maps the student's width to the teacher's (TinyBERT, Jiao et al. 2020; DistillKit's
hidden-state alignment). The projections belong to the trainer, not to the student: they are trained with it, saved
in every checkpoint (`distillation_modules.safetensors`, so resume restores them) and beside the final student only
if `DistillationConfig.save_distillation_modules` (they are not needed for inference).
"""

from __future__ import annotations

import torch
from torch import nn


def layer_map(spec: str, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """`feature_layer_map` -> [(student_layer, teacher_layer), ...].

    "uniform": every student layer s to teacher layer round(s * teacher_layers / student_layers) (the last to the
    last); "last-K": the last K student layers to the last K teacher layers; "s:t,s:t": explicit pairs.
    """
    spec = spec.strip()
    if spec == "uniform":
        return [(s, max(1, round(s * teacher_layers / student_layers))) for s in range(1, student_layers + 1)]
    if spec.startswith("last-"):
        try:
            k = int(spec[len("last-"):])
        except ValueError:
            k = 0
        if not 1 <= k <= min(student_layers, teacher_layers):
            raise ValueError(f"feature_layer_map {spec!r}: K must be an integer in [1, {min(student_layers, teacher_layers)}]"
                             " (the smaller of the two depths).")
        return [(student_layers - k + i, teacher_layers - k + i) for i in range(1, k + 1)]
    pairs = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            s, t = (int(x) for x in item.split(":"))
        except ValueError:
            raise ValueError(f"feature_layer_map {spec!r}: write 'uniform', 'last-K' or pairs 's:t,s:t' "
                             f"(layer numbers, 0 = embeddings); {item!r} is not s:t.") from None
        if not (0 <= s <= student_layers and 0 <= t <= teacher_layers):
            raise ValueError(f"feature_layer_map pair {item!r}: student layer must be in [0, {student_layers}] and "
                             f"teacher layer in [0, {teacher_layers}].")
        pairs.append((s, t))
    if not pairs:
        raise ValueError("feature_layer_map is empty: write 'uniform', 'last-K' or pairs 's:t,s:t'.")
    return pairs


def select_layer(hidden_states: tuple[torch.Tensor, ...], layer: int, num_layers: int) -> torch.Tensor:
    """Layer `layer`'s output from a model's `hidden_states` (with or without the embedding output in front)."""
    if len(hidden_states) == num_layers + 1:
        return hidden_states[layer]
    if len(hidden_states) == num_layers and layer >= 1:
        return hidden_states[layer - 1]
    raise ValueError(f"hidden_states has {len(hidden_states)} entries for {num_layers} layers; layer {layer} cannot "
                     "be selected (layer 0, the embeddings, needs a model that returns them).")


class FeatureProjector(nn.Module):
    """One linear map student width -> teacher width per layer pair (identity when the widths match and
    `project=False`)."""

    def __init__(self, pairs: list[tuple[int, int]], student_width: int, teacher_width: int, project: bool = True):
        super().__init__()
        if not project and student_width != teacher_width:
            raise ValueError(f"feature_projection=False needs equal widths, but the student has {student_width} and "
                             f"the teacher {teacher_width}: set feature_projection=True (learned linear maps).")
        self.pairs = list(pairs)
        self.projections = nn.ModuleDict(
            {f"{s}_{t}": nn.Linear(student_width, teacher_width) for s, t in self.pairs} if project else {}
        )

    def forward(self, student_feature: torch.Tensor, pair: tuple[int, int]) -> torch.Tensor:
        """[..., student_width] -> [..., teacher_width]."""
        key = f"{pair[0]}_{pair[1]}"
        return self.projections[key](student_feature) if key in self.projections else student_feature
