"""Per-sample gradients for every lightarch layer, registered with Opacus (no change to the model files).

Opacus computes per-sample gradients with one "grad sampler" per layer type, from the layer's input (activations)
and the gradient of its output (backprops). lightarch's MoE layers need more than that:

- `RMSNorm`: an analytic sampler (the gradient of `weight * normed` is `backprop * normed`, summed over tokens).
- `Router`: its input is the batch flattened to (B*T, H), and its logits reach the loss two ways: through the routing
  weights inside the MoE block and, for the balance / z losses, through transformers' output recorder, a forward
  hook that keeps the logits *before* Opacus's backward hook wraps them (so that hook sees only part of the
  gradient, or None). Opacus's router hooks are removed; a tensor hook on the logits the router produced catches
  their complete gradient (B*T, E), and the per-sample gradient is `sum_t grad_logits[b, t] (x) input[b, t]`.
- `Experts` (3D weights, called as `experts(hidden, index, weights)` on flattened tokens or on selected
  (token, expert) pairs): every input row is mapped to its example, and each example's rows are run through the
  experts' own forward again, alone, and differentiated (`torch.autograd.grad`). An expert that gets no token of an
  example gets an exact zero; one that gets every token gets all of them.
- The shared experts (`MLP` on flattened tokens): a forward pre-hook reshapes their input to (B, T, H) and a forward
  hook flattens the output back, so Opacus's own `nn.Linear` sampler sees the batch dimension.

`prepare_per_sample_gradients(model)` installs the hooks this needs (on the model's MoE blocks and routers) and
returns their handles; call it after wrapping the model with Opacus (`PrivateTrainer` does). Importing this module
registers the samplers. Not supported: gradient checkpointing (a second forward of a layer per backward). The routers must not add noise of their own (`router_jitter_noise=0`): the per-sample
gradient of the jittered input is not reproducible in the backward pass.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.grad_sample_module import (
    create_or_accumulate_grad_sample,
    promote_current_grad_sample,
)
from torch import nn
from torch.utils.hooks import RemovableHandle

from ...layers import MLP, Experts, RMSNorm, Router, SparseMoeBlock


def _loss_scale(layer: nn.Module) -> float:
    """Opacus multiplies backprops by the batch size when the loss is a batch mean; gradients caught outside its
    backprops need the same factor. Set by `prepare_per_sample_gradients(loss_reduction=...)`."""
    return float(layer.max_batch_len) if getattr(layer, "_dp_loss_reduction", "mean") == "mean" else 1.0


@register_grad_sampler(RMSNorm)
def compute_rms_norm_grad_sample(layer: RMSNorm, activations: list[torch.Tensor], backprops: torch.Tensor
                                 ) -> dict[nn.Parameter, torch.Tensor]:
    """weight (H,): per example, `sum over tokens of backprop * normed input`. Input (B, ..., H)."""
    x = activations[0]
    if not layer.weight.requires_grad:
        return {}
    hidden = x.to(torch.float32)
    normed = (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + layer.variance_epsilon)).to(x.dtype)
    grad = (normed * backprops).reshape(x.shape[0], -1, x.shape[-1]).sum(1)  # (B, H)
    return {layer.weight: grad}


def _experts_example_grads(layer: Experts, activations: list[torch.Tensor], backprops: torch.Tensor):
    """Yield (example, params, grads): each example's gradient of the experts' weights from its rows alone."""
    hidden, index, weights = activations  # (N, H), (N, k), (N, k): N tokens (top-k) or selected pairs (top-p)
    row_example = layer._dp_row_examples.pop()  # (N,) the example of every input row
    params = [p for p in (layer.gate_up_proj, layer.down_proj) if p.requires_grad]
    forward = type(layer).forward  # unbound: no module hooks (Opacus's would record this recomputation)
    with torch.enable_grad():
        for example in range(layer.max_batch_len):
            rows = (row_example == example).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            output = forward(layer, hidden[rows], index[rows], weights[rows])  # (rows, H)
            yield example, params, torch.autograd.grad(output, params, backprops[rows], allow_unused=True)


@register_grad_sampler(Experts)
def compute_experts_grad_sample(layer: Experts, activations: list[torch.Tensor], backprops: torch.Tensor
                                ) -> dict[nn.Parameter, torch.Tensor]:
    """gate_up_proj (E, 2I, H), down_proj (E, H, I): each example's rows through the experts' forward, alone."""
    params = [p for p in (layer.gate_up_proj, layer.down_proj) if p.requires_grad]
    samples = {p: torch.zeros((layer.max_batch_len, *p.shape), dtype=p.dtype, device=p.device) for p in params}
    for example, params, grads in _experts_example_grads(layer, activations, backprops):
        for param, grad in zip(params, grads):
            if grad is not None:
                samples[param][example] = grad
    return samples


@register_norm_sampler(Experts)
def compute_experts_norm_sample(layer: Experts, activations: list[torch.Tensor], backprops: torch.Tensor
                                ) -> dict[nn.Parameter, torch.Tensor]:
    """Ghost clipping: each example's gradient norm of gate_up_proj and down_proj, (B,) each, from one example's
    gradient at a time (1/B of the per-sample gradient's memory; an example without tokens has norm 0)."""
    params = [p for p in (layer.gate_up_proj, layer.down_proj) if p.requires_grad]
    norms = {p: torch.zeros(layer.max_batch_len, dtype=p.dtype, device=p.device) for p in params}
    for example, params, grads in _experts_example_grads(layer, activations, backprops):
        for param, grad in zip(params, grads):
            if grad is not None:
                norms[param][example] = grad.norm(2)
    return norms


def _router_grad_sample(router: Router, args, output) -> None:
    """Router forward hook: when this forward's logits get their complete gradient (B*T, E), turn it into the
    per-sample gradient of the weight (B, E, H), `sum_t grad_logits[b, t] (x) input[b, t]`."""
    logits = output[0]
    if not (router.training and torch.is_grad_enabled() and logits.requires_grad and router.weight.requires_grad):
        return
    batch, length = router._dp_batch_shape
    x = args[0].detach().reshape(batch, length, -1)  # (B, T, H)
    scale = float(batch) if router._dp_loss_reduction == "mean" else 1.0  # as Opacus scales its backprops

    def per_sample(grad: torch.Tensor) -> None:
        if not router._dp_hooks_enabled():  # ghost clipping's second (clipped) backward: no per-sample work
            return
        grad = grad.detach().reshape(batch, length, -1).to(x.dtype) * scale  # (B, T, E)
        grad_sample = torch.einsum("bte,bth->beh", grad, x)  # (B, E, H)
        if router._dp_ghost:  # ghost clipping keeps only each example's norm, (B,)
            router.weight._norm_sample = grad_sample.reshape(batch, -1).norm(2, dim=-1)
            return
        create_or_accumulate_grad_sample(param=router.weight, grad_sample=grad_sample, max_batch_len=batch)
        promote_current_grad_sample(router.weight)

    logits.register_hook(per_sample)


def _record_batch_shape(block: SparseMoeBlock, args) -> None:
    """Pre-hook on the MoE block: its input is the last (B, T, H) the routers and experts see unflattened."""
    batch, length = args[0].shape[:2]
    block.gate._dp_batch_shape = (batch, length)
    block.experts.max_batch_len = batch  # Opacus reads the batch size here instead of from the flattened rows
    block.experts._dp_row_examples = []  # filled by `_record_expert_rows`, emptied by the experts' sampler
    if block.shared_experts is not None:
        block.shared_experts._dp_batch_shape = (batch, length)


def _record_expert_rows(block: SparseMoeBlock, router: Router, output) -> None:
    """Router forward hook: the example of every row the experts will get (tokens, or selected pairs in top-p)."""
    if not (block.training and torch.is_grad_enabled()):
        return
    _, length = router._dp_batch_shape
    selected = output[2]  # (B*T, slots); the sentinel num_experts marks an unused top-p slot
    if block.router_mode == "top_k":
        token_idx = torch.arange(selected.shape[0], device=selected.device)
    else:  # the (token, slot) pairs SparseMoeBlock passes, in the same (row-major) order
        token_idx = torch.nonzero(selected < block.num_experts, as_tuple=True)[0]
    block.experts._dp_row_examples.append(token_idx // length)


def _unflatten_input(mlp: MLP, args):
    batch, length = mlp._dp_batch_shape
    return (args[0].reshape(batch, length, -1),)  # (B*T, H) -> (B, T, H)


def _flatten_output(mlp: MLP, args, output):
    return output.reshape(-1, output.shape[-1])  # (B, T, H) -> (B*T, H)


def _remove_opacus_router_hooks(model: nn.Module) -> None:
    """Opacus hooks every module with parameters; a router's full backward hook sees only the gradient of the
    logits that went through the MoE block (None when only the routing weights did) and would crash or miss the
    balance-loss path. The routers' per-sample gradients come from `_router_grad_sample` instead."""
    routers = [module for module in model.modules() if isinstance(module, Router)]
    hook_dicts = [id(d) for router in routers for d in (router._forward_hooks, router._backward_hooks)]
    handles = getattr(model, "autograd_grad_sample_hooks", [])
    for handle in list(handles):
        hooks = handle.hooks_dict_ref()
        if hooks is not None and id(hooks) in hook_dicts:
            handle.remove()
            handles.remove(handle)


def prepare_per_sample_gradients(model: nn.Module, loss_reduction: str = "mean") -> list[RemovableHandle]:
    """Make Opacus's per-sample gradients exact for lightarch's MoE layers; returns the hooks' handles.

    Call it AFTER wrapping the model with Opacus (`GradSampleModule(model)`, `PrivacyEngine.make_private`), on the
    wrapper or the model, with the wrapper's `loss_reduction`. Raises a ValueError for a router with
    `router_jitter_noise > 0`. Under ghost clipping (a `GradSampleModuleFastGradientClipping` wrapper) the routers
    store each example's gradient norm (`_norm_sample`) instead of the per-sample gradient.
    """
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    wrapper = model if hasattr(model, "hooks_enabled") else None  # Opacus's GradSampleModule, if given
    ghost = isinstance(model, GradSampleModuleFastGradientClipping)
    model = getattr(model, "_module", model)  # the model inside Opacus's GradSampleModule
    _remove_opacus_router_hooks(model)
    handles: list[RemovableHandle] = []
    for name, module in model.named_modules():
        if isinstance(module, Router):
            if module.jitter_noise > 0:
                raise ValueError(
                    f"{name}: router_jitter_noise={module.jitter_noise} multiplies the router's input by fresh noise "
                    "that the per-sample gradient cannot reproduce; set router_jitter_noise=0 for DP training."
                )
            module._dp_loss_reduction = loss_reduction
            module._dp_ghost = ghost
            module._dp_hooks_enabled = (lambda: wrapper.hooks_enabled) if wrapper is not None else (lambda: True)
            handles.append(module.register_forward_hook(_router_grad_sample))
        if isinstance(module, SparseMoeBlock):
            handles.append(module.register_forward_pre_hook(_record_batch_shape))
            handles.append(module.gate.register_forward_hook(
                lambda router, args, output, block=module: _record_expert_rows(block, router, output)))
            if module.shared_experts is not None:
                handles.append(module.shared_experts.register_forward_pre_hook(_unflatten_input))
                handles.append(module.shared_experts.register_forward_hook(_flatten_output))
    return handles


def finish_per_sample_gradients(model: nn.Module) -> None:
    """After `backward()`: complete the per-sample gradients of layers called more often than their outputs were used.

    Opacus promotes a parameter's per-sample gradient once as many backward hooks fired as forwards ran. A layer
    whose output of one call does not reach the loss (the sequence classifier's score on the final state, which only
    the exits' copies train) never gets there, and its `grad_sample` would stay None. The gradient summed so far is
    complete (the unused call contributes nothing): promote it and drop the unused call's activations.
    """
    model = getattr(model, "_module", model)
    for module in model.modules():
        if getattr(module, "activations", None):
            module.activations.clear()
            if hasattr(module, "max_batch_len"):
                del module.max_batch_len
    for param in model.parameters():
        if hasattr(param, "_current_grad_sample"):
            promote_current_grad_sample(param)
        if getattr(param, "_forward_counter", 0):
            param._forward_counter = 0


__all__ = [
    "compute_experts_grad_sample",
    "compute_experts_norm_sample",
    "compute_rms_norm_grad_sample",
    "finish_per_sample_gradients",
    "prepare_per_sample_gradients",
]
