"""The whole-model MoE benchmark (lightarch.evaluation.benchmarks.moe): `scripts/bench_moe.py --quick` runs end to end
and writes well-formed results for both architectures; the same-model check catches different weights; bad options
are one-line errors naming the option. Nothing here is timed."""

import json

import pytest
import torch

from conftest import PNG_MAGIC, run_script
from lightarch.evaluation.benchmarks.moe import (
    TARGETS,
    build_pair,
    check_moe_options,
    check_same_model,
    make_run,
    measurements,
)

MICRO = dict(hidden_size=32, num_hidden_layers=2, num_experts=4, moe_intermediate_size=16, vocab_size=128)
QUICK_MEASUREMENTS = ["decode_b1", "decode_b2", "prefill_32", "prefill_64", "train_step"]


def test_quick_run_writes_json_table_and_plot(tmp_path):
    result = run_script("bench_moe", "--quick", "--num_threads", "1", "--output_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "results.md").read_text()
    assert table in result.stdout  # the table is printed too
    assert (tmp_path / "results.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic writes left no temporary file

    assert results["config"]["architectures"] == ["qwen3_moe", "mixtral"]
    assert results["config"]["hidden_size"] == 32 and results["config"]["rounds"] == 2
    assert results["environment"]["torch_num_threads"] == 1
    assert set(results["results"]) == {"qwen3_moe", "mixtral"}
    for architecture, entry in results["results"].items():
        assert entry["max_abs_logit_diff"] <= 1e-4  # the same model, converted
        assert list(entry["measurements"]) == QUICK_MEASUREMENTS
        for name, row in entry["measurements"].items():
            for side in ("transformers", "lightarch"):
                assert len(row[side]["seconds"]) == 2 and all(s > 0 for s in row[side]["seconds"])
                assert row[side]["tokens_per_s"] > 0
            assert row["ratio"] == pytest.approx(row["lightarch"]["tokens_per_s"] / row["transformers"]["tokens_per_s"])
            assert row["target"] == TARGETS.get(name)
        assert entry["measurements"]["decode_b2"]["tokens"] == 2 * 4  # batch x new tokens
        assert entry["measurements"]["prefill_64"]["tokens"] == 64
        assert entry["measurements"]["train_step"]["tokens"] == 2 * 16
        assert isinstance(entry["measurements"]["decode_b1"]["same_greedy_tokens"], bool)
    model_names = {"Qwen3MoeForCausalLM", "MixtralForCausalLM"}
    assert {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "Causal" in line} \
        == model_names
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 2 * len(QUICK_MEASUREMENTS)


@pytest.mark.parametrize("architecture", ["qwen3_moe", "mixtral"])
def test_pairs_share_weights_and_the_check_catches_a_difference(architecture):
    reference, converted = build_pair(architecture, **MICRO)
    assert check_same_model(reference, converted, vocab_size=128) <= 1e-5
    with torch.no_grad():
        converted.model.layers[0].mlp.experts.down_proj.mul_(1.05)
    with pytest.raises(AssertionError, match="max abs logit difference"):
        check_same_model(reference, converted, vocab_size=128)


def test_runs_count_their_tokens_and_set_the_mode():
    reference, converted = build_pair("qwen3_moe", **MICRO)
    options = dict(new_tokens=3, prompt_length=5, train_batch_size=2, train_seq_len=8)
    names = measurements([1, 2], [16])
    assert names == ["decode_b1", "decode_b2", "prefill_16", "train_step"]
    for name, tokens in zip(names, (3, 6, 16, 16)):
        run, counted = make_run(converted, name, 128, **options)
        assert counted == tokens and converted.training == (name == "train_step")
        output = run()
        if name == "decode_b2":
            assert output.shape == (2, 5 + 3)
    same = [make_run(model, "decode_b1", 128, **options)[0]() for model in (reference, converted)]
    assert same[0].shape == same[1].shape  # the two models get the same prompt


@pytest.mark.parametrize("args, message", [
    (["--architectures", "llama"], "--architectures: unknown architecture 'llama'"),
    (["--decode_batch_sizes", "1,x"], "--decode_batch_sizes must be comma-separated integers"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    result = run_script("bench_moe", "--quick", *args, "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_check_options_name_the_option():
    check_moe_options(rounds=1, warmup=0, decode_batch_sizes=[1, 8], experts_implementation="eager")
    for options, message in ((dict(rounds=0), "--rounds must be >= 1"),
                             (dict(decode_batch_sizes=[0]), "--decode_batch_sizes must be >= 1"),
                             (dict(warmup=-1), "--warmup must be >= 0"),
                             (dict(experts_implementation="batched"), "--experts_implementation must be one of")):
        with pytest.raises(ValueError, match=message):
            check_moe_options(**options)
