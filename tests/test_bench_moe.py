"""scripts/bench_moe.py runs end to end on a micro config and writes well-formed results."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_moe.py"
MICRO = [
    "--hidden_size", "32", "--moe_intermediate_size", "16", "--num_experts", "4", "--top_k", "2",
    "--max_experts_per_token", "3", "--batch_size", "2", "--seq_len", "8",
    "--warmup", "1", "--rounds", "2", "--iters_per_round", "1", "--num_threads", "1",
]
VARIANTS = {
    "transformers_eager": None,
    "transformers_grouped_mm": None,
    "lightarch_top_k_eager": "transformers_eager",
    "lightarch_top_k_grouped_mm": "transformers_grouped_mm",
    "lightarch_top_p_eager": "transformers_eager",
    "lightarch_top_p_grouped_mm": "transformers_grouped_mm",
    "dense_mlp": "transformers_grouped_mm",
}


@pytest.fixture(scope="module")
def bench_moe():
    spec = importlib.util.spec_from_file_location("bench_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_micro_run_writes_results(bench_moe, tmp_path):
    threads = torch.get_num_threads()
    try:
        returned = bench_moe.main([*MICRO, "--output_dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert {"config", "environment", "variants"} <= results.keys()
    assert results["config"]["hidden_size"] == 32 and results["config"]["top_k"] == 2
    assert {"torch", "transformers", "cpu_count", "torch_num_threads"} <= results["environment"].keys()
    assert results["environment"]["torch_num_threads"] == 1
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left no temporary file

    assert set(results["variants"]) == set(VARIANTS)
    for name, baseline in VARIANTS.items():
        row = results["variants"][name]
        assert row["tokens_per_s"] > 0 and row["tokens_per_s_best"] >= row["tokens_per_s"]
        assert row["tokens_per_cpu_s"] > 0
        assert len(row["step_seconds"]) == 2 and all(s > 0 for s in row["step_seconds"])
        assert row["baseline"] == baseline
        if baseline is None:
            assert row["ratio"] is None and row["ratio_cpu_time"] is None
        else:
            expected = row["tokens_per_s"] / results["variants"][baseline]["tokens_per_s"]
            assert row["ratio"] == pytest.approx(expected) and row["ratio"] > 0
            expected = row["tokens_per_cpu_s"] / results["variants"][baseline]["tokens_per_cpu_s"]
            assert row["ratio_cpu_time"] == pytest.approx(expected)
    assert results["variants"]["lightarch_top_k_eager"]["experts_per_token"] == 2.0
    assert 1.0 <= results["variants"]["lightarch_top_p_eager"]["experts_per_token"] <= 3.0
    assert results["variants"]["lightarch_top_k_eager"]["max_abs_diff_vs_transformers_eager"] <= 1e-5

    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in table for name in VARIANTS)


def test_equivalence_check_catches_different_weights(bench_moe):
    args = bench_moe.BenchArguments(hidden_size=32, moe_intermediate_size=16, num_experts=4, max_experts_per_token=3)
    variants = bench_moe.build_variants(args, torch.float32)
    inputs = torch.randn(2, 8, 32)
    grad_output = torch.randn_like(inputs)
    bench_moe.check_equivalence(variants, inputs, grad_output, torch.float32)  # same weights: passes
    with torch.no_grad():
        variants["lightarch_top_k_grouped_mm"][0].experts.down_proj.mul_(1.01)
    with pytest.raises(AssertionError, match="lightarch_top_k_grouped_mm"):
        bench_moe.check_equivalence(variants, inputs, grad_output, torch.float32)
