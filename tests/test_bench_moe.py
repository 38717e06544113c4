"""The MoE block benchmark (lightarch.evaluation.benchmarks.moe): scripts/bench_moe.py runs end to end on a micro
config and writes well-formed results; the equivalence check catches different weights."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import PROJECT_ROOT
from lightarch.evaluation.benchmarks.moe import block_config, build_variants, check_equivalence, check_moe_options

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


def test_micro_run_writes_results(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "bench_moe.py"), *MICRO, "--output_dir",
                             str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text() in result.stdout  # the table is printed too
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


def test_equivalence_check_catches_different_weights():
    config = block_config(hidden_size=32, moe_intermediate_size=16, num_experts=4, max_experts_per_token=3)
    variants = build_variants(config, router_std=0.1, dtype=torch.float32)
    inputs = torch.randn(2, 8, 32)
    grad_output = torch.randn_like(inputs)
    check_equivalence(variants, inputs, grad_output, torch.float32)  # same weights: passes
    with torch.no_grad():
        variants["lightarch_top_k_grouped_mm"][0].experts.down_proj.mul_(1.01)
    with pytest.raises(AssertionError, match="lightarch_top_k_grouped_mm"):
        check_equivalence(variants, inputs, grad_output, torch.float32)


@pytest.mark.parametrize("options, message", [(dict(dtype="float64"), "--dtype must be one of"),
                                              (dict(rounds=0), "--rounds must be >= 1")])
def test_bad_options_name_the_option(options, message):
    values = dict(dtype="float32", batch_size=2, seq_len=8, rounds=1, iters_per_round=1)
    check_moe_options(**values)
    with pytest.raises(ValueError, match=message):
        check_moe_options(**{**values, **options})
