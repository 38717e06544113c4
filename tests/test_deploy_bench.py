"""The inference benchmark (lightarch.evaluation.benchmarks.inference): scripts/bench_inference.py runs end to end on
a tiny model and writes well-formed results (no timing asserts); option checks, the realtime preset, the padding
bound's arithmetic and the static-batching server in process."""

import json
import subprocess

import pytest
from deploy_helpers import save_tiny_model

from conftest import run_script
from lightarch.evaluation.benchmarks import inference as bench
from lightarch.evaluation.benchmarks.inference import check_inference_options, preset_differences, token_positions


def run_bench(*args: str, cwd) -> subprocess.CompletedProcess:
    return run_script("bench_inference", *args, cwd=cwd)


def test_bench_inference_micro_run_writes_results(tmp_path):
    variants = "torch_fp32,torch_int8"
    folder = save_tiny_model(tmp_path / "model", router_mode="top_p", num_shared_experts=1)
    heldout = tmp_path / "model" / "results.json"  # no held-out list: standard-library files are used
    assert not heldout.exists()
    result = run_bench("--model_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--variants", variants,
                        "--prompt_tokens", "16", "--new_tokens", "4", "--rounds", "1", "--prompts", "2",
                        "--warmup", "1", "--throughput_requests", "6", "--min_prompt", "4", "--max_prompt", "40",
                        "--padded_batch_sizes", "3,6", "--throughput_rounds", "1", "--num_threads", "1",
                        "--throughput_new_tokens", "4,2-9", "--online_workload", "2-9", "--online_rates", "200,2000",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(written["latency"]) == set(variants.split(","))
    for row in written["latency"].values():
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["runs"] == 2
    assert written["latency"]["torch_fp32"]["greedy_agreement_with_torch_fp32"] == 1.0
    assert set(written["throughput"]) == {"4", "2-9"}
    mixed = written["throughput"]["2-9"]
    assert mixed["new_tokens"][0] == 2 and mixed["new_tokens"][-1] == 9 and len(mixed["new_tokens"]) == 6
    # each request ends at its own length, and continuous batching still equals padded generate
    assert mixed["identical_outputs"] == {"padded_generate_bs3": 6, "padded_generate_bs6": 6}
    throughput = written["throughput"]["4"]
    assert throughput["requests"] == 6
    # greedy: continuous batching equals padded generate at every batch size
    assert throughput["identical_outputs"] == {"padded_generate_bs3": 6, "padded_generate_bs6": 6}
    assert throughput["best_padded"] in throughput["identical_outputs"]
    assert written["command"].startswith("python scripts/bench_inference.py --model_dir")
    assert throughput["prompt_lengths"][0] == 4 and throughput["prompt_lengths"][-1] == 40
    assert 0 < throughput["paged_cache_bytes"] < 2**24
    # prompts of 4, 11, 18, 25, 32, 40 tokens (130), 4 new each: one padded batch of 6 computes 6 x (40 + 3) positions
    positions = throughput["token_positions"]
    assert positions["padded_generate_bs6"] == 6 * (40 + 3) and positions["continuous_batching"] == 130 + 6 * 3
    assert throughput["padding_bound"] == pytest.approx(
        throughput["token_positions"][throughput["best_padded"]] / throughput["token_positions"]["continuous_batching"])
    # online serving: both servers answer every request, identically, and no request completes before it arrives
    online = mixed["online"]
    assert set(online["rates"]) == {"200", "2000"} and online["max_static_batch"] == 6 and "online" not in throughput
    for row in online["rates"].values():
        assert row["identical_outputs"] == 6
        for mode in ("static_batching", "continuous_batching"):
            assert 0 < row[mode]["p50_s"] <= row[mode]["p95_s"] <= row[mode]["makespan_s"]
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "Online serving, 2-9 new tokens" in markdown
    assert "| torch_int8 |" in markdown and "Continuous batching speed-up" in markdown
    assert "| torch_fp32 p50 < 120.0 ms |" in markdown and "padded generate, batches of 6" in markdown
    assert (tmp_path / "out" / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


GOOD_OPTIONS = dict(preset="realtime", variants="torch_fp32", padded_batch_sizes="8,32",
                    throughput_new_tokens="16,8-128", online_rates="4,8", online_workload="8-128",
                    cb_attn_implementation="sdpa", min_prompt=8, max_prompt=256)


@pytest.mark.parametrize("options, message", [
    (dict(variants="torch_fp16"), "--variants 'torch_fp16'"),
    (dict(padded_batch_sizes="0"), "--padded_batch_sizes '0'"),
    (dict(padded_batch_sizes="a,b"), "--padded_batch_sizes 'a,b'"),
    (dict(cb_attn_implementation="sdpa_paged"), "--cb_attn_implementation 'sdpa_paged'"),
    (dict(preset="huge"), "--preset 'huge' is unknown"),
    (dict(throughput_new_tokens="16,9-4"), "--throughput_new_tokens '16,9-4'"),
    (dict(online_rates="4,-1"), "--online_rates '4,-1'"),
    (dict(online_workload="32"), "--online_workload '32' is not one of"),
    (dict(min_prompt=300), "--min_prompt <= --max_prompt"),
])
def test_bench_inference_rejects_bad_options(options, message):
    check_inference_options(**GOOD_OPTIONS)  # passes
    with pytest.raises(ValueError, match=message):
        check_inference_options(**{**GOOD_OPTIONS, **options})


def test_bench_inference_without_a_model_names_the_training_command(tmp_path):
    result = run_bench("--model_dir", str(tmp_path / "missing"), "--train_if_missing", "false", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "has no model" in result.stderr and "scripts/train.py --preset realtime --output_dir" in result.stderr
    assert not (tmp_path / "missing").exists()


def test_realtime_preset_is_the_main_jobs_architecture_with_top_k_routing(tmp_path):
    """The benchmark's model: a valid top-k preset with the main job's vocabulary and layout, which the main job's
    checks accept as it is (scripts/train.py --preset realtime)."""
    from transformers import TrainingArguments

    from lightarch import SparseMoeConfig
    from lightarch.training.cli import config_from_preset
    from lightarch.training.sparse_moe import check_train_options

    config = config_from_preset(SparseMoeConfig, "realtime")
    main_job = SparseMoeConfig.from_preset("tiny")
    assert config.router_mode == "top_k" and main_job.router_mode == "top_p"
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "num_experts", "sliding_window",
                 "moe_intermediate_size", "max_position_embeddings"):
        assert getattr(config, name) == getattr(main_job, name), name
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        SparseMoeConfig.from_preset("realtime", num_experts_per_tok=9)
    check_train_options(config, TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=1),
                        block_size=256, tokenizer_min_frequency=2, time_budget_minutes=9, sample_prompt="x",
                        sample_max_new_tokens=8)
    assert preset_differences(config, "realtime") == {}
    assert preset_differences(SparseMoeConfig.from_preset("realtime", hidden_size=64), "realtime") == {
        "hidden_size": (96, 64)}


def test_token_positions_counts_padding_against_a_naive_count():
    """The padding bound's arithmetic, against a position-by-position count of what each forward computes."""
    prompts = [[1] * 5, [1] * 2, [1] * 9, [1] * 3]
    new_tokens = [4, 1, 2, 6]

    def naive(batch_size):
        positions = 0
        for i in range(0, len(prompts), batch_size):
            rows, steps = prompts[i : i + batch_size], new_tokens[i : i + batch_size]
            positions += sum(max(map(len, rows)) for _ in rows)  # prefill: every row padded to the longest prompt
            positions += sum(len(rows) for _ in range(max(steps) - 1))  # decode: every row until the longest is done
        return positions

    assert token_positions(prompts, new_tokens, None) == (5 + 2 + 9 + 3) + (3 + 0 + 1 + 5)
    for batch_size in (1, 2, 4):
        assert token_positions(prompts, new_tokens, batch_size) == naive(batch_size)
    assert token_positions(prompts, new_tokens, 1) == token_positions(prompts, new_tokens, None)


def test_static_batching_server_batches_what_has_arrived():
    """The online baseline: requests that arrive while a batch runs wait for it, then go together (a fake model
    records each padded `generate` call's rows)."""
    calls = []

    def fake_padded_generate(model, prompts, new_tokens):
        calls.append([p[0] for p in prompts])
        bench.time.sleep(0.05)
        return [[p[0]] * n for p, n in zip(prompts, new_tokens)]

    original = bench.padded_generate
    bench.padded_generate = fake_padded_generate
    try:
        prompts, new_tokens = [[0], [1], [2], [3]], [1, 2, 1, 2]
        # request 0 alone at t=0; 1 and 2 arrive during its batch; 3 long after
        completions, outputs = bench.static_batching_server(None, prompts, new_tokens, [0.0, 0.01, 0.02, 0.3], 8)
    finally:
        bench.padded_generate = original
    assert calls == [[0], [1, 2], [3]]
    assert outputs == [[0], [1, 1], [2], [3, 3]]
    assert completions[1] == completions[2] and completions[0] < completions[1] < completions[3]
    assert completions[3] >= 0.3
