"""Conversion between lightarch's SparseMoeForCausalLM and transformers' Mixtral / Qwen3-MoE / Mistral.

Every model is tiny and random, built with a large `initializer_range` so routing is far from uniform: a conversion
that dropped e.g. `norm_topk_prob` or the sliding window would change the logits by much more than the tolerance
(the `*_matters` checks below prove each equality assert can fail).
"""

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.testing_utils import CaptureLogger

import lightarch.interop.conversion
from lightarch import SparseMoeConfig
from lightarch import SparseMoeForCausalLM, from_transformers, to_transformers
from lightarch.interop.conversion import config_to_transformers

ATOL = 1e-5
VOCAB = 101
SEQ = 12
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_mixtral(attn_implementation: str = "sdpa", **overrides) -> MixtralForCausalLM:
    config = MixtralConfig(**{**COMMON, "intermediate_size": 48, "num_local_experts": 4, **overrides})
    return MixtralForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


def tiny_qwen3_moe(attn_implementation: str = "sdpa", **overrides) -> Qwen3MoeForCausalLM:
    values = dict(
        COMMON, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, head_dim=16,
    )
    config = Qwen3MoeConfig(**{**values, **overrides})
    return Qwen3MoeForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


def tiny_mistral(attn_implementation: str = "sdpa", **overrides) -> MistralForCausalLM:
    config = MistralConfig(**{**COMMON, "intermediate_size": 48, "sliding_window": 4, **overrides})
    return MistralForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of SEQ tokens; the second is left-padded by 5."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, SEQ), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :5] = 0
    attention_mask[1, :5] = 0
    return input_ids, attention_mask


@torch.no_grad()
def logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits at real (non-padding) positions only: padded positions' outputs are not meaningful."""
    out = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return out[attention_mask.bool()]


def assert_same_state_dict(expected: dict, actual: dict) -> None:
    assert set(expected) == set(actual)  # same keys (Qwen3-MoE registers `experts` before `gate`: order differs)
    for key in expected:
        assert expected[key].dtype == actual[key].dtype, key
        assert torch.equal(expected[key], actual[key]), key


def check_conversion(source, architecture_class) -> SparseMoeForCausalLM:
    """Converted logits match, the round trip restores the exact state dict and the logits."""
    input_ids, attention_mask = batch()
    expected = logits(source, input_ids, attention_mask)
    converted = from_transformers(source)
    assert isinstance(converted, SparseMoeForCausalLM)
    assert converted.config._attn_implementation == source.config._attn_implementation
    assert (logits(converted, input_ids, attention_mask) - expected).abs().max() <= ATOL

    back = to_transformers(converted)
    assert type(back) is architecture_class
    assert_same_state_dict(source.state_dict(), back.state_dict())
    assert (logits(back, input_ids, attention_mask) - expected).abs().max() <= ATOL
    return converted


def max_diff(model_a, model_b) -> float:
    input_ids, attention_mask = batch()
    return (logits(model_a, input_ids, attention_mask) - logits(model_b, input_ids, attention_mask)).abs().max()


# --- Same function and exact round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_mixtral(attn_implementation):
    source = tiny_mixtral(attn_implementation, router_jitter_noise=0.05)  # jitter acts in training only
    converted = check_conversion(source, MixtralForCausalLM)
    config = converted.config
    assert (config.router_mode, config.norm_topk_prob, config.first_k_dense_layers) == ("top_k", True, 0)
    assert (config.num_experts, config.moe_intermediate_size, config.use_qk_norm) == (4, 48, False)
    assert config.layer_types == ["full_attention"] * 2
    assert config.router_z_loss_coef == 0.0
    assert config.router_aux_loss_coef == source.config.router_aux_loss_coef != SparseMoeConfig().router_aux_loss_coef
    assert config.router_jitter_noise == 0.05 and to_transformers(converted).config.router_jitter_noise == 0.05


def test_mixtral_conversion_is_sensitive_to_routing():
    """The equality above is meaningful: renormalisation off, or another expert count, changes the logits."""
    source = tiny_mixtral()
    assert max_diff(source, from_transformers(source, norm_topk_prob=False)) > 100 * ATOL
    assert max_diff(source, from_transformers(source, num_experts_per_tok=1)) > 100 * ATOL


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe(attn_implementation, norm_topk_prob):
    source = tiny_qwen3_moe(attn_implementation, norm_topk_prob=norm_topk_prob, mlp_only_layers=[0])
    converted = check_conversion(source, Qwen3MoeForCausalLM)
    config = converted.config
    assert (config.use_qk_norm, config.norm_topk_prob, config.first_k_dense_layers) == (True, norm_topk_prob, 1)
    assert (config.head_dim, config.intermediate_size, config.moe_intermediate_size) == (16, 64, 24)
    # the back-converted config keeps the dense layer and the explicit head_dim
    back_config = to_transformers(converted).config
    assert back_config.mlp_only_layers == [0] and back_config.head_dim == 16
    # qk-norm weights are carried over (they are not the all-ones init)
    source.model.layers[1].self_attn.q_norm.weight.data.mul_(3.0)
    assert max_diff(source, converted) > 100 * ATOL


def test_qwen3_moe_sliding_window():
    source = tiny_qwen3_moe(use_sliding_window=True, sliding_window=4)
    converted = check_conversion(source, Qwen3MoeForCausalLM)
    assert converted.config.layer_types == ["sliding_attention"] * 3 and converted.config.sliding_window == 4
    assert to_transformers(converted).config.use_sliding_window is True


def test_qwen3_moe_dense_layers_not_first_are_refused():
    source = tiny_qwen3_moe(decoder_sparse_step=2)  # layers 0 and 2 dense, 1 sparse
    with pytest.raises(ValueError, match="first_k_dense_layers"):
        from_transformers(source)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_mistral_sliding_window(attn_implementation):
    source = tiny_mistral(attn_implementation)  # window 4 < 12 tokens
    converted = check_conversion(source, MistralForCausalLM)
    config = converted.config
    assert config.first_k_dense_layers == config.num_hidden_layers == 2
    assert config.layer_types == ["sliding_attention"] * 2 and config.sliding_window == 4
    # the window matters at this length, so the equality above checks it is honoured
    assert max_diff(source, from_transformers(source, sliding_window=None)) > 100 * ATOL


def test_mistral_full_attention():
    converted = check_conversion(tiny_mistral(sliding_window=None), MistralForCausalLM)
    assert converted.config.layer_types == ["full_attention"] * 2
    assert to_transformers(converted).config.sliding_window is None


def test_dtype_tying_and_implementations_are_kept():
    source = tiny_mixtral("eager", tie_word_embeddings=True).to(torch.bfloat16)
    converted = from_transformers(source)
    assert converted.dtype == torch.bfloat16 and converted.config.dtype == torch.bfloat16
    assert converted.config.tie_word_embeddings
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    assert converted.config._attn_implementation == "eager"
    assert converted.config._experts_implementation == source.config._experts_implementation
    back = to_transformers(converted)
    assert back.lm_head.weight is back.model.embed_tokens.weight and back.dtype == torch.bfloat16
    assert_same_state_dict(source.state_dict(), back.state_dict())


# --- Incremental decoding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_source", [tiny_mixtral, tiny_mistral], ids=["mixtral", "mistral_sliding"])
def test_greedy_generate_matches(make_source):
    source = make_source()
    converted = from_transformers(source)
    input_ids, attention_mask = batch()
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = source.generate(input_ids, **kwargs)
        actual = converted.generate(input_ids, **kwargs)
    assert expected.shape == (2, SEQ + 10)
    assert torch.equal(actual, expected)
    assert len(set(expected[0, SEQ:].tolist())) > 1  # not a degenerate repeat of one token


# --- Config overrides -----------------------------------------------------------------------------------------------


def test_top_p_override_runs_and_cannot_go_back():
    source = tiny_mixtral()
    converted = from_transformers(source, router_mode="top_p", router_top_p=1.0, max_experts_per_token=4)
    assert converted.config.router_mode == "top_p"
    assert_same_state_dict(source.state_dict(), converted.state_dict())  # same weights, other routing
    input_ids, attention_mask = batch()
    out = converted(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    assert torch.isfinite(out.logits).all()
    # top_p=1.0 with up to 4 of 4 experts: every token uses every expert, so it differs from Mixtral's top-2
    assert torch.allclose(out.experts_per_token, torch.full_like(out.experts_per_token, 4.0))
    assert max_diff(source, converted) > 100 * ATOL
    with pytest.raises(ValueError, match="router_mode"):
        to_transformers(converted)


def test_shared_experts_override_initialises_only_new_weights():
    source = tiny_mixtral()
    converted = from_transformers(source, num_shared_experts=1)
    state = converted.state_dict()
    new_keys = sorted(set(state) - set(source.state_dict()))
    assert new_keys and all(".mlp.shared_experts." in key for key in new_keys)
    for key in new_keys:  # drawn by _init_weights: normal(0, initializer_range), not left empty
        assert state[key].std().item() == pytest.approx(COMMON["initializer_range"], rel=0.3), key
    for key, tensor in source.state_dict().items():
        assert torch.equal(state[key], tensor), key
    with pytest.raises(ValueError, match="num_shared_experts"):
        to_transformers(converted)


def test_structural_override_is_refused():
    with pytest.raises(ValueError, match="unexpected keys"):
        from_transformers(tiny_mixtral(), first_k_dense_layers=1)


# --- Refusals and architecture choice -------------------------------------------------------------------------------


def test_unsupported_model_type():
    llama = LlamaForCausalLM(LlamaConfig(**{**COMMON, "intermediate_size": 48}))
    with pytest.raises(ValueError, match="MixtralForCausalLM.*Qwen3MoeForCausalLM.*MistralForCausalLM"):
        from_transformers(llama)


def lightarch_config(**overrides) -> SparseMoeConfig:
    values = dict(COMMON, intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    return SparseMoeConfig(**{**values, **overrides})


@pytest.mark.parametrize(
    "overrides, architecture, feature",
    [
        (dict(router_mode="top_p"), None, "router_mode"),
        (dict(num_shared_experts=1), None, "num_shared_experts"),
        (dict(router_bias_update_rate=1e-3), None, "router_bias_update_rate"),
        (dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4), None, "layer_types"),
        (dict(use_qk_norm=True, layer_types=["sliding_attention", "full_attention"], sliding_window=4), None,
         "layer_types"),
        (dict(first_k_dense_layers=2, layer_types=["sliding_attention"] * 2, sliding_window=4, num_sink_tokens=1),
         "mistral", "num_sink_tokens"),
        (dict(first_k_dense_layers=1), "mixtral", "first_k_dense_layers"),
        (dict(norm_topk_prob=False), "mixtral", "norm_topk_prob"),
        (dict(use_qk_norm=True), "mixtral", "use_qk_norm"),
        (dict(), "mistral", "first_k_dense_layers"),
        (dict(), "qwen3_moe", "use_qk_norm"),
        (dict(), "llama", "supported"),
    ],
)
def test_to_transformers_refuses_what_the_target_cannot_express(overrides, architecture, feature):
    model = SparseMoeForCausalLM(lightarch_config(**overrides))
    with pytest.raises(ValueError, match=feature):
        to_transformers(model, architecture)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(), MixtralForCausalLM),
        (dict(use_qk_norm=True, first_k_dense_layers=1), Qwen3MoeForCausalLM),
        (dict(first_k_dense_layers=2), MistralForCausalLM),
    ],
)
def test_architecture_is_picked_automatically(overrides, expected):
    model = SparseMoeForCausalLM(lightarch_config(**overrides)).eval()
    converted = to_transformers(model)
    assert type(converted) is expected
    assert_same_state_dict(model.state_dict(), converted.state_dict())
    assert max_diff(model, converted) <= ATOL


def test_training_only_settings_are_dropped_with_a_warning():
    model = SparseMoeForCausalLM(lightarch_config(router_z_loss_coef=1e-3)).eval()
    with CaptureLogger(lightarch.interop.conversion.logger) as captured:
        converted = to_transformers(model, "mixtral")
    assert "router_z_loss_coef" in captured.out
    assert max_diff(model, converted) <= ATOL


def test_config_to_transformers_accepts_class_names():
    config = config_to_transformers(lightarch_config(use_qk_norm=True), "Qwen3MoeForCausalLM")
    assert isinstance(config, Qwen3MoeConfig) and config.mlp_only_layers == []
