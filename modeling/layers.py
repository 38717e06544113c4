"""Building blocks shared by lightarch's decoders: norm, rotary embedding, attention, MLP, router, experts, MoE block.

Every block takes the model config and follows transformers' conventions (attention interface, Cache classes,
`use_experts_implementation`), so weights keep the key names of Mixtral / Qwen3-MoE / Mistral checkpoints.

This file imports only torch and transformers: it is copied into saved model folders for `trust_remote_code`.
"""

import dataclasses
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.integrations import use_experts_implementation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .long_context import BlockAttentionMask, block_attention, sink_attention

logger = logging.get_logger(__name__)


class FieldCachedOutput:
    """Mixin for a `ModelOutput` dataclass (put it first among the bases): the same behaviour, but the field names
    are computed once per class. `ModelOutput.__setattr__` re-derives them from `dataclasses.fields` on every
    assignment, and a dataclass assigns every field when built: with the ~15 fields of these outputs that cost
    ~25 us per output, twice per forward, a tenth of a batch-1 decoding step of a small model."""

    def __setattr__(self, name, value):
        names = type(self).__dict__.get("_field_names")
        if names is None:
            names = frozenset(field.name for field in dataclasses.fields(self))
            type.__setattr__(type(self), "_field_names", names)
        name = self._replace_old_cache_name(name)
        if name in names and value is not None:
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 (T5 / Llama style)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if (hidden_states.dtype == self.weight.dtype == torch.float32 and not torch.is_grad_enabled()
                and not (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing())):
            # Inference in float32: torch's rms_norm runs the same float32 operations as below (pow, mean, add, rsqrt,
            # mul) in one call, so the same bits with fewer dispatches (17 norms per decoded token in 4 layers).
            return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def rope_position_limit(config) -> int:
    """The longest sequence the rotary embeddings cover: `max_position_embeddings`, times `factor` for a scaled
    `rope_type` (linear, dynamic, yarn, llama3, ...) extending the pretraining length (`original_max_position_embeddings`
    if the config states one, else `max_position_embeddings`)."""
    rope = config.rope_parameters if isinstance(config.rope_parameters, dict) else {}
    factor = rope.get("factor")
    if rope.get("rope_type", "default") == "default" or not factor or factor <= 1:
        return config.max_position_embeddings
    original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
    return max(config.max_position_embeddings, int(factor * original))


class RotaryEmbedding(nn.Module):
    """cos / sin tables for rotary position embeddings; any `rope_type` of transformers' rope utilities."""

    def __init__(self, config) -> None:
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim), as `repeat_interleave` on dim 1."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class Attention(nn.Module):
    """Grouped-query attention; a `"sliding_attention"` layer sees only the last `sliding_window` tokens."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.layer_type = config.layer_types[layer_idx]
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        self.use_rope = config.no_rope_layers is None or bool(config.no_rope_layers[layer_idx])
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope

        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.use_qk_norm:  # Qwen3 style: RMSNorm over each head's query and key
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def project_qkv(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query, key and value of `hidden_states` (B, T, hidden) as this layer attends and caches them.

        Per-head q / k norms when configured; rotary embeddings (`position_embeddings`: cos, sin of (B, T, D)) on
        rotary layers only; on NoPE layers with `attn_temperature_tuning`, Llama 4's query scaling by position, which
        needs `position_ids` (B, T) or (1, T). Returns query (B, H, T, D), key and value (B, Hkv, T, D). Every path that
        computes attention inputs calls this: `forward`, the adaptive model's skipped-layer KV fill, the ONNX step.
        """
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)  # (B, T, heads, D)
        query = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)  # (B, H, T, D)
        key = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)  # (B, Hkv, T, D)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, T, D)

        if self.use_rope:
            cos, sin = position_embeddings
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
        elif self.temperature_tuning:  # Llama 4: sharper attention far into a long context, for NoPE layers
            if position_ids is None:
                raise ValueError(
                    f"Layer {self.layer_idx} is a NoPE layer with attn_temperature_tuning=True: its queries are "
                    "scaled by position, so pass position_ids (B, T) to project_qkv / the attention forward."
                )
            positions = position_ids.to(query.dtype)[:, None, :, None]  # (B, 1, T, 1)
            query = query * (
                torch.log1p(torch.floor((positions + 1.0) / self.config.floor_scale)) * self.config.attn_scale + 1.0
            )
        return query, key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query_states, key_states, value_states = self.project_qkv(
            hidden_states, position_embeddings, kwargs.get("position_ids")
        )

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        if isinstance(attention_mask, BlockAttentionMask):  # long-context path: windowed / chunked compute
            attn_output = self._block_attention(query_states, key_states, value_states, attention_mask, cache)
            attn_output = attn_output.reshape(*input_shape, -1).contiguous()
            return self.o_proj(attn_output), None

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    def _block_attention(self, query_states, key_states, value_states, mask: BlockAttentionMask, cache):
        use_sdpa = self.config._attn_implementation == "sdpa"
        if not mask.num_sink_tokens:
            return block_attention(self, query_states, key_states, value_states, mask, self.scaling, use_sdpa)
        if cache is not None:
            layer = cache.layers[self.layer_idx]
            sink_keys, sink_values, tokens_before = layer.sink_keys, layer.sink_values, layer.tokens_before_update
        else:  # one forward over the whole sequence: the sinks are its first tokens
            sink_keys = key_states[:, :, : mask.num_sink_tokens]
            sink_values = value_states[:, :, : mask.num_sink_tokens]
            tokens_before = 0

        def rotate(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            if not self.use_rope:
                return states
            cos, sin = mask.rotary_emb(states, positions[None])
            return apply_rotary_pos_emb(states, states, cos, sin)[0]

        return sink_attention(self, query_states, key_states, value_states, sink_keys, sink_values, tokens_before,
                              mask, self.scaling, use_sdpa, rotate)


class MLP(nn.Module):
    """Dense SwiGLU feed-forward (used for dense layers and shared experts)."""

    def __init__(self, config, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation
class Experts(nn.Module):
    """SwiGLU experts stored as 3D tensors (Mixtral / Qwen3-MoE layout); `experts_implementation` picks the kernel.

    The eager forward skips a slot whose index equals `num_experts`; the other implementations do not, so
    `SparseMoeBlock` passes only real (token, expert) pairs.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()

        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate, up = F.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current_hidden_states = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states

    def run(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """`forward`, or `few_pairs_forward` (the same bits) for at most `_FEW_PAIRS` (token, slot) pairs of a CPU
        inference forward with the grouped_mm kernel, e.g. a decoding step at batch 1, where transformers' grouped_mm
        loops over every expert. The shortcut is not a module call, so it is taken only when no hook is registered on
        this module (tensor parallelism adds one). (T, H), (T, k), (T, k) -> (T, H)."""
        if (top_k_index.numel() <= _FEW_PAIRS and not torch.is_grad_enabled() and hidden_states.device.type == "cpu"
                and self.config._experts_implementation == "grouped_mm" and not self._is_expert_parallel
                and not (self._forward_hooks or self._forward_pre_hooks)  # e.g. tensor parallelism's all-reduce
                and not torch.compiler.is_compiling()):
            return self.few_pairs_forward(hidden_states, top_k_index, top_k_weights)
        return self(hidden_states, top_k_index, top_k_weights)

    def few_pairs_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """transformers' grouped_mm experts, bit for bit, computing only the experts that were hit: each hit expert's
        rows go through two `F.linear` as one block (the matrix products the grouped kernel runs for that expert), and
        the weighted pair outputs are summed over slots by the same (T, k, H) reduction. Reads the indices back once
        (one host synchronisation), so it serves CPU inference. Every index must be a real expert (< num_experts)."""
        num_tokens, num_slots = top_k_index.shape
        pairs_of_expert: dict[int, list[int]] = {}
        for pair, expert in enumerate(top_k_index.reshape(-1).tolist()):
            pairs_of_expert.setdefault(expert, []).append(pair)
        pair_output = hidden_states.new_empty(num_tokens * num_slots, self.hidden_dim)  # (T * k, H)
        for expert in sorted(pairs_of_expert):
            pairs = pairs_of_expert[expert]
            if len(pairs) == 1:
                rows = hidden_states[pairs[0] // num_slots].unsqueeze(0)  # (1, H), no index tensor
            else:
                rows = hidden_states[[pair // num_slots for pair in pairs]]  # (n, H)
            gate, up = F.linear(rows, self.gate_up_proj[expert]).chunk(2, dim=-1)
            pair_output[pairs] = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
        weighted = pair_output * top_k_weights.reshape(-1, 1)
        return weighted.view(num_tokens, num_slots, self.hidden_dim).sum(dim=1).to(hidden_states.dtype)


# Up to this many (token, slot) pairs, `Experts.run` skips the experts nobody chose (a decoding step at batch 1 has
# top_k pairs); measured on CPU: faster than grouped_mm up to about 2 tokens at top-2.
_FEW_PAIRS = 4


# A balanced router whose weight trains warns once after this many training forwards without a bias update: the
# update is registered by the training loop (`lightarch.training.RouterBiasUpdateCallback`), which may forget it.
_FORWARDS_BEFORE_MISSING_UPDATE_WARNING = 1000


def update_router_biases(model: nn.Module, group=None) -> int:
    """DeepSeek-V3 auxiliary-loss-free balancing: move each expert's selection bias towards equal load.

    `bias_i += rate * sign(mean_load - load_i)` for every balanced router in `model` (any module, wrapped or not),
    with the load counted since the last update. Under torch.distributed the loads of all routers are all-reduced
    in one call over `group` (default: every rank; every rank of the group calls it, even with no tokens), so every
    rank keeps the same bias. The ranks of `group` must hold the same routers: under pipeline parallelism pass the
    stage's data-parallel group (`lightarch.training.parallel.pipeline_data_parallel_group`). Call it after each
    optimizer step: `lightarch.training.RouterBiasUpdateCallback` (Trainer) or `register_router_bias_hook` (custom
    loops) do. Returns the number of routers updated.
    """
    routers = [
        module for module in model.modules()
        if getattr(module, "bias_update_rate", 0) > 0 and hasattr(module, "tokens_per_expert")
    ]
    if not routers:
        return 0
    with torch.no_grad():
        loads = torch.stack([router.tokens_per_expert for router in routers])  # (routers, num_experts)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loads, group=group)
        updated = 0
        for router, load in zip(routers, loads):
            router.tokens_per_expert.zero_()
            router._forwards_since_bias_update = 0
            if load.sum() == 0:
                continue
            router.e_score_correction_bias.add_(router.bias_update_rate * torch.sign(load.mean() - load))
            updated += 1
    return updated


class Router(nn.Module):
    """Per-token gate. Returns `(router_logits, routing_weights, selected_experts)`.

    `selected_experts` has `experts_per_token_limit` slots per token; in `"top_p"` mode unused slots hold the
    sentinel `num_experts` with weight 0. Selection uses `probs + e_score_correction_bias` when auxiliary-loss-free
    balancing is on; the weights always come from the unbiased probabilities (DeepSeek-V3).
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.router_mode = config.router_mode
        self.top_k = config.num_experts_per_tok
        self.top_p = config.router_top_p
        self.max_experts_per_token = config.max_experts_per_token
        self.norm_topk_prob = config.norm_topk_prob
        self.jitter_noise = config.router_jitter_noise
        self.bias_update_rate = config.router_bias_update_rate
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        if self.bias_update_rate > 0:
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))
            self.register_buffer("tokens_per_expert", torch.zeros(self.num_experts), persistent=False)
            self._forwards_since_bias_update = 0

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        router_logits = F.linear(hidden_states, self.weight)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        selection_scores = probs.detach()
        if self.bias_update_rate > 0:
            selection_scores = selection_scores + self.e_score_correction_bias

        if self.router_mode == "top_k":
            _, selected_experts = torch.topk(selection_scores, self.top_k, dim=-1)
            routing_weights = probs.gather(-1, selected_experts)
        else:
            _, selected_experts = torch.topk(selection_scores, self.max_experts_per_token, dim=-1)
            routing_weights = probs.gather(-1, selected_experts)
            # Keep a slot while the mass of the slots before it is below top_p: the first slot is always kept.
            mass_before = routing_weights.detach().cumsum(dim=-1) - routing_weights.detach()
            keep = mass_before < self.top_p
            routing_weights = routing_weights * keep
            selected_experts = selected_experts.masked_fill(~keep, self.num_experts)
        if self.norm_topk_prob:
            routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)

        if self.training and self.bias_update_rate > 0:
            with torch.no_grad():
                counts = torch.bincount(selected_experts.flatten(), minlength=self.num_experts + 1)
                self.tokens_per_expert += counts[: self.num_experts].float()
            if self.weight.requires_grad and not torch.compiler.is_compiling():  # a Python counter: no sync
                self._forwards_since_bias_update += 1
                if self._forwards_since_bias_update == _FORWARDS_BEFORE_MISSING_UPDATE_WARNING:
                    logger.warning_once(
                        f"A router with router_bias_update_rate={self.bias_update_rate} has trained for "
                        f"{_FORWARDS_BEFORE_MISSING_UPDATE_WARNING} forwards without a bias update: its experts "
                        "are not being balanced. The update is registered by the training loop: add "
                        "`lightarch.training.RouterBiasUpdateCallback()` to the Trainer's callbacks, or call "
                        "`lightarch.training.register_router_bias_hook(optimizer, model)` in a custom loop."
                    )
        return router_logits, routing_weights.to(router_logits.dtype), selected_experts


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ shared experts that every token uses)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.router_mode = config.router_mode
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts > 0
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat_hidden_states = hidden_states.reshape(-1, hidden_dim)
        _, routing_weights, selected_experts = self.gate(flat_hidden_states)
        if self.router_mode == "top_k":
            output = self._run_experts(flat_hidden_states, selected_experts, routing_weights)
        else:
            # Dynamic routing: run only the (token, expert) pairs that were selected, one expert per pair.
            token_idx, slot_idx = torch.nonzero(selected_experts < self.num_experts, as_tuple=True)
            pair_output = self._run_experts(
                flat_hidden_states[token_idx],
                selected_experts[token_idx, slot_idx].unsqueeze(-1),
                routing_weights[token_idx, slot_idx].unsqueeze(-1),
            )
            output = torch.zeros_like(flat_hidden_states)
            output = output.index_add_(0, token_idx, pair_output.to(flat_hidden_states.dtype))
        if self.shared_experts is not None:
            output = output + self.shared_experts(flat_hidden_states)
        return output.reshape(batch_size, sequence_length, hidden_dim)

    def _run_experts(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # PEFT's LoRA on the 3D expert weights replaces `experts` by a wrapper without `Experts.run`: call it then.
        if isinstance(self.experts, Experts):
            return self.experts.run(hidden_states, top_k_index, top_k_weights)
        return self.experts(hidden_states, top_k_index, top_k_weights)


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer layer: attention, then a dense MLP or a sparse MoE block."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        if layer_idx < config.first_k_dense_layers:
            self.mlp = MLP(config, config.intermediate_size)
        else:
            self.mlp = SparseMoeBlock(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states
