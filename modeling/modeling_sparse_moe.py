"""lightarch's sparse mixture-of-experts decoder: dynamic (top-p) or fixed (top-k) routing, hybrid sliding attention.

Layout and weight names follow transformers' Qwen3-MoE / Mixtral / Mistral, so their checkpoints convert by
renaming nothing (see `conversion.py`). Imports are relative so a saved folder loads with `trust_remote_code=True`.
"""

import functools
import inspect
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .checkpoint_checks import CheckedLoadingMixin
from .configuration_sparse_moe import SparseMoeConfig
from .layers import (
    Attention,
    DecoderLayer,
    Experts,
    FieldCachedOutput,
    RMSNorm,
    RotaryEmbedding,
    Router,
    rope_position_limit,
)
from .long_context import BlockAttentionMask, SinkSlidingWindowLayer, default_block_size, install_sink_layers

logger = logging.get_logger(__name__)


@dataclass
class SparseMoeModelOutputWithPast(FieldCachedOutput, MoeModelOutputWithPast):
    r"""
    router_indices (`tuple(torch.LongTensor)`, *optional*):
        Per MoE layer, the experts each token selected, `(batch * seq, slots)`; `num_experts` marks an unused slot.
    """

    router_indices: tuple[torch.LongTensor, ...] | None = None


@dataclass
class SparseMoeCausalLMOutputWithPast(FieldCachedOutput, MoeCausalLMOutputWithPast):
    r"""
    aux_loss (`torch.FloatTensor`):
        `router_aux_loss_coef * load_balancing_loss + router_z_loss_coef * router_z_loss`, already added to `loss`.
    load_balancing_loss (`torch.FloatTensor`):
        Switch-Transformer balance loss, the mean over MoE layers; 1.0 means perfectly balanced.
    router_z_loss (`torch.FloatTensor`):
        Mean squared log-partition of the router logits, the mean over MoE layers.
    experts_per_token (`torch.FloatTensor` of shape `(num_moe_layers,)`):
        Per MoE layer, the mean number of experts a (non-padding) token used.
    router_indices (`tuple(torch.LongTensor)`):
        See `SparseMoeModelOutputWithPast`.
    """

    load_balancing_loss: torch.FloatTensor | None = None
    router_z_loss: torch.FloatTensor | None = None
    experts_per_token: torch.FloatTensor | None = None
    router_indices: tuple[torch.LongTensor, ...] | None = None


def router_statistics(
    router_logits: tuple[torch.Tensor, ...],
    router_indices: tuple[torch.Tensor, ...],
    num_experts: int,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Balance loss, z-loss, experts per token and expert load, computed per MoE layer and masked for padding.

    Unlike transformers' `load_balancing_loss_func`, each layer is balanced on its own (the loss is the mean of
    per-layer losses, not one loss over all layers' tokens concatenated), counts are normalised by the number of
    selections so dynamic top-p routing is measured fairly, and a 2D `attention_mask` that also covers cached
    tokens is cut to the tokens of this forward (a 1D mask gives one weight per router row directly).

    Returns `load_balancing_loss` and `router_z_loss` (scalars), `experts_per_token` `(layers,)` and
    `expert_load` `(layers, num_experts)`, the fraction of selections each expert received.
    """
    device = router_logits[0].device
    num_rows = router_logits[0].shape[0]
    token_mask = torch.ones(num_rows, device=device)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        sequence_length = num_rows // attention_mask.shape[0]
        token_mask = attention_mask[:, -sequence_length:].reshape(-1).to(device=device, dtype=torch.float32)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:  # already one entry per row
        token_mask = attention_mask.to(device=device, dtype=torch.float32)
    num_tokens = token_mask.sum().clamp(min=1.0)

    balance_losses, z_losses, experts_per_token, expert_loads = [], [], [], []
    for layer_logits, layer_indices in zip(router_logits, router_indices):
        probs = torch.softmax(layer_logits.float(), dim=-1)
        selected = nn.functional.one_hot(layer_indices, num_experts + 1)[..., :num_experts].sum(dim=1).float()
        selected = selected * token_mask[:, None]
        load = selected.sum(dim=0) / selected.sum().clamp(min=1.0)
        mean_prob = (probs * token_mask[:, None]).sum(dim=0) / num_tokens
        balance_losses.append(num_experts * torch.sum(load * mean_prob))
        z = torch.logsumexp(layer_logits.float(), dim=-1) ** 2
        z_losses.append((z * token_mask).sum() / num_tokens)
        experts_per_token.append(selected.sum() / num_tokens)
        expert_loads.append(load)
    return {
        "load_balancing_loss": torch.stack(balance_losses).mean(),
        "router_z_loss": torch.stack(z_losses).mean(),
        "experts_per_token": torch.stack(experts_per_token).detach(),
        "expert_load": torch.stack(expert_loads).detach(),
    }


def router_aux_loss(config: SparseMoeConfig, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The auxiliary term a MoE model adds to its loss: weighted balance loss plus weighted z-loss."""
    return (config.router_aux_loss_coef * stats["load_balancing_loss"]
            + config.router_z_loss_coef * stats["router_z_loss"])


def aux_loss_share(
    aux_loss: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None
) -> torch.Tensor:
    """The part of `aux_loss` this micro-batch adds to the loss.

    Under gradient accumulation the LM loss of a micro-batch is its share of the step's token total
    (`num_items_in_batch`); the auxiliary loss gets the same share, or it would count once per micro-batch.
    """
    if num_items_in_batch is None:
        return aux_loss
    local_items = (labels[..., 1:] != -100).sum()
    return aux_loss * (local_items / num_items_in_batch).to(aux_loss.dtype)


def check_input_shapes(input_ids, inputs_embeds, attention_mask, hidden_size: int) -> None:
    """One-line errors naming the argument for inputs of the wrong rank, dtype, width or size (shapes only: no value
    is read, so this adds no host synchronisation to a decoding step)."""
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.LongTensor of shape (batch_size, sequence_length), got "
                            f"{type(input_ids).__name__}; use tokenizer(..., return_tensors='pt').")
        if input_ids.dim() != 2:
            hint = " (one sequence: input_ids[None])" if input_ids.dim() == 1 else ""
            raise ValueError(f"input_ids must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}"
                             f"{hint}.")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}; "
                             "pass input_ids.long(), or continuous vectors as inputs_embeds.")
        shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(f"inputs_embeds must have shape (batch_size, sequence_length, hidden_size={hidden_size}), "
                             f"got {tuple(inputs_embeds.shape)}.")
        shape = tuple(inputs_embeds.shape[:2])
    if 0 in shape:
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        raise ValueError(f"{name} is empty (batch_size, sequence_length) = {shape}: give at least one sequence of at "
                         "least one token (for generate, a prompt of at least one token, e.g. the BOS id).")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() not in (2, 4):
        raise ValueError(f"attention_mask must have shape (batch_size, sequence_length) (or a 4D float mask), got "
                         f"{tuple(attention_mask.shape)}; for one sequence use attention_mask[None].")


def check_labels(labels: torch.Tensor, input_shape: tuple, num_items_in_batch) -> None:
    """Labels must match the inputs' (batch_size, sequence_length), and without `num_items_in_batch` at least one of
    them must be a target: transformers' mean over zero targets is NaN (Qwen3-MoE and Mistral return loss=nan there)."""
    if tuple(labels.shape) != tuple(input_shape):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the inputs have (batch_size, sequence_length) = "
                         f"{tuple(input_shape)}; give one label per input token (-100 for tokens without a target).")
    if num_items_in_batch is None and not bool((labels[..., 1:] != -100).any()):
        raise ValueError("labels hold no target: every label after the first position is -100, so the mean loss "
                         "would be NaN; give at least one label that is not -100 (the first label is never a target, "
                         "labels are shifted), or drop labels to get logits only.")


def check_generate_prompt(args: tuple, kwargs: dict) -> None:
    """`generate` reads `input_ids.shape[1]` before the forward's checks run: name a prompt of the wrong rank first."""
    prompt = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    if isinstance(prompt, torch.Tensor) and prompt.dim() != 2:
        hint = " (one prompt: input_ids[None])" if prompt.dim() == 1 else ""
        raise ValueError(f"generate: input_ids must have shape (batch_size, sequence_length), got "
                         f"{tuple(prompt.shape)}{hint}.")


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Every id of `input_ids` must index the embedding table (`vocab_size` rows, the current size after
    `resize_token_embeddings`): a one-line error instead of an IndexError deep inside. Reads two values back (one host
    synchronisation)."""
    if input_ids.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids contain token id {low if low < 0 else high}, outside the vocabulary "
            f"[0, {vocab_size - 1}] (config.vocab_size={vocab_size}). Was the input made by "
            "another tokenizer, or does the tokenizer have more tokens than the model (resize_token_embeddings)?"
        )


# Per thread: id of each base model whose `generate` is running -> nesting depth (self-speculative decoding nests).
_GENERATING = threading.local()


@contextmanager
def decoding_own_tokens(model: PreTrainedModel, args: tuple, kwargs: dict):
    """Around `model.generate(*args, **kwargs)`: check the prompt's token ids once, then let the base model's
    single-token steps after cached tokens skip reading input values back (`_check_inputs`): each decodes a token
    sampled from this model's LM head, so it is inside the vocabulary, and its position extends the checked prompt's.
    This saves one host synchronisation per decoded token. Trusted only when the LM head is no wider than the
    embedding table."""
    embeddings = model.get_input_embeddings().num_embeddings
    prompt = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    if isinstance(prompt, torch.Tensor) and not (prompt.dtype.is_floating_point or prompt.dtype.is_complex
                                                 or prompt.dtype == torch.bool):
        check_token_ids(prompt, embeddings)
    head = model.get_output_embeddings()
    if head is None or getattr(head, "out_features", embeddings + 1) > embeddings:
        yield
        return
    depths = getattr(_GENERATING, "depths", None)
    if depths is None:
        depths = _GENERATING.depths = {}
    key = id(model.base_model)
    depths[key] = depths.get(key, 0) + 1
    try:
        yield
    finally:
        depths[key] -= 1
        if not depths[key]:
            del depths[key]


def is_decoding_own_tokens(base_model: nn.Module) -> bool:
    """Whether `base_model`'s `generate` runs in this thread under `decoding_own_tokens`."""
    return id(base_model) in getattr(_GENERATING, "depths", {})


def add_remote_code_auto_map(model: PreTrainedModel, auto_classes: dict[str, str]) -> None:
    """Before saving a remote-code folder: map every Auto class of `auto_classes` (Auto class -> model class of the
    saving model's file) in `config.auto_map`; transformers itself writes only the saving class's own entry."""
    if model._auto_class is not None:
        module = type(model).__module__.split(".")[-1]
        auto_map = dict(getattr(model.config, "auto_map", None) or {})
        for auto_class, class_name in auto_classes.items():
            auto_map.setdefault(auto_class, f"{module}.{class_name}")
        model.config.auto_map = auto_map


class SparseMoePreTrainedModel(CheckedLoadingMixin, PreTrainedModel):
    config: SparseMoeConfig
    config_class = SparseMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # top-p routing has data-dependent shapes
    # transformers looks for `@use_experts_implementation` in this file's source; our experts live in layers.py.
    _can_set_experts_implementation_cached_value = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(Router, index=0),
        "router_indices": OutputRecorder(Router, index=2),
        "hidden_states": DecoderLayer,
        "attentions": Attention,
    }
    # The Auto classes a saved folder maps to this file (`lightarch/__init__.py` registers the same ones).
    _remote_code_auto_classes = {"AutoModel": "SparseMoeModel", "AutoModelForCausalLM": "SparseMoeForCausalLM",
                                 "AutoModelForSequenceClassification": "SparseMoeForSequenceClassification"}

    def __init__(self, config: SparseMoeConfig, *args, **kwargs) -> None:
        # Re-check the values: a field assigned after the config was built (`config.num_experts_per_tok = 99`) passed
        # only its type check, and would otherwise fail inside a kernel.
        config._check_values()
        super().__init__(config, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers', and a remote-code folder maps AutoModel, AutoModelForCausalLM and
        AutoModelForSequenceClassification to this file whichever of the three classes saved it."""
        add_remote_code_auto_map(self, self._remote_code_auto_classes)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint,
                                    every_n_layers: int = 1):
        """As transformers', but MoE layers checkpoint without reentrancy: a reentrant checkpoint runs the layer under
        no_grad, so the router logits it records for the auxiliary losses carry no gradient and the balance / z-loss
        would silently stop training the router (the gradients would differ from a run without checkpointing)."""
        options = getattr(gradient_checkpointing_func, "keywords", None) or {}
        if enable and options.get("use_reentrant") and self.config.first_k_dense_layers < self.config.num_hidden_layers:
            logger.warning_once("Gradient checkpointing of MoE layers uses use_reentrant=False: a reentrant checkpoint "
                                "drops the gradient of the router's auxiliary losses.")
            gradient_checkpointing_func = functools.partial(gradient_checkpointing_func.func,
                                                            **{**options, "use_reentrant": False})
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)

    def init_parallel_plans(self) -> None:
        """The config's tensor- / expert-parallel plans name every part a SparseMoe can have (QK norms, shared experts,
        dense MLP layers); the base model keeps the entries that name a parameter it built, so its plan describes
        exactly what gets sharded."""
        super().init_parallel_plans()
        if self.base_model is not self:
            return  # a head model takes the base model's (already matched) plans, prefixed
        generic = {re.sub(r"\.\d+(?=\.|$)", ".*", name) for name, _ in self.named_parameters()}
        generic |= {name.rsplit(".", 1)[0] for name in generic if "." in name}  # a plan entry may name the module
        self._tp_plan = {pattern: style for pattern, style in self._tp_plan.items() if pattern in generic}
        self._ep_plan = {pattern: style for pattern, style in self._ep_plan.items() if pattern in generic}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, Router):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias_update_rate > 0:
                init.zeros_(module.e_score_correction_bias)
                init.zeros_(module.tokens_per_expert)


class SparseMoeModel(SparseMoePreTrainedModel):
    def __init__(self, config: SparseMoeConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.post_init()

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache) -> None:
        """Clear errors for inputs that would otherwise fail deep inside, or silently give wrong results."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        check_input_shapes(input_ids, inputs_embeds, attention_mask, self.config.hidden_size)
        if torch.compiler.is_compiling():
            return  # export / compile trace: data-dependent checks cannot run there
        batch_size, sequence_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        # Paged caches (continuous batching) pack requests into one row and pass positions explicitly.
        past_length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        total_length = past_length + sequence_length
        # A decoding step of `generate` (one token after cached ones): its token came from the LM head and its
        # position follows the prompt's, which were checked once (`decoding_own_tokens`), so no value is read back.
        own_token = sequence_length == 1 and past_length > 0 and is_decoding_own_tokens(self)
        if input_ids is not None and not own_token:
            check_token_ids(input_ids, self.get_input_embeddings().num_embeddings)  # current size, after resizing
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            if attention_mask.shape[0] != batch_size or attention_mask.shape[1] != total_length:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but the input needs "
                    f"({batch_size}, {total_length}): batch size x (cached tokens {past_length} + new tokens "
                    f"{sequence_length}). Pass the mask the tokenizer returned for these inputs."
                )
        if self.config.num_sink_tokens:
            return  # streaming: attention sinks keep every attended distance below sinks + window
        limit = rope_position_limit(self.config)
        # A decoding step's positions are at most the cached + new length: read them only when that bound is too long.
        if position_ids is not None and position_ids.numel() > 0 and not (own_token and total_length <= limit):
            total_length = int(position_ids.max()) + 1
        if total_length > limit:
            rope = self.config.rope_parameters
            scaled = "" if limit == self.config.max_position_embeddings else (
                f" and its {rope['rope_type']} RoPE scaling (factor {rope['factor']}) covers {limit}")
            raise ValueError(
                f"The sequence reaches {total_length} tokens (cached {past_length} + new {sequence_length}) but "
                f"config.max_position_embeddings is {self.config.max_position_embeddings}{scaled}. Truncate the input "
                "(tokenizer(..., truncation=True, max_length=...)), or for long documents use a sliding-window "
                "preset with chunked prefill, SparseMoeConfig.from_preset('hybrid-long') (prefill_chunk_size, "
                "up to 262144 tokens) or 'streaming' (attention sinks, unbounded)."
            )

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        positions_to_keep: int = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SparseMoeModelOutputWithPast:
        r"""
        positions_to_keep (`int`, *optional*, defaults to 0):
            Return `last_hidden_state` for the last `positions_to_keep` positions only (0: all). The causal LM passes
            its integer `logits_to_keep`, so a chunked prefill of a long prompt never holds every position's hidden
            state: with sliding layers, its memory then stays flat in the prompt length.
        """
        self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, cache)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if self.config.num_sink_tokens and isinstance(cache, DynamicCache):
            if not all(isinstance(layer, SinkSlidingWindowLayer) for layer in cache.layers):
                install_sink_layers(cache, self.config)  # e.g. the DynamicCache that `generate` built
        sequence_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            device = (input_ids if input_ids is not None else inputs_embeds).device
            position_ids = torch.arange(sequence_length, device=device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # Per-layer outputs (hidden states, attention maps) cover the whole input, so they need one pass: a chunked
        # prefill would record every layer once per chunk.
        records_layers = any(kwargs.get(f"output_{name}", getattr(self.config, f"output_{name}", False))
                             for name in ("hidden_states", "attentions"))
        if not records_layers and self.prefills_in_chunks(sequence_length, has_cache=cache is not None):
            hidden_states = self._chunked_prefill(input_ids, inputs_embeds, attention_mask, position_ids, cache,
                                                  use_cache, positions_to_keep, **kwargs)
        else:
            if inputs_embeds is None:
                inputs_embeds = self.embed_tokens(input_ids)
            hidden_states = self._decoder_layers(inputs_embeds, attention_mask, position_ids, cache, use_cache,
                                                 in_chunks=False, **kwargs)
        if positions_to_keep > 0:
            hidden_states = hidden_states[:, -positions_to_keep:]
        hidden_states = self.norm(hidden_states)
        return SparseMoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)

    def prefills_in_chunks(self, sequence_length: int, has_cache: bool) -> bool:
        """Whether a forward over `sequence_length` new tokens runs as a chunked prefill (it needs a cache)."""
        chunk_size = self.config.prefill_chunk_size
        return chunk_size is not None and has_cache and sequence_length > chunk_size

    def _chunked_prefill(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache,
                         positions_to_keep, **kwargs) -> torch.Tensor:
        """Run a long input in chunks of `prefill_chunk_size`, the cache carrying the state between chunks.

        Each chunk is embedded on its own and only the chunks holding one of the last `positions_to_keep` positions
        are kept (all when 0), so peak memory is bounded by the chunk (and the window of sliding layers, plus the KV
        of global layers) instead of the prompt length.
        """
        chunk_size = self.config.prefill_chunk_size
        sequence_length = position_ids.shape[1]
        first_kept = sequence_length - positions_to_keep if positions_to_keep > 0 else 0
        past_length = cache.get_seq_length()
        kept_chunks = []
        for start in range(0, sequence_length, chunk_size):
            end = min(start + chunk_size, sequence_length)
            if inputs_embeds is not None:
                chunk_embeds = inputs_embeds[:, start:end]
            else:
                chunk_embeds = self.embed_tokens(input_ids[:, start:end])
            chunk_mask = attention_mask
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
                chunk_mask = attention_mask[:, : past_length + end]
            hidden_states = self._decoder_layers(chunk_embeds, chunk_mask, position_ids[:, start:end], cache,
                                                 use_cache, in_chunks=True, **kwargs)
            if end > first_kept:
                kept_chunks.append(hidden_states)
        return kept_chunks[0] if len(kept_chunks) == 1 else torch.cat(kept_chunks, dim=1)

    def _decoder_layers(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, in_chunks, **kwargs):
        """Run every decoder layer over `inputs_embeds`, with the mask each layer type needs."""
        causal_mask_mapping = attention_mask
        # The masks may already have been prepared, e.g. by `generate`.
        if not isinstance(attention_mask, dict):
            causal_mask_mapping = self._attention_masks(inputs_embeds, attention_mask, position_ids, cache, in_chunks,
                                                        kwargs.get("output_attentions"))
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        layer_types = self.config.layer_types  # read once: config attribute access is slow in transformers 5
        # Index, not slice: slicing a ModuleList builds a new one at every forward (every decoded token).
        for i in range(self.config.num_hidden_layers):
            hidden_states = self.layers[i](
                hidden_states,
                attention_mask=causal_mask_mapping[layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        return hidden_states

    def _attention_masks(self, inputs_embeds, attention_mask, position_ids, cache, in_chunks, output_attentions):
        """One mask per layer type present.

        Sliding layers get a `BlockAttentionMask` (block-local windowed compute) unless the config asks for
        transformers' mask-only sliding window, attention weights are requested, or the attention backend is not
        eager / sdpa (e.g. the paged kernels of continuous batching). Full layers get one during chunked prefill.
        """
        block_attention_usable = (
            self.config._attn_implementation in ("eager", "sdpa")
            and not (output_attentions or self.config.output_attentions)
            and (attention_mask is None or attention_mask.dim() == 2)
            and not (self.training and self.config.attention_dropout > 0)
        )
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        # A chunk after cached tokens (our chunked prefill, or generate(prefill_chunk_size=...)) would otherwise build
        # a chunk x sequence mask for full layers.
        past_length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        in_chunks = in_chunks or (past_length > 0 and inputs_embeds.shape[1] > 1)
        masks = {}
        if "full_attention" in self.config.layer_types:
            if in_chunks and block_attention_usable:
                masks["full_attention"] = BlockAttentionMask(attention_mask, None, default_block_size(None))
            else:
                masks["full_attention"] = create_causal_mask(**mask_kwargs)
        if self.has_sliding_layers:
            window = self.config.sliding_window
            if block_attention_usable and self.config.sliding_window_implementation == "windowed":
                masks["sliding_attention"] = BlockAttentionMask(
                    attention_mask, window, default_block_size(window), self.config.num_sink_tokens, self.rotary_emb
                )
            elif self.config.num_sink_tokens:
                raise ValueError(
                    f"Attention sinks (num_sink_tokens={self.config.num_sink_tokens}) run on the eager and sdpa "
                    f"attention implementations, without output_attentions; got "
                    f"attn_implementation={self.config._attn_implementation!r}."
                )
            else:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return masks


class SparseMoeForCausalLM(SparseMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: SparseMoeConfig) -> None:
        super().__init__(config)
        self.model = SparseMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SparseMoeCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets (shifted inside); -100 is ignored. The returned loss adds `aux_loss`.
        output_router_logits (`bool`, *optional*):
            Return each MoE layer's router logits. Router statistics (`aux_loss`, `load_balancing_loss`,
            `router_z_loss`, `experts_per_token`) are computed when `labels` are given, with `output_router_logits`,
            or in training mode; an inference forward without them (e.g. a decoding step) computes none.
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        if (input_ids is None) ^ (inputs_embeds is None):  # else the model names the mistake
            check_input_shapes(input_ids, inputs_embeds, attention_mask, self.config.hidden_size)
            if labels is not None:
                check_labels(labels, (input_ids if input_ids is not None else inputs_embeds).shape[:2],
                             kwargs.get("num_items_in_batch"))
        # Router statistics only when asked for: the loss needs them (labels), the caller does (output_router_logits),
        # or training may add `aux_loss` itself. Inference (a decoding step, a long chunked prefill) records nothing.
        record_router = self.config.first_k_dense_layers < self.config.num_hidden_layers and (
            labels is not None or bool(output_router_logits) or self.training
        )
        outputs: SparseMoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=record_router,
            output_router_indices=record_router,
            positions_to_keep=logits_to_keep if isinstance(logits_to_keep, int) and labels is None else 0,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        aux_loss = stats = None
        if record_router:
            router_logits, router_indices, token_mask = self._router_records_per_layer(outputs, attention_mask)
            stats = router_statistics(router_logits, router_indices, self.config.num_experts, token_mask)
            aux_loss = router_aux_loss(self.config, stats)
            if loss is not None:
                loss = loss + aux_loss_share(aux_loss, labels, kwargs.get("num_items_in_batch")).to(loss.device)

        return SparseMoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
            load_balancing_loss=stats["load_balancing_loss"] if stats else None,
            router_z_loss=stats["router_z_loss"] if stats else None,
            experts_per_token=stats["experts_per_token"] if stats else None,
            router_indices=outputs.router_indices if output_router_logits else None,
        )

    # transformers' `generate` reads `inspect.signature(self.forward)` at every step of a remote-code model (a check
    # for the removed `cache_position` argument, ~50 us a token on CPU): computed once here.
    forward.__signature__ = inspect.signature(forward)

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, with a one-line error for a prompt of the wrong rank or with ids outside the
        vocabulary; the decoding steps then skip the host synchronisation of the input checks (`decoding_own_tokens`)."""
        check_generate_prompt(args, kwargs)
        if kwargs.get("use_cache") is False or kwargs.get("inputs_embeds") is not None:
            # `config.prefill_chunk_size` reaches the generation config, whose chunked prefill needs a cache and splits
            # input_ids only: leave the prompt to the forward, which chunks inputs_embeds too (with a cache).
            kwargs.setdefault("prefill_chunk_size", None)
        with decoding_own_tokens(self, args, kwargs):
            return super().generate(*args, **kwargs)

    def _router_records_per_layer(self, outputs, attention_mask):
        """(router_logits, router_indices, token_mask) with one entry per MoE layer.

        Chunked prefill runs every layer once per chunk, so each MoE layer is recorded once per chunk: concatenate
        its chunks, and order the padding mask the same way (chunk, then batch, then position).
        """
        router_logits, router_indices = outputs.router_logits, outputs.router_indices
        num_moe_layers = self.config.num_hidden_layers - self.config.first_k_dense_layers
        if len(router_logits) == num_moe_layers:
            return router_logits, router_indices, attention_mask
        router_logits = tuple(torch.cat(router_logits[layer::num_moe_layers]) for layer in range(num_moe_layers))
        router_indices = tuple(torch.cat(router_indices[layer::num_moe_layers]) for layer in range(num_moe_layers))
        token_mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            batch_size = attention_mask.shape[0]
            new_tokens = attention_mask[:, -(router_logits[0].shape[0] // batch_size) :]
            chunks = new_tokens.split(self.config.prefill_chunk_size, dim=1)
            token_mask = torch.cat([chunk.reshape(-1) for chunk in chunks])
        return router_logits, router_indices, token_mask


class SparseMoeForSequenceClassification(GenericForSequenceClassification, SparseMoePreTrainedModel):
    """A score head on the last non-padding token (as Qwen3-MoE / Mistral)."""

    def __init__(self, config: SparseMoeConfig) -> None:
        SparseMoePreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = SparseMoeModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


__all__ = [
    "SparseMoeCausalLMOutputWithPast",
    "SparseMoeForCausalLM",
    "SparseMoeForSequenceClassification",
    "SparseMoeModel",
    "SparseMoeModelOutputWithPast",
    "SparseMoePreTrainedModel",
    "aux_loss_share",
    "check_generate_prompt",
    "check_input_shapes",
    "check_labels",
    "check_token_ids",
    "decoding_own_tokens",
    "router_aux_loss",
    "router_statistics",
]
