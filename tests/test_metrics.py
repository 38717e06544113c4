"""lightarch's `evaluate` metrics: each loads offline from its shipped folder, matches a hand-computed value, and
gives the same figure whether the data comes in one `compute` or in several `add_batch` calls (and in `combine`)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import zipfile

import evaluate
import numpy as np
import pytest
import torch
from conftest import PROJECT_ROOT
from lightarch.evaluation.metrics import METRICS, load_metric, metric_path


def test_every_metric_is_a_local_folder_that_evaluate_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in METRICS:
        path = metric_path(name)
        assert path.endswith(name) and (PROJECT_ROOT / "modeling" / "evaluation" / "metrics" / name / f"{name}.py"
                                        ).is_file()
        module = evaluate.load(path, keep_in_memory=True)
        assert isinstance(module, evaluate.Metric) and module.name == name
    with pytest.raises(ValueError, match="choose one of"):
        metric_path("accuracy")


def _uniform_then_sharp() -> tuple[np.ndarray, np.ndarray]:
    """Two sequences, vocab 4: sequence 0 has uniform logits (NLL ln 4 per target); sequence 1 puts logit ln 3 on
    token 2 (p = 3/6 = 1/2) and scores one target (the second is -100)."""
    logits = np.zeros((2, 3, 4))
    logits[1, 0, 2] = math.log(3.0)
    labels = np.array([[0, 1, 3], [0, 2, -100]])
    return logits, labels


def test_perplexity_from_logits_against_hand_computed_value():
    logits, labels = _uniform_then_sharp()
    # targets: seq 0 -> 2 targets at ln 4 each; seq 1 -> 1 target at ln 2 (the -100 is ignored)
    expected_nll = (2 * math.log(4) + math.log(2)) / 3
    result = load_metric("perplexity").compute(predictions=logits, references=labels)
    assert result["tokens"] == 3
    assert result["nll"] == pytest.approx(expected_nll)
    assert result["perplexity"] == pytest.approx(math.exp(expected_nll))
    metric = load_metric("perplexity")  # two batches: the token-weighted figure, not the mean of two perplexities
    metric.add_batch(predictions=logits[:1], references=labels[:1])
    metric.add_batch(predictions=torch.tensor(logits[1:]), references=torch.tensor(labels[1:]))
    assert metric.compute()["perplexity"] == pytest.approx(math.exp(expected_nll))
    with pytest.raises(ValueError, match="logits"):
        load_metric("perplexity").compute(predictions=logits[0], references=labels)


class _FixedLogits(torch.nn.Module):
    """A 'causal LM' whose logits at every position are the same fixed vector."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids):
        class Output:
            logits = self.logits.expand(*input_ids.shape, -1)

        return Output()


def test_perplexity_from_a_model_matches_its_logits():
    model = _FixedLogits([0.0, math.log(3.0), 0.0, 0.0])  # p(1) = 1/2, p(others) = 1/6
    blocks = torch.tensor([[0, 1, 1], [1, 0, 2], [2, 1, 3]])
    # targets 1,1 | 0,2 | 1,3 -> three at 1/2, three at 1/6
    expected = math.exp((3 * math.log(2) + 3 * math.log(6)) / 6)
    assert load_metric("perplexity").compute(model=model, references=blocks, batch_size=2)["perplexity"] == (
        pytest.approx(expected))
    from lightarch.evaluation import perplexity

    assert perplexity(model, blocks, batch_size=1) == pytest.approx(expected)


def test_exact_match_with_and_without_normalisation():
    predictions, references = ["Paris", " paris ", "Rome", "a  b"], ["Paris", "Paris", "Milan", "a b"]
    assert load_metric("exact_match").compute(predictions=predictions, references=references)["exact_match"] == 0.25
    loose = load_metric("exact_match").compute(predictions=predictions, references=references, ignore_case=True,
                                               ignore_whitespace=True)
    assert loose == {"exact_match": 0.75, "count": 4}


def test_passkey_accuracy_counts_an_extra_digit_as_wrong():
    result = load_metric("passkey_accuracy").compute(predictions=["71432", "71433", "714321", "7143", ""],
                                                     references=["71432"] * 5)
    # exact: only the first; digits: 1, 0.8, 1, 0.8, 0
    assert result == {"exact": pytest.approx(0.2), "digits": pytest.approx(3.6 / 5), "count": 5}


def test_vqa_accuracy_normalises_case_spacing_and_punctuation_per_kind():
    result = load_metric("vqa_accuracy").compute(
        predictions=["The T-shirt.", "yes", "Sneaker", "no"], references=["the t-shirt .", "no", "sneaker", "no"],
        kinds=["what_is_shown", "same", "what_is_said", "same"])
    assert result == {"accuracy": 0.75, "per_kind": {"what_is_shown": 1.0, "same": 0.5, "what_is_said": 1.0},
                      "count": 4}


def test_retrieval_recall_at_k():
    ranked, labels = [[3, 1, 2], [1, 2, 3], [2, 3, 1], [2, 1, 3]], [1, 1, 1, 3]
    result = load_metric("retrieval_recall").compute(predictions=ranked, references=labels, k=[1, 2, 3])
    assert result == {"recall@1": 0.25, "recall@2": 0.5, "recall@3": 1.0, "count": 4}
    with pytest.raises(ValueError, match="k must be"):
        load_metric("retrieval_recall").compute(predictions=ranked, references=labels, k=0)


def test_modality_alignment_error_is_the_mean_over_pairs_not_over_items():
    # image->text: 1 miss of 4 (0.25); text->image: 0 of 2 -> mean 0.125 (an item-weighted mean would be 1/6)
    result = load_metric("modality_alignment_error").compute(
        predictions=[0, 1, 2, 0, 0, 1], references=[0, 1, 2, 3, 0, 1],
        pairs=["image->text"] * 4 + ["text->image"] * 2)
    assert result["pairs"] == {"image->text": 0.25, "text->image": 0.0}
    assert result["error"] == pytest.approx(0.125) and result["count"] == 6


BATCHES = {
    "exact_match": dict(predictions=["a", "b", "c", "d"], references=["a", "x", "c", "y"]),
    "passkey_accuracy": dict(predictions=["12345", "12340", "99999"], references=["12345", "12345", "12345"]),
    "vqa_accuracy": dict(predictions=["A", "b", "c"], references=["a", "x", "c"], kinds=["k1", "k2", "k1"]),
    "retrieval_recall": dict(predictions=[[1, 2], [2, 1], [3, 1]], references=[1, 1, 2]),
    "modality_alignment_error": dict(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0], pairs=["a", "b", "a", "b"]),
}


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_add_batch_twice_equals_one_compute(name):
    inputs = BATCHES[name]
    whole = load_metric(name).compute(**inputs)
    metric = load_metric(name)
    cut = 2
    metric.add_batch(**{k: v[:cut] for k, v in inputs.items()})
    metric.add_batch(**{k: v[cut:] for k, v in inputs.items()})
    assert metric.compute() == whole
    metric.add_batch(**inputs)  # a module is reusable after compute
    assert metric.compute() == whole


def test_combine_runs_several_lightarch_metrics_together():
    combined = evaluate.combine([load_metric("exact_match"), load_metric("passkey_accuracy")])
    combined.add_batch(predictions=["12345", "1234"], references=["12345", "12345"])
    combined.add_batch(predictions=["00000"], references=["00001"])
    result = combined.compute()
    assert result["exact_match"] == pytest.approx(1 / 3) and result["exact"] == pytest.approx(1 / 3)
    assert result["digits"] == pytest.approx((1 + 0.8 + 0.8) / 3)


def test_the_metrics_ship_in_the_wheel_and_load_from_it(tmp_path):
    """Built from a copy of modeling/ etc. (as tests/test_package_layout.py does), installed into a folder on
    PYTHONPATH, and loaded from there in a fresh process."""
    source = tmp_path / "src"
    for name in ("modeling", "configuration", "model_cards"):
        shutil.copytree(PROJECT_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", source / "pyproject.toml")
    shutil.copy2(PROJECT_ROOT / "README.md", source / "README.md")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist")], cwd=source, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("lightarch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    missing = [name for name in METRICS if f"lightarch/evaluation/metrics/{name}/{name}.py" not in names]
    assert not missing, f"the wheel lacks {missing}: pyproject needs the package-data line for the metrics"
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    check = ("import evaluate, lightarch.evaluation.metrics as m\n"
             "assert m.__file__.startswith(%r), m.__file__\n"
             "print(m.load_metric('exact_match').compute(predictions=['a'], references=['a'])['exact_match'])\n"
             % str(tmp_path / "site"))
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tmp_path / "site"),
           "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "1.0", run.stderr[-2000:]


def test_the_evaluation_code_computes_its_figures_through_the_metrics(monkeypatch):
    """perplexity, passkey scoring, VQA accuracy, R@1 and the alignment error each load their metric module."""
    from lightarch.evaluation import metrics, multimodal, passkey, perplexity

    loaded = []

    def spy(name, **kwargs):
        loaded.append(name)
        return load_metric(name, **kwargs)

    monkeypatch.setattr(metrics, "load_metric", spy)  # perplexity imports it when called
    monkeypatch.setattr(passkey, "load_metric", spy)
    monkeypatch.setattr(multimodal, "load_metric", spy)
    perplexity(_FixedLogits([0.0, 0.0]), torch.tensor([[0, 1, 1]]))
    assert passkey.score("71433", "71432") == {"exact": 0.0, "digits": pytest.approx(0.8)}
    labels = np.repeat(np.arange(10), 2)
    embeddings = {m: (np.eye(10)[labels], labels) for m in ("image", "text")}
    assert multimodal.recall_at_1(*embeddings["image"], *embeddings["text"]) == 1.0
    assert multimodal.modality_alignment_error(embeddings)["error"] == 0.0
    from lightarch.data.multimodal import Question

    questions = [Question("what_is_shown", "<image> ?", "T-shirt", ()), Question("same", "<image> <audio> ?", "no", ())]
    assert multimodal.answer_accuracy(questions, ["t-shirt", "yes"])["per_kind"] == {"what_is_shown": 1.0, "same": 0.0}
    assert loaded == ["perplexity", "passkey_accuracy", "retrieval_recall", "modality_alignment_error",
                      "vqa_accuracy"]
