"""lightarch's adaptive-depth decoder: early exits, whole-input routing by a complexity estimator, per-token early
exit (CALM) and self-speculative decoding (LayerSkip) on one model.

The decoder is the SparseMoe decoder (its `DecoderLayer`, masks and input checks are reused, not copied), with exits
after the depths in `config.exit_layers`. Every exit has its own RMSNorm and shares the LM head (or the classifier),
and a shallow path is a prefix of the deep one, so going deeper never recomputes anything.

- `"estimator"` policy: a small network reads the hidden states after `estimator_input_layer` layers (and, if asked,
  the confidence of the exit there), predicts for the whole input which exit suffices, and the input runs to that
  exit only. In `generate` the decision made on the prompt holds for every new token (it travels in the model kwargs
  as `exit_route`). In a batch of mixed routes the rows that have left stop running (`RowSubsetCache`).
- `"confidence"` policy: each token leaves at the first exit whose softmax margin reaches the threshold; the prompt's
  tokens leave with its last token, the only one whose prediction a generation uses. Layers a token skips get its
  key/value computed from its exit hidden state (CALM's propagation), so later tokens attend to every layer, and a
  forward over a whole sequence (with `prompt_mask`) gives exactly what cached decoding gives.
- `generate(assistant_early_exit=d)`: transformers' `EarlyExitCandidateGenerator` lowers
  `config.num_hidden_layers` to `d` while it drafts; the model then runs `d` layers and reads exit `d`. The full
  model verifies, so the output equals greedy full-depth decoding.

Imports are relative so a saved folder loads with `trust_remote_code=True`.
"""

import inspect
import math
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_adaptive_depth import AdaptiveDepthConfig
from .layers import DecoderLayer, FieldCachedOutput, RMSNorm, RotaryEmbedding
from .long_context import BlockAttentionMask
from .modeling_sparse_moe import (
    SparseMoeCausalLMOutputWithPast,
    SparseMoeModel,
    SparseMoeModelOutputWithPast,
    SparseMoePreTrainedModel,
    aux_loss_share,
    check_generate_prompt,
    check_input_shapes,
    check_labels,
    decoding_own_tokens,
    router_aux_loss,
    router_statistics,
)


@dataclass
class AdaptiveDepthModelOutputWithPast(SparseMoeModelOutputWithPast):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Each token's hidden state at the exit it took, after that exit's norm.
    exit_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        With `output_exit_states=True`: the normed hidden state at every exit, shallowest first.
    exit_layer (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
        The depth (number of decoder layers) whose exit gave each token's output.
    exit_route (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        `"estimator"` policy: the index into `config.exit_layers` each input was routed to.
    estimator_logits (`torch.FloatTensor` of shape `(batch_size, num_exits)`, *optional*):
        The estimator's logits over "the earliest exit that suffices".
    layers_computed (`torch.LongTensor`, scalar):
        Decoder layers this forward ran in full on the batch (key/value filling of skipped layers not counted).
    """

    exit_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    exit_layer: torch.LongTensor | None = None
    exit_route: torch.LongTensor | None = None
    estimator_logits: torch.FloatTensor | None = None
    layers_computed: torch.LongTensor | None = None


@dataclass
class AdaptiveDepthCausalLMOutputWithPast(SparseMoeCausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor`):
        With `labels`: the weighted mean of the exits' LM losses, plus `estimator_loss_weight * estimator_loss`,
        plus the router's `aux_loss` for MoE layers.
    exit_logits (`tuple(torch.FloatTensor)`, *optional*):
        With `labels` or `output_exit_logits=True`: the LM logits of every exit, shallowest first.
    exit_losses (`torch.FloatTensor` of shape `(num_exits,)`, *optional*):
        With `labels`: each exit's LM loss (detached).
    estimator_loss (`torch.FloatTensor`, *optional*):
        With `labels`: the estimator's loss (`config.estimator_objective`: cross-entropy against
        `estimator_targets`, or each exit's binary cross-entropy against whether it suffices).
    estimator_targets (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        With `labels`: the earliest sufficient exit of each input (see `earliest_sufficient_exit`).
    exit_layer, exit_route, estimator_logits, layers_computed:
        See `AdaptiveDepthModelOutputWithPast`.
    """

    exit_logits: tuple[torch.FloatTensor, ...] | None = None
    exit_losses: torch.FloatTensor | None = None
    estimator_loss: torch.FloatTensor | None = None
    estimator_targets: torch.LongTensor | None = None
    exit_layer: torch.LongTensor | None = None
    exit_route: torch.LongTensor | None = None
    estimator_logits: torch.FloatTensor | None = None
    layers_computed: torch.LongTensor | None = None


@dataclass
class AdaptiveDepthSequenceClassifierOutputWithPast(FieldCachedOutput, SequenceClassifierOutputWithPast):
    r"""
    Fields as `AdaptiveDepthCausalLMOutputWithPast`; `exit_logits` are the pooled (last real token) class logits.
    """

    aux_loss: torch.FloatTensor | None = None
    exit_logits: tuple[torch.FloatTensor, ...] | None = None
    exit_losses: torch.FloatTensor | None = None
    estimator_loss: torch.FloatTensor | None = None
    estimator_targets: torch.LongTensor | None = None
    exit_layer: torch.LongTensor | None = None
    exit_route: torch.LongTensor | None = None
    estimator_logits: torch.FloatTensor | None = None
    layers_computed: torch.LongTensor | None = None


@dataclass
class AdaptiveDepthGenerateOutput(FieldCachedOutput, GenerateDecoderOnlyOutput):
    r"""
    exit_layers (`torch.LongTensor` of shape `(batch_size, new_tokens)`):
        The depth whose exit produced each new token (full depth under self-speculative decoding: the full model
        verifies every token).
    layers_computed (`torch.LongTensor` of shape `(forward_calls,)`):
        Decoder layers each forward of the generation ran on the batch (the first one is the prompt).
    """

    exit_layers: torch.LongTensor | None = None
    layers_computed: torch.LongTensor | None = None


def route_from_estimate(estimator_logits: torch.Tensor, threshold: float, objective: str = "earliest"
                        ) -> torch.LongTensor:
    """Index of the exit each input is routed to, from the estimator's logits (batch, num_exits) -> (batch,).

    `objective="earliest"`: the earliest exit whose cumulative "earliest sufficient exit" probability (softmax)
    reaches `threshold`. `"sufficiency"`: the earliest exit whose own probability of sufficing (sigmoid) reaches it.
    Either way threshold 0 always picks the first exit, 1 always the last, and the last exit is the fallback.
    """
    num_exits = estimator_logits.shape[-1]
    if threshold >= 1.0:
        return torch.full(estimator_logits.shape[:-1], num_exits - 1, dtype=torch.long, device=estimator_logits.device)
    if objective == "sufficiency":
        sufficient = estimator_logits.float().sigmoid() >= threshold
    else:
        sufficient = estimator_logits.float().softmax(-1).cumsum(-1) >= threshold
    return first_sufficient_exit(sufficient)


def first_sufficient_exit(sufficient: torch.Tensor) -> torch.LongTensor:
    """Index of the first True per row, the last exit when there is none: the routing rule and the estimator's
    "earliest exit" target both read exits this way. (..., num_exits) bool -> (...)."""
    sufficient = sufficient.clone()
    sufficient[..., -1] = True
    return sufficient.int().argmax(-1)


def exit_confidence(logits: torch.Tensor) -> torch.Tensor:
    """An exit's confidence features: softmax margin, top probability, entropy / log(classes). (B, C) -> (B, 3)."""
    probabilities = logits.float().softmax(-1)
    top2 = probabilities.topk(min(2, probabilities.shape[-1]), dim=-1).values
    margin = top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0.0)
    entropy = -(probabilities * probabilities.clamp(min=1e-12).log()).sum(-1)
    return torch.stack([margin, top2[..., 0], entropy / math.log(max(2, probabilities.shape[-1]))], dim=-1)


def softmax_margin(logits: torch.Tensor) -> torch.Tensor:
    """CALM's confidence: top-1 minus top-2 probability, in [0, 1]. (..., vocab) -> (...)."""
    probabilities = logits.float().softmax(-1)
    if probabilities.shape[-1] == 1:
        return probabilities[..., 0]
    top2 = probabilities.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@torch.no_grad()
def exit_sufficiency(exit_correct: torch.Tensor | None, exit_losses: torch.Tensor, target: str, tolerance: float
                     ) -> torch.Tensor:
    """Per input and exit, whether that exit suffices: it is right (`target="correct"`) or its loss is within
    `tolerance` of the last exit's (`target="loss"`, also used when `exit_correct` is None).

    exit_correct: (batch, num_exits) bool or None; exit_losses: (batch, num_exits) -> (batch, num_exits) bool.
    """
    if target == "correct" and exit_correct is not None:
        return exit_correct.clone()
    return exit_losses <= exit_losses[:, -1:] + tolerance


@torch.no_grad()
def earliest_sufficient_exit(
    exit_correct: torch.Tensor | None, exit_losses: torch.Tensor, target: str, tolerance: float
) -> torch.LongTensor:
    """The estimator's training target under `estimator_objective="earliest"`: per input, the first exit that
    suffices (`exit_sufficiency`); the last exit when none does. (batch, num_exits) -> (batch,)."""
    return first_sufficient_exit(exit_sufficiency(exit_correct, exit_losses, target, tolerance))


class AdaptiveDepthEstimator(nn.Module):
    """Predicts from cheap early features which exit suffices for the whole input.

    Per-token features (RMSNorm, linear, SiLU) are pooled over the input's real tokens as `config.estimator_features`
    says (mean, max, the last token), optionally joined by the confidence of the exit at `estimator_input_layer`
    (`exit_confidence`), then a two-layer MLP gives one logit per exit: a distribution over "the earliest exit that
    suffices" or each exit's own odds of sufficing (`config.estimator_objective`).
    (batch, seq, hidden) + (batch, seq) mask [+ (batch, 3) exit confidence] -> (batch, num_exits).
    """

    def __init__(self, config: AdaptiveDepthConfig) -> None:
        super().__init__()
        width = config.estimator_hidden_size
        self.features = list(config.estimator_features)
        pooled = [name for name in self.features if name != "exit_confidence"]
        inputs = width * len(pooled) + (3 if "exit_confidence" in self.features else 0)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.token_proj = nn.Linear(config.hidden_size, width)
        self.hidden = nn.Linear(inputs, width)
        self.out = nn.Linear(width, len(config.exit_layers))
        self.detach_features = config.estimator_detach_features

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor,
                exit_confidence: torch.Tensor | None = None) -> torch.Tensor:
        if self.detach_features:
            hidden_states = hidden_states.detach()
            exit_confidence = exit_confidence.detach() if exit_confidence is not None else None
        features = F.silu(self.token_proj(self.norm(hidden_states)))  # (B, T, W)
        mask = token_mask[..., None].to(features.dtype)
        has_tokens = mask.sum(1) > 0  # (B, 1)
        parts = []
        for name in self.features:
            if name == "mean":
                parts.append((features * mask).sum(1) / mask.sum(1).clamp(min=1.0))
            elif name == "max":
                maximum = features.masked_fill(mask == 0, torch.finfo(features.dtype).min).amax(1)
                parts.append(torch.where(has_tokens, maximum, torch.zeros_like(maximum)))
            elif name == "last":
                rows = torch.arange(features.shape[0], device=features.device)
                parts.append(features[rows, last_true_index(token_mask)] * has_tokens)
            else:
                if exit_confidence is None:
                    raise ValueError("estimator_features has 'exit_confidence': pass the exit's confidence "
                                     "(AdaptiveDepthModel.forward computes it when given exit_head).")
                parts.append(exit_confidence.to(features.dtype))  # (B, 3)
        return self.out(F.silu(self.hidden(torch.cat(parts, dim=-1))))


def last_true_index(mask: torch.Tensor) -> torch.LongTensor:
    """Index of each row's last True (0 for a row without any). (B, T) bool -> (B,)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.to(torch.long)).argmax(-1)


def fill_skipped_kv(layer: DecoderLayer, hidden_states: torch.Tensor, position_embeddings, position_ids,
                    cache: Cache) -> None:
    """CALM's state propagation: the key/value a skipped layer would have cached, computed from the exit hidden state.

    Only the layer's input norm and its attention's `project_qkv` run (no attention, no feed-forward), so the keys
    are exactly the ones the layer caches when it runs: rotated on rotary layers only. The query is discarded.
    """
    attention = layer.self_attn
    _, keys, values = attention.project_qkv(layer.input_layernorm(hidden_states), position_embeddings, position_ids)
    cache.update(keys, values, attention.layer_idx)  # keys, values: (B, Hkv, T, D)


class AdaptiveDepthPreTrainedModel(SparseMoePreTrainedModel):
    """SparseMoe's initialisation, recorded outputs and checked loading, for the adaptive-depth config."""

    config: AdaptiveDepthConfig
    config_class = AdaptiveDepthConfig
    _remote_code_auto_classes = {"AutoModel": "AdaptiveDepthModel", "AutoModelForCausalLM": "AdaptiveDepthForCausalLM",
                                 "AutoModelForSequenceClassification": "AdaptiveDepthForSequenceClassification"}


class AdaptiveDepthModel(AdaptiveDepthPreTrainedModel):
    """The decoder with exits and the estimator; `forward` applies the inference policy."""

    # The SparseMoe decoder's input checks and per-layer-type masks apply unchanged.
    _check_inputs = SparseMoeModel._check_inputs
    _attention_masks = SparseMoeModel._attention_masks

    def __init__(self, config: AdaptiveDepthConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # the last exit's norm
        self.exit_norms = nn.ModuleList(
            [RMSNorm(config.hidden_size, eps=config.rms_norm_eps) for _ in config.exit_layers[:-1]]
        )
        self.estimator = AdaptiveDepthEstimator(config)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.post_init()

    def exit_norm(self, exit_index: int) -> RMSNorm:
        """The norm of exit `exit_index` (an index into `config.exit_layers`)."""
        return self.norm if exit_index == len(self.config.exit_layers) - 1 else self.exit_norms[exit_index]

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
        exit_policy: str | None = None,
        exit_threshold: float | None = None,
        exit_route: torch.LongTensor | None = None,
        exit_head: nn.Module | None = None,
        output_exit_states: bool = False,
        prompt_mask: torch.Tensor | None = None,
        estimator_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AdaptiveDepthModelOutputWithPast:
        r"""
        exit_policy (`str`, *optional*):
            `"full"`, `"estimator"` or `"confidence"`; defaults to `config.exit_policy`.
        exit_threshold (`float`, *optional*):
            The policy's threshold in [0, 1]; defaults to `config.estimator_threshold` / `config.confidence_threshold`.
        exit_route (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            A route already chosen (index into `config.exit_layers` per input): the estimator is skipped. `generate`
            passes the prompt's route to every later step this way.
        exit_head (`nn.Module`, *optional*):
            The head exits are read with (the LM head or the classifier): the `"confidence"` policy measures its
            softmax margin, the estimator's `"exit_confidence"` feature its confidence at the estimator's exit.
        output_exit_states (`bool`):
            Run every layer and return the normed hidden state of every exit and the estimator's logits (training).
        prompt_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            The prompt among the tokens: the estimator routes on it, and under the `"confidence"` policy its tokens
            leave together with its last token (the only one whose prediction a generation uses; deeper layers get
            the prompt's key/value by propagation). Default: the real tokens of a call on an empty cache (in
            `generate`, the prompt); after cached tokens, none (each token decides by itself: decoding steps,
            assisted decoding's verification), while the estimator then reads this call's tokens. When a forward
            also holds the answer (training, teacher-forced evaluation), mark the prompt here so the model decides
            as it will in `generate`.
        estimator_mask:
            Deprecated name of `prompt_mask`.
        """
        if estimator_mask is not None:
            if prompt_mask is not None:
                raise ValueError("Pass prompt_mask only (estimator_mask is its deprecated name).")
            warnings.warn("estimator_mask is deprecated; pass prompt_mask.", FutureWarning, stacklevel=2)
            prompt_mask = estimator_mask
        self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, cache)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        config = self.config
        exit_layers = list(config.exit_layers)
        num_layers = len(self.layers)
        # transformers' EarlyExitCandidateGenerator drafts by lowering config.num_hidden_layers to an exit depth.
        drafting_depth = config.num_hidden_layers
        policy = exit_policy if exit_policy is not None else config.exit_policy
        if drafting_depth < num_layers:
            if drafting_depth not in exit_layers:
                raise ValueError(
                    f"config.num_hidden_layers was set to {drafting_depth} (e.g. by generate(assistant_early_exit="
                    f"{drafting_depth})) but the exits are at depths {exit_layers}; use one of {exit_layers[:-1]}."
                )
            policy = "full"
        elif output_exit_states or exit_route is not None:
            policy = "full" if output_exit_states else "estimator"
        if policy not in ("full", "estimator", "confidence"):
            raise ValueError(f"exit_policy must be 'full', 'estimator' or 'confidence', got {policy!r}.")
        threshold = exit_threshold if exit_threshold is not None else config.threshold_for(policy)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"exit_threshold must be in [0, 1], got {threshold}.")
        if policy == "confidence" and exit_head is None:
            raise ValueError("exit_policy='confidence' measures each exit's softmax margin: pass exit_head (the LM "
                             "head or classifier), as AdaptiveDepthForCausalLM does.")

        masks = attention_mask
        if not isinstance(attention_mask, dict):  # the masks may already have been prepared, e.g. by `generate`
            masks = self._attention_masks(inputs_embeds, attention_mask, position_ids, cache, False,
                                          kwargs.get("output_attentions"))
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        batch_size, length = inputs_embeds.shape[:2]
        token_mask = torch.ones(batch_size, length, dtype=torch.bool, device=inputs_embeds.device)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -length:].to(device=inputs_embeds.device, dtype=torch.bool)
        if prompt_mask is not None:
            prompt_tokens = token_mask & prompt_mask[:, -length:].to(device=token_mask.device, dtype=torch.bool)
            estimator_tokens = prompt_tokens
        else:  # the tokens of a call on an empty cache are the prompt; after cached tokens, each decides by itself
            estimator_tokens = token_mask
            prompt_tokens = token_mask if cache is None or cache.get_seq_length() == 0 else torch.zeros_like(
                token_mask)

        layer_types = config.layer_types  # config attributes are slow to read (~1 us): read once per forward

        def run_layer(index: int, hidden_states: torch.Tensor, rows: torch.LongTensor | None = None) -> torch.Tensor:
            """Decoder layer `index` on the whole batch, or on the batch rows `rows` only (their hidden states)."""
            layer_mask, embeddings, positions, layer_cache = masks[layer_types[index]], position_embeddings, \
                position_ids, cache
            if rows is not None:
                layer_mask = _select_rows(layer_mask, rows, batch_size)
                embeddings = tuple(_select_rows(t, rows, batch_size) for t in position_embeddings)
                positions = _select_rows(position_ids, rows, batch_size)
                layer_cache = RowSubsetCache(cache, rows, batch_size) if cache is not None else None
            return self.layers[index](
                hidden_states,
                attention_mask=layer_mask,
                position_embeddings=embeddings,
                position_ids=positions,
                cache=layer_cache,
                use_cache=use_cache,
                **kwargs,
            )

        exit_index = {depth: i for i, depth in enumerate(exit_layers)}
        estimator_logits = route = exit_states = None
        if policy == "confidence":
            output, exit_layer, layers_computed = self._confidence_forward(
                inputs_embeds, run_layer, position_embeddings, position_ids, cache, token_mask, prompt_tokens,
                exit_head, threshold, exit_index,
            )
        else:
            # "full" / drafting: one depth for everyone. "estimator": each row runs to its own exit; in a batch of
            # mixed routes the rows that have left are dropped from the deeper layers (`RowSubsetCache` keeps the
            # cache's batch shape), unless per-layer outputs are recorded (they need the whole batch at every layer).
            stop = drafting_depth if policy == "full" else None
            wants_estimate = output_exit_states or (policy == "estimator" and exit_route is None)
            if policy == "estimator" and exit_route is not None:
                route = exit_route.to(device=inputs_embeds.device, dtype=torch.long).reshape(batch_size)
            records_layers = bool(kwargs.get("output_hidden_states") or kwargs.get("output_attentions"))
            splits = (policy == "estimator" and batch_size > 1 and not records_layers
                      and all(m is None or isinstance(m, (torch.Tensor, BlockAttentionMask)) for m in masks.values()))
            running = torch.arange(batch_size, device=inputs_embeds.device) if splits else None  # rows still running
            estimator_layer = config.estimator_input_layer
            confidence_feature = "exit_confidence" in config.estimator_features
            hidden_states = inputs_embeds
            output = None
            exit_states = [] if output_exit_states else None
            depth = 0
            while True:
                normed = None
                estimates_here = depth == estimator_layer and wants_estimate
                if depth in exit_index and (exit_states is not None or policy == "full" or (
                        estimates_here and confidence_feature)):
                    normed = self.exit_norm(exit_index[depth])(hidden_states)
                if estimates_here:  # every row is still running here
                    estimator_logits = self._estimate(hidden_states, normed, estimator_tokens, exit_head)
                    if policy == "estimator":
                        route = route_from_estimate(estimator_logits, threshold, config.estimator_objective)
                if stop is None and route is not None:
                    stop = exit_layers[int(route.max())]
                if depth in exit_index:
                    index = exit_index[depth]
                    if exit_states is not None:
                        exit_states.append(normed)
                    if policy != "estimator":
                        if depth == stop:
                            output = normed
                    else:
                        leaving = route == index if running is None else route[running] == index  # (rows running,)
                        if bool(leaving.any()):
                            normed = normed if normed is not None else self.exit_norm(index)(hidden_states)
                            if running is None:  # whole batch: select per row
                                output = normed if output is None else torch.where(leaving[:, None, None], normed,
                                                                                     output)
                            else:
                                if output is None:
                                    output = normed.new_zeros(batch_size, length, normed.shape[-1])
                                output = output.index_copy(0, running[leaving], normed[leaving])
                                if depth < stop:
                                    running, hidden_states = running[~leaving], hidden_states[~leaving]
                if depth == stop:
                    break
                subset = running if running is not None and len(running) < batch_size else None
                hidden_states = run_layer(depth, hidden_states, subset)
                depth += 1
            layers_computed = depth
            if policy == "estimator":
                depths = torch.tensor(exit_layers, device=route.device)[route]
                exit_layer = depths[:, None].expand(batch_size, length)
            else:
                exit_layer = torch.full((batch_size, length), stop, dtype=torch.long, device=inputs_embeds.device)

        return AdaptiveDepthModelOutputWithPast(
            last_hidden_state=output,
            cache=cache if use_cache else None,
            exit_hidden_states=tuple(exit_states) if exit_states is not None else None,
            exit_layer=exit_layer,
            exit_route=route,
            estimator_logits=estimator_logits,
            layers_computed=torch.tensor(layers_computed),
        )

    def _estimate(self, hidden_states: torch.Tensor, normed: torch.Tensor | None, prompt_tokens: torch.Tensor,
                  exit_head: nn.Module | None) -> torch.Tensor:
        """The estimator's logits (B, num_exits) from the states after `estimator_input_layer` layers; `normed` is
        that depth's exit state when it is an exit (for the `"exit_confidence"` feature)."""
        confidence = None
        if "exit_confidence" in self.config.estimator_features:
            if exit_head is None:
                raise ValueError("estimator_features has 'exit_confidence', which reads the exit through its head: "
                                 "pass exit_head (AdaptiveDepthForCausalLM and the classifier do).")
            rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
            confidence = exit_confidence(exit_head(normed[rows, last_true_index(prompt_tokens)]))  # (B, 3)
        return self.estimator(hidden_states, prompt_tokens, confidence)

    def _confidence_forward(self, hidden_states, run_layer, position_embeddings, position_ids, cache, token_mask,
                            prompt_tokens, exit_head, threshold, exit_index):
        """Per-token early exit. A token leaves at the first exit whose softmax margin reaches `threshold`; the
        prompt's tokens leave together with its last token. A token that has left keeps its hidden state: where
        other tokens still run a layer, that layer sees it unchanged (so the key/value it caches come from the exit
        state); where no token runs a layer, only its key/value are computed (`fill_skipped_kv`). Returns (output,
        exit_layer, layers run)."""
        num_layers = len(self.layers)
        batch_size, length = hidden_states.shape[:2]
        rows = torch.arange(batch_size, device=hidden_states.device)
        last_prompt = last_true_index(prompt_tokens)  # (B,)
        has_prompt = prompt_tokens.any(1)
        deciders = token_mask & ~prompt_tokens  # tokens that decide for themselves, plus each prompt's last token
        deciders[rows, last_prompt] |= has_prompt
        active = token_mask.clone()  # padding never decides anything
        output = torch.zeros_like(hidden_states)
        exit_layer = torch.full((batch_size, length), num_layers, dtype=torch.long, device=hidden_states.device)
        layers_computed = 0
        for depth in range(num_layers + 1):
            if depth in exit_index and bool(active.any()):
                normed = self.exit_norm(exit_index[depth])(hidden_states)
                if depth == num_layers:
                    leaving = active
                else:
                    deciding = active & deciders
                    confident = torch.zeros_like(active)
                    if threshold < 1.0 and bool(deciding.any()):
                        confident[deciding] = softmax_margin(exit_head(normed[deciding])) >= threshold
                    prompt_leaves = confident[rows, last_prompt] & has_prompt  # (B,)
                    confident = torch.where(prompt_tokens, prompt_leaves[:, None], confident)
                    leaving = active & confident
                output = torch.where(leaving[..., None], normed, output)
                exit_layer = exit_layer.masked_fill(leaving & token_mask, depth)
                active = active & ~leaving
            if depth == num_layers:
                break
            if bool(active.any()):
                updated = run_layer(depth, hidden_states)
                hidden_states = torch.where(active[..., None], updated, hidden_states)
                layers_computed += 1
            elif cache is not None:
                fill_skipped_kv(self.layers[depth], hidden_states, position_embeddings, position_ids, cache)
        return output, exit_layer, layers_computed


def _select_rows(value, rows: torch.LongTensor, batch_size: int):
    """`value[rows]` for a per-row tensor (first dimension `batch_size`) or a block-attention mask's key padding;
    anything else (None, broadcast tensors of first dimension 1) unchanged."""
    if isinstance(value, BlockAttentionMask):
        return replace(value, key_padding_mask=_select_rows(value.key_padding_mask, rows, batch_size))
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size and batch_size > 1:
        return value.index_select(0, rows)
    return value


class RowSubsetCache:
    """The cache as a layer sees it when only the batch rows `rows` run it (whole-input routing, mixed routes).

    The layer attends and caches for those rows; the underlying cache keeps its batch shape, so `generate`'s cache
    handling (beam reordering, cropping, lengths) is unchanged. The other rows' entries in this layer are zeros and
    are never read: those rows left the batch at a shallower exit, and their route holds for every later token.
    """

    def __init__(self, cache: Cache, rows: torch.LongTensor, batch_size: int) -> None:
        self.cache, self.rows, self.batch_size = cache, rows, batch_size

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states, value_states: (rows, Hkv, T, D) -> the cached (rows, Hkv, T_total, D)
        keys = key_states.new_zeros((self.batch_size, *key_states.shape[1:])).index_copy_(0, self.rows, key_states)
        values = value_states.new_zeros((self.batch_size, *value_states.shape[1:])).index_copy_(0, self.rows,
                                                                                                  value_states)
        keys, values = self.cache.update(keys, values, layer_idx, *args, **kwargs)
        return keys.index_select(0, self.rows), values.index_select(0, self.rows)

    def __getattr__(self, name: str):
        return getattr(self.cache, name)


def _last_real_token(input_ids: torch.Tensor | None, pad_token_id: int | None, batch_size: int, device) -> torch.Tensor:
    """Index of each row's rightmost non-padding token (left or right padding), as transformers' classifiers do."""
    if input_ids is None or pad_token_id is None:
        return torch.full((batch_size,), -1, dtype=torch.long, device=device)
    return last_true_index((input_ids != pad_token_id).to(device))


class AdaptiveDepthForCausalLM(AdaptiveDepthPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: AdaptiveDepthConfig) -> None:
        super().__init__(config)
        self.model = AdaptiveDepthModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._exit_logs: list[list] = []  # one per running `generate` call (self-speculative nests two)
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
        exit_policy: str | None = None,
        exit_threshold: float | None = None,
        exit_route: torch.LongTensor | None = None,
        output_exit_logits: bool | None = None,
        prompt_mask: torch.Tensor | None = None,
        estimator_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AdaptiveDepthCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets (shifted inside; -100 ignored). Every layer runs, every exit is trained, and the
            estimator learns the earliest exit whose answer (the labelled tokens) is right.
        exit_policy, exit_threshold, exit_route, prompt_mask, estimator_mask:
            See `AdaptiveDepthModel.forward`.
        output_exit_logits (`bool`, *optional*):
            Run every layer and return the logits of every exit (and the estimator's logits).
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        if labels is not None and (input_ids is None) ^ (inputs_embeds is None):  # else the model names the mistake
            check_input_shapes(input_ids, inputs_embeds, attention_mask, self.config.hidden_size)
            check_labels(labels, (input_ids if input_ids is not None else inputs_embeds).shape[:2],
                         kwargs.get("num_items_in_batch"))
        all_exits = labels is not None or bool(output_exit_logits)
        if labels is not None and use_cache is None:
            use_cache = False  # a training forward needs no cache (generate passes use_cache explicitly)
        record_router = self.config.first_k_dense_layers < self.config.num_hidden_layers and (
            labels is not None or output_router_logits
        )
        outputs: AdaptiveDepthModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            exit_policy=exit_policy,
            exit_threshold=exit_threshold,
            exit_route=exit_route,
            exit_head=self.lm_head,
            output_exit_states=all_exits,
            prompt_mask=prompt_mask,
            estimator_mask=estimator_mask,
            output_router_logits=record_router,
            output_router_indices=record_router,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        if self._exit_logs:
            self._exit_logs[-1].append((outputs.exit_layer[:, -1], outputs.layers_computed))

        exit_logits = exit_losses = estimator_loss = estimator_targets = None
        if all_exits:
            exit_logits = tuple(self.lm_head(states) for states in outputs.exit_hidden_states[:-1])
            exit_logits += (logits if logits.shape[1] == outputs.last_hidden_state.shape[1]
                            else self.lm_head(outputs.exit_hidden_states[-1]),)
        loss = None
        if labels is not None:
            weights = self.config.exit_loss_weights
            losses = [self.loss_function(logits=exit, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
                      for exit in exit_logits]
            loss = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
            exit_losses = torch.stack([l.detach() for l in losses])
            correct, per_example_losses, has_labels = _lm_exit_quality(exit_logits, labels)
            estimator_targets, estimator_loss = _estimator_objective(self.config, outputs.estimator_logits, correct,
                                                                     per_example_losses, has_labels)
            loss = loss + self.config.estimator_loss_weight * estimator_loss

        aux_loss = stats = None
        if record_router:
            stats = router_statistics(outputs.router_logits, outputs.router_indices, self.config.num_experts,
                                      attention_mask)
            aux_loss = router_aux_loss(self.config, stats)
            if loss is not None:
                loss = loss + aux_loss_share(aux_loss, labels, kwargs.get("num_items_in_batch")).to(loss.device)

        return AdaptiveDepthCausalLMOutputWithPast(
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
            exit_logits=exit_logits,
            exit_losses=exit_losses,
            estimator_loss=estimator_loss,
            estimator_targets=estimator_targets,
            exit_layer=outputs.exit_layer,
            exit_route=outputs.exit_route,
            estimator_logits=outputs.estimator_logits,
            layers_computed=outputs.layers_computed,
        )

    # transformers' `generate` reads `inspect.signature(self.forward)` at every step of a remote-code model (a check
    # for the removed `cache_position` argument, ~50 us a token on CPU): computed once here.
    forward.__signature__ = inspect.signature(forward)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        """Keep the prompt's route (whole-input routing decides once, and later steps, cached or not, follow it) and
        which positions are the prompt (`prompt_mask`: a step without cache runs the whole sequence again, and must
        decide as the cached steps did)."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        if getattr(outputs, "exit_route", None) is not None:
            model_kwargs["exit_route"] = outputs.exit_route
        exit_layer = getattr(outputs, "exit_layer", None)
        # With a cache, forward's own rule (the tokens of a call on an empty cache are the prompt) already holds.
        if model_kwargs.get("use_cache") is False and exit_layer is not None:
            prompt_mask = model_kwargs.get("prompt_mask")
            if prompt_mask is None:  # after the prompt's forward, which covered exactly the prompt
                prompt_mask = torch.ones(exit_layer.shape, dtype=torch.bool, device=exit_layer.device)
            model_kwargs["prompt_mask"] = torch.cat(
                [prompt_mask, prompt_mask.new_zeros(prompt_mask.shape[0], num_new_tokens)], 1)
        return model_kwargs

    def generate(self, *args, exit_policy: str | None = None, exit_threshold: float | None = None, **kwargs):
        """`GenerationMixin.generate` under an exit policy (`exit_policy`, `exit_threshold`, else the config's).

        With `return_dict_in_generate=True` the output also reports `exit_layers` (the depth that produced each new
        token) and `layers_computed` (layers run per forward). `assistant_early_exit=d` (d one of
        `config.exit_layers[:-1]`) drafts with exit `d` and verifies with the full model: the output equals greedy
        full-depth decoding.
        """
        check_generate_prompt(args, kwargs)
        generation_config = kwargs.get("generation_config")
        early_exit = kwargs.get("assistant_early_exit")
        if early_exit is None and generation_config is not None:
            early_exit = generation_config.assistant_early_exit
        if early_exit is None and kwargs.get("generation_config") is None:
            early_exit = self.generation_config.assistant_early_exit
        if early_exit is not None:
            if early_exit not in self.config.exit_layers[:-1]:
                raise ValueError(f"assistant_early_exit={early_exit} is not an early exit of this model; use one of "
                                 f"config.exit_layers[:-1] = {self.config.exit_layers[:-1]}.")
            if exit_policy not in (None, "full"):
                raise ValueError(f"Self-speculative decoding verifies with the full model; exit_policy must be 'full' "
                                 f"(got {exit_policy!r}).")
            exit_policy = "full"
        log: list = []
        self._exit_logs.append(log)
        try:
            with decoding_own_tokens(self, args, kwargs):  # prompt ids checked once, not at every decoded token
                output = super().generate(*args, exit_policy=exit_policy, exit_threshold=exit_threshold, **kwargs)
        finally:
            self._exit_logs.pop()
        if not isinstance(output, GenerateDecoderOnlyOutput) or not log:
            return output
        prompt = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        new_tokens = output.sequences.shape[1] - (prompt.shape[-1] if prompt is not None else 0)
        batch_size = output.sequences.shape[0]
        if early_exit is not None:
            exit_layers = torch.full((batch_size, new_tokens), self.config.num_hidden_layers, dtype=torch.long)
        else:
            exit_layers = torch.stack([step for step, _ in log], dim=1)[:, :new_tokens].cpu()
        layers_computed = torch.stack([count for _, count in log])
        return AdaptiveDepthGenerateOutput(**output, exit_layers=exit_layers, layers_computed=layers_computed)


def _lm_exit_quality(exit_logits, labels):
    """Per input and exit: are all labelled next tokens the argmax, and the mean token loss. Plus which inputs have
    any label. Shapes (batch, num_exits), (batch, num_exits), (batch,)."""
    with torch.no_grad():
        shift_labels = labels[:, 1:].to(exit_logits[0].device)
        mask = shift_labels != -100
        count = mask.sum(1).clamp(min=1)
        correct, losses = [], []
        for logits in exit_logits:
            shifted = logits[:, :-1].float()
            correct.append(((shifted.argmax(-1) == shift_labels) | ~mask).all(1))
            token_loss = F.cross_entropy(shifted.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
            losses.append((token_loss * mask).sum(1) / count)
        return torch.stack(correct, 1), torch.stack(losses, 1), mask.any(1)


def _estimator_objective(config, estimator_logits, exit_correct, exit_losses, weight_mask):
    """The estimator's targets (the earliest sufficient exit per input, (batch,)) and its loss under
    `config.estimator_objective`: cross-entropy against that exit, or binary cross-entropy of every exit's logit
    against whether that exit suffices. Inputs without any label (`weight_mask` False) do not count."""
    sufficient = exit_sufficiency(exit_correct, exit_losses, config.estimator_target, config.estimator_loss_tolerance)
    targets = first_sufficient_exit(sufficient)
    if not bool(weight_mask.any()):
        return targets, estimator_logits.sum() * 0.0
    logits = estimator_logits[weight_mask].float()
    if config.estimator_objective == "sufficiency":
        return targets, F.binary_cross_entropy_with_logits(logits, sufficient[weight_mask].float())
    return targets, F.cross_entropy(logits, targets[weight_mask])


class AdaptiveDepthForSequenceClassification(AdaptiveDepthPreTrainedModel):
    """A score head on the last real token, shared by every exit; the estimator learns the earliest exit whose class
    is right (single-label) or whose loss is within the tolerance (regression, multi-label)."""

    def __init__(self, config: AdaptiveDepthConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = AdaptiveDepthModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
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
        exit_policy: str | None = None,
        exit_threshold: float | None = None,
        exit_route: torch.LongTensor | None = None,
        output_exit_logits: bool | None = None,
        prompt_mask: torch.Tensor | None = None,
        estimator_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AdaptiveDepthSequenceClassifierOutputWithPast:
        all_exits = labels is not None or bool(output_exit_logits)
        outputs: AdaptiveDepthModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            exit_policy=exit_policy,
            exit_threshold=exit_threshold,
            exit_route=exit_route,
            exit_head=self.score,
            output_exit_states=all_exits,
            prompt_mask=prompt_mask,
            estimator_mask=estimator_mask,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        batch_size = hidden_states.shape[0]
        if self.config.pad_token_id is None and batch_size != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        last = _last_real_token(input_ids, self.config.pad_token_id, batch_size, hidden_states.device)
        rows = torch.arange(batch_size, device=hidden_states.device)
        logits = self.score(hidden_states[rows, last])

        exit_logits = exit_losses = estimator_loss = estimator_targets = loss = None
        if all_exits:
            exit_logits = tuple(self.score(states[rows, last]) for states in outputs.exit_hidden_states)
        if labels is not None:
            losses = [self.loss_function(logits=exit, labels=labels, pooled_logits=exit, config=self.config)
                      for exit in exit_logits]
            weights = self.config.exit_loss_weights
            loss = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
            exit_losses = torch.stack([l.detach() for l in losses])
            correct, per_example = self._exit_quality(exit_logits, labels)
            estimator_targets, estimator_loss = _estimator_objective(
                self.config, outputs.estimator_logits, correct, per_example,
                torch.ones(batch_size, dtype=torch.bool, device=logits.device))
            loss = loss + self.config.estimator_loss_weight * estimator_loss

        return AdaptiveDepthSequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            exit_logits=exit_logits,
            exit_losses=exit_losses,
            estimator_loss=estimator_loss,
            estimator_targets=estimator_targets,
            exit_layer=outputs.exit_layer,
            exit_route=outputs.exit_route,
            estimator_logits=outputs.estimator_logits,
            layers_computed=outputs.layers_computed,
        )

    @torch.no_grad()
    def _exit_quality(self, exit_logits, labels):
        """(correct or None, per-example loss), each (batch, num_exits), for the problem type of the config."""
        labels = labels.to(exit_logits[0].device)
        problem = self.config.problem_type
        if problem == "single_label_classification":
            correct = torch.stack([exit.argmax(-1) == labels.view(-1) for exit in exit_logits], 1)
            losses = torch.stack([F.cross_entropy(exit.float(), labels.view(-1), reduction="none")
                                  for exit in exit_logits], 1)
            return correct, losses
        if problem == "regression":
            losses = [((exit.float().squeeze(-1) - labels.float().view(exit.shape[0], -1).squeeze(-1)) ** 2)
                      .reshape(exit.shape[0], -1).mean(1) for exit in exit_logits]
        else:
            losses = [F.binary_cross_entropy_with_logits(exit.float(), labels.float(), reduction="none").mean(1)
                      for exit in exit_logits]
        return None, torch.stack(losses, 1)


__all__ = [
    "AdaptiveDepthCausalLMOutputWithPast",
    "AdaptiveDepthEstimator",
    "AdaptiveDepthForCausalLM",
    "AdaptiveDepthForSequenceClassification",
    "AdaptiveDepthGenerateOutput",
    "AdaptiveDepthModel",
    "AdaptiveDepthModelOutputWithPast",
    "AdaptiveDepthPreTrainedModel",
    "AdaptiveDepthSequenceClassifierOutputWithPast",
    "RowSubsetCache",
    "earliest_sufficient_exit",
    "exit_confidence",
    "exit_sufficiency",
    "first_sufficient_exit",
    "last_true_index",
    "route_from_estimate",
    "softmax_margin",
]
