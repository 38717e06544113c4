"""Long context: windowed compute equals the mask-based computation, chunked prefill, attention sinks, bad input."""

import re
import types

import pytest
import torch
from conftest import tiny_sparse_moe_config
from torch.utils._python_dispatch import TorchDispatchMode

from lightarch import SparseMoeConfig
from lightarch import SparseMoeForCausalLM
from lightarch.layers import Attention, RotaryEmbedding, apply_rotary_pos_emb
from lightarch.long_context import BlockAttentionMask, block_attention, sink_attention


def naive_attention(query, key, value, key_padding_mask, window, scaling, groups):
    """Reference: the full (L x P+L) score matrix with transformers' causal / sliding-window mask semantics."""
    batch, _, length, _ = query.shape
    keys = key.shape[-2]
    past = keys - length
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    query_index = torch.arange(length)[:, None] + past
    key_index = torch.arange(keys)[None]
    visible = key_index <= query_index
    if window is not None:
        visible &= query_index - key_index < window
    visible = visible[None].expand(batch, -1, -1).clone()
    if key_padding_mask is not None:
        visible &= key_padding_mask[:, -keys:][:, None, :].bool()
    scores = (query @ key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return (torch.nan_to_num(torch.softmax(scores, -1)) @ value).transpose(1, 2)


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize(
    "length, past, window, block, padding",
    [
        (37, 0, 8, 8, 3),  # length not a multiple of the block, left padding
        (37, 5, 8, 16, 0),  # cached keys before the queries
        (1, 7, 8, 8, 2),  # one decoding step
        (40, 0, 5, 64, 5),  # block larger than the sequence
        (13, 0, 20, 4, 2),  # window larger than the sequence
        (50, 0, None, 16, 4),  # full attention in blocks (chunked prefill), padding
        (23, 9, None, 8, 0),  # full attention after a cached past
    ],
)
def test_block_attention_equals_naive_reference(use_sdpa, length, past, window, block, padding):
    query = torch.randn(2, 4, length, 16)
    key, value = torch.randn(2, 2, past + length, 16), torch.randn(2, 2, past + length, 16)
    key_padding_mask = torch.ones(2, past + length + 3, dtype=torch.long)
    key_padding_mask[0, : 3 + padding] = 0
    key_padding_mask = key_padding_mask if padding else None
    module = types.SimpleNamespace(num_key_value_groups=2)
    output = block_attention(module, query, key, value, BlockAttentionMask(key_padding_mask, window, block), 0.25,
                             use_sdpa)
    reference = naive_attention(query, key, value, key_padding_mask, window, 0.25, 2)
    real_queries = torch.ones(2, length, dtype=torch.bool) if key_padding_mask is None else key_padding_mask[:, -length:].bool()
    torch.testing.assert_close(output[real_queries], reference[real_queries], atol=2e-6, rtol=1e-5)


def test_block_attention_gradients_equal_the_reference():
    query = torch.randn(1, 2, 20, 8, requires_grad=True)
    key = torch.randn(1, 2, 20, 8, requires_grad=True)
    value = torch.randn(1, 2, 20, 8, requires_grad=True)
    weights = torch.randn(1, 20, 2, 8)
    module = types.SimpleNamespace(num_key_value_groups=1)
    grads = []
    for compute in (
        lambda: block_attention(module, query, key, value, BlockAttentionMask(None, 6, 4), 0.3, True),
        lambda: naive_attention(query, key, value, None, 6, 0.3, 1),
    ):
        grads.append(torch.autograd.grad((compute() * weights).sum(), [query, key, value]))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_windowed_model_equals_mask_only_model(attn_implementation):
    """Same weights: lightarch's windowed compute and transformers-style mask-only sliding give the same logits."""
    windowed = SparseMoeForCausalLM(tiny_sparse_moe_config()).eval()
    masked = SparseMoeForCausalLM(tiny_sparse_moe_config(sliding_window_implementation="mask")).eval()
    masked.load_state_dict(windowed.state_dict())
    for model in (windowed, masked):
        model.set_attn_implementation(attn_implementation)
    input_ids = torch.randint(3, 97, (2, 19))
    attention_mask = torch.ones(2, 19, dtype=torch.long)
    attention_mask[0, :4] = 0
    with torch.no_grad():
        got = windowed(input_ids, attention_mask=attention_mask).logits
        expected = masked(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)


def _hybrid(**overrides):
    return tiny_sparse_moe_config(router_mode="top_p", **overrides)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_chunked_prefill_equals_one_shot(attn_implementation):
    one_shot = SparseMoeForCausalLM(_hybrid()).eval()
    chunked = SparseMoeForCausalLM(_hybrid(prefill_chunk_size=5)).eval()
    chunked.load_state_dict(one_shot.state_dict())
    for model in (one_shot, chunked):
        model.set_attn_implementation(attn_implementation)
    input_ids = torch.randint(3, 97, (2, 23))
    attention_mask = torch.ones(2, 23, dtype=torch.long)
    attention_mask[0, :6] = 0
    with torch.no_grad():
        expected = one_shot(input_ids, attention_mask=attention_mask, use_cache=True)
        got = chunked(input_ids, attention_mask=attention_mask, use_cache=True)
    real = attention_mask.bool()
    torch.testing.assert_close(got.logits[real], expected.logits[real], atol=1e-5, rtol=1e-4)
    for chunked_layer, one_shot_layer in zip(got.cache.layers, expected.cache.layers):
        torch.testing.assert_close(chunked_layer.keys, one_shot_layer.keys, atol=1e-5, rtol=1e-4)

    generated = chunked.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    reference = one_shot.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, reference)
    # transformers' own generate option chunks the same way
    via_generate = one_shot.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                                     prefill_chunk_size=7)
    assert torch.equal(via_generate, reference)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces: a deterministic stand-in for peak attention memory."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return output


def _largest_tensor_during_prefill(length: int, **overrides) -> int:
    config = tiny_sparse_moe_config(layer_types=["sliding_attention"] * 3, max_position_embeddings=4096,
                                    num_attention_heads=2, num_key_value_heads=1, **overrides)
    model = SparseMoeForCausalLM(config).eval()
    input_ids = torch.randint(3, 97, (1, length))
    with torch.no_grad(), LargestTensor() as recorder:
        model(input_ids, use_cache=True, logits_to_keep=1)
    return recorder.largest


def test_windowed_chunked_prefill_memory_does_not_grow_with_the_prompt():
    """All-sliding model, chunked prefill keeping one position: no tensor grows with n (embeddings, hidden states and
    router records are per chunk); the mask-only path materialises n x n scores."""
    n = 1024
    mask_only = _largest_tensor_during_prefill(n, sliding_window_implementation="mask")
    assert mask_only >= n * n
    windowed = _largest_tensor_during_prefill(n, prefill_chunk_size=128)
    assert windowed < n * 32  # below one n x hidden tensor (hidden_size=32)
    assert _largest_tensor_during_prefill(4 * n, prefill_chunk_size=128) == windowed


def test_chunked_prefill_keeping_the_last_positions_equals_one_shot():
    config = _hybrid(prefill_chunk_size=5)
    chunked = SparseMoeForCausalLM(config).eval()
    one_shot = SparseMoeForCausalLM(_hybrid()).eval()
    one_shot.load_state_dict(chunked.state_dict())
    input_ids = torch.randint(3, 97, (2, 23))
    with torch.no_grad():
        expected = one_shot(input_ids, use_cache=True).logits
        for keep in (1, 3, 7):  # inside the last chunk, and across chunks
            got = chunked(input_ids, use_cache=True, logits_to_keep=keep)
            assert got.logits.shape == (2, keep, config.vocab_size)
            torch.testing.assert_close(got.logits, expected[:, -keep:], atol=1e-5, rtol=1e-4)
            assert got.router_logits is None and got.aux_loss is None  # router records are not kept
        hidden = chunked.model(input_ids, use_cache=True, positions_to_keep=4).last_hidden_state
        assert hidden.shape == (2, 4, config.hidden_size)
        # asking for the router keeps its records for every chunk
        recorded = chunked(input_ids, use_cache=True, logits_to_keep=1, output_router_logits=True)
        assert recorded.experts_per_token is not None


def test_sink_attention_equals_streamingllm_reference():
    """StreamingLLM numbering: each query sees its window at true distances and the sinks as if adjacent."""
    sinks, window, length, dim = 2, 4, 15, 8
    config = types.SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, head_dim=dim,
                                   hidden_size=dim, num_attention_heads=1, max_position_embeddings=64)
    rotary = RotaryEmbedding(config)
    raw_query, raw_key, value = torch.randn(1, 1, length, dim), torch.randn(1, 1, length, dim), torch.randn(1, 1, length, dim)

    def rotate(states, positions):
        cos, sin = rotary(states, positions[None])
        return apply_rotary_pos_emb(states, states, cos, sin)[0]

    positions = torch.arange(length)
    query, key = rotate(raw_query, positions), rotate(raw_key, positions)
    module = types.SimpleNamespace(num_key_value_groups=1)
    mask = BlockAttentionMask(None, window, 4, sinks, rotary)
    output = sink_attention(module, query, key, value, key[:, :, :sinks], value[:, :, :sinks], 0, mask, 0.5,
                            True, rotate)

    for i in range(length):
        in_window = [j for j in range(max(0, i - window + 1), i + 1)]
        old_sinks = [s for s in range(sinks) if s < i - window + 1]  # sinks that left the window
        cache_size = len(old_sinks) + len(in_window)
        # positions inside the cache: sinks first, then the window, the query last
        cache_positions = torch.arange(cache_size)
        keys = torch.cat([raw_key[0, 0, old_sinks], raw_key[0, 0, in_window]])
        values = torch.cat([value[0, 0, old_sinks], value[0, 0, in_window]])
        rotated_keys = rotate(keys[None, None], cache_positions)[0, 0]
        rotated_query = rotate(raw_query[:, :, i : i + 1], torch.tensor([cache_size - 1]))[0, 0]
        expected = torch.softmax(rotated_query @ rotated_keys.T * 0.5, dim=-1) @ values
        torch.testing.assert_close(output[0, i, 0], expected[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_streaming_with_sinks_keeps_the_cache_size_constant(attn_implementation):
    config = tiny_sparse_moe_config(layer_types=["sliding_attention"] * 3, num_sink_tokens=2, sliding_window=4,
                                    max_position_embeddings=32)
    model = SparseMoeForCausalLM(config).eval()
    model.set_attn_implementation(attn_implementation)
    input_ids = torch.randint(3, 97, (2, 30))
    with torch.no_grad():
        full = model(input_ids).logits
        output = model(input_ids[:, :7], use_cache=True)
        cache, steps = output.cache, [output.logits]
        for t in range(7, 30):
            output = model(input_ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(output.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)

    with torch.no_grad():
        output = model(input_ids[:, :5], use_cache=True)
        cache, token = output.cache, output.logits[:, -1:].argmax(-1)
        sizes = []
        for step in range(70):  # past max_position_embeddings (32)
            output = model(token, cache=cache, use_cache=True)
            token = output.logits[:, -1:].argmax(-1)
            sizes.append([layer.cached_tokens() for layer in cache.layers])
    assert all(size == [2 + 3] * 3 for size in sizes[5:])  # 2 sinks + window - 1
    assert torch.isfinite(output.logits).all()
    generated = model.generate(input_ids[:, :5], max_new_tokens=40, do_sample=False)
    assert generated.shape == (2, 45)


def test_presets_are_valid_and_the_long_one_is_hybrid():
    hybrid = SparseMoeConfig.from_preset("hybrid-long")
    assert hybrid.layer_types.count("sliding_attention") == 5 and hybrid.layer_types.count("full_attention") == 1
    assert hybrid.max_position_embeddings >= 200_000 and hybrid.prefill_chunk_size
    assert SparseMoeConfig.from_preset("streaming", num_hidden_layers=2, layer_types=["sliding_attention"] * 2)
    with pytest.raises(ValueError, match="Unknown preset"):
        SparseMoeConfig.from_preset("huge")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(prefill_chunk_size=0), "prefill_chunk_size"),
        (dict(num_sink_tokens=-1), "num_sink_tokens"),
        (dict(num_sink_tokens=2), "num_sink_tokens"),  # a full-attention layer would grow without bound
        (dict(num_sink_tokens=2, layer_types=["sliding_attention"] * 3, sliding_window_implementation="mask"),
         "num_sink_tokens"),
        (dict(sliding_window_implementation="flash"), "sliding_window_implementation"),
    ],
)
def test_config_rejects_bad_long_context_options(overrides, field):
    with pytest.raises(ValueError, match=re.escape(f"`{field}`")):
        tiny_sparse_moe_config(**overrides)


def test_prompt_over_a_full_attention_limit_names_the_limit_and_the_way_out():
    model = SparseMoeForCausalLM(tiny_sparse_moe_config(max_position_embeddings=24,
                                                         layer_types=["full_attention"] * 3)).eval()
    with pytest.raises(ValueError, match=r"max_position_embeddings is 24.*chunked prefill.*hybrid-long"):
        model.generate(torch.randint(3, 97, (1, 30)), max_new_tokens=2)


def test_sinks_refuse_paged_attention():
    model = SparseMoeForCausalLM(tiny_sparse_moe_config(layer_types=["sliding_attention"] * 3, num_sink_tokens=2))
    model.set_attn_implementation("paged|eager")
    with pytest.raises(ValueError, match="num_sink_tokens=2"):
        model(torch.randint(3, 97, (1, 5)))


def test_no_rope_layer_attends_without_positions():
    """Reference: a NoPE layer's output rebuilt from its projections with plain causal attention, no rotation."""
    config = _hybrid(no_rope_layers=[1, 0, 1])
    config._attn_implementation = "eager"
    attention = Attention(config, layer_idx=1).eval()  # the global layer
    hidden = torch.randn(2, 11, config.hidden_size)
    positions = torch.arange(11)[None]
    with torch.no_grad():
        shape = (2, 11, -1, attention.head_dim)
        query = attention.q_proj(hidden).view(shape).transpose(1, 2)
        key = attention.k_proj(hidden).view(shape).transpose(1, 2)
        value = attention.v_proj(hidden).view(shape).transpose(1, 2)
        reference = naive_attention(query, key, value, None, None, attention.scaling, attention.num_key_value_groups)
        causal = torch.full((11, 11), float("-inf")).triu(1)[None, None]
        output, _ = attention(hidden, RotaryEmbedding(config)(hidden, positions), causal, position_ids=positions)
    torch.testing.assert_close(output, attention.o_proj(reference.reshape(2, 11, -1)), atol=1e-5, rtol=1e-4)


def test_no_rope_layers_keep_chunked_prefill_exact():
    model = SparseMoeForCausalLM(_hybrid(no_rope_layers=[1, 0, 1])).eval()  # global layer without RoPE (iRoPE)
    chunked = SparseMoeForCausalLM(_hybrid(no_rope_layers=[1, 0, 1], prefill_chunk_size=4)).eval()
    chunked.load_state_dict(model.state_dict())
    input_ids = torch.randint(3, 97, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(chunked(input_ids, use_cache=True).logits, model(input_ids).logits,
                                   atol=1e-5, rtol=1e-4)


def test_attention_temperature_tuning_scales_nope_queries_after_floor_scale():
    base = dict(no_rope_layers=[1, 0, 1], attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5)
    tuned = SparseMoeForCausalLM(_hybrid(**base)).eval()
    plain = SparseMoeForCausalLM(_hybrid(**{**base, "attn_temperature_tuning": False})).eval()
    plain.load_state_dict(tuned.state_dict())
    input_ids = torch.randint(3, 97, (1, 12))
    with torch.no_grad():
        tuned_logits, plain_logits = tuned(input_ids).logits, plain(input_ids).logits
    # positions 0..2 have floor((p + 1) / 4) = 0: scale 1, identical; later positions are sharpened
    torch.testing.assert_close(tuned_logits[:, :3], plain_logits[:, :3])
    assert not torch.allclose(tuned_logits[:, 4:], plain_logits[:, 4:])


def test_temperature_tuned_nope_layer_needs_position_ids():
    config = _hybrid(no_rope_layers=[1, 0, 1], attn_temperature_tuning=True, floor_scale=4)
    hidden = torch.randn(1, 5, config.hidden_size)
    cos_sin = RotaryEmbedding(config)(hidden, torch.arange(5)[None])
    with pytest.raises(ValueError, match="Layer 1 is a NoPE layer with attn_temperature_tuning=True.*position_ids"):
        Attention(config, layer_idx=1).project_qkv(hidden, cos_sin)
    Attention(config, layer_idx=0).project_qkv(hidden, cos_sin)  # a rotary layer reads positions from cos / sin


@pytest.mark.parametrize("value", [[1, 0], [1, 2, 0]])
def test_config_rejects_bad_no_rope_layers(value):
    with pytest.raises(ValueError, match="no_rope_layers"):
        _hybrid(no_rope_layers=value)
