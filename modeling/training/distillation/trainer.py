"""`DistillationTrainer`: a Trainer that trains `model` (the student) against a frozen `teacher_model`.

Batches may carry, beside the student's `input_ids` / `attention_mask` / `labels`:
- `teacher_input_ids`, `teacher_attention_mask`: the teacher's own tokenization (different tokenizers); without
  them the teacher gets the student's inputs;
- `task_ids` [B]: the task of each example, with `tasks=[(name, num_labels), ...]`: one classification head over all
  tasks' classes (the teacher's and the student's heads have sum(num_labels) outputs, task k owns its slice).
  A classification label of -100 marks an unlabelled (transfer) example: only the teacher's outputs teach it.
- `teacher_logits` [B, ...] and `teacher_features` [B, pairs, teacher_width] (pooled, one per layer pair):
  precomputed teacher outputs (offline distillation); with what the loss needs precomputed, the teacher is not run.

Offline from disk: `teacher_topk=TeacherTopK.load(folder)` (`lightarch.training.distillation.topk`, the teacher's
top-k logits stored as safetensors) with `teacher_model=None`: the trainer checks that they belong to `train_dataset`
and the student, adds them to each row and computes the loss with the tail as one bucket
(`topk_distillation_divergence`). The student's evaluation loss then has no teacher: evaluate the student alone
(perplexity, accuracy) rather than with `trainer.evaluate()` at alpha > 0.

Everything Trainer does keeps working (gradient accumulation, checkpoints, resume, report_to); the projections and
task weights this trainer owns are optimized with the student, saved in each checkpoint and restored on resume.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer

from .config import DistillationConfig
from .features import FeatureProjector, layer_map, select_layer
from .losses import distillation_divergence, feature_alignment_loss, masked_mean_pool
from .topk import BATCH_KEYS as TOPK_KEYS
from .topk import TeacherTopK, TopKCollator, TopKDataset, topk_distillation_divergence
from .weighting import LEARNED_WEIGHTINGS, TaskWeighting

MODULES_FILE = "distillation_modules.safetensors"
PRECOMPUTED_KEYS = ("teacher_logits", "teacher_features")


def task_rows(task_ids: torch.Tensor, tasks: Sequence[tuple[str, int]]):
    """Yield (k, name, rows [B] bool, slice of the shared head) for each task present in the batch."""
    offset = 0
    for k, (name, num_labels) in enumerate(tasks):
        rows = task_ids == k
        if bool(rows.any()):
            yield k, name, rows, slice(offset, offset + num_labels)
        offset += num_labels


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _is_token_level(model: nn.Module) -> bool:
    """A language model head (logits over a vocabulary per position), not a classification head."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter is not None and getter() is not None


def last_shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """GradNorm's W, the last parameters every task's loss goes through: the student's final norm (`base_model.norm`,
    the layer before the head), else its last decoder layer. ValueError when the model has neither."""
    base = getattr(model, "base_model", model)
    for module in (getattr(base, "norm", None), (getattr(base, "layers", None) or [None])[-1]):
        params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
        if params:
            return params
    raise ValueError(f"task_weighting='gradnorm' needs the student's last shared layer (base_model.norm or "
                     f"base_model.layers), which {type(model).__name__} lacks: use task_weighting='uncertainty'.")


def check_distillation_pair(student: nn.Module, teacher: nn.Module, args: DistillationConfig,
                            tasks: Sequence[tuple[str, int]] | None) -> None:
    """Errors a run would otherwise hit mid-training: vocabularies or label sets that logit distillation cannot
    compare."""
    student_config, teacher_config = _text_config(student), _text_config(teacher)
    if args.alpha > 0 and _is_token_level(student) and _is_token_level(teacher):
        if student_config.vocab_size != teacher_config.vocab_size:
            raise ValueError(
                f"Logit distillation needs one vocabulary, but the student's vocab_size is {student_config.vocab_size} "
                f"and the teacher's {teacher_config.vocab_size}: train the student with the teacher's tokenizer, or "
                "set alpha=0 and use feature / sequence-level distillation (feature_weight > 0, feature_pooling="
                "'mean')."
            )
    if not _is_token_level(student) and args.alpha > 0:
        s_labels, t_labels = getattr(student_config, "num_labels", None), getattr(teacher_config, "num_labels", None)
        if s_labels != t_labels:
            raise ValueError(f"Logit distillation needs the same classes, but the student has num_labels={s_labels} "
                             f"and the teacher {t_labels}: give both heads the same labels, or set alpha=0.")
        if tasks is not None and sum(n for _, n in tasks) != s_labels:
            raise ValueError(f"tasks have {sum(n for _, n in tasks)} classes in all, but the heads have num_labels="
                             f"{s_labels}: the head must have one output per class of every task.")


class DistillationTrainer(Trainer):
    """Trainer for knowledge distillation; see the module docstring for the batch layout."""

    def __init__(self, model: PreTrainedModel, teacher_model: nn.Module | None = None,
                 args: DistillationConfig | None = None, tasks: Sequence[tuple[str, int]] | None = None,
                 teacher_topk: TeacherTopK | None = None, **kwargs) -> None:
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}.")
        if teacher_model is None and teacher_topk is None and (args.alpha > 0 or args.feature_weight > 0):
            raise ValueError("teacher_model is required (the frozen model the student learns from), unless "
                             "teacher_topk= gives its stored logits, or alpha=0 and feature_weight=0 (no teacher).")
        if teacher_model is not None:
            check_distillation_pair(model, teacher_model, args, tasks)
        if teacher_topk is not None:
            kwargs = self._attach_topk(model, teacher_topk, args, tasks, kwargs)
        self.teacher_topk = teacher_topk
        super().__init__(model=model, args=args, **kwargs)
        # A micro-batch loss is a mean: Trainer divides it by the accumulation steps (one big batch's mean).
        self.model_accepts_loss_kwargs = False
        self.teacher_model = teacher_model.to(self.args.device) if teacher_model is not None else None
        if self.teacher_model is not None:
            self.teacher_model.eval()
            self.teacher_model.requires_grad_(False)
        self.tasks = list(tasks) if tasks is not None else [("task", getattr(_text_config(model), "num_labels", 1))]
        modules = nn.ModuleDict({"task_weighting": TaskWeighting(len(self.tasks), args.task_weighting,
                                                                 args.task_weights)})
        self.feature_pairs: list[tuple[int, int]] = []
        if args.feature_weight > 0:
            if teacher_model is None:
                raise ValueError("feature_weight > 0 needs teacher_model (stored top-k logits hold no features): "
                                 "pass the teacher, or set feature_weight=0.")
            student_config, teacher_config = _text_config(model), _text_config(teacher_model)
            self.feature_pairs = layer_map(args.feature_layer_map, student_config.num_hidden_layers,
                                           teacher_config.num_hidden_layers)
            modules["projector"] = FeatureProjector(self.feature_pairs, student_config.hidden_size,
                                                    teacher_config.hidden_size, args.feature_projection)
        self.distillation_modules = modules.to(self.args.device)
        self._shared_parameters = last_shared_parameters(model) if args.task_weighting == "gradnorm" else []
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._router_records: list = []
        base = getattr(model, "base_model", None)
        self._router_hook = None
        if hasattr(_text_config(model), "router_aux_loss_coef") and not _is_token_level(model) and base is not None:
            # The classification head drops the router records; catch them at the base model to keep the aux loss.
            self._router_hook = base.register_forward_hook(self._catch_router_records)

    @staticmethod
    def _attach_topk(model: nn.Module, topk: TeacherTopK, args: DistillationConfig,
                     tasks: Sequence[tuple[str, int]] | None, kwargs: dict) -> dict:
        """Check the stored logits against the student and `train_dataset`; rows get their entries, the collator
        stacks them."""
        from transformers import default_data_collator

        token_level = _is_token_level(model)
        config = _text_config(model)
        topk.check(kwargs.get("train_dataset"), config.vocab_size if token_level else config.num_labels,
                   args.temperature)
        if topk.manifest["token_level"] != token_level:
            stored_kind = "per token" if topk.manifest["token_level"] else "per row"
            student_kind = "language model" if token_level else "classifier"
            raise ValueError(f"The stored teacher logits are {stored_kind}, but the student is a {student_kind}: "
                             "store the logits of a teacher of the student's kind.")
        if not token_level and topk.k != config.num_labels:
            raise ValueError(f"For a classifier, store every logit (k = num_labels = {config.num_labels}, got k = "
                             f"{topk.k}): classification heads are small, and task slices need all of them.")
        kwargs = dict(kwargs)
        if kwargs.get("train_dataset") is not None:
            kwargs["train_dataset"] = TopKDataset(kwargs["train_dataset"], topk)
        kwargs["data_collator"] = TopKCollator(kwargs.get("data_collator") or default_data_collator)
        return kwargs

    # -- optimizer, checkpoints ---------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        extra = [p for p in self.distillation_modules.parameters() if p.requires_grad and id(p) not in known]
        if extra:
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
            # Trainer zeroes only the model's gradients (`model.zero_grad()`): clear ours after every step, or they
            # would add up across steps; GradNorm's weights are renormalized first.
            optimizer.register_step_post_hook(self._after_optimizer_step)
        return optimizer

    def _after_optimizer_step(self, *_) -> None:
        self.distillation_modules["task_weighting"].renormalize()
        self.distillation_modules.zero_grad(set_to_none=True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The student; and the projections / task weights in checkpoints (for resume), or when asked for."""
        super().save_model(output_dir, _internal_call)
        if (_internal_call or self.args.save_distillation_modules) and self.args.should_save:
            from safetensors.torch import save_file

            folder = output_dir or self.args.output_dir
            os.makedirs(folder, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.distillation_modules.state_dict().items()}
            save_file(state, os.path.join(folder, MODULES_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, MODULES_FILE)
        if os.path.isfile(path):
            from safetensors.torch import load_file

            self.distillation_modules.load_state_dict(load_file(path, device=str(self.args.device)))

    # -- loss ---------------------------------------------------------------------------------------------------
    def _catch_router_records(self, module, args, output) -> None:
        logits = getattr(output, "router_logits", None)
        indices = getattr(output, "router_indices", None)
        if logits and indices:
            self._router_records.append((logits, indices))

    def _router_aux_loss(self, model: nn.Module, outputs, attention_mask) -> torch.Tensor | None:
        aux = getattr(outputs, "aux_loss", None)
        if aux is not None or not self._router_records:
            self._router_records.clear()
            return aux
        from lightarch.modeling_sparse_moe import router_aux_loss, router_statistics

        logits, indices = self._router_records.pop()
        self._router_records.clear()
        config = _text_config(model)
        return router_aux_loss(config, router_statistics(logits, indices, config.num_experts, attention_mask))

    def _feature_loss(self, outputs, teacher_outputs, student_mask, teacher_mask, shared_inputs: bool,
                      teacher_features: torch.Tensor | None = None):
        args = self.args
        pooling = args.feature_pooling
        if pooling == "auto":
            pooling = "tokens" if shared_inputs and teacher_features is None else "mean"
        if teacher_features is not None and pooling != "mean":
            raise ValueError("precomputed teacher_features are pooled: use feature_pooling='mean' (or 'auto').")
        if pooling == "tokens" and not shared_inputs:
            raise ValueError("feature_pooling='tokens' needs the teacher to see the student's tokens, but the batch "
                             "has teacher_input_ids: use feature_pooling='mean' (sequence-level alignment).")
        student_layers = _text_config(self.model).num_hidden_layers
        teacher_layers = _text_config(self.teacher_model).num_hidden_layers
        projector = self.distillation_modules["projector"]
        losses = []
        for index, pair in enumerate(self.feature_pairs):
            student_h = select_layer(outputs.hidden_states, pair[0], student_layers)  # [B, T, Hs]
            if teacher_features is not None:
                teacher_h = teacher_features[:, index]  # [B, Ht], pooled when precomputed
            else:
                teacher_h = select_layer(teacher_outputs.hidden_states, pair[1], teacher_layers)  # [B, T', Ht]
            if pooling == "mean":
                student_h = masked_mean_pool(student_h, student_mask)  # [B, Hs]
                if teacher_features is None:
                    teacher_h = masked_mean_pool(teacher_h, teacher_mask)  # [B, Ht]
                mask = None
            else:
                mask = student_mask
            losses.append(feature_alignment_loss(projector(student_h, pair), teacher_h.detach(), args.feature_loss,
                                                 mask))
        return torch.stack(losses).mean()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        task_ids = inputs.pop("task_ids", None)
        precomputed = {key: inputs.pop(key) for key in PRECOMPUTED_KEYS if key in inputs}
        stored = {key: inputs.pop(key) for key in TOPK_KEYS if key in inputs}  # [B, L, k] / [B, L], or [B, k] / [B]
        teacher_inputs = {key[len("teacher_"):]: inputs.pop(key) for key in list(inputs) if key.startswith("teacher_")}
        shared_inputs = not teacher_inputs
        if shared_inputs:
            teacher_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask") if key in inputs}
        want_features = args.feature_weight > 0
        student_kwargs = dict(inputs)
        if want_features:
            student_kwargs["output_hidden_states"] = True
        if self._router_hook is not None and model.training:
            student_kwargs.update(output_router_logits=True, output_router_indices=True)
        outputs = model(**student_kwargs)
        student_logits = outputs.logits
        if stored and student_logits.dim() == 2:  # a classifier stores every logit: back to [B, C]
            precomputed["teacher_logits"] = torch.zeros_like(student_logits, dtype=torch.float32).scatter(
                -1, stored["teacher_topk_indices"].long(), stored["teacher_topk_values"].float())
            stored = {}
        elif stored:  # trim the dataset-length padding to this batch's length T
            length = student_logits.shape[1]
            stored = {key: value[:, :length] for key, value in stored.items()}
        teacher_outputs = None
        need_logits = args.alpha > 0 and "teacher_logits" not in precomputed and not stored
        need_features = want_features and "teacher_features" not in precomputed
        if (need_logits or need_features) and self.teacher_model is None:
            raise ValueError("This batch carries no teacher logits and there is no teacher_model: pass "
                             "teacher_model, or teacher_topk for the training data (evaluate the student alone).")
        if need_logits or need_features:
            self.teacher_model.eval()
            with torch.no_grad():
                teacher_outputs = self.teacher_model(**teacher_inputs, output_hidden_states=need_features)
        teacher_logits = precomputed.get("teacher_logits", getattr(teacher_outputs, "logits", None))

        mode = "train" if model.training else "eval"
        parts: dict[str, torch.Tensor] = {}
        device = student_logits.device
        num_tasks = len(self.tasks)
        per_task = [torch.zeros((), device=device)] * num_tasks
        present = torch.zeros(num_tasks, dtype=torch.bool, device=device)
        ce_sum = kd_sum = 0.0
        if student_logits.dim() == 3:  # causal LM: position t predicts token t + 1
            shifted = labels[:, 1:] if labels is not None else None
            mask = (shifted != -100) if shifted is not None else inputs.get("attention_mask")[:, 1:].bool()
            ce = (F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)
                  if shifted is not None else torch.zeros((), device=device))
            if args.alpha == 0:
                kd = torch.zeros((), device=device)
            elif stored:
                kd = topk_distillation_divergence(
                    student_logits[:, :-1], stored["teacher_topk_values"][:, :-1],
                    stored["teacher_topk_indices"][:, :-1], stored["teacher_logsumexp"][:, :-1],
                    stored["teacher_tail_log_mass"][:, :-1], args.beta, args.temperature, mask)
            else:
                kd = distillation_divergence(student_logits[:, :-1], teacher_logits[:, :-1], args.beta,
                                             args.temperature, mask)
            per_task[0] = (1 - args.alpha) * ce + args.alpha * kd
            present[0] = True
            ce_sum, kd_sum = ce, kd
        else:  # classification: [B, sum of classes]
            if task_ids is None:
                task_ids = torch.zeros(student_logits.shape[0], dtype=torch.long, device=device)
            for k, name, rows, head in task_rows(task_ids, self.tasks):
                s = student_logits[rows, head]  # [b_k, C_k]
                ce = torch.zeros((), device=device)
                if labels is not None:  # the mean over labelled rows (-100: a teacher-labelled transfer example)
                    labelled = (labels[rows] != -100).sum().clamp(min=1)
                    ce = F.cross_entropy(s.float(), labels[rows], ignore_index=-100, reduction="sum") / labelled
                kd = torch.zeros((), device=device)
                if args.alpha > 0:
                    t = teacher_logits[rows, head]
                    kd = distillation_divergence(s, t, args.beta, args.temperature)
                per_task[k] = (1 - args.alpha) * ce + args.alpha * kd
                present[k] = True
                share = rows.float().mean()
                ce_sum, kd_sum = ce_sum + share * ce, kd_sum + share * kd
                self._metrics[mode][f"task_loss/{name}"].append(float(per_task[k].detach()))
        weighting = self.distillation_modules["task_weighting"]
        if weighting.mode == "gradnorm" and model.training and torch.is_grad_enabled():
            gradnorm_loss = weighting.gradnorm_update(torch.stack(per_task), present, self._shared_parameters,
                                                      args.gradnorm_alpha)
            if gradnorm_loss is not None:
                parts["loss_gradnorm"] = gradnorm_loss
        loss = weighting(torch.stack(per_task), present)
        parts["loss_ce"], parts["loss_kd"] = ce_sum, kd_sum
        if want_features:
            feature = self._feature_loss(outputs, teacher_outputs, inputs.get("attention_mask"),
                                         teacher_inputs.get("attention_mask"), shared_inputs,
                                         precomputed.get("teacher_features"))
            loss = loss + args.feature_weight * feature
            parts["loss_feature"] = feature
        aux = self._router_aux_loss(model, outputs, inputs.get("attention_mask")) if model.training else None
        if aux is not None:
            loss = loss + aux
            parts["loss_router_aux"] = aux
        for key, value in parts.items():
            self._metrics[mode][key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
        if weighting.mode in LEARNED_WEIGHTINGS:
            for (name, _), weight in zip(self.tasks, self.distillation_modules["task_weighting"].effective_weights()):
                self._metrics[mode][f"task_weight/{name}"].append(float(weight))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Trainer's logs plus the mean of each loss part (and learned task weight) since the last log."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():
            if values:
                logs[prefix + key] = round(sum(values) / len(values), 6)
        self._metrics[mode].clear()
        super().log(logs, *args, **kwargs)
