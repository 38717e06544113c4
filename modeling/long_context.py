"""Long-context attention: block-local sliding windows, chunked prefill, attention sinks.

transformers implements a sliding window as a mask over the whole sequence, so every token still pays for all
n keys and the mask itself is n x n (transformers issue #29777). Here a sliding layer computes each block of
queries against only the keys its window can see, so prefill costs O(n * window) time and O(block * window) memory.
Full-attention layers processed chunk by chunk (chunked prefill) split each chunk's keys into the cached past
(no mask) and the chunk itself (causal), and merge the two partial softmaxes by their log-sum-exp, so no
chunk x sequence mask is ever built.

This file imports only torch and transformers: it is copied into saved model folders for `trust_remote_code`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer


@dataclass
class BlockAttentionMask:
    """What block attention needs instead of a 4D mask: which keys are padding, and the window (None = full).

    `key_padding_mask` is the 2D (batch, past + new) attention mask of the whole input, or None when nothing is
    padded; the attention layer takes its last columns for the keys it actually holds.
    """

    key_padding_mask: torch.Tensor | None
    window: int | None
    block_size: int
    num_sink_tokens: int = 0
    rotary_emb: torch.nn.Module | None = None  # sinks re-rotate queries (see `sink_attention`)


def _repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return hidden_states
    batch, heads, length, dim = hidden_states.shape
    return hidden_states[:, :, None].expand(batch, heads, n_rep, length, dim).reshape(batch, heads * n_rep, length, dim)


def attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    additive_mask: torch.Tensor | None,
    scaling: float,
    is_causal: bool,
    use_sdpa: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each query's scores, so partial results can merge.

    Shapes: query (B, H, L, D), key / value (B, H, S, D), additive_mask broadcastable to (B, H, L, S) with finite
    large negative values for hidden keys (never -inf: a fully hidden row then gets a negligible merge weight).
    Returns (B, H, L, D) and (B, H, L) in float32.
    """
    if use_sdpa and query.device.type == "cpu":
        # PyTorch's CPU flash kernel: O(L * block) memory, and it returns the log-sum-exp.
        if additive_mask is not None:
            additive_mask = additive_mask.to(query.dtype)
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=additive_mask, scale=scaling
        )
        return output, lse.float()
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    if is_causal:
        length, keys = scores.shape[-2:]
        causal = torch.ones(length, keys, dtype=torch.bool, device=scores.device).tril(keys - length)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    if additive_mask is not None:
        scores = scores + additive_mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    probabilities = torch.exp(scores - lse[..., None]).to(value.dtype)
    return torch.matmul(probabilities, value), lse


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine attention over disjoint key sets: softmax over the union, from each part's output and log-sum-exp."""
    if len(parts) == 1:
        return parts[0][0]
    lses = torch.stack([lse for _, lse in parts])
    weights = torch.softmax(lses, dim=0)  # exp(lse_i) / sum_j exp(lse_j)
    return sum(output.float() * weight[..., None] for (output, _), weight in zip(parts, weights)).to(parts[0][0].dtype)


def block_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: BlockAttentionMask,
    scaling: float,
    use_sdpa: bool,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention computed block by block over the queries.

    query (B, H, L, D); key / value (B, Hkv, P + L, D): `P` cached keys followed by the L new ones, as the cache
    returns them. Query `i` sees key `j` when `0 <= (i + P) - j < window` (any `j <= i + P` when window is None)
    and key `j` is not padding: exactly the semantics of transformers' causal and sliding-window masks.
    Returns (B, L, H, D), the layout of transformers' attention functions, and with `return_lse` the
    log-sum-exp (B, L, H) of each query's scores.

    A windowed block attends to one span of keys with a (block x (block + window)) mask. A full-attention block
    (chunked prefill) attends to the cached past without a mask and to itself causally, merged by log-sum-exp, so
    memory stays O(block x block) however long the past is; when gradients are needed it uses one masked span.
    """
    batch, _, length, _ = query.shape
    past = key.shape[-2] - length
    key = _repeat_kv(key, module.num_key_value_groups)
    value = _repeat_kv(value, module.num_key_value_groups)
    window = mask.window
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)

    key_is_padding = None
    if mask.key_padding_mask is not None:
        key_padding = mask.key_padding_mask[:, -key.shape[-2] :].to(query.device)
        if not bool(key_padding.all()):
            key_is_padding = key_padding == 0  # (B, P + L)

    outputs, lses = [], []
    for start in range(0, length, mask.block_size):
        end = min(start + mask.block_size, length)
        block_query = query[:, :, start:end]
        if window is None and not needs_grad and not return_lse:
            outputs.append(_full_block_without_mask(block_query, key, value, key_is_padding, past, start, end,
                                                    scaling, use_sdpa))
            continue
        span_start = 0 if window is None else max(0, past + start - window + 1)
        span_end = past + end
        query_index = torch.arange(past + start, past + end, device=query.device)[:, None]
        key_index = torch.arange(span_start, span_end, device=query.device)[None]
        visible = key_index <= query_index
        if window is not None:
            visible &= query_index - key_index < window
        visible = visible[None]
        if key_is_padding is not None:  # a query always sees itself, so no row is fully hidden
            visible = visible & (~key_is_padding[:, None, span_start:span_end] | (key_index == query_index))
        additive = _additive_mask(visible)[:, None]
        span = slice(span_start, span_end)
        if return_lse:
            block_output, block_lse = attention_with_lse(block_query, key[:, :, span], value[:, :, span], additive,
                                                         scaling, False, use_sdpa and not needs_grad)
            lses.append(block_lse)
        elif use_sdpa:
            block_output = F.scaled_dot_product_attention(
                block_query, key[:, :, span], value[:, :, span], attn_mask=additive.to(query.dtype), scale=scaling
            )
        else:
            block_output, _ = attention_with_lse(block_query, key[:, :, span], value[:, :, span], additive, scaling,
                                                 False, use_sdpa=False)
        outputs.append(block_output)
    output = torch.cat(outputs, dim=2).transpose(1, 2).contiguous()
    if return_lse:
        return output, torch.cat(lses, dim=2).transpose(1, 2)
    return output


def _additive_mask(visible: torch.Tensor) -> torch.Tensor:
    """0 where visible, the most negative float32 elsewhere (finite, so a hidden row never produces NaN)."""
    return torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, torch.finfo(torch.float32).min)


def _full_block_without_mask(block_query, key, value, key_is_padding, past, start, end, scaling, use_sdpa):
    """One block of full causal attention: the block's own keys (causal) merged with all earlier keys."""
    near = slice(past + start, past + end)
    if key_is_padding is None:
        parts = [attention_with_lse(block_query, key[:, :, near], value[:, :, near], None, scaling, True, use_sdpa)]
    else:
        size = end - start
        causal = torch.ones(size, size, dtype=torch.bool, device=key.device).tril()[None]
        diagonal = torch.eye(size, dtype=torch.bool, device=key.device)[None]
        visible = causal & (~key_is_padding[:, None, near] | diagonal)
        parts = [attention_with_lse(block_query, key[:, :, near], value[:, :, near], _additive_mask(visible)[:, None],
                                    scaling, False, use_sdpa)]
    if past + start > 0:
        far = slice(0, past + start)
        far_mask = None if key_is_padding is None else _additive_mask(~key_is_padding[:, far])[:, None, None]
        parts.append(attention_with_lse(block_query, key[:, :, far], value[:, :, far], far_mask, scaling, False,
                                        use_sdpa))
    return merge_attention(parts)


def default_block_size(window: int | None) -> int:
    """Queries per block: about one window (cost ~2 windows per query), within [64, 1024] to bound memory."""
    return 512 if window is None else max(64, min(window, 1024))


# --------------------------------------------------------------------------------------------- attention sinks


class SinkSlidingWindowLayer(DynamicSlidingWindowLayer):
    """StreamingLLM cache layer: the first `num_sink_tokens` tokens plus the last `sliding_window - 1`.

    Its size never exceeds `num_sink_tokens + sliding_window - 1` tokens however long generation runs.
    `update` returns the window keys as a sliding layer does; the sink keys are read from `sink_keys`.
    """

    def __init__(self, sliding_window: int, num_sink_tokens: int, **kwargs) -> None:
        super().__init__(sliding_window=sliding_window)
        self.num_sink_tokens = num_sink_tokens
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self.tokens_before_update = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.tokens_before_update = self.cumulative_length
        missing = self.num_sink_tokens - (0 if self.sink_keys is None else self.sink_keys.shape[-2])
        if missing > 0:
            # clone: a view would keep the whole (possibly huge) prompt chunk alive
            new_keys = key_states[:, :, :missing].clone()
            new_values = value_states[:, :, :missing].clone()
            if self.sink_keys is None:
                self.sink_keys, self.sink_values = new_keys, new_values
            else:
                self.sink_keys = torch.cat([self.sink_keys, new_keys], dim=-2)
                self.sink_values = torch.cat([self.sink_values, new_values], dim=-2)
        full_keys, full_values = super().update(key_states, value_states, *args, **kwargs)
        self.keys, self.values = self.keys.clone(), self.values.clone()  # drop the reference to the full chunk
        return full_keys, full_values

    def cached_tokens(self) -> int:
        """Tokens held in memory: sinks plus window."""
        sinks = 0 if self.sink_keys is None else self.sink_keys.shape[-2]
        return sinks + (0 if self.keys is None else self.keys.shape[-2])

    def reset(self) -> None:
        super().reset()
        self.sink_keys = self.sink_values = None
        self.tokens_before_update = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.sink_keys is not None:
            self.sink_keys = self.sink_keys.index_select(0, beam_idx.to(self.sink_keys.device))
            self.sink_values = self.sink_values.index_select(0, beam_idx.to(self.sink_values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.sink_keys is not None:
            self.sink_keys = self.sink_keys.repeat_interleave(repeats, dim=0)
            self.sink_values = self.sink_values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.sink_keys is not None:
            self.sink_keys = self.sink_keys[indices, ...]
            self.sink_values = self.sink_values[indices, ...]


def install_sink_layers(cache: DynamicCache, config) -> None:
    """Turn a fresh DynamicCache (as `generate` builds it) into a StreamingLLM cache, in place."""
    if cache.get_seq_length() > 0:
        raise ValueError("Attention sinks need an empty cache at the start: the sink tokens are the first ones seen.")
    cache.layers = [SinkSlidingWindowLayer(config.sliding_window, config.num_sink_tokens)
                    for _ in range(config.num_hidden_layers)]


def sink_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    sink_keys: torch.Tensor,
    sink_values: torch.Tensor,
    tokens_before: int,
    mask: BlockAttentionMask,
    scaling: float,
    use_sdpa: bool,
    rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """StreamingLLM attention: the window (true relative positions) merged with the sink tokens it no longer covers.

    StreamingLLM numbers positions inside the cache, so a query sees each sink at distance at most
    `num_sink_tokens + window - 1`, the distances it was trained on. Keys are cached after rotary embedding, so
    the same distances are obtained by rotating the query back by `min(0, sinks + window - 1 - position)` for the
    sink part only; the window part keeps the true (short) distances. `tokens_before` is the absolute index of the
    first query; `rotate(states, positions)` applies rotary embedding at `positions`.
    """
    window_output, window_lse = block_attention(module, query, window_keys, window_values, mask, scaling, use_sdpa,
                                                return_lse=True)
    sink_keys = _repeat_kv(sink_keys, module.num_key_value_groups)
    sink_values = _repeat_kv(sink_values, module.num_key_value_groups)
    columns = torch.arange(query.shape[-2], device=query.device) + tokens_before  # absolute index of each query
    sink_index = torch.arange(sink_keys.shape[-2], device=query.device)
    # A sink is added here only once it has left the query's window (the window part counts it before that).
    visible = (columns[:, None] - sink_index[None]) >= mask.window
    rotation = (mask.num_sink_tokens + mask.window - 1 - columns).clamp(max=0)
    sink_output, sink_lse = attention_with_lse(rotate(query, rotation), sink_keys, sink_values,
                                               _additive_mask(visible)[None, None], scaling, False,
                                               use_sdpa and not torch.is_grad_enabled())
    return merge_attention([(window_output, window_lse), (sink_output.transpose(1, 2), sink_lse.transpose(1, 2))])
