"""The model-selection matrix from fixture results files (what bench_inference, bench_adaptive, eval_multimodal and
the training recipes write), with missing measurements, and the recommendation's choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_script
from lightarch.evaluation.selection import (
    SCENARIOS,
    collect_measurements,
    markdown,
    recommend,
    select_model,
    selection_matrix,
)

MIB = 2**20


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _bench_inference(model_dir: Path, fp32_ms: float, int8_ms: float | None, parameters: int) -> dict:
    latency = {"torch_fp32": {"p50_ms": fp32_ms, "p95_ms": fp32_ms * 1.2}}
    memory = {"torch_fp32": 40 * MIB}
    if int8_ms is not None:
        latency["onnx_int8"] = {"p50_ms": int8_ms, "p95_ms": int8_ms * 1.5}
        memory["onnx_int8_file"] = 12 * MIB
    return {"model_dir": str(model_dir), "parameters": parameters, "latency": latency, "memory_bytes": memory,
            "throughput": {"8-128": {"modes": {"static": {"tokens_per_second": 100.0},
                                               "continuous": {"tokens_per_second": 260.0}}}}}


@pytest.fixture
def outputs(tmp_path) -> Path:
    """realtime: fast (int8 80 ms), accuracy not measured; deep: 450 ms, 96% factual accuracy (the bench beats its
    training-time 50%); mm: two multimodal runs (eval 0.05 / 0.40 beat the training-time 0.2); small: parameters
    only."""
    root = tmp_path / "outputs"
    for name in ("realtime", "deep", "small", "mm/aligned", "mm/no_alignment"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
    _write(root / "bench_realtime" / "results.json", _bench_inference(root / "realtime", 150.0, 80.0, 2_000_000))
    _write(root / "bench_deep" / "results.json", _bench_inference(root / "deep", 450.0, None, 30_000_000))
    _write(root / "deep" / "results.json", {"calibration": {"estimator": {"easy": {"accuracy": 0.5},
                                                                          "hard": {"accuracy": 0.5}}},
                                            "num_parameters": 30_000_000})
    _write(root / "bench_adaptive" / "results.json", {
        "model_dir": str(root / "deep"), "exit_layers": [2, 4],
        "splits": {"easy": {"questions": 300, "estimator": {"accuracy": 0.98}},
                   "hard": {"questions": 100, "estimator": {"accuracy": 0.90}}}})  # pooled: 0.96
    _write(root / "mm" / "aligned" / "results.json", {"heldout": {"alignment_error": {"error": 0.2}},
                                                      "num_parameters": 5_000_000})
    _write(root / "mm" / "eval" / "results.json", {
        "model_dir": str(root / "mm"), "models": {"aligned": {"alignment_error": {"error": 0.05}},
                                                  "no_alignment": {"alignment_error": {"error": 0.40}}}})
    _write(root / "small" / "results.json", {"num_parameters": 1000, "heldout_perplexity": 9.0})
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text("not json")
    return root


def test_measurements_are_read_grouped_by_model_and_the_evaluations_win(outputs):
    models = collect_measurements([outputs])
    by_name = {Path(folder).name: measures for folder, measures in models.items()}
    assert set(by_name) == {"realtime", "deep", "aligned", "no_alignment", "small"}
    realtime = by_name["realtime"]
    assert realtime["latency_p50_ms"]["value"] == 80.0 and realtime["latency_p50_ms"]["detail"] == "onnx_int8"
    assert realtime["latency_p95_ms"]["value"] == pytest.approx(120.0)
    assert realtime["memory_mb"]["value"] == 12.0 and realtime["throughput_tokens_per_s"]["value"] == 260.0
    assert "factual_accuracy" not in realtime
    assert by_name["deep"]["factual_accuracy"]["value"] == pytest.approx(0.96)
    assert by_name["deep"]["factual_accuracy"]["source"].endswith("bench_adaptive/results.json")
    assert by_name["aligned"]["alignment_error"]["value"] == 0.05
    assert by_name["aligned"]["parameters"]["value"] == 5_000_000


def test_matrix_marks_pass_fail_and_missing(outputs):
    matrix = selection_matrix(collect_measurements([outputs]))
    rows = matrix["scenarios"]
    assert rows["realtime"]["passing"] == ["realtime"] and rows["realtime"]["models"]["deep"]["verdict"] == "fail"
    assert rows["realtime"]["models"]["aligned"] == {"value": None, "verdict": "missing"}
    assert rows["reasoning"]["passing"] == ["deep"]
    assert rows["reasoning"]["models"]["realtime"]["verdict"] == "missing"
    assert rows["multimodal"]["passing"] == ["aligned"]
    assert rows["multimodal"]["models"]["no_alignment"]["verdict"] == "fail"
    assert all(cell["verdict"] == "missing" for row in rows.values() for cell in [row["models"]["small"]])
    assert matrix["models"]["small"]["latency_p50_ms"] is None and matrix["models"]["small"]["parameters"] == 1000
    text = markdown(matrix)
    assert "| realtime | quantized lightweight model | latency_p50_ms < 200 |" in text
    assert "80.0 pass" in text and "450.0 FAIL" in text and "not measured" in text
    assert {s.threshold for s in SCENARIOS.values()} == {200.0, 0.95, 0.1}


def test_recommendations_follow_the_scenario_and_the_constraints(outputs):
    matrix = selection_matrix(collect_measurements([outputs]))
    assert recommend(matrix, "realtime")["choice"] == "realtime"
    assert recommend(matrix, "reasoning")["choice"] == "deep"
    assert recommend(matrix, "multimodal")["choice"] == "aligned"
    # both fast and accurate: no model measured meets both; the fast one lacks an accuracy, never assumed
    both = recommend(matrix, max_latency_ms=200, min_accuracy=0.95)
    assert both["choice"] is None
    assert both["excluded"]["realtime"].startswith("factual_accuracy not measured")
    assert both["excluded"]["deep"].startswith("fails latency_p50_ms <= 200")
    assert recommend(matrix, max_latency_ms=500)["ranking"] == ["realtime", "deep"]
    assert recommend(matrix, "realtime", max_memory_mb=10)["choice"] is None  # int8 file is 12 MiB
    assert recommend(matrix, max_memory_mb=50)["ranking"] == ["realtime", "deep"]
    with pytest.raises(ValueError, match="--scenario"):
        recommend(matrix, "chat")
    with pytest.raises(ValueError, match="--min_accuracy"):
        recommend(matrix, min_accuracy=95)
    with pytest.raises(ValueError, match="nothing to choose by"):
        recommend(matrix)


def test_outputs_written_atomically_and_missing_values_stay_null(outputs, tmp_path):
    result = select_model([outputs], tmp_path / "select", scenario="reasoning")
    folder = tmp_path / "select"
    saved = json.loads((folder / "results.json").read_text())
    assert saved["recommendation"]["choice"] == "deep" == result["recommendation"]["choice"]
    assert saved["matrix"]["models"]["realtime"]["factual_accuracy"] is None
    assert (folder / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Recommendation (factual_accuracy > 0.95)" in (folder / "results.md").read_text()
    with pytest.raises(ValueError, match="no results.json"):
        select_model([outputs / "broken"])
    with pytest.raises(ValueError, match="--results .*no such file"):
        select_model([tmp_path / "nope"])


def test_script_end_to_end_and_bad_options(outputs, tmp_path):
    result = run_script("select_model", "--results", str(outputs), "--output_dir", str(tmp_path / "out"),
                        "--scenario", "realtime", "--max_latency_ms", "200")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "**realtime**" in result.stdout and (tmp_path / "out" / "matrix.png").is_file()
    bad = run_script("select_model", "--results", str(outputs), "--output_dir", str(tmp_path / "o2"),
                     "--scenario", "chat")
    assert bad.returncode == 2 and "--scenario 'chat'" in bad.stderr.splitlines()[-1]
