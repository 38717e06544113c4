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
                        "--padded_batch_sizes", "3,6", "--throughput_rounds", "1", "--num_threads", "1",
                        "--throughput_new_tokens", "4,2-9", "--online_workload", "2-9", "--online_rates", "200,2000"])
    finally:
        torch.set_num_threads(threads)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(written["latency"]) == set(variants.split(",")) == set(results["latency"])
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


def test_bench_inference_rejects_bad_options(tmp_path):
    from scripts.bench_inference import main

    with pytest.raises(ValueError, match="--variants 'torch_fp16'"):
        main(["--variants", "torch_fp16"])
    with pytest.raises(ValueError, match="has no model.*--config_overrides"):
        main(["--model_dir", str(tmp_path / "missing"), "--train_if_missing", "false"])
    with pytest.raises(ValueError, match="--padded_batch_sizes '0'"):
        main(["--padded_batch_sizes", "0"])
    with pytest.raises(ValueError, match="--cb_attn_implementation 'sdpa_paged'"):
        main(["--cb_attn_implementation", "sdpa_paged"])
    with pytest.raises(ValueError, match="--preset 'huge' is unknown"):
        main(["--preset", "huge"])
    with pytest.raises(ValueError, match="--throughput_new_tokens '16,9-4'"):
        main(["--throughput_new_tokens", "16,9-4"])
    with pytest.raises(ValueError, match="--online_rates '4,-1'"):
        main(["--online_rates", "4,-1"])
    with pytest.raises(ValueError, match="--online_workload '32' is not one of"):
        main(["--online_workload", "32"])


def test_realtime_preset_validates_and_the_main_job_accepts_it(tmp_path):
    """The benchmark's model: a valid top-k preset whose vocabulary is the main job's tokenizer, which scripts/train.py
    turns into exactly that config (parsed and validated, not trained)."""
    from lightarch import SparseMoeConfig
    from lightarch.configuration.configuration_sparse_moe import SPARSE_MOE_PRESETS
    from scripts.bench_inference import BenchArguments, preset_differences, train_command
    from scripts.train import DataArguments, build_config, parse_args

    assert BenchArguments().preset == "realtime"
    config = SparseMoeConfig.from_preset("realtime")
    assert config.router_mode == "top_k" and config.vocab_size == DataArguments().vocab_size
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        SparseMoeConfig.from_preset("realtime", num_experts_per_tok=9)

    command = train_command("realtime", str(tmp_path / "out"))
    model_args, data_args, _ = parse_args(command[2:])
    trained = build_config(model_args, data_args.vocab_size, data_args.block_size,
                           {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    assert preset_differences(trained, "realtime") == {}
    assert set(SPARSE_MOE_PRESETS["realtime"]) - {"vocab_size"} <= set(json.loads(command[-1]))
    assert preset_differences(SparseMoeConfig.from_preset("realtime", hidden_size=64), "realtime") == {
        "hidden_size": (96, 64)}


def test_token_positions_counts_padding_against_a_naive_count():
    """The padding bound's arithmetic, against a position-by-position count of what each forward computes."""
    from scripts.bench_inference import token_positions

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
    import scripts.bench_inference as bench

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
