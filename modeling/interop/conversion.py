"""Convert between lightarch's `SparseMoeForCausalLM` and transformers' Mixtral, Qwen3-MoE and Mistral.

lightarch kept the parameter names of those checkpoints (`model.layers.N.self_attn.{q,k,v,o}_proj`,
`self_attn.{q,k}_norm`, `mlp.gate.weight`, `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, dense
`mlp.{gate,up,down}_proj`), so a conversion is a config translation plus a strict `load_state_dict`: no tensor is
renamed, reshaped or re-laid-out, and a round trip gives back bit-identical weights.

```python
>>> from lightarch import from_transformers, to_transformers
>>> lightarch_model = from_transformers(mixtral)            # same logits as `mixtral`
>>> mixtral_again = to_transformers(lightarch_model)        # architecture picked from the config
>>> # Switch lightarch features on while converting: top-p routing reuses every expert as is.
>>> dynamic = from_transformers(mixtral, router_mode="top_p", router_top_p=0.6)
>>> # New modules (here shared experts) are freshly initialised; every other weight is copied.
>>> shared = from_transformers(mixtral, num_shared_experts=1)
```
"""

from __future__ import annotations

import copy
import re

import torch
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers import initialization as init
from transformers.utils import logging

from ..configuration import SparseMoeConfig

from ..modeling_sparse_moe import SparseMoeForCausalLM

logger = logging.get_logger(__name__)

# Target architecture name -> (model class, config class). Keys are transformers' `model_type`s.
ARCHITECTURES: dict[str, tuple[type[PreTrainedModel], type[PreTrainedConfig]]] = {
    "mixtral": (MixtralForCausalLM, MixtralConfig),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig),
    "mistral": (MistralForCausalLM, MistralConfig),
}
SUPPORTED = ", ".join(model_class.__name__ for model_class, _ in ARCHITECTURES.values())

# Fields every decoder here shares under the same name and meaning.
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)

# A config override may add parameters the source checkpoint does not have; these are the only ones allowed to be
# missing after loading, and each is allowed only when its override was given.
_KEYS_ADDED_BY_OVERRIDE: dict[str, re.Pattern] = {
    "num_shared_experts": re.compile(r"\.mlp\.shared_experts\."),
    "router_bias_update_rate": re.compile(r"\.mlp\.gate\.e_score_correction_bias$"),
    "use_qk_norm": re.compile(r"\.self_attn\.[qk]_norm\.weight$"),
    "attention_bias": re.compile(r"\.self_attn\.[qkvo]_proj\.bias$"),
}


def _architecture_of(config: PreTrainedConfig) -> str:
    for name, (_, config_class) in ARCHITECTURES.items():
        if isinstance(config, config_class):
            return name
    raise ValueError(
        f"Cannot convert a {type(config).__name__} (model_type={getattr(config, 'model_type', None)!r}); "
        f"supported: {SUPPORTED} (and their configs MixtralConfig, Qwen3MoeConfig, MistralConfig)."
    )


def _head_dim(config: PreTrainedConfig) -> int:
    # Qwen3MoeConfig has no `head_dim` field (checkpoints set it as an extra attribute); all fall back the same way.
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _qwen3_moe_dense_layers(config: Qwen3MoeConfig) -> list[int]:
    """The layers Qwen3-MoE builds as dense MLPs (same rule as `Qwen3MoeDecoderLayer.__init__`)."""
    return [
        i
        for i in range(config.num_hidden_layers)
        if i in config.mlp_only_layers or not (config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0)
    ]


def config_from_transformers(config: PreTrainedConfig, **config_overrides) -> SparseMoeConfig:
    """Translate a Mixtral / Qwen3-MoE / Mistral config into the `SparseMoeConfig` computing the same function.

    `config_overrides` are then applied on top (e.g. `router_mode="top_p"`), and the result is validated by
    `SparseMoeConfig` itself. Raises ValueError for what lightarch cannot express (e.g. Qwen3-MoE dense layers that
    are not the first k).
    """
    architecture = _architecture_of(config)
    values = {name: getattr(config, name) for name in _SHARED_FIELDS}
    values["head_dim"] = _head_dim(config)
    values["rope_parameters"] = copy.deepcopy(config.rope_parameters)
    values["dtype"] = config.dtype
    sliding_window = config.sliding_window  # Qwen3-MoE already sets it to None when `use_sliding_window` is off

    if architecture == "mixtral":
        values.update(
            num_experts=config.num_local_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.intermediate_size,
            intermediate_size=config.intermediate_size,  # unused (no dense layer), kept so the round trip is exact
            first_k_dense_layers=0,
            use_qk_norm=False,
            attention_bias=False,
            router_mode="top_k",
            norm_topk_prob=True,  # Mixtral always renormalises the top-k weights
            router_aux_loss_coef=config.router_aux_loss_coef,
            router_jitter_noise=config.router_jitter_noise,
            router_z_loss_coef=0.0,
            output_router_logits=config.output_router_logits,
        )
    elif architecture == "qwen3_moe":
        dense_layers = _qwen3_moe_dense_layers(config)
        if dense_layers != list(range(len(dense_layers))):
            raise ValueError(
                f"This Qwen3-MoE config has dense MLP layers {dense_layers} (from decoder_sparse_step="
                f"{config.decoder_sparse_step}, mlp_only_layers={config.mlp_only_layers}); lightarch can only make the "
                "first k layers dense (`first_k_dense_layers`), so this layout cannot be converted."
            )
        values.update(
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size,
            intermediate_size=config.intermediate_size,
            first_k_dense_layers=len(dense_layers),
            use_qk_norm=True,
            attention_bias=config.attention_bias,
            router_mode="top_k",
            norm_topk_prob=config.norm_topk_prob,
            router_aux_loss_coef=config.router_aux_loss_coef,
            router_jitter_noise=0.0,
            router_z_loss_coef=0.0,
            output_router_logits=config.output_router_logits,
        )
    else:  # mistral: every layer is a dense SwiGLU MLP
        values.update(
            intermediate_size=config.intermediate_size,
            first_k_dense_layers=config.num_hidden_layers,
            use_qk_norm=False,
            attention_bias=False,
        )
    values["sliding_window"] = sliding_window
    values["layer_types"] = [
        "sliding_attention" if sliding_window is not None else "full_attention"
    ] * config.num_hidden_layers

    if "sliding_window" in config_overrides and "layer_types" not in config_overrides:
        # Re-derive the (uniform) layer types from the new window, as the source architectures do.
        window = config_overrides["sliding_window"]
        values["layer_types"] = ["sliding_attention" if window is not None else "full_attention"] * (
            config_overrides.get("num_hidden_layers", values["num_hidden_layers"])
        )
    values.update(config_overrides)
    return SparseMoeConfig(**values)


def _check_expressible(config: SparseMoeConfig, architecture: str) -> None:
    """Raise a ValueError naming the first feature of `config` that `architecture` cannot compute."""
    target = ARCHITECTURES[architecture][0].__name__
    has_moe_layers = config.first_k_dense_layers < config.num_hidden_layers

    def refuse(feature: str, why: str) -> None:
        raise ValueError(f"Cannot convert to {target}: {feature} ({why}).")

    if len(set(config.layer_types)) > 1:
        refuse(
            f"layer_types={config.layer_types}",
            f"{target} uses one attention type for every layer; mixed full/sliding layers are lightarch-only",
        )
    if config.num_sink_tokens > 0:
        refuse(f"num_sink_tokens={config.num_sink_tokens}", "attention sinks (streaming attention) are lightarch-only")
    if config.no_rope_layers is not None and 0 in config.no_rope_layers:
        refuse(f"no_rope_layers={config.no_rope_layers}", "every layer there uses rotary embeddings")
    if config.router_bias_update_rate > 0:
        refuse(
            f"router_bias_update_rate={config.router_bias_update_rate}",
            "auxiliary-loss-free bias balancing changes expert selection and has no equivalent",
        )
    if architecture == "mistral":
        if has_moe_layers:
            refuse(
                f"first_k_dense_layers={config.first_k_dense_layers} < num_hidden_layers={config.num_hidden_layers}",
                "Mistral has no MoE layers; every layer must be dense",
            )
    else:
        if has_moe_layers and config.router_mode != "top_k":
            refuse(f"router_mode={config.router_mode!r}", "only fixed top-k routing exists there")
        if has_moe_layers and config.num_shared_experts > 0:
            refuse(f"num_shared_experts={config.num_shared_experts}", "there are no shared experts")
    if architecture == "mixtral":
        if config.first_k_dense_layers > 0:
            refuse(f"first_k_dense_layers={config.first_k_dense_layers}", "every Mixtral layer is a MoE layer")
        if not config.norm_topk_prob:
            refuse("norm_topk_prob=False", "Mixtral always renormalises the top-k weights")
    if architecture in ("mixtral", "mistral"):
        if config.use_qk_norm:
            refuse("use_qk_norm=True", "there is no query/key RMSNorm; use Qwen3MoeForCausalLM")
        if config.attention_bias:
            refuse("attention_bias=True", "the attention projections have no bias")
    if architecture == "qwen3_moe" and not config.use_qk_norm:
        refuse("use_qk_norm=False", "Qwen3-MoE always normalises queries and keys")

    # Training-only settings do not change the weights or the inference forward: drop them with a warning.
    dropped = []
    if config.router_z_loss_coef > 0:
        dropped.append(f"router_z_loss_coef={config.router_z_loss_coef}")
    if config.router_jitter_noise > 0 and architecture != "mixtral":
        dropped.append(f"router_jitter_noise={config.router_jitter_noise}")
    if dropped:
        logger.warning(f"{target} has no {', '.join(dropped)}; dropped (it only affects training).")


def config_to_transformers(config: SparseMoeConfig, architecture: str | None = None) -> PreTrainedConfig:
    """Translate a `SparseMoeConfig` into a Mixtral / Qwen3-MoE / Mistral config, or raise a ValueError naming the
    feature the target cannot express. `architecture=None` picks one (see `to_transformers`)."""
    architecture = _resolve_architecture(config, architecture)
    _check_expressible(config, architecture)
    config_class = ARCHITECTURES[architecture][1]
    values = {name: getattr(config, name) for name in _SHARED_FIELDS}
    values["head_dim"] = config.head_dim
    values["rope_parameters"] = copy.deepcopy(config.rope_parameters)
    values["dtype"] = config.dtype
    sliding = config.layer_types[0] == "sliding_attention"
    sliding_window = config.sliding_window if sliding else None

    if architecture == "mixtral":
        values.update(
            intermediate_size=config.moe_intermediate_size,
            num_local_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            router_aux_loss_coef=config.router_aux_loss_coef,
            router_jitter_noise=config.router_jitter_noise,
            output_router_logits=config.output_router_logits,
            sliding_window=sliding_window,
        )
    elif architecture == "qwen3_moe":
        values.update(
            intermediate_size=config.intermediate_size,
            moe_intermediate_size=config.moe_intermediate_size,
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            norm_topk_prob=config.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(config.first_k_dense_layers)),
            attention_bias=config.attention_bias,
            router_aux_loss_coef=config.router_aux_loss_coef,
            output_router_logits=config.output_router_logits,
            use_sliding_window=sliding,
            sliding_window=sliding_window,
        )
    else:
        values.update(intermediate_size=config.intermediate_size, sliding_window=sliding_window)
    return config_class(**values)


def _resolve_architecture(config: SparseMoeConfig, architecture: str | None) -> str:
    """Normalise `architecture` (model_type or class name); when None, pick the target that can express `config`:
    query/key norm -> Qwen3-MoE, no MoE layer -> Mistral, otherwise Mixtral."""
    if architecture is None:
        if config.use_qk_norm:
            return "qwen3_moe"
        if config.first_k_dense_layers >= config.num_hidden_layers:
            return "mistral"
        return "mixtral"
    for name, (model_class, config_class) in ARCHITECTURES.items():
        if architecture in (name, model_class.__name__, config_class.__name__):
            return name
    raise ValueError(f"Unknown architecture {architecture!r}; supported: {SUPPORTED} (or {list(ARCHITECTURES)}).")


def _load_weights(
    target: PreTrainedModel, state_dict: dict[str, torch.Tensor], allowed_missing: list[re.Pattern], context: str
) -> list[str]:
    """Copy `state_dict` into `target` (built without initialisation), initialise the parameters it lacks through the
    model's `_init_weights`, and tie the embeddings. Returns the keys that were initialised rather than copied.

    Any unexpected key, shape mismatch or missing key not matched by `allowed_missing` is a ValueError: a silent
    partial load would give a model that runs but computes something else.
    """
    expected = target.state_dict()
    unexpected = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    not_allowed = [key for key in missing if not any(pattern.search(key) for pattern in allowed_missing)]
    mismatched = [
        f"{key}: {tuple(state_dict[key].shape)} -> {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state_dict and state_dict[key].shape != tensor.shape
    ]
    if unexpected or not_allowed or mismatched:
        raise ValueError(
            f"{context}: the weights do not fit the converted architecture.\n"
            f"  unexpected keys: {unexpected}\n  missing keys: {not_allowed}\n  shape mismatches: {mismatched}\n"
            "Config overrides may only add modules (num_shared_experts, router_bias_update_rate, use_qk_norm, "
            "attention_bias); they cannot change sizes, the number of layers or which layers are dense."
        )
    result = target.load_state_dict(state_dict, strict=not missing)
    assert not result.unexpected_keys and set(result.missing_keys) == set(missing), result
    if missing:
        # transformers' init functions skip tensors flagged as initialised: only the missing ones get drawn.
        loaded = target.state_dict(keep_vars=True)
        for key in state_dict:
            loaded[key]._is_hf_initialized = True
        target.initialize_weights()
    target.tie_weights()
    return missing


def _build(model_class: type[PreTrainedModel], config: PreTrainedConfig, source: PreTrainedModel, **kwargs):
    """Instantiate `model_class` without random initialisation (every weight is loaded or initialised after)."""
    with init.no_init_weights():
        model = model_class._from_config(
            config, dtype=source.dtype, attn_implementation=source.config._attn_implementation, **kwargs
        )
    return model


def _is_moe(config: PreTrainedConfig) -> bool:
    if isinstance(config, SparseMoeConfig):
        return config.first_k_dense_layers < config.num_hidden_layers
    return not isinstance(config, MistralConfig)


def from_transformers(model: PreTrainedModel, **config_overrides) -> SparseMoeForCausalLM:
    """Convert a `MixtralForCausalLM`, `Qwen3MoeForCausalLM` or `MistralForCausalLM` into a `SparseMoeForCausalLM`
    computing the same logits, keeping the dtype, device, attention / experts implementation, weight tying and
    generation config.

    `config_overrides` are applied to the `SparseMoeConfig`, to switch lightarch features on while converting:

    ```python
    >>> dynamic = from_transformers(mixtral, router_mode="top_p", router_top_p=0.6)  # same weights, top-p routing
    >>> shared = from_transformers(qwen3_moe, num_shared_experts=1)  # + freshly initialised shared experts
    ```

    Overrides that add parameters (`num_shared_experts`, `router_bias_update_rate`, `use_qk_norm`,
    `attention_bias`) get them initialised by the model's `_init_weights`; every other weight is copied exactly.

    Note: Mixtral applies `router_jitter_noise` (training only) to the experts' input as well as the router's;
    lightarch jitters only the router input.
    """
    if not isinstance(model, tuple(model_class for model_class, _ in ARCHITECTURES.values())):
        raise ValueError(f"from_transformers() cannot convert a {type(model).__name__}; supported: {SUPPORTED}.")
    config = config_from_transformers(model.config, **config_overrides)
    kwargs = {}
    if _is_moe(model.config):  # keep e.g. grouped_mm; a dense source has no experts implementation to keep
        kwargs["experts_implementation"] = model.config._experts_implementation
    converted = _build(SparseMoeForCausalLM, config, model, **kwargs)
    allowed = [pattern for name, pattern in _KEYS_ADDED_BY_OVERRIDE.items() if name in config_overrides]
    _load_weights(converted, model.state_dict(), allowed, f"from_transformers({type(model).__name__})")
    converted.generation_config = copy.deepcopy(model.generation_config)
    return converted.to(model.device).train(model.training)


def to_transformers(model: SparseMoeForCausalLM, architecture: str | None = None) -> PreTrainedModel:
    """Convert a `SparseMoeForCausalLM` into `MixtralForCausalLM`, `Qwen3MoeForCausalLM` or `MistralForCausalLM`
    (`architecture`: model_type such as `"mixtral"` or class name), with bit-identical weights.

    With `architecture=None` the target is chosen from the config: query/key norm -> Qwen3-MoE, no MoE layer ->
    Mistral, otherwise Mixtral. Raises a ValueError naming the feature when the target cannot compute the same
    function (top-p routing, shared experts, bias balancing, mixed attention layer types, MoE layers for Mistral,
    dense layers for Mixtral, ...); training-only settings it lacks (z-loss) are dropped with a warning.
    """
    if not isinstance(model, SparseMoeForCausalLM):
        raise ValueError(f"to_transformers() expects a SparseMoeForCausalLM, got {type(model).__name__}.")
    architecture = _resolve_architecture(model.config, architecture)
    config = config_to_transformers(model.config, architecture)
    model_class = ARCHITECTURES[architecture][0]
    kwargs = {}
    if architecture != "mistral":
        kwargs["experts_implementation"] = model.config._experts_implementation
    converted = _build(model_class, config, model, **kwargs)
    _load_weights(converted, model.state_dict(), [], f"to_transformers({model_class.__name__})")
    converted.generation_config = copy.deepcopy(model.generation_config)
    return converted.to(model.device).train(model.training)


__all__ = ["config_from_transformers", "config_to_transformers", "from_transformers", "to_transformers"]
