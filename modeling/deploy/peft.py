"""PEFT LoRA / QLoRA targets for lightarch decoders: attention, dense MLPs, shared experts and the routed experts' 3D
weights (PEFT `target_parameters`); never the router."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
LORA_TARGET_GROUPS = ("attention", "dense_mlp", "shared_experts", "experts")
ROUTER_MODULE = "mlp.gate"


def lora_target_modules(targets: Sequence[str] = ("attention", "dense_mlp", "shared_experts")) -> str | list:
    """A PEFT `target_modules` regex for the `nn.Linear` groups in `targets` (never the router `mlp.gate`).

    `"experts"` is ignored here (it is a `target_parameters` group); with no linear group the result is `[]`.
    """
    unknown = [t for t in targets if t not in LORA_TARGET_GROUPS]
    if unknown:
        raise ValueError(f"Unknown LoRA target group(s) {unknown}; choose from {LORA_TARGET_GROUPS}.")
    patterns = []
    if "attention" in targets:
        patterns.append(r"self_attn\.(q|k|v|o)_proj")
    if "dense_mlp" in targets:
        patterns.append(r"mlp\.(gate|up|down)_proj")
    if "shared_experts" in targets:
        patterns.append(r"mlp\.shared_experts\.(gate|up|down)_proj")
    if not patterns:
        return []  # PEFT's way of saying "no modules" (experts only, through target_parameters)
    return r".*\.(" + "|".join(patterns) + r")$"


def lora_config(
    targets: Sequence[str] = ("attention", "dense_mlp", "shared_experts", "experts"),
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    **kwargs,
):
    """A `peft.LoraConfig` for a lightarch decoder, adapting the groups in `targets` (see `LORA_TARGET_GROUPS`).

    `"experts"` adds the routed experts' 3D weights through `target_parameters`; PEFT cannot apply dropout to a
    parameter, so it requires `lora_dropout=0`. The router is never targeted.
    """
    from peft import LoraConfig

    targets = tuple(targets)
    if not targets:
        raise ValueError(f"LoRA needs at least one target group from {LORA_TARGET_GROUPS}.")
    if "experts" in targets and lora_dropout:
        raise ValueError(
            f"lora_dropout={lora_dropout} cannot be used with the 'experts' target: PEFT applies expert LoRA to the 3D "
            "weight tensors, where dropout on the input is impossible. Set lora_dropout=0 or drop 'experts'."
        )
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules([t for t in targets if t != "experts"]),
        target_parameters=list(EXPERT_PARAMETERS) if "experts" in targets else None,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def check_lora_targets(model: nn.Module) -> None:
    """Raise if a PEFT-wrapped lightarch model adapts its router (routing must stay the base model's)."""
    for name, module in model.named_modules():
        if name.endswith(ROUTER_MODULE) or f"{ROUTER_MODULE}." in name:
            if any(key in name for key in ("lora_A", "lora_B")) or hasattr(module, "lora_A"):
                raise ValueError(
                    f"LoRA adapts the router {name!r}. lightarch never adapts routers: a low-rank routing change sends "
                    "tokens to experts the adapter was not trained with. Remove 'gate' from target_modules / "
                    "target_parameters (use lightarch.deploy.lora_config)."
                )
