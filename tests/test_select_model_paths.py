"""The selection matrix joins each benchmark to its model's own records when the benchmark recorded `--model_dir`
as given, relative to the folder it ran from (the scripts' defaults: outputs/realtime, outputs/adaptive_depth,
outputs/multimodal), whatever folder select_model runs from.

The records below keep the keys and nesting of tiny real runs of bench_inference, bench_adaptive, train_adaptive,
train_multimodal and eval_multimodal (values shortened)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lightarch.evaluation.selection import collect_measurements, model_folder, selection_matrix


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _adaptive_run(model_dir: str, easy: float, hard: float) -> dict:
    """One entry of bench_adaptive's `runs` (one per --model_dir folder): 288 easy and 12 hard test questions."""
    return {"model_dir": model_dir, "exit_layers": [1, 2, 4], "num_layers": 4, "training_seed": 0,
            "splits": {"easy": {"questions": 288, "estimator": {"accuracy": easy, "mean_layers": 1.2}},
                       "hard": {"questions": 12, "estimator": {"accuracy": hard, "mean_layers": 4.0}}}}


@pytest.fixture
def repo(tmp_path) -> Path:
    """A checkout whose benchmarks ran from its root with the scripts' default (relative) model folders."""
    root = tmp_path / "checkout"
    out = root / "outputs"
    for name in ("realtime", "adaptive_depth", "multimodal/aligned", "multimodal/no_alignment"):
        (out / name).mkdir(parents=True)
        (out / name / "config.json").write_text("{}")
    _write(out / "realtime" / "results.json", {"num_parameters": 1_687_392, "heldout_perplexity": 9.0})
    _write(out / "bench_inference" / "results.json", {
        "model_dir": "outputs/realtime", "parameters": 1_687_392,
        "latency": {"torch_fp32": {"p50_ms": 60.0, "p95_ms": 62.0, "runs": 30},
                    "onnx_int8": {"p50_ms": 35.0, "p95_ms": 37.0, "runs": 30}},
        "memory_bytes": {"torch_fp32": 7_000_000, "onnx_int8_file": 2_000_000},
        "throughput": {"16": {"modes": {"continuous_batching": {"tokens_per_second": 900.0}}}}})
    _write(out / "adaptive_depth" / "results.json", {
        "num_parameters": 10_251, "calibration": {"estimator": {"easy": {"accuracy": 0.5}, "hard": {"accuracy": 0.5}},
                                                  "full_accuracy": {"easy": 0.6, "hard": 0.5}}})
    _write(out / "bench_adaptive" / "results.json", {"runs": [_adaptive_run("outputs/adaptive_depth", 0.99, 0.75)],
                                                     "summary": {}, "arguments": {}})  # pooled 0.9804
    for variant in ("aligned", "no_alignment"):
        _write(out / "multimodal" / variant / "results.json", {
            "variant": variant, "num_parameters": 93_025, "heldout": {"alignment_error": {"error": 0.5}}})
    _write(out / "multimodal" / "eval" / "results.json", {
        "model_dir": "outputs/multimodal", "models": {"aligned": {"alignment_error": {"error": 0.04}},
                                                      "no_alignment": {"alignment_error": {"error": 0.6}}}})
    (tmp_path / "elsewhere").mkdir()
    return root


def test_relative_model_folders_join_from_any_working_directory(repo, monkeypatch):
    monkeypatch.chdir(repo.parent / "elsewhere")  # not the folder the benchmarks ran from
    models = collect_measurements([repo / "outputs"])
    out = (repo / "outputs").resolve()
    assert set(models) == {(out / n).as_posix() for n in ("realtime", "adaptive_depth", "multimodal/aligned",
                                                           "multimodal/no_alignment")}
    realtime = models[(out / "realtime").as_posix()]
    assert realtime["latency_p50_ms"]["value"] == 35.0 and realtime["latency_p50_ms"]["detail"] == "onnx_int8"
    deep = models[(out / "adaptive_depth").as_posix()]
    assert deep["factual_accuracy"]["value"] == pytest.approx((288 * 0.99 + 12 * 0.75) / 300)
    assert deep["factual_accuracy"]["source"].endswith("bench_adaptive/results.json")  # the bench, not training
    aligned = models[(out / "multimodal/aligned").as_posix()]
    assert aligned["alignment_error"]["value"] == 0.04 and aligned["parameters"]["value"] == 93_025
    assert models[(out / "multimodal/no_alignment").as_posix()]["alignment_error"]["value"] == 0.6
    passing = {name: row["passing"] for name, row in selection_matrix(models)["scenarios"].items()}
    assert passing == {"realtime": ["realtime"], "reasoning": ["adaptive_depth"], "multimodal": ["aligned"]}


def test_the_working_directory_still_counts_and_absolute_paths_are_kept(repo, monkeypatch, tmp_path):
    record = repo / "outputs" / "bench_inference" / "results.json"
    monkeypatch.chdir(repo)
    assert model_folder("outputs/realtime", record) == (repo / "outputs" / "realtime").resolve()
    assert model_folder(repo / "outputs" / "realtime", record) == (repo / "outputs" / "realtime").resolve()
    monkeypatch.chdir(tmp_path / "elsewhere")
    # found nowhere above the record: the current directory's reading, as before (shown as its own model)
    assert model_folder("gone/model", record) == (tmp_path / "elsewhere" / "gone" / "model").resolve()


def test_a_bench_of_several_seeds_gives_each_model_its_own_accuracy(repo, monkeypatch):
    out = repo / "outputs"
    (out / "adaptive_seed1").mkdir()
    (out / "adaptive_seed1" / "config.json").write_text("{}")
    _write(out / "bench_adaptive" / "results.json", {"runs": [_adaptive_run("outputs/adaptive_depth", 0.99, 0.75),
                                                              _adaptive_run("outputs/adaptive_seed1", 0.9, 0.9)]})
    monkeypatch.chdir(repo.parent / "elsewhere")
    models = collect_measurements([out])
    accuracy = {Path(k).name: v["factual_accuracy"]["value"] for k, v in models.items() if "factual_accuracy" in v}
    assert accuracy == {"adaptive_depth": pytest.approx((288 * 0.99 + 12 * 0.75) / 300),
                        "adaptive_seed1": pytest.approx(0.9)}


def test_a_qa_readers_own_record_describes_its_folder_even_after_a_move(repo, monkeypatch):
    """A reader trained into /tmp/x and moved to outputs/retrieval_qa: its results.json still names /tmp/x, and its
    re-evaluation (qa_eval/) names the new place; both are the one model in outputs/retrieval_qa."""
    out = repo / "outputs"
    reader = out / "retrieval_qa"
    reader.mkdir()
    (reader / "config.json").write_text("{}")
    _write(reader / "results.json", {"factual_accuracy": 0.92, "model_dir": "/tmp/trained_elsewhere",
                                     "num_parameters": 1687392})
    _write(reader / "qa_eval" / "results.json", {"factual_accuracy": 0.92, "model_dir": "outputs/retrieval_qa"})
    monkeypatch.chdir(repo.parent / "elsewhere")
    models = collect_measurements([out])
    names = {Path(k).name: v for k, v in models.items() if "factual_accuracy" in v}
    assert set(names) == {"adaptive_depth", "retrieval_qa"}  # no phantom /tmp/trained_elsewhere, no qa_eval
    measures = names["retrieval_qa"]
    assert measures["factual_accuracy"]["value"] == 0.92 and measures["parameters"]["value"] == 1687392
