"""Trainer support for the multimodal model: every loss part in the logs, not only the total.

`Trainer` logs `loss` alone. `MultiModalTrainer` keeps the parts each forward returns (`generation_loss`, `aux_loss`,
`alignment_loss`, `text_image_loss`, `text_audio_loss`, `image_audio_loss`) and adds, at each logging step, their
mean over the forwards since the last log (training), or over the evaluation (keys prefixed `eval_`). A part that no
forward in the window produced (e.g. `image_audio_loss` when no batch had both) is left out.

It also loads checkpoints (resume, best model) through `from_pretrained`: `save_pretrained` writes the ViT encoder
under its legacy key names, which `Trainer` would not rename (the encoder would silently restart from random weights).
"""

import logging
from collections import defaultdict

import torch
from transformers import Trainer

from ..modeling_multimodal import loss_parts

logger = logging.getLogger(__name__)


def load_checkpoint_weights(model: torch.nn.Module, checkpoint: str) -> None:
    """Copy the weights saved in the `checkpoint` folder into `model`, every tensor, key names converted the way
    `from_pretrained` converts them; a ValueError names the folder when they do not all fit."""
    loaded, info = type(model).from_pretrained(checkpoint, output_loading_info=True)
    saved, current = loaded.state_dict(), model.state_dict()
    problems = {kind: sorted(map(str, keys)) for kind, keys in info.items() if kind != "error_msgs" and keys}
    problems |= {kind: keys for kind, keys in (
        ("not in the checkpoint", sorted(current.keys() - saved.keys())),
        ("not in the model", sorted(saved.keys() - current.keys())),
        ("other shape", sorted(k for k in saved.keys() & current.keys() if saved[k].shape != current[k].shape)),
    ) if keys}
    if problems:
        summary = "; ".join(f"{kind} {keys[:3]}{'...' if len(keys) > 3 else ''}" for kind, keys in problems.items())
        raise ValueError(f"--resume_from_checkpoint: {checkpoint} does not hold this model's weights ({summary}); "
                         "resume with the model options of that run, or start from scratch.")
    model.load_state_dict(saved)


class MultiModalTrainer(Trainer):
    """A `Trainer` whose logs carry the mean of each loss part; use it like `Trainer`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._part_totals = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._part_counts = {"train": defaultdict(float), "eval": defaultdict(float)}

    def compute_loss(self, model: torch.nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        split = "train" if model.training else "eval"
        # With `num_items_in_batch` the decoder's loss is this micro-batch's share of the step's token total: the
        # shares of one optimizer step add up to its loss, so each counts as a fraction of a step.
        share_weight = 1.0
        if split == "train" and num_items_in_batch is not None:
            share_weight = 1.0 / self.args.gradient_accumulation_steps
        for name, value in loss_parts(outputs).items():
            if name != "loss":
                self._part_totals[split][name] += value
                self._part_counts[split][name] += share_weight if name == "generation_loss" else 1.0
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        model = self.model if model is None else model
        load_checkpoint_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint, self.state.best_metric)
        load_checkpoint_weights(self.model, self.state.best_model_checkpoint)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if any(key.startswith("eval_") for key in logs):
            logs.update(self.pop_loss_parts("eval", prefix="eval_"))
        elif "loss" in logs:  # a training log step
            logs.update(self.pop_loss_parts("train"))
        super().log(logs, start_time)

    def pop_loss_parts(self, split: str, prefix: str = "") -> dict[str, float]:
        """Mean of each loss part recorded for `split` ("train" or "eval") since the last call; resets them."""
        totals, counts = self._part_totals[split], self._part_counts[split]
        means = {f"{prefix}{name}": totals[name] / counts[name] for name in totals if counts[name]}
        totals.clear()
        counts.clear()
        return means


__all__ = ["MultiModalTrainer", "load_checkpoint_weights"]
