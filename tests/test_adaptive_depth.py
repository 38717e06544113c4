"""AdaptiveDepth: config validation, exits and estimator, policies, cached vs uncached decoding, self-speculative
decoding, sequence classification, saving and remote code, the task suite, the training recipe and the
benchmark (both scripts also end to end, as subprocesses)."""

import json
import re
import shutil

import pytest
import torch
from conftest import PNG_MAGIC, run_script, run_without_lightarch, tiny_sparse_moe_config
from transformers import AutoConfig, DynamicCache, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from lightarch import AdaptiveDepthConfig, SparseMoeConfig
from lightarch import (
    AdaptiveDepthForCausalLM,
    AdaptiveDepthForSequenceClassification,
    AdaptiveDepthModel,
    SparseMoeForCausalLM,
)
from lightarch.modeling_adaptive_depth import earliest_sufficient_exit, route_from_estimate, softmax_margin


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny_config(**overrides) -> AdaptiveDepthConfig:
    """4 layers (sliding, full, sliding, full), MoE from layer 1, exits after 1, 2 and 4 layers."""
    values = tiny_sparse_moe_config().to_dict()
    values = {k: values[k] for k in SparseMoeConfig.__dataclass_fields__ if k in values}
    values.update(num_hidden_layers=4, first_k_dense_layers=1,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                  exit_layers=[1, 2, 4], estimator_input_layer=1)
    values.update(overrides)
    return AdaptiveDepthConfig(**values)


def confident_model(**overrides) -> AdaptiveDepthForCausalLM:
    """A random model whose LM head is scaled up, so softmax margins spread over (0, 1) and exits really differ."""
    model = AdaptiveDepthForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def median_margin(model, input_ids) -> float:
    """A threshold that makes about half the tokens leave at the first exit."""
    with torch.no_grad():
        out = model(input_ids, output_exit_logits=True)
    return softmax_margin(out.exit_logits[0]).median().item()


def margin_quantile(model, input_ids, attention_mask, quantile: float) -> float:
    """A threshold that lets about `quantile` of the real tokens leave at the first exit."""
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, output_exit_logits=True)
    return softmax_margin(out.exit_logits[0])[attention_mask.bool()].quantile(quantile).item()


def left_padded(length: int = 10, pad: int = 3):
    input_ids = torch.randint(3, 97, (2, length))
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :pad] = 0
    attention_mask[0, :pad] = 0
    return input_ids, attention_mask


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(exit_layers=[]), "exit_layers"),
        (dict(exit_layers=[2, 1, 4]), "exit_layers"),
        (dict(exit_layers=[1, 1, 4]), "exit_layers"),
        (dict(exit_layers=[1, 2, 5]), "exit_layers"),
        (dict(exit_layers=[0, 4]), "exit_layers"),
        (dict(exit_layers=[1, 2]), "exit_layers"),
        (dict(exit_loss_weights=[1.0, 1.0]), "exit_loss_weights"),
        (dict(exit_loss_weights=[1.0, -1.0, 1.0]), "exit_loss_weights"),
        (dict(estimator_threshold=-0.1), "estimator_threshold"),
        (dict(estimator_threshold=1.5), "estimator_threshold"),
        (dict(confidence_threshold=1.01), "confidence_threshold"),
        (dict(exit_policy="shallow"), "exit_policy"),
        (dict(estimator_input_layer=2), "estimator_input_layer"),
        (dict(estimator_target="accuracy"), "estimator_target"),
        (dict(estimator_hidden_size=0), "estimator_hidden_size"),
        (dict(prefill_chunk_size=8), "prefill_chunk_size"),
    ],
)
def test_config_rejects_invalid_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=re.escape(f"`{field}`")):
        tiny_config(**overrides)


def test_config_defaults_round_trip_and_auto_classes(tmp_path):
    config = AdaptiveDepthConfig(num_hidden_layers=8)
    assert config.exit_layers == [2, 4, 6, 8] and config.exit_loss_weights == [1.0] * 4
    assert AdaptiveDepthConfig(num_hidden_layers=3).exit_layers == [1, 2, 3]
    tiny_config(exit_policy="confidence", confidence_threshold=0.7).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, AdaptiveDepthConfig) and loaded.model_type == "lightarch_adaptive"
    assert loaded.exit_layers == [1, 2, 4] and loaded.exit_policy == "confidence" and loaded.confidence_threshold == 0.7
    config = tiny_config()
    assert type(AutoModel.from_config(config)) is AdaptiveDepthModel
    assert type(AutoModelForCausalLM.from_config(config)) is AdaptiveDepthForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is AdaptiveDepthForSequenceClassification


# --------------------------------------------------------------------------------------------- exits and estimator


def test_exit_and_estimator_shapes_and_gradients():
    model = AdaptiveDepthForCausalLM(tiny_config())
    input_ids, attention_mask = left_padded()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert len(out.exit_logits) == 3 and all(l.shape == (2, 10, 97) for l in out.exit_logits)
    assert out.estimator_logits.shape == (2, 3) and out.estimator_targets.shape == (2,)
    assert out.exit_losses.shape == (3,) and out.aux_loss is not None
    expected = out.exit_losses.mean() + model.config.estimator_loss_weight * out.estimator_loss + out.aux_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for name, parameter in model.named_parameters():
        if ".mlp.experts." in name or ".mlp.gate." in name:
            continue  # experts that no token picked get no gradient
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_estimator_loss_trains_the_backbone_only_without_detach():
    input_ids = torch.randint(3, 97, (2, 8))
    for detach in (True, False):
        model = AdaptiveDepthForCausalLM(tiny_config(estimator_detach_features=detach))
        out = model(input_ids, labels=input_ids)
        out.estimator_loss.backward()
        assert model.model.estimator.out.weight.grad.abs().sum() > 0
        embedding_grad = model.model.embed_tokens.weight.grad
        assert (embedding_grad is None or embedding_grad.abs().sum() == 0) == detach


def test_estimator_targets_earliest_right_exit_or_within_loss_tolerance():
    correct = torch.tensor([[False, True, True], [False, False, False], [True, False, True]])
    losses = torch.tensor([[3.0, 1.05, 1.0], [2.0, 1.5, 1.0], [0.5, 0.9, 0.45]])
    assert earliest_sufficient_exit(correct, losses, "correct", 0.1).tolist() == [1, 2, 0]
    assert earliest_sufficient_exit(correct, losses, "loss", 0.1).tolist() == [1, 2, 0]
    assert earliest_sufficient_exit(correct, losses, "loss", 0.0).tolist() == [2, 2, 2]


def test_routing_rule_and_margin():
    logits = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [-5.0, -5.0, 5.0]])
    assert route_from_estimate(logits, 0.0).tolist() == [0, 0, 0]
    assert route_from_estimate(logits, 1.0).tolist() == [2, 2, 2]
    assert route_from_estimate(logits, 0.5).tolist() == [1, 0, 2]
    assert route_from_estimate(torch.tensor([[100.0, 0.0, 0.0]]), 1.0).tolist() == [2]  # p=1.0 in float32
    torch.testing.assert_close(softmax_margin(torch.tensor([[10.0, 0.0], [0.0, 0.0]])),
                               torch.tensor([1 - 2 * torch.sigmoid(torch.tensor(-10.0)).item(), 0.0]))


def test_full_policy_equals_a_plain_forward_of_the_same_decoder():
    """The deep path is exactly the SparseMoe decoder with the same weights; every layer runs once."""
    model = AdaptiveDepthForCausalLM(tiny_config()).eval()
    values = {k: v for k, v in model.config.to_dict().items() if k in SparseMoeConfig.__dataclass_fields__}
    plain = SparseMoeForCausalLM(SparseMoeConfig(**values)).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".exit_norms." in k or ".estimator." in k for k in unexpected)
    calls = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in
             enumerate(model.model.layers)]
    input_ids, attention_mask = left_padded()
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, exit_policy="full", output_exit_logits=True)
        expected = plain(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=1e-5)
    assert calls == [0, 1, 2, 3] and int(out.layers_computed) == 4 and bool((out.exit_layer == 4).all())
    for hook in hooks:
        hook.remove()


def test_shallow_route_is_a_prefix_of_the_deep_path():
    model = AdaptiveDepthForCausalLM(tiny_config()).eval()
    input_ids = torch.randint(3, 97, (2, 9))
    calls = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        full = model(input_ids, output_exit_logits=True)
        calls.clear()
        for route, depth in enumerate(model.config.exit_layers):
            out = model(input_ids, exit_route=torch.tensor([route, route]))
            torch.testing.assert_close(out.logits, full.exit_logits[route], atol=1e-6, rtol=1e-5)
            assert len(calls) == depth and int(out.layers_computed) == depth and bool((out.exit_layer == depth).all())
            calls.clear()
        mixed = model(input_ids, exit_route=torch.tensor([0, 2]))
    torch.testing.assert_close(mixed.logits[0], full.exit_logits[0][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed.logits[1], full.exit_logits[2][1], atol=1e-6, rtol=1e-5)
    assert mixed.exit_layer[:, 0].tolist() == [1, 4]


@pytest.mark.parametrize("policy", ["estimator", "confidence"])
def test_thresholds_at_the_extremes_give_always_shallow_and_always_deep(policy):
    model = confident_model()
    input_ids, attention_mask = left_padded()
    real = attention_mask.bool()
    with torch.no_grad():
        shallow = model(input_ids, attention_mask=attention_mask, exit_policy=policy, exit_threshold=0.0)
        deep = model(input_ids, attention_mask=attention_mask, exit_policy=policy, exit_threshold=1.0)
    assert bool((shallow.exit_layer[real] == 1).all()) and int(shallow.layers_computed) == 1
    assert bool((deep.exit_layer[real] == 4).all()) and int(deep.layers_computed) == 4
    model.config.exit_policy = policy  # the config's threshold is the default
    for value, depth in ((0.0, 1), (1.0, 4)):
        setattr(model.config, f"{policy}_threshold", value)
        with torch.no_grad():
            assert bool((model(input_ids, attention_mask=attention_mask).exit_layer[real] == depth).all())


def test_confidence_policy_exits_per_token_and_fills_skipped_layers_kv():
    model = confident_model()
    input_ids = torch.randint(3, 97, (1, 12))
    threshold = median_margin(model, input_ids)
    prompt_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    prompt_mask[:, 0] = True  # a one-token prompt: the other tokens decide for themselves
    with torch.no_grad():
        out = model(input_ids, exit_policy="confidence", exit_threshold=threshold, prompt_mask=prompt_mask)
        full = model(input_ids, output_exit_logits=True)
        depths = out.exit_layer[0]
        assert (depths == 1).any() and (depths > 1).any()  # mixed exits
        shallow = depths == 1
        torch.testing.assert_close(out.logits[0, shallow], full.exit_logits[0][0, shallow], atol=1e-5, rtol=1e-5)

        # A decoding step whose token leaves after layer 1: layers 2-4 run only their key/value projections, on the
        # exit hidden state, and cache exactly what their attention would have cached for that state.
        prefill = model(input_ids, exit_policy="confidence", exit_threshold=1.0, use_cache=True)
        captured = []
        hook = model.model.layers[0].register_forward_hook(lambda module, args, output: captured.append(output))
        step = model(input_ids[:, :1], cache=prefill.cache, exit_policy="confidence", exit_threshold=0.0)
        hook.remove()
        assert int(step.layers_computed) == 1 and step.exit_layer.tolist() == [[1]]
        assert [layer.keys.shape[-2] for layer in step.cache.layers] == [3, 13, 3, 13]
        exit_state = captured[0]  # the residual stream after layer 1
        position = torch.tensor([[12]])
        rotary = model.model.rotary_emb(exit_state, position)
        for index in (1, 2, 3):
            layer = model.model.layers[index]
            reference = DynamicCache(config=model.config)
            layer.self_attn(layer.input_layernorm(exit_state), rotary, None, cache=reference)
            torch.testing.assert_close(step.cache.layers[index].keys[:, :, -1:], reference.layers[index].keys)
            torch.testing.assert_close(step.cache.layers[index].values[:, :, -1:], reference.layers[index].values)


def test_filled_kv_equals_the_kv_attention_caches_on_nope_and_rotary_layers():
    """iRoPE + Llama 4 temperature tuning: the keys filled for a skipped NoPE layer are not rotated, a rotary layer's
    are, exactly as each layer's attention caches them for the same hidden states and positions."""
    model = confident_model(no_rope_layers=[1, 0, 1, 0], attn_temperature_tuning=True, floor_scale=2)
    input_ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        prefill = model(input_ids, exit_policy="confidence", exit_threshold=1.0, use_cache=True)
        captured = []
        hook = model.model.layers[0].register_forward_hook(lambda module, args, output: captured.append(output))
        step = model(input_ids[:, :1], cache=prefill.cache, exit_policy="confidence", exit_threshold=0.0)
        hook.remove()
        assert int(step.layers_computed) == 1  # layers 2-4 (NoPE, rotary, NoPE) only filled their key/value
        exit_state, position = captured[0], torch.tensor([[7], [7]])
        rotary = model.model.rotary_emb(exit_state, position)
        for index in (1, 2, 3):
            layer = model.model.layers[index]
            assert layer.self_attn.use_rope == (index == 2)
            reference = DynamicCache(config=model.config)
            layer.self_attn(layer.input_layernorm(exit_state), rotary, None, cache=reference, position_ids=position)
            torch.testing.assert_close(step.cache.layers[index].keys[:, :, -1:], reference.layers[index].keys)
            torch.testing.assert_close(step.cache.layers[index].values[:, :, -1:], reference.layers[index].values)


# --------------------------------------------------------------------------------------------- decoding


def _generate(model, input_ids, attention_mask, **kwargs):
    return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                          return_dict_in_generate=True, pad_token_id=0, eos_token_id=None, **kwargs)


@pytest.mark.parametrize("policy", ["full", "estimator", "confidence"])
def test_cached_decoding_equals_uncached(policy):
    model = confident_model()
    input_ids, attention_mask = left_padded()
    threshold = {"full": None, "estimator": 0.3, "confidence": margin_quantile(model, input_ids, attention_mask, 0.7)
                 }[policy]
    with torch.no_grad():
        cached = _generate(model, input_ids, attention_mask, exit_policy=policy, exit_threshold=threshold,
                           output_logits=True)
        uncached = _generate(model, input_ids, attention_mask, exit_policy=policy, exit_threshold=threshold,
                             use_cache=False, output_logits=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    # the same logits too: without a cache every step reruns the whole sequence, whose tokens must decide as they
    # did when they were new (generate keeps which positions are the prompt in `prompt_mask`)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=1e-4)
    assert torch.equal(cached.exit_layers, uncached.exit_layers)
    assert cached.exit_layers.shape == (2, 6) and cached.layers_computed.shape == (6,)
    if policy == "confidence":  # a token reads, at a deeper layer, the key/value filled for an earlier shallow one
        assert any(later > earlier for row in cached.exit_layers.tolist() for i, earlier in enumerate(row)
                   for later in row[i + 1 :])
    if policy == "estimator":  # the prompt's route holds for every new token
        assert all(len(set(row)) == 1 for row in cached.exit_layers.tolist())


def test_generate_routes_on_the_prompt_like_a_forward_whose_prompt_mask_is_the_prompt():
    """Training and teacher-forced evaluation also see the answer: `prompt_mask` keeps the estimator on the
    question."""
    model = confident_model(exit_policy="estimator")
    with torch.no_grad():
        model.model.estimator.out.weight.mul_(30)  # spread the estimates
        prompts = torch.randint(3, 97, (6, 5))
        first_exit_probability = model(prompts, output_exit_logits=True).estimator_logits.softmax(-1)[:, 0]
        model.config.estimator_threshold = first_exit_probability.median().item()  # about half take the first exit
        out = model.generate(prompts, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             eos_token_id=None)
        prompt_mask = torch.zeros_like(out.sequences, dtype=torch.bool)
        prompt_mask[:, :5] = True
        forced = model(out.sequences, prompt_mask=prompt_mask)
    depths = torch.tensor(model.config.exit_layers)[forced.exit_route]
    assert torch.equal(out.exit_layers[:, 0], depths) and len(set(depths.tolist())) > 1


def test_confidence_incremental_logits_equal_one_forward():
    """Token by token with the cache (exited tokens' key/value filled) gives the whole-sequence forward's logits."""
    model = confident_model()
    input_ids = torch.randint(3, 97, (1, 12))
    threshold = median_margin(model, input_ids)
    prompt_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    prompt_mask[:, :4] = True
    with torch.no_grad():
        whole = model(input_ids, exit_policy="confidence", exit_threshold=threshold, prompt_mask=prompt_mask)
        out = model(input_ids[:, :4], exit_policy="confidence", exit_threshold=threshold, use_cache=True)
        logits, depths, cache = [out.logits], [out.exit_layer], out.cache
        for i in range(4, 12):
            out = model(input_ids[:, i : i + 1], cache=cache, exit_policy="confidence", exit_threshold=threshold)
            logits.append(out.logits)
            depths.append(out.exit_layer)
    torch.testing.assert_close(torch.cat(logits, 1), whole.logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.cat(depths, 1), whole.exit_layer)
    steps = torch.cat(depths, 1)[0, 4:].tolist()
    assert any(later > earlier for i, earlier in enumerate(steps) for later in steps[i + 1 :])  # a filled layer is read


def test_self_speculative_decoding_equals_greedy_and_drafts_with_the_early_exit():
    model = confident_model(layer_types=["full_attention"] * 4, sliding_window=None)
    input_ids = torch.randint(3, 97, (1, 7))
    draft_depths = []
    model.model.register_forward_pre_hook(lambda *a: draft_depths.append(model.config.num_hidden_layers))
    with torch.no_grad():
        greedy = model.generate(input_ids, max_new_tokens=12, do_sample=False, exit_policy="full", pad_token_id=0)
        draft_depths.clear()
        speculative = model.generate(input_ids, max_new_tokens=12, do_sample=False, assistant_early_exit=2,
                                     pad_token_id=0)
    assert torch.equal(speculative, greedy)
    assert 2 in draft_depths and 4 in draft_depths  # drafts at exit 2, verifies at full depth
    assert model.config.num_hidden_layers == 4
    with pytest.raises(ValueError, match="assistant_early_exit=3"):
        model.generate(input_ids, max_new_tokens=2, do_sample=False, assistant_early_exit=3)


def test_generate_reports_exits_and_rejects_bad_policies():
    model = confident_model()
    input_ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=3, do_sample=False, exit_policy="estimator",
                             exit_threshold=0.0, return_dict_in_generate=True, eos_token_id=None)
    assert out.exit_layers.tolist() == [[1, 1, 1]] and out.layers_computed.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="exit_policy"):
        model(input_ids, exit_policy="deepest")
    with pytest.raises(ValueError, match="exit_threshold"):
        model(input_ids, exit_policy="confidence", exit_threshold=2.0)
    model.config.num_hidden_layers = 3  # what an assistant_early_exit that is not an exit would do
    with pytest.raises(ValueError, match="exits are at depths"):
        model(input_ids)


def test_beam_search_and_sampling_run_under_the_estimator():
    model = confident_model(exit_policy="estimator", estimator_threshold=0.5)
    input_ids = torch.randint(3, 97, (2, 6))
    with torch.no_grad():
        assert model.generate(input_ids, max_new_tokens=3, num_beams=2, do_sample=False).shape == (2, 9)
        assert model.generate(input_ids, max_new_tokens=3, do_sample=True, top_k=5).shape == (2, 9)


# --------------------------------------------------------------------------------------------- classification


def test_sequence_classification_exits_estimator_and_policies():
    model = AdaptiveDepthForSequenceClassification(tiny_config(num_labels=3))
    input_ids, attention_mask = left_padded()
    labels = torch.tensor([0, 2])
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (2, 3) and len(out.exit_logits) == 3 and out.estimator_logits.shape == (2, 3)
    out.loss.backward()
    assert model.score.weight.grad.abs().sum() > 0 and model.model.exit_norms[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask, output_exit_logits=True)
        shallow = model(input_ids, attention_mask=attention_mask, exit_policy="estimator", exit_threshold=0.0)
        per_token = model(input_ids, attention_mask=attention_mask, exit_policy="confidence", exit_threshold=0.0)
    torch.testing.assert_close(shallow.logits, full.exit_logits[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(per_token.logits, full.exit_logits[0], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------- saving


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    model = confident_model(exit_policy="estimator", estimator_threshold=0.4)
    folder = tmp_path_factory.mktemp("adaptive")
    model.save_pretrained(folder)
    input_ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        expected = {policy: model(input_ids, exit_policy=policy).logits for policy in ("full", "estimator")}
        expected["generated"] = model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    return folder, model, input_ids, expected


def test_round_trip_through_auto_classes(saved_model):
    folder, model, input_ids, expected = saved_model
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is AdaptiveDepthForCausalLM and loaded.config.exit_policy == "estimator"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected["estimator"])
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_adaptive_depth.AdaptiveDepthForCausalLM"
    for name in ("configuration_adaptive_depth.py", "configuration_sparse_moe.py", "modeling_adaptive_depth.py",
                 "modeling_sparse_moe.py", "layers.py"):
        source = (folder / name).read_text()
        assert not re.search(r"^\s*(from|import) (configuration|modeling|lightarch)\b", source, flags=re.MULTILINE), name
    assert "class SparseMoeConfig" in (folder / "configuration_sparse_moe.py").read_text()


def test_remote_code_loads_in_a_fresh_process_without_lightarch(saved_model, tmp_path):
    folder, _, input_ids, expected = saved_model
    torch.save({"input_ids": input_ids, **expected}, tmp_path / "expected.pt")
    run_without_lightarch(
        f"""
        import torch
        from transformers import AutoConfig, DynamicCache, AutoModelForCausalLM
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        config = AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert config.exit_layers == [1, 2, 4], config.exit_layers
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            for policy in ("full", "estimator"):
                assert torch.equal(model(expected["input_ids"], exit_policy=policy).logits, expected[policy]), policy
            generated = model.generate(expected["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(generated, expected["generated"])
            one = expected["input_ids"][:1]
            speculative = model.generate(one, max_new_tokens=4, do_sample=False, assistant_early_exit=2,
                                         pad_token_id=0)
            assert torch.equal(speculative, model.generate(one, max_new_tokens=4, do_sample=False,
                                                           exit_policy="full", pad_token_id=0))
        print("REMOTE-CODE-OK")
        """,
        tmp_path,
    )


# --------------------------------------------------------------------------------------------- task suite and scripts


def test_task_suite_answers_labels_and_holdout():
    from lightarch.data.arithmetic import PadCollator, all_problems, build_tokenizer, encode, sample_problems

    easy, hard = all_problems("easy"), all_problems("hard")
    assert len({p.prompt for p in easy}) == 300 and len({p.prompt for p in hard}) == 9000
    assert {p.prompt: p.answer for p in hard}["7+2*3="] == "13" and {p.prompt: p.answer for p in easy}["3-8="] == "-5"
    tokenizer = build_tokenizer()
    example = encode(hard[0], tokenizer)
    prompt_length = 1 + len(hard[0].prompt)
    assert example["labels"][:prompt_length] == [-100] * prompt_length
    assert example["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"][1:prompt_length]) == hard[0].prompt
    excluded = {p.prompt for p in hard[:8000]}
    sampled = sample_problems(2000, 0.5, seed=0, exclude=excluded)
    assert not excluded & {p.prompt for p in sampled} and 800 < sum(p.split == "hard" for p in sampled) < 1200
    batch = PadCollator(tokenizer.pad_token_id)([encode(easy[0], tokenizer), example])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["labels"][batch["attention_mask"] == 0].eq(-100).all()


TINY_MODEL = ("hidden_size=16,num_hidden_layers=4,num_attention_heads=2,num_key_value_heads=1,intermediate_size=32,"
              "first_k_dense_layers=4,exit_layers=[1,2,4],exit_loss_weights=[2,1,1],estimator_hidden_size=8")
TINY_SIZES = dict(train_examples=64, heldout_hard=24, calibration_hard=12, calibration_easy=12)
TINY_SCHEDULE = dict(estimator_steps=2, estimator_batch_size=16, calibration_threshold_steps=3)
TINY_TRAINING = dict(max_steps=3, per_device_train_batch_size=16, logging_steps=1, warmup_steps=0, disable_tqdm=True)
TINY_TRAIN = ["--config_overrides", TINY_MODEL, "--num_threads", "1"] + [
    f"--{name}={value}" for name, value in {**TINY_SIZES, **TINY_SCHEDULE, **TINY_TRAINING}.items()]


def tiny_run(output_dir, training: dict | None = None, schedule: dict | None = None):
    """The library call the script makes, on the tiny model."""
    from transformers import TrainingArguments

    from lightarch.data.arithmetic import SuiteSizes
    from lightarch.training.adaptive_depth import AdaptiveSchedule, train_adaptive
    from lightarch.training.cli import config_from_preset

    config = config_from_preset(AdaptiveDepthConfig, "arithmetic", TINY_MODEL)
    args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none", save_strategy="no",
                             seed=42, **{**TINY_TRAINING, **(training or {})})
    schedule = AdaptiveSchedule(**{**TINY_SCHEDULE, **(schedule or {})})
    return train_adaptive(config, args, SuiteSizes(**TINY_SIZES), schedule)


def test_arithmetic_preset_is_the_training_default_and_fits_the_tokenizer():
    from lightarch.configuration.configuration_adaptive_depth import ADAPTIVE_DEPTH_PRESETS
    from lightarch.data.arithmetic import build_tokenizer

    assert AdaptiveDepthConfig.presets() is ADAPTIVE_DEPTH_PRESETS and "tiny" not in AdaptiveDepthConfig.presets()
    config = AdaptiveDepthConfig.from_preset("arithmetic")
    tokenizer = build_tokenizer()
    assert config.vocab_size == len(tokenizer) == 17
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    # the model scripts/train_adaptive.py trained before presets existed (its re-declared defaults)
    assert config.exit_layers == [2, 4, 6, 8] and config.exit_loss_weights == [2.0, 1.0, 1.0, 1.0]
    assert config.first_k_dense_layers == config.num_hidden_layers == 8 and config.estimator_loss_weight == 0.1
    assert sum(p.numel() for p in AdaptiveDepthForCausalLM(config).parameters()) == 1_207_748
    config.exit_layers.append(9)  # a config never shares the preset's lists
    assert AdaptiveDepthConfig.from_preset("arithmetic").exit_layers == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="Unknown preset 'tiny'"):
        AdaptiveDepthConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """scripts/train_adaptive.py end to end on the tiny model (seconds)."""
    folder = tmp_path_factory.mktemp("train_adaptive") / "run"
    result = run_script("train_adaptive", *TINY_TRAIN, "--output_dir", str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, json.loads((folder / "results.json").read_text())


def test_train_script_writes_a_calibrated_model(trained_folder):
    folder, results = trained_folder
    for name in ("model.safetensors", "config.json", "README.md", "results.json", "heldout.json", "training.png",
                 "tokenizer.json", "modeling_adaptive_depth.py", "configuration_adaptive_depth.py"):
        assert (folder / name).is_file(), name
    assert (folder / "training.png").read_bytes().startswith(PNG_MAGIC)
    assert "${" not in (folder / "README.md").read_text()
    assert results["phase1_steps"] == 3 and results["phase2_steps"] == 2
    assert {"loss_exit_1", "loss_exit_4", "estimator_loss"} <= set(results["history"][0])
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.exit_policy == "estimator" and model.config.exit_layers == [1, 2, 4]
    assert model.config.estimator_threshold == results["thresholds"]["estimator"]
    heldout = json.loads((folder / "heldout.json").read_text())
    assert len(heldout["test"]["hard"]) == 12 and not set(heldout["test"]["hard"]) & set(heldout["calibration"]["hard"])


def test_phase_two_trains_only_the_estimator(tmp_path):
    """With one phase-1 step at learning rate 0, phase 2 must leave every backbone weight untouched."""
    folder = tmp_path / "frozen"
    tiny_run(folder, training=dict(max_steps=1, learning_rate=0.0), schedule=dict(estimator_learning_rate=0.05))
    trained = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(42)  # the recipe's seed: the same initial weights
    initial = AdaptiveDepthForCausalLM(trained.config)
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, initial.state_dict()[k])}
    assert changed and all(k.startswith("model.estimator.") for k in changed), changed


def test_a_failing_model_card_never_loses_the_trained_model(tmp_path, monkeypatch, caplog):
    import lightarch.training.adaptive_depth as recipe

    def broken_plot(*args, **kwargs):
        raise RuntimeError("the plot broke")

    monkeypatch.setattr(recipe, "plot_training", broken_plot)
    folder = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the plot broke"):
        tiny_run(folder, schedule=dict(estimator_steps=0))
    assert str(folder) in caplog.text and "saved, complete" in caplog.text
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.exit_policy == "estimator"
    assert json.loads((folder / "results.json").read_text())["thresholds"]["estimator"] == \
        model.config.estimator_threshold
    assert (folder / "heldout.json").is_file() and not (folder / "training.png").exists()


def test_bench_script_writes_results_table_and_curves(trained_folder, tmp_path):
    folder, _ = trained_folder
    second_seed = tmp_path / "second_seed"  # a second run (the same model here: the seeds' figures must be equal)
    shutil.copytree(folder, second_seed)
    result = run_script("bench_adaptive", "--model_dir", str(folder), str(second_seed), "--output_dir",
                        str(tmp_path / "bench"), "--threshold_steps", "3", "--timing_examples", "2",
                        "--timing_rounds", "1", "--disable_tqdm", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| easy | estimator |" in result.stdout and "| figure | mean | min | max | std | worst seed |" in result.stdout
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert len(results["runs"]) == 2
    saved = results["summary"]["estimator: easy layers saved"]
    assert saved["values"][0] == saved["values"][1] == saved["mean"] == saved["worst"] and saved["std"] == 0.0
    twice = run_script("bench_adaptive", "--model_dir", str(folder), str(folder), "--output_dir",
                       str(tmp_path / "bench2"))
    assert twice.returncode == 2 and "--model_dir lists a folder twice" in twice.stderr
    result = run_script("bench_adaptive", "--model_dir", str(folder), "--output_dir", str(tmp_path / "bench"),
                        "--threshold_steps", "3", "--timing_examples", "2", "--timing_rounds", "1",
                        "--disable_tqdm", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("results.json", "results.md", "curves.png"):
        assert (tmp_path / "bench" / name).is_file()
    assert (tmp_path / "bench" / "curves.png").read_bytes().startswith(PNG_MAGIC)
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    run = results["runs"][0]
    assert len(results["runs"]) == 1 and run["training_seed"] == 42
    for split in ("easy", "hard"):
        r = run["splits"][split]
        assert {"full", "estimator", "confidence", "estimator_curve", "confidence_curve", "oracle_curve",
                "confusion"} <= set(r)
        assert sum(map(sum, r["confusion"]["counts"])) == r["questions"]
        timing = run["timing"][split]
        assert set(timing["wall_time_ratio"]) == {f"{mode}/{policy}" for mode in ("generate", "loop")
                                                  for policy in ("full", "estimator", "confidence")} | {
                                                     "generate/self_speculative"}
        assert timing["wall_time_ratio"]["generate/full"] == 1.0
        # the three ways of decoding agree on which answers are right
        accuracy = timing["generated_accuracy"]
        assert accuracy["generate/self_speculative"] == accuracy["generate/full"] == accuracy["loop/full"]
        assert accuracy["generate/estimator"] == accuracy["loop/estimator"]
        assert accuracy["generate/confidence"] == accuracy["loop/confidence"]
        assert timing["decoding_agrees_with_teacher_forcing"], (accuracy, timing["teacher_forced_accuracy"])
        assert timing["self_speculative_equals_greedy"]
    assert set(run["targets"]) == {"estimator", "confidence"}
    assert results["summary"]["estimator: easy layers saved"]["values"] == [
        run["targets"]["estimator"]["easy_layer_reduction"]]


def test_bench_refuses_a_folder_without_heldout_questions(tmp_path):
    from lightarch.evaluation.benchmarks.adaptive_depth import check_bench_options

    with pytest.raises(ValueError, match="--model_dir .* has no heldout.json; train it with scripts/train_adaptive"):
        check_bench_options(tmp_path)
    (tmp_path / "heldout.json").write_text("{}")
    with pytest.raises(ValueError, match="--timing_rounds must be >= 1"):
        check_bench_options(tmp_path, timing_rounds=0)


@pytest.mark.parametrize("script", ["train_adaptive", "bench_adaptive"])
def test_help_explains_every_option(script):
    text = run_script(script, "--help").stdout
    options = re.findall(r"^  (--\w+)(.*)\n((?:  {6,}.*\n)*)", text.split("options:")[1], flags=re.MULTILINE)
    assert len(options) >= 8
    for name, rest, more in options:
        explanation = re.sub(r"\(default: .*?\)|[A-Z_]+|--[\w-]+|,", "", rest + more).strip()
        assert len(explanation) > 10, f"{script} {name} has no help"
    if script == "train_adaptive":
        assert "--preset" in text and "--help_all" in text and "TrainingArguments option is accepted" in text


@pytest.mark.parametrize(
    "make, option",
    [
        (lambda: _config("exit_layers=[2,1,4],exit_loss_weights=null"), "exit_layers"),
        (lambda: _config("exit_layers=[1,2]"), "exit_layers"),
        (lambda: _config("estimator_input_layer=3"), "estimator_input_layer"),
        (lambda: _config("exit_width=3"), "--config_overrides: AdaptiveDepthConfig has no field 'exit_width'"),
        (lambda: _check(_config("vocab_size=12")), "--config_overrides vocab_size=12"),
        (lambda: _check(_config("bos_token_id=5")), "--config_overrides bos_token_id=5"),
        (lambda: _check(AdaptiveDepthConfig.from_preset("arithmetic"), max_steps=-1), "--max_steps"),
        (lambda: _sizes(calibration_easy=300), "--calibration_easy"),
        (lambda: _sizes(hard_fraction=1.5), "--hard_fraction"),
        (lambda: _sizes(calibration_hard=30), "--calibration_hard"),
        (lambda: _schedule(time_budget_minutes=15.0, reserve_minutes=20.0), "--reserve_minutes"),
        (lambda: _schedule(estimator_steps=-1), "--estimator_steps"),
    ],
)
def test_bad_training_options_are_refused_naming_them(make, option):
    with pytest.raises(ValueError, match=re.escape(option)):
        make()


def _config(overrides: str):
    from lightarch.training.cli import config_from_preset

    return config_from_preset(AdaptiveDepthConfig, "arithmetic", overrides)


def _check(config, max_steps: int = 10):
    from transformers import TrainingArguments

    from lightarch.training.adaptive_depth import check_adaptive_run

    check_adaptive_run(config, TrainingArguments(output_dir="unused", max_steps=max_steps, report_to="none"))


def _sizes(**values):
    from lightarch.data.arithmetic import SuiteSizes

    return SuiteSizes(**{**TINY_SIZES, **values})


def _schedule(**values):
    from lightarch.training.adaptive_depth import AdaptiveSchedule

    return AdaptiveSchedule(**values)


def test_train_script_refuses_bad_options_in_one_line(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = run_script("train_adaptive", *TINY_TRAIN, "--output_dir", str(foreign))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--output_dir" in result.stderr and "is not empty" in result.stderr
    assert (foreign / "notes.txt").read_text() == "mine"
