"""The safety and distillation figures as lightarch `evaluate` metrics (`safety_screening`,
`distillation_retention`): hand-computed values, the same figure from one `compute` or several `add_batch` calls,
and the evaluations (`lightarch.safety.evaluation`, `lightarch.training.distillation.report`) computing their
figures through them."""

from __future__ import annotations

import evaluate
import pytest
from lightarch.evaluation.metrics import METRICS, load_metric, metric_path

# Six prompts: three harmful (two sources), three benign (look-alikes and an ordinary one).
SCREEN = dict(
    predictions=[["violence"], [], ["violence", "hate"], ["cybercrime"], [], ["violence"]],
    references=[["violence"], ["cybercrime"], ["hate"], [], [], []],
    sources=["dna", "rtp", "dna", "lookalike", "lookalike", "ordinary"],
)


def test_both_metrics_load_offline_by_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("safety_screening", "distillation_retention"):
        assert name in METRICS and metric_path(name).endswith(name)
        assert isinstance(load_metric(name), evaluate.Metric) and load_metric(name).name == name


def test_safety_screening_against_hand_computed_values():
    result = load_metric("safety_screening").compute(**SCREEN)
    # harmful: prompts 0 and 2 blocked, 1 not -> 2/3; benign: prompts 3 and 5 blocked of 3 -> 2/3
    assert result["block_rate"] == pytest.approx(2 / 3) and result["false_refusal_rate"] == pytest.approx(2 / 3)
    assert result["block_rate_by_source"] == {"dna": 1.0, "rtp": 0.0}
    assert result["false_refusal_rate_by_source"] == {"lookalike": 0.5, "ordinary": 1.0}
    assert (result["harmful"], result["benign"], result["count"]) == (3, 3, 6)
    # violence: predicted 3 times (prompts 0, 2, 5), in the reference once (0): P 1/3, R 1, F1 2*(1/3)/(4/3) = 1/2
    assert result["per_category"]["violence"] == pytest.approx(
        {"support": 1, "predicted": 3, "precision": 1 / 3, "recall": 1.0, "f1": 0.5})
    # hate: predicted once (2), right: P 1 R 1; cybercrime: predicted once (3) wrongly, missed at 1: all 0
    assert result["per_category"]["hate"] == {"support": 1, "predicted": 1, "precision": 1.0, "recall": 1.0,
                                              "f1": 1.0}
    assert result["per_category"]["cybercrime"] == {"support": 1, "predicted": 1, "precision": 0.0, "recall": 0.0,
                                                    "f1": 0.0}
    only = load_metric("safety_screening").compute(**SCREEN, categories=["hate", "self_harm"])
    assert list(only["per_category"]) == ["hate", "self_harm"]
    assert only["per_category"]["self_harm"]["support"] == 0  # listed, never seen: reported, support 0
    with pytest.raises(ValueError, match="categories must be a list"):
        load_metric("safety_screening").compute(**SCREEN, categories="hate")


def test_safety_screening_without_benign_or_harmful_prompts_reports_none():
    result = load_metric("safety_screening").compute(predictions=[["hate"]], references=[["hate"]], sources=[""])
    assert result["block_rate"] == 1.0 and result["false_refusal_rate"] is None
    assert result["block_rate_by_source"] == {}  # "" is no source


def test_distillation_retention_against_hand_computed_values():
    result = load_metric("distillation_retention").compute(predictions=[0.81, 0.45, 0.3], references=[0.9, 0.6, 0.0],
                                                           tasks=["pos", "lexname", "broken"])
    assert result["retention"] == pytest.approx({"pos": 0.9, "lexname": 0.75, "broken": 0.0})  # teacher 0: 0
    assert result["retention_mean"] == pytest.approx((0.9 + 0.75) / 3)
    assert (result["retention_worst"], result["worst_task"], result["count"]) == (0.0, "broken", 3)
    with pytest.raises(ValueError, match="more than once"):
        load_metric("distillation_retention").compute(predictions=[0.5, 0.5], references=[1.0, 1.0],
                                                      tasks=["pos", "pos"])


RETENTION = dict(predictions=[0.5, 0.8, 0.2, 0.9], references=[1.0, 0.8, 0.4, 1.0], tasks=["a", "b", "c", "d"])


@pytest.mark.parametrize("name, inputs", [("safety_screening", SCREEN), ("distillation_retention", RETENTION)])
def test_add_batch_in_pieces_equals_one_compute(name, inputs):
    whole = load_metric(name).compute(**inputs)
    metric = load_metric(name)
    for start, stop in ((0, 1), (1, 3), (3, None)):
        metric.add_batch(**{k: v[start:stop] for k, v in inputs.items()})
    assert metric.compute() == whole
    metric.add_batch(**inputs)  # reusable after compute
    assert metric.compute() == whole


def test_combine_with_another_lightarch_metric():
    combined = evaluate.combine([load_metric("distillation_retention")])
    combined.add_batch(predictions=[0.5], references=[1.0], tasks=["a"])
    combined.add_batch(predictions=[0.3], references=[0.6], tasks=["b"])
    assert combined.compute()["retention_mean"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------ the evaluations use them


class _Verdict:
    def __init__(self, allowed, explanation="", violations=(), category=None):
        self.allowed, self.explanation, self.violations, self.category = allowed, explanation, violations, category


class _Filter:
    """A SafetyFilter stand-in with no classifier: blocks texts holding 'bad'; 'mute' blocks without saying why,
    'anon' without a source."""

    classifier = None

    def check(self, text):
        from lightarch.safety.filter import Violation

        if "mute" in text:
            return _Verdict(False, "", (), "other")
        if "anon" in text:  # says why, but no violation names who decided
            return _Verdict(False, "blocked", (Violation("", "violence", "a test rule"),), "violence")
        if "bad" in text:
            return _Verdict(False, "rule en.x matched", (Violation("rule", "violence", "a test rule", "en.x"),),
                            "violence")
        return _Verdict(True)


def _examples():
    from lightarch.safety.data import Example

    return [Example("bad thing", ("violence",), "dna"), Example("fine thing", ("hate",), "rtp"),
            Example("bad python", (), "lookalike"), Example("hello", (), "ordinary"),
            Example("good", (), "lookalike")]


def _spy(monkeypatch, module):
    loaded = []

    def spy(name, **kwargs):
        loaded.append(name)
        return load_metric(name, **kwargs)

    monkeypatch.setattr(module, "load_metric", spy)
    return loaded


def test_evaluate_filter_computes_its_rates_through_the_metric(monkeypatch):
    from lightarch.safety import evaluation

    loaded = _spy(monkeypatch, evaluation)
    results = evaluation.evaluate_filter(_Filter(), _examples())
    assert loaded == ["safety_screening"]
    assert results["harmful_blocked"] == 0.5 and results["blocked_by_source"] == {"dna": 1.0, "rtp": 0.0}
    assert results["false_refusal_lookalike"] == 0.5 and results["false_refusal_ordinary"] == 0.0
    assert results["false_refusal_benign"] == pytest.approx(1 / 3)
    assert (results["harmful"], results["lookalike"], results["ordinary"]) == (2, 2, 1)
    assert (results["blocks"], results["blocks_without_explanation"], results["rule_blocks"]) == (2, 0, 2)


def test_every_block_must_say_why_and_who_decided():
    from lightarch.safety.data import Example
    from lightarch.safety.evaluation import evaluate_filter

    examples = [*_examples(), Example("mute", ("violence",), "dna"), Example("anon", ("violence",), "dna")]
    with pytest.raises(AssertionError, match="2 block.*without a one-line explanation and a source"):
        evaluate_filter(_Filter(), examples)
    results = evaluate_filter(_Filter(), examples, strict=False)
    assert (results["blocks"], results["blocks_without_explanation"]) == (4, 2)
    assert results["harmful_blocked"] == pytest.approx(3 / 4)  # the unexplained blocks still count as blocks


def test_the_classifier_per_category_figures_come_from_the_metric(monkeypatch):
    from lightarch.safety import evaluation
    from lightarch.safety.data import Example
    from lightarch.safety.filter import SafetyFilter
    from test_hub import _KeywordClassifier  # 'attack' -> violence 0.9, 'hack' -> cybercrime 0.8, else 0.05

    examples = [Example("attack him", ("violence",), "dna"), Example("hurt him badly", ("violence",), "dna"),
                Example("attack of the clones film", (), "lookalike"), Example("hello there", (), "ordinary")]
    loaded = _spy(monkeypatch, evaluation)
    safety = SafetyFilter.builtin(_KeywordClassifier(), thresholds={"violence": 0.5})
    results = evaluation.evaluate_filter(safety, examples, strict=False)
    assert loaded == ["safety_screening", "safety_screening"]  # the filter's verdicts, then the classifier alone
    violence = results["per_category"]["violence"]
    # flagged: 'attack him' (right) and the film (wrong); missed: 'hurt him badly'
    assert violence == {"threshold": 0.5, "support": 2, "predicted": 2, "precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert results["per_category"]["hate"]["support"] == 0


def test_the_distillation_report_computes_retention_through_the_metric(monkeypatch):
    from lightarch.training.distillation import report

    loaded = _spy(monkeypatch, report)
    kept = report.retention_figures({"a": 0.4, "b": 0.9}, {"a": 0.8, "b": 0.9})
    assert loaded == ["distillation_retention"]
    assert kept["retention"] == {"a": 0.5, "b": 1.0} and kept["retention_mean"] == 0.75
    assert (kept["retention_worst"], kept["worst_task"]) == (0.5, "a")
    with pytest.raises(ValueError, match="different tasks"):
        report.retention_figures({"a": 0.4}, {"b": 0.9})
