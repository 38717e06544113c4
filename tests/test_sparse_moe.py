"""SparseMoe: config validation, routing, balancing, cache equivalence, generation, bad input."""

import re

import pytest
import torch
from conftest import tiny_sparse_moe_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from lightarch import SparseMoeConfig
from lightarch import (
    SparseMoeForCausalLM,
    SparseMoeForSequenceClassification,
    SparseMoeModel,
    router_statistics,
)
from lightarch.layers import SparseMoeBlock
from lightarch.training import register_router_bias_hook


def left_padded_batch(vocab_size: int = 97, length: int = 12, pad: int = 3):
    input_ids = torch.randint(3, vocab_size, (2, length))
    attention_mask = torch.ones(2, length, dtype=torch.long)
    input_ids[0, :pad] = 0
    attention_mask[0, :pad] = 0
    return input_ids, attention_mask


# --------------------------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=30, num_attention_heads=4), "num_attention_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(router_top_p=0.0), "router_top_p"),
        (dict(router_top_p=1.5), "router_top_p"),
        (dict(max_experts_per_token=9), "max_experts_per_token"),
        (dict(router_mode="top_q"), "router_mode"),
        (dict(layer_types=["sliding_attention", "global", "sliding_attention"]), "layer_types"),
        (dict(layer_types=["full_attention"] * 2), "layer_types"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(sliding_window=None), "sliding_window"),
        (dict(first_k_dense_layers=4), "first_k_dense_layers"),
        (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef"),
        (dict(router_jitter_noise=1.0), "router_jitter_noise"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
    ],
)
def test_config_rejects_inconsistent_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=re.escape(f"`{field}`")):
        tiny_sparse_moe_config(**overrides)


def test_config_defaults_and_round_trip(tmp_path):
    config = SparseMoeConfig()
    assert config.layer_types == ["full_attention"] * config.num_hidden_layers
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    tiny_sparse_moe_config(router_mode="top_p").save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SparseMoeConfig)
    assert loaded.router_mode == "top_p"
    assert loaded.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]


def test_auto_classes_are_registered():
    config = tiny_sparse_moe_config()
    assert type(AutoModel.from_config(config)) is SparseMoeModel
    assert type(AutoModelForCausalLM.from_config(config)) is SparseMoeForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is SparseMoeForSequenceClassification


def test_plans_name_real_modules():
    """Every tensor-/expert-parallel plan entry matches a module or parameter of a model that has those parts."""
    config = tiny_sparse_moe_config(first_k_dense_layers=1, num_shared_experts=1, use_qk_norm=True)
    model = SparseMoeModel(config)
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    for plan in (config.base_model_tp_plan, config.base_model_ep_plan):
        for pattern in plan:
            regex = re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
            assert any(regex.match(name) for name in names), f"plan entry {pattern} matches nothing"


# --------------------------------------------------------------------------------------------- routing


def _hand_made_block(router_mode: str = "top_p", **overrides) -> SparseMoeBlock:
    """4 experts over a 4-dim hidden state; the router is the identity, so logits equal the input."""
    config = tiny_sparse_moe_config(
        hidden_size=4,
        num_attention_heads=1,
        num_key_value_heads=1,
        router_mode=router_mode,
        router_top_p=0.7,
        max_experts_per_token=3,
        **overrides,
    )
    block = SparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(torch.eye(4))
        block.experts.gate_up_proj.normal_(std=0.5)
        block.experts.down_proj.normal_(std=0.5)
    return block


def test_top_p_takes_one_expert_when_confident_and_the_maximum_when_flat():
    block = _hand_made_block()
    hidden = torch.tensor([[[8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 1.9, -5.0, -5.0]]], requires_grad=True)
    _, weights, experts = block.gate(hidden.reshape(-1, 4))
    used = (experts < 4).sum(dim=-1)
    assert used.tolist() == [1, 3, 2]  # dominant: 1; flat: capped at max_experts_per_token=3; two close: 2
    assert experts[0, 0].item() == 0
    assert torch.allclose(weights.sum(dim=-1), torch.ones(3))
    assert (weights[experts == 4] == 0).all()

    block(hidden).sum().backward()
    assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0
    assert hidden.grad.abs().sum() > 0


def test_top_p_matches_a_naive_per_token_reference():
    """The compacted (token, expert) pair computation equals a loop over tokens and their chosen experts."""
    block = _hand_made_block()
    hidden = torch.randn(1, 6, 4) * 2
    output = block(hidden)
    _, weights, experts = block.gate(hidden.reshape(-1, 4))
    reference = torch.zeros(6, 4)
    for token in range(6):
        for slot in range(experts.shape[1]):
            expert = experts[token, slot].item()
            if expert == 4:
                continue
            gate, up = (block.experts.gate_up_proj[expert] @ hidden[0, token]).chunk(2)
            reference[token] += weights[token, slot] * (block.experts.down_proj[expert] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(output[0], reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router_mode", ["top_k", "top_p"])
def test_grouped_mm_matches_eager(router_mode):
    config = tiny_sparse_moe_config(router_mode=router_mode, num_shared_experts=1)
    model = SparseMoeForCausalLM(config).eval()
    input_ids, attention_mask = left_padded_batch()
    eager = model(input_ids, attention_mask=attention_mask).logits
    model.set_experts_implementation("grouped_mm")
    grouped = model(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(grouped, eager, atol=1e-5, rtol=1e-5)


def test_outputs_report_experts_per_token_per_layer_and_loss_includes_aux_terms():
    config = tiny_sparse_moe_config(router_mode="top_p", router_top_p=0.9, first_k_dense_layers=1,
                                    router_z_loss_coef=0.01)
    model = SparseMoeForCausalLM(config)
    input_ids, attention_mask = left_padded_batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    output = model(input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    assert output.experts_per_token.shape == (2,)  # two MoE layers after one dense layer
    assert ((output.experts_per_token >= 1) & (output.experts_per_token <= 3)).all()
    assert len(output.router_logits) == 2 and output.router_logits[0].shape == (24, 4)
    expected_aux = 0.01 * output.load_balancing_loss + 0.01 * output.router_z_loss
    torch.testing.assert_close(output.aux_loss, expected_aux)
    lm_loss = model.loss_function(logits=output.logits, labels=labels, vocab_size=config.vocab_size)
    torch.testing.assert_close(output.loss, lm_loss + output.aux_loss)

    # Gradient accumulation: two halves with the step's token count add up to the full batch, auxiliary loss too.
    num_items = int((labels[:, 1:] != -100).sum())
    halves = [model(input_ids[i : i + 1], attention_mask=attention_mask[i : i + 1], labels=labels[i : i + 1],
                    num_items_in_batch=num_items) for i in (0, 1)]
    whole = model(input_ids, attention_mask=attention_mask, labels=labels)
    per_row_aux = torch.stack([h.aux_loss for h in halves])
    row_share = torch.tensor([int((labels[i, 1:] != -100).sum()) / num_items for i in (0, 1)])
    torch.testing.assert_close(halves[0].loss + halves[1].loss,
                               whole.loss - whole.aux_loss + (per_row_aux * row_share).sum())

    top_k = SparseMoeForCausalLM(tiny_sparse_moe_config(num_experts_per_tok=3))
    assert top_k(input_ids, attention_mask=attention_mask).experts_per_token.tolist() == [3.0, 3.0, 3.0]


def test_router_statistics_ignore_padding():
    """Masked statistics equal the statistics of the unpadded tokens alone (transformers issue #28093)."""
    num_experts = 4
    logits = tuple(torch.randn(2 * 5, num_experts) for _ in range(2))
    indices = tuple(torch.topk(layer, 2, dim=-1).indices for layer in logits)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    keep = mask.reshape(-1).bool()
    masked = router_statistics(logits, indices, num_experts, mask)
    reference = router_statistics(tuple(x[keep] for x in logits), tuple(x[keep] for x in indices), num_experts)
    for key in masked:
        torch.testing.assert_close(masked[key], reference[key])
    # During generation the 2D mask also covers cached tokens: only the last columns belong to this forward.
    with_past = torch.cat([torch.ones(2, 7, dtype=torch.long), mask], dim=1)
    torch.testing.assert_close(router_statistics(logits, indices, num_experts, with_past)["load_balancing_loss"],
                               reference["load_balancing_loss"])
    # Per layer, not concatenated (transformers issue #28255): one balanced layer and one collapsed layer.
    balanced = torch.eye(num_experts).repeat(2, 1) * 10
    collapsed = torch.zeros(8, num_experts)
    collapsed[:, 0] = 10
    stats = router_statistics((balanced, collapsed), (balanced.topk(1).indices, collapsed.topk(1).indices), num_experts)
    per_layer = [router_statistics((x,), (x.topk(1).indices,), num_experts)["load_balancing_loss"] for x in (balanced, collapsed)]
    torch.testing.assert_close(stats["load_balancing_loss"], torch.stack(per_layer).mean())
    assert per_layer[1] > 3.5 * per_layer[0]


def _expert_load_spread(block: SparseMoeBlock, hidden: torch.Tensor) -> float:
    with torch.no_grad():
        _, _, experts = block.gate(hidden.reshape(-1, hidden.shape[-1]))
    load = torch.bincount(experts.flatten(), minlength=block.num_experts + 1)[: block.num_experts].float()
    load = load / load.sum()
    return (load.max() - load.min()).item()


def _train_block_on_skewed_data(bias_update_rate: float) -> float:
    """Top-1 routing where a shared input direction sends most tokens to expert 0; no auxiliary loss."""
    torch.manual_seed(0)
    config = tiny_sparse_moe_config(hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                                    num_experts_per_tok=1, router_bias_update_rate=bias_update_rate,
                                    router_aux_loss_coef=0.0)
    block = SparseMoeBlock(config).train()
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(std=0.2)
        block.experts.down_proj.normal_(std=0.2)
        direction = torch.nn.functional.normalize(torch.randn(16), dim=0)
        block.gate.weight.normal_(std=0.3)
        block.gate.weight[0] += 3 * direction
    target_map = torch.randn(16, 16) * 0.3
    optimizer = torch.optim.Adam(block.parameters(), lr=1e-3)
    register_router_bias_hook(optimizer, block)
    generator = torch.Generator().manual_seed(1)
    for _ in range(60):
        hidden = torch.randn(4, 32, 16, generator=generator) + direction
        loss = (block(hidden) - hidden @ target_map).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # the registered post-step hook applies the bias update
    held_out = torch.randn(8, 32, 16, generator=generator) + direction
    return _expert_load_spread(block, held_out)


def test_auxiliary_loss_free_balancing_evens_out_expert_load():
    without = _train_block_on_skewed_data(0.0)
    with_bias = _train_block_on_skewed_data(0.01)
    assert without > 0.5, f"the data should be skewed without balancing (spread {without:.2f})"
    assert with_bias < 0.5 * without, f"balanced spread {with_bias:.2f} vs unbalanced {without:.2f}"


# --------------------------------------------------------------------------------------------- cache and generation


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("router_mode", ["top_k", "top_p"])
def test_incremental_decoding_matches_full_forward(attn_implementation, router_mode):
    """Left-padded batch, window 4 shorter than the 12-token prompt: sliding and full layers, token by token."""
    config = tiny_sparse_moe_config(router_mode=router_mode)
    model = SparseMoeForCausalLM(config).eval()
    model.set_attn_implementation(attn_implementation)
    input_ids, attention_mask = left_padded_batch(length=12)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        prefix = 5
        out = model(input_ids[:, :prefix], attention_mask=attention_mask[:, :prefix],
                    position_ids=position_ids[:, :prefix], use_cache=True)
        cache = out.cache
        steps = [out.logits]
        for t in range(prefix, 12):
            out = model(input_ids[:, t : t + 1], attention_mask=attention_mask[:, : t + 1],
                        position_ids=position_ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    incremental = torch.cat(steps, dim=1)
    real = attention_mask.bool()
    torch.testing.assert_close(incremental[real], full[real], atol=1e-5, rtol=1e-4)
    # Sliding layers keep only the window in the cache; the full layer keeps everything.
    assert cache.layers[0].keys.shape[-2] <= config.sliding_window
    assert cache.layers[1].keys.shape[-2] == 12


def test_generate_greedy_sampling_and_beam_search():
    model = SparseMoeForCausalLM(tiny_sparse_moe_config(router_mode="top_p")).eval()
    input_ids, attention_mask = left_padded_batch(length=6, pad=2)
    greedy = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    no_cache = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                              use_cache=False)
    assert greedy.shape == (2, 14)
    assert torch.equal(greedy, no_cache)
    sampled = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=True, top_k=20)
    assert sampled.shape == (2, 14)
    beams = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, num_beams=3,
                           do_sample=False)
    assert beams.shape[0] == 2 and beams.shape[1] <= 14


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_sparse_moe_config(router_mode="top_p")
    input_ids, attention_mask = left_padded_batch()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SparseMoeForCausalLM(config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_sequence_classification_uses_the_last_real_token():
    config = tiny_sparse_moe_config(num_labels=3)
    model = SparseMoeForSequenceClassification(config).eval()
    input_ids = torch.randint(3, 97, (2, 7))
    input_ids[1, 5:] = 0  # right padding
    output = model(input_ids, labels=torch.tensor([0, 2]))
    assert output.logits.shape == (2, 3) and output.loss.requires_grad
    alone = model(input_ids[1:, :5]).logits
    torch.testing.assert_close(output.logits[1:], alone, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    model = SparseMoeForCausalLM(tiny_sparse_moe_config(max_position_embeddings=16)).eval()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[5, 97]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[5, -1]]))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\)"):
        model(torch.tensor([[5, 6]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings is 16"):
        model(torch.randint(3, 97, (1, 17)))
    with pytest.raises(ValueError, match="max_position_embeddings is 16"):
        model.generate(torch.randint(3, 97, (1, 12)), max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "paged|eager"])
def test_continuous_batching_matches_generate(attn_implementation):
    """transformers' continuous batching (paged cache) gives the tokens of plain greedy `generate`."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = SparseMoeForCausalLM(tiny_sparse_moe_config(router_mode="top_p")).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]  # the first is longer than the sliding window
    expected = [model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist()
                for p in prompts]
    if attn_implementation != "sdpa":
        model.set_attn_implementation(attn_implementation)
    outputs = model.generate_batch(
        prompts,
        generation_config=GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0),
        continuous_batching_config=ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64),
    )
    assert [outputs[f"req_{i}"].generated_tokens for i in range(2)] == expected
