"""Ghost clipping (Opacus's fast gradient clipping) for lightarch models: DP-SGD without per-sample gradients.

Standard DP-SGD (`grad_sample_mode="hooks"`) keeps every parameter's per-sample gradient, (B, *shape), alive until
the optimizer clips them: B copies of the model. Ghost clipping (Li et al. 2021; Opacus's
`GradSampleModuleFastGradientClipping`, `DPTensorFastGradientClipping`) needs only each example's gradient norm:
a first backward of the mean loss computes the norms layer by layer, the clipping factors
`min(1, C / (norm + 1e-6))` follow, and a second backward of `sum_b factor_b * loss_b` (hooks off) gives the clipped
summed gradient directly. Opacus's `DPOptimizerFastGradientClipping` then adds the noise: the same step, the same
noise and the same accounting as the standard path.

What Opacus 1.6 does for each lightarch layer here (`GhostClippingModule`):

- `nn.Linear` (attention, shared experts, heads, estimator) and `nn.Embedding`: Opacus's own norm samplers (the
  only two types Opacus 1.6 ships one for); the per-sample gradient is never formed (for a (B, T, in) input the
  Linear norm comes from the (B, T, T) Gram matrices of activations and backprops).
- The 3D `Experts`: a norm sampler registered here (`grad_samplers.compute_experts_norm_sample`) takes each
  example's gradient of the experts' weights alone (its rows through the experts' forward, as the grad sampler
  does) and keeps only its norm: one example's (E, 2I, H) + (E, H, I) gradient at a time, never the (B, ...) one.
  An example whose tokens skip an expert contributes exact zeros for it.
- `RMSNorm`: a grad sampler but no norm sampler. For such a layer Opacus 1.6 computes the per-sample gradient with
  the grad sampler, takes each example's norm (`create_norm_sample`) and sets `grad_sample` back to None at once
  ("fast gradient clipping", hook mode): one (B, H) tensor at a time, so no closed form is worth registering. A
  layer with neither sampler would go through functorch's vmap the same way.
- `Router`: its Opacus hooks are replaced by `grad_samplers`' logits hook, which under ghost clipping stores the
  norm of the (B, E, H) per-sample gradient and drops the gradient.
- A layer with a norm sampler called more than once in a forward (AdaptiveDepth's shared exit head, the classifier's
  `score`) makes Opacus raise "Parameter tying is not supported with Ghost Clipping"; and a parameter shared by two
  modules (tied embeddings) would get the norm of one module's part only (Opacus overwrites `_norm_sample`). Such
  layers fall back to the per-sample path here (their gradient is summed over the calls before its norm is taken).

The second backward needs the loss of each example, (B,): `per_example_private_losses` computes it from the model's
outputs for the four lightarch models (`SUPPORTED_MODELS`) and checks that its mean equals `private_loss` (the
loss the standard path differentiates) before using it; any other model is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.grad_sample_module import promote_current_grad_sample
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    create_norm_sample,
)
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from .loss import (
    check_equal_label_counts,
    forward_with_router_outputs,
    per_sequence_aux_losses,
)

SUPPORTED_MODELS = (
    "SparseMoeForCausalLM",
    "SparseMoeForSequenceClassification",
    "AdaptiveDepthForCausalLM",
    "AdaptiveDepthForSequenceClassification",
)
GRAD_SAMPLE_MODES = ("hooks", "ghost")


class GhostClippingModule(GradSampleModuleFastGradientClipping):
    """Opacus's ghost-clipping wrapper, with the per-sample fallback for layers called more than once or sharing a
    parameter (see the module docstring) and the norms of layers whose outputs were not all used completed."""

    def __init__(self, module: nn.Module, *, max_grad_norm: float, loss_reduction: str = "mean") -> None:
        super().__init__(module, batch_first=True, loss_reduction=loss_reduction, max_grad_norm=max_grad_norm,
                         use_ghost_clipping=True)
        owners: dict[int, list[nn.Module]] = {}
        for layer in module.modules():
            for param in layer.parameters(recurse=False):
                owners.setdefault(id(param), []).append(layer)
        # ids of the layers that take the per-sample path: tied parameters now, repeated calls when first seen
        self.per_sample_layers = {id(layer) for layers in owners.values() if len(layers) > 1 for layer in layers}

    def _hook_with_fallback(self, hook, module: nn.Module, *args, **kwargs):
        if id(module) not in self.per_sample_layers:
            return hook(module, *args, **kwargs)
        self.use_ghost_clipping = False  # Opacus reads it per call: this layer goes through its grad sampler
        try:
            return hook(module, *args, **kwargs)
        finally:
            self.use_ghost_clipping = True

    def capture_activations_hook(self, module: nn.Module, forward_input, _forward_output) -> None:
        if type(module) in self.NORM_SAMPLERS and getattr(module, "activations", None) and self.hooks_enabled:
            self.per_sample_layers.add(id(module))  # a second call in this forward: Opacus's ghost path refuses it
        self._hook_with_fallback(super().capture_activations_hook, module, forward_input, _forward_output)

    def capture_backprops_hook(self, module: nn.Module, _forward_input, forward_output, loss_reduction: str,
                               batch_first: bool) -> None:
        self._hook_with_fallback(super().capture_backprops_hook, module, _forward_input, forward_output,
                                 loss_reduction=loss_reduction, batch_first=batch_first)

    def get_norm_sample(self) -> torch.Tensor:
        """Per-example gradient norms, (B,), after completing those of calls whose output was not used."""
        complete_norm_samples(self)
        return super().get_norm_sample()

    def get_clipping_coef(self) -> torch.Tensor:
        coef = super().get_clipping_coef()
        for param in self.trainable_parameters:  # never reuse a norm in the next step
            param._norm_sample = None
        return coef


def complete_norm_samples(module: GhostClippingModule) -> None:
    """After the first backward: finish the per-sample path of layers with an unused call (as
    `finish_per_sample_gradients`), and give a zero norm to parameters the loss does not reach. A parameter that has
    a gradient but no norm (a layer no sampler covered) is an error, never a silent zero."""
    model = module._module
    for layer in model.modules():
        if getattr(layer, "activations", None):
            layer.activations.clear()
            if hasattr(layer, "max_batch_len"):
                del layer.max_batch_len
    norms = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if hasattr(param, "_current_grad_sample"):
            promote_current_grad_sample(param)
        if getattr(param, "grad_sample", None) is not None:
            create_norm_sample(param=param, grad_sample=param.grad_sample, max_batch_len=len(param.grad_sample))
            param.grad_sample = None
        param._forward_counter = 0
        norms[name] = getattr(param, "_norm_sample", None)
    batch = next((len(norm) for norm in norms.values() if norm is not None), 0)
    for name, param in model.named_parameters():
        if name in norms and norms[name] is None:
            if param.grad is not None and bool(param.grad.any()):
                raise RuntimeError(f"{name}: has a gradient but no per-sample gradient norm under ghost clipping "
                                   "(no sampler covers its layer); use grad_sample_mode='hooks'.")
            param._norm_sample = torch.zeros(batch, dtype=param.dtype, device=param.device)


def check_ghost_supported(model: nn.Module) -> None:
    """A ValueError naming `grad_sample_mode` for a model ghost clipping cannot train here."""
    model = getattr(model, "_module", model)
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise ValueError(f"grad_sample_mode='ghost': {name} has no per-example loss here (ghost clipping's second "
                         f"backward needs one; supported: {', '.join(SUPPORTED_MODELS)}); use grad_sample_mode='hooks'.")
    objective = getattr(model.config, "estimator_objective", "earliest")
    if name.startswith("AdaptiveDepth") and objective != "earliest":
        raise ValueError(f"grad_sample_mode='ghost' with estimator_objective={objective!r}: only 'earliest' has a "
                         "per-example estimator loss here; use estimator_objective='earliest' or "
                         "grad_sample_mode='hooks'.")


def _example_losses(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's task loss, (B,), as the model's loss function computes it over the batch."""
    if logits.dim() == 3:  # causal LM (B, T, V): next-token cross-entropy, mean over the example's tokens
        shift_labels = labels[:, 1:].to(logits.device)  # (B, T-1)
        token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shift_labels, ignore_index=-100,
                                reduction="none")  # (B, T-1)
        mask = shift_labels != -100
        return (token * mask).sum(1) / mask.sum(1).clamp(min=1)
    problem = config.problem_type  # set by the model's loss function on this forward
    if problem == "single_label_classification":
        return F.cross_entropy(logits.float(), labels.view(-1), reduction="none")
    if problem == "regression":
        return ((logits.float().squeeze(-1) - labels.float().view(logits.shape[0], -1).squeeze(-1)) ** 2
                ).reshape(logits.shape[0], -1).mean(1)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(1)


def per_example_private_losses(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, object]:
    """(each example's loss (B,), outputs): the terms whose mean is `private_loss(model, inputs)`.

    The mean is checked against the model's own loss (its batch balance loss replaced by the per-sequence one, as
    in `private_loss`); a mismatch raises a ValueError rather than training on a different loss.
    """
    check_ghost_supported(model)
    check_equal_label_counts(inputs.get("labels"))
    labels = inputs["labels"]
    outputs, router_outputs = forward_with_router_outputs(model, inputs)
    config = getattr(model, "_module", model).config
    exit_logits = outputs.get("exit_logits")
    if exit_logits is not None and outputs.get("estimator_logits") is not None:  # AdaptiveDepth: every exit
        weights = torch.tensor(config.exit_loss_weights, dtype=torch.float32, device=labels.device)
        per_exit = torch.stack([_example_losses(config, logits, labels) for logits in exit_logits], 1)  # (B, exits)
        losses = (per_exit * weights).sum(1) / weights.sum()
        estimator = F.cross_entropy(outputs["estimator_logits"].float(), outputs["estimator_targets"],
                                    reduction="none")  # (B,)
        losses = losses + config.estimator_loss_weight * estimator
    else:
        losses = _example_losses(config, outputs["logits"], labels)
    expected = outputs["loss"]
    aux_loss = outputs.get("aux_loss")
    if aux_loss is not None and router_outputs:
        per_sequence = per_sequence_aux_losses(config, router_outputs, labels.shape[0], inputs.get("attention_mask"))
        losses = losses + per_sequence.to(losses.dtype)
        expected = expected - aux_loss + per_sequence.mean()
    losses = losses.to(expected.dtype)
    if not torch.allclose(losses.detach().mean(), expected.detach(), rtol=1e-4, atol=1e-6):
        raise ValueError(f"grad_sample_mode='ghost': the per-example losses of {type(model).__name__} average to "
                         f"{losses.mean().item():.6g}, not its loss {expected.item():.6g}; use grad_sample_mode='hooks'.")
    return losses, outputs


def ghost_backward(module: GhostClippingModule, optimizer, losses: torch.Tensor) -> None:
    """Opacus's two backward passes: norms from the mean of `losses` (B,), then `sum_b coef_b * loss_b` into `.grad`
    (the clipped sum). Parameters the loss does not reach get a zero gradient (the optimizer accumulates `.grad`)."""
    DPTensorFastGradientClipping(module, optimizer, losses, module.loss_reduction).backward()
    for param in (param for group in optimizer.param_groups for param in group["params"]):
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)


def make_private_ghost(engine, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader, noise_multiplier: float,
                       max_grad_norm: float):
    """What `PrivacyEngine.make_private(grad_sample_mode="ghost")` builds, with `GhostClippingModule` as the
    wrapper: (module, `DPOptimizerFastGradientClipping`, Poisson `DPDataLoader`), the optimizer's steps accounted by
    `engine.accountant`."""
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizerFastGradientClipping

    check_ghost_supported(module)
    sample_rate = 1.0 / len(data_loader)
    wrapped = GhostClippingModule(module, max_grad_norm=max_grad_norm, loss_reduction="mean")
    dp_optimizer = DPOptimizerFastGradientClipping(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=int(len(data_loader.dataset) * sample_rate), loss_reduction="mean")
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return wrapped, dp_optimizer, DPDataLoader.from_data_loader(data_loader)


__all__ = [
    "GRAD_SAMPLE_MODES",
    "SUPPORTED_MODELS",
    "GhostClippingModule",
    "check_ghost_supported",
    "complete_norm_samples",
    "ghost_backward",
    "make_private_ghost",
    "per_example_private_losses",
]
