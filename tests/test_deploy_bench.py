"""scripts/bench_inference.py runs end to end on a tiny model and writes well-formed results (no timing asserts)."""

import json

import pytest
import torch
from deploy_helpers import save_tiny_model


@pytest.mark.parametrize("variants", ["torch_fp32,torch_int8"])
def test_bench_inference_micro_run_writes_results(tmp_path, variants):
    from scripts.bench_inference import main

    folder = save_tiny_model(tmp_path / "model", router_mode="top_p", num_shared_experts=1)
    heldout = tmp_path / "model" / "results.json"  # no held-out list: standard-library files are used
    assert not heldout.exists()
    threads = torch.get_num_threads()
    try:
        results = main(["--model_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--variants", variants,
                        "--prompt_tokens", "16", "--new_tokens", "4", "--rounds", "1", "--prompts", "2",
                        "--warmup", "1", "--throughput_requests", "6", "--min_prompt", "4", "--max_prompt", "40",
                        "--padded_batch_size", "3", "--throughput_rounds", "1", "--num_threads", "1"])
    finally:
        torch.set_num_threads(threads)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(written["latency"]) == set(variants.split(",")) == set(results["latency"])
    for row in written["latency"].values():
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["runs"] == 2
    assert written["latency"]["torch_fp32"]["greedy_agreement_with_torch_fp32"] == 1.0
    throughput = written["throughput"]
    assert throughput["requests"] == 6 and throughput["identical_outputs"] == 6  # greedy: CB equals padded generate
    assert throughput["prompt_lengths"][0] == 4 and throughput["prompt_lengths"][-1] == 40
    assert 0 < throughput["paged_cache_bytes"] < 2**24
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| torch_int8 |" in markdown and "Continuous batching speed-up" in markdown
    assert (tmp_path / "out" / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_inference_rejects_bad_options(tmp_path):
    from scripts.bench_inference import main

    with pytest.raises(ValueError, match="--variants 'torch_fp16'"):
        main(["--variants", "torch_fp16"])
    with pytest.raises(ValueError, match="has no model"):
        main(["--model_dir", str(tmp_path / "missing")])
