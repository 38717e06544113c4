"""AdaptiveDepth routing (issue 20): the per-exit sufficiency estimator and its features, batches of mixed routes that
drop the rows that have left, the confidence policy's prompt leaving with its last token, the benchmark's oracle
curve, confusion matrix and per-seed summary, and the estimator's own held-out training questions."""

import pytest
import torch
import torch.nn.functional as F

from lightarch.modeling_adaptive_depth import (
    AdaptiveDepthForCausalLM,
    RowSubsetCache,
    exit_confidence,
    exit_sufficiency,
    last_true_index,
    route_from_estimate,
)
from test_adaptive_depth import confident_model, tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


SUFFICIENCY = dict(estimator_objective="sufficiency", estimator_features=["mean", "max", "last", "exit_confidence"])


# --------------------------------------------------------------------------------------------- the estimator


def test_sufficiency_routing_takes_the_earliest_exit_whose_own_probability_reaches_the_threshold():
    logits = torch.logit(torch.tensor([[0.9, 0.2, 0.95], [0.3, 0.8, 0.99], [0.1, 0.1, 0.1]]))
    assert route_from_estimate(logits, 0.85, "sufficiency").tolist() == [0, 2, 2]
    assert route_from_estimate(logits, 0.75, "sufficiency").tolist() == [0, 1, 2]
    assert route_from_estimate(logits, 0.0, "sufficiency").tolist() == [0, 0, 0]
    assert route_from_estimate(logits, 1.0, "sufficiency").tolist() == [2, 2, 2]
    # the same logits read as "earliest sufficient exit" (softmax, cumulative) route differently
    assert route_from_estimate(logits, 0.75, "earliest").tolist() != [0, 1, 2]


def test_sufficiency_loss_is_each_exits_binary_cross_entropy_against_its_own_correctness():
    model = confident_model(**SUFFICIENCY, estimator_input_layer=1)
    input_ids = torch.randint(3, 97, (4, 7))
    labels = input_ids.clone()
    labels[:, :3] = -100
    out = model(input_ids, labels=labels)
    shifted = labels[:, 1:]
    correct = torch.stack([((logits[:, :-1].argmax(-1) == shifted) | (shifted == -100)).all(1)
                           for logits in out.exit_logits], 1)
    expected = F.binary_cross_entropy_with_logits(out.estimator_logits.float(), correct.float())
    torch.testing.assert_close(out.estimator_loss, expected)
    sufficient = exit_sufficiency(correct, torch.zeros(4, 3), "correct", 0.1)
    assert torch.equal(sufficient, correct)
    out.loss.backward()
    assert model.model.estimator.out.weight.grad.abs().sum() > 0


def test_exit_confidence_feature_reads_the_exit_at_the_estimators_depth():
    """With 'exit_confidence' the estimate changes when only the exit's head changes (the hidden states do not)."""
    model = confident_model(**SUFFICIENCY, estimator_input_layer=1)
    input_ids = torch.randint(3, 97, (3, 6))
    with torch.no_grad():
        before = model(input_ids, output_exit_logits=True).estimator_logits
        model.lm_head.weight.mul_(0.01)  # flatter exit distributions: lower margins, higher entropy
        after = model(input_ids, output_exit_logits=True).estimator_logits
    assert not torch.allclose(before, after)
    features = exit_confidence(torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert features.shape == (2, 3)
    torch.testing.assert_close(features[1], torch.tensor([0.0, 1 / 3, 1.0]))  # uniform: no margin, full entropy
    assert features[0, 0] > 0.9 and features[0, 2] < 0.2


def test_last_feature_pools_the_last_prompt_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert last_true_index(mask).tolist() == [1, 3, 0]


@pytest.mark.parametrize("overrides, field", [
    (dict(estimator_objective="softmax"), "estimator_objective"),
    (dict(estimator_features=[]), "estimator_features"),
    (dict(estimator_features=["mean", "mean"]), "estimator_features"),
    (dict(estimator_features=["median"]), "estimator_features"),
    (dict(estimator_features=["exit_confidence"], estimator_input_layer=0), "exit_confidence"),
])
def test_config_rejects_bad_estimator_options_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


# --------------------------------------------------------------------------------------------- mixed routes


def _rows_seen_by(model):
    seen = {}
    hooks = [layer.register_forward_hook(lambda module, args, output, i=i: seen.setdefault(i, []).append(
        args[0].shape[0])) for i, layer in enumerate(model.model.layers)]
    return seen, hooks


def test_mixed_routes_drop_the_rows_that_have_left_and_match_each_row_alone():
    model = confident_model()
    input_ids = torch.randint(3, 97, (3, 6))
    route = torch.tensor([0, 2, 1])  # exits after 1, 4 and 2 layers
    with torch.no_grad():
        seen, hooks = _rows_seen_by(model)
        batch = model(input_ids, exit_route=route)
        for hook in hooks:
            hook.remove()
        assert seen == {0: [3], 1: [2], 2: [1], 3: [1]}  # layer 0 for all, layer 1 for routes 1-2, then route 2
        for row in range(3):
            alone = model(input_ids[row : row + 1], exit_route=route[row : row + 1])
            torch.testing.assert_close(batch.logits[row], alone.logits[0], atol=1e-5, rtol=1e-5)
        assert batch.exit_layer[:, 0].tolist() == [1, 4, 2]


def test_mixed_routes_in_cached_generate_match_each_row_alone_and_keep_the_cache_shape():
    model = confident_model(exit_policy="estimator")
    prompts = torch.randint(3, 97, (3, 5))
    with torch.no_grad():
        model.model.estimator.out.weight.mul_(30)  # spread the estimates
        estimates = model(prompts, output_exit_logits=True).estimator_logits.softmax(-1)[:, 0]
        model.config.estimator_threshold = estimates.median().item()
        out = model.generate(prompts, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             eos_token_id=None, pad_token_id=0, output_logits=True)
        assert len(set(out.exit_layers[:, 0].tolist())) > 1  # mixed routes in the batch
        for row in range(3):
            alone = model.generate(prompts[row : row + 1], max_new_tokens=4, do_sample=False,
                                   return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
                                   output_logits=True)
            assert torch.equal(alone.sequences[0], out.sequences[row])
            torch.testing.assert_close(torch.stack(alone.logits)[:, 0], torch.stack(out.logits)[:, row],
                                       atol=1e-4, rtol=1e-4)


def test_row_subset_cache_writes_its_rows_and_returns_only_theirs():
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    full = torch.randn(3, 2, 4, 8)
    cache.update(full, full + 1, 0)
    view = RowSubsetCache(cache, torch.tensor([0, 2]), 3)
    new = torch.randn(2, 2, 1, 8)
    keys, values = view.update(new, new + 1, 0)
    assert keys.shape == (2, 2, 5, 8) and cache.layers[0].keys.shape == (3, 2, 5, 8)
    torch.testing.assert_close(keys[:, :, :4], full[[0, 2]])
    torch.testing.assert_close(keys[:, :, 4:], new)
    torch.testing.assert_close(values[:, :, 4:], new + 1)
    assert view.get_seq_length() == 5  # everything else is the underlying cache's


# --------------------------------------------------------------------------------------------- confidence policy


def test_the_prompt_leaves_with_its_last_token_and_deeper_layers_only_fill_its_key_value():
    """The prefill runs the layers its last token needs; the other prompt tokens get their deeper key/value from
    their exit state (two projections per layer), so executed work follows the exits."""
    model = confident_model()
    input_ids = torch.randint(3, 97, (1, 9))
    with torch.no_grad():
        seen, hooks = _rows_seen_by(model)
        out = model(input_ids, exit_policy="confidence", exit_threshold=0.0, use_cache=True)
        for hook in hooks:
            hook.remove()
        assert int(out.layers_computed) == 1 and set(seen) == {0}
        assert out.exit_layer.tolist() == [[1] * 9]
        # a prompt whose last token is never confident runs every layer for every token
        deep = model(input_ids, exit_policy="confidence", exit_threshold=1.0, use_cache=True)
        assert int(deep.layers_computed) == 4 and deep.exit_layer.tolist() == [[4] * 9]
        # every layer cached the prompt's key/value (sliding layers their window) as a full-depth prefill does
        assert [layer.keys.shape for layer in out.cache.layers] == [layer.keys.shape for layer in deep.cache.layers]


def test_teacher_forcing_with_prompt_mask_counts_the_layers_a_generation_runs():
    from lightarch.data.arithmetic import all_problems, build_tokenizer
    from lightarch.evaluation.adaptive_depth import confidence_operating_point

    tokenizer = build_tokenizer()
    model = AdaptiveDepthForCausalLM(tiny_config(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1,
                                                 eos_token_id=2)).eval()
    problems = all_problems("easy")[:8]
    shallow = confidence_operating_point(model, problems, tokenizer, threshold=0.0)
    deep = confidence_operating_point(model, problems, tokenizer, threshold=1.0)
    assert shallow["executed_layers"] == pytest.approx(1.0) and shallow["kv_filled_layers"] == pytest.approx(3.0)
    assert deep["executed_layers"] == pytest.approx(4.0) and deep["kv_filled_layers"] == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------- benchmark helpers


def test_oracle_curve_and_confusion_by_hand():
    from lightarch.evaluation.benchmarks.adaptive_depth import oracle_curve, route_confusion

    correct = torch.tensor([[True, True, True], [False, True, True], [False, False, True], [False, False, False]])
    curve = oracle_curve(correct, [2, 4, 8])
    # oracle: 2, 4, 8 layers and "none right" at the first exit (2): 16 / 4 layers, 3 / 4 right; then the question
    # needing 8 layers moves to the first exit (-6 layers, -1 right), then the one needing 4 (-2, -1)
    assert [(p["mean_layers"], p["accuracy"]) for p in curve] == [(4.0, 0.75), (2.5, 0.5), (2.0, 0.25)]
    confusion = route_confusion(correct, torch.tensor([0, 2, 2, 1]), [2, 4, 8])
    assert confusion["rows_oracle_exit"] == ["exit 2", "exit 4", "exit 8", "none right"]
    assert confusion["counts"] == [[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0]]


def test_summary_gives_mean_spread_and_worst_seed():
    from lightarch.evaluation.benchmarks.adaptive_depth import SUMMARY_FIGURES, summarize

    def run(saved, drop, meets):
        policy = {"easy_layer_reduction": saved, "easy_accuracy_drop": drop, "easy_generate_time_ratio": 0.5,
                  "hard_accuracy_drop": 0.0, "meets_all": meets}
        return {"targets": {"estimator": dict(policy), "confidence": dict(policy)}}

    summary = summarize([run(0.74, 0.0, True), run(0.70, 0.004, True), run(0.72, 0.002, False)])
    saved = summary["estimator: easy layers saved"]
    assert saved["mean"] == pytest.approx(0.72) and saved["worst"] == 0.70 and saved["max"] == 0.74
    assert saved["std"] == pytest.approx((0.0008 / 3) ** 0.5)
    assert summary["estimator: easy accuracy drop"]["worst"] == 0.004  # lower is better: the worst is the largest
    assert summary["every_run_meets_all"] == {"estimator": False, "confidence": False}
    assert {name for name, *_ in SUMMARY_FIGURES} <= set(summary)


def test_estimator_questions_are_held_out_of_phase_one_and_apart_from_calibration_and_test():
    from lightarch.data.arithmetic import SuiteSizes, sample_problems, split_heldout

    sizes = SuiteSizes(train_examples=10, heldout_hard=40, calibration_hard=10, estimator_hard=30)
    heldout = split_heldout(sizes, seed=3)
    estimator = set(heldout["estimator"]["hard"])
    assert len(estimator) == 30
    assert not estimator & (set(heldout["calibration"]["hard"]) | set(heldout["test"]["hard"]))
    drawn = sample_problems(500, 1.0, seed=0, hard_prompts=sorted(estimator))
    assert {p.prompt for p in drawn} <= estimator
    with pytest.raises(ValueError, match="--estimator_hard"):
        SuiteSizes(heldout_hard=1500, estimator_hard=4000)


def test_accuracy_drop_bound_by_hand():
    from lightarch.evaluation.adaptive_depth import DROP_BOUND_Z, accuracy_drop_bound

    full = torch.tensor([True, True, True, False])
    policy = torch.tensor([True, False, True, True])  # one lost, one gained: no drop, but uncertain
    bound = accuracy_drop_bound(full, policy)
    assert bound["accuracy_drop"] == 0.0
    assert bound["drop_upper_bound"] == pytest.approx(DROP_BOUND_Z * 0.5 ** 0.5 / 2)
    assert accuracy_drop_bound(full, full) == {"accuracy_drop": 0.0, "drop_upper_bound": 0.0}
