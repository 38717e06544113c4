"""The paper scaling model: ZeRO memory by hand and against the ZeRO paper, the pipeline bubble, monotonic
behaviour, the article's ZeRO-3 point, and the plan_parallel.py script."""

import json
from dataclasses import replace

import pytest
from conftest import run_script, tiny_sparse_moe_config
from lightarch.training.parallel.planner import (
    ARTICLE_BATCH,
    ARTICLE_CLUSTER,
    ARTICLE_MODEL,
    BatchSpec,
    ClusterSpec,
    Layout,
    ModelSpec,
    article_zero3_point,
    model_spec_from_config,
    model_states_bytes,
    pipeline_bubble_fraction,
    plan,
    scaling_curve,
)

MODEL = ModelSpec(num_parameters=1e9, num_layers=24, hidden_size=2048, num_attention_heads=16)
CLUSTER = ClusterSpec(num_gpus=64)
BATCH = BatchSpec(sequence_length=1024, micro_batch_size=2, micro_batches=4)


def test_zero_memory_by_hand():
    """Rajbhandari et al.: 2 + 2 + 12 bytes per parameter, sharded over N by stage."""
    psi, n = 1e9, 8
    totals = {stage: sum(model_states_bytes(psi, n, stage).values()) for stage in (0, 1, 2, 3)}
    assert totals[0] == pytest.approx(16e9)
    assert totals[1] == pytest.approx(4e9 + 12e9 / 8)  # 5.5 GB
    assert totals[2] == pytest.approx(2e9 + 14e9 / 8)  # 3.75 GB
    assert totals[3] == pytest.approx(16e9 / 8)  # 2 GB


def test_zero_paper_figure_1():
    """Figure 1 of arXiv:1910.02054 (7.5B parameters, N_d = 64): 120, 31.4, 16.6 and 1.9 GB per device."""
    from lightarch.training.parallel.planner import zero_paper_figure1

    figure = zero_paper_figure1()
    published = {"baseline": 120, "P_os": 31.4, "P_os+g": 16.6, "P_os+g+p": 1.9}
    for name, value in published.items():
        assert round(figure[name], 1) == pytest.approx(value, abs=0.05), name


def test_pipeline_bubble():
    assert pipeline_bubble_fraction(1, 8) == 0.0
    assert pipeline_bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert pipeline_bubble_fraction(8, 1) == pytest.approx(7 / 8)
    fractions = [pipeline_bubble_fraction(4, m) for m in (1, 2, 4, 8, 32)]
    assert fractions == sorted(fractions, reverse=True)
    step = plan(MODEL, CLUSTER, BATCH, Layout(pp=4))
    assert step.bubble_fraction == pytest.approx(3 / 7)
    assert step.step_time_no_overlap >= step.compute_time / (1 - 3 / 7)


def test_memory_falls_with_the_zero_stage_and_with_gpus():
    per_stage = [plan(MODEL, CLUSTER, BATCH, Layout(zero_stage=s)).memory_total for s in (0, 1, 2, 3)]
    assert per_stage == sorted(per_stage, reverse=True) and len(set(per_stage)) == 4
    curve = scaling_curve(MODEL, CLUSTER, BATCH, Layout(zero_stage=3), [8, 16, 64, 256, 1024])
    memory = [p.memory_total for p in curve]
    assert memory == sorted(memory, reverse=True)


def test_communication_and_efficiency_move_the_right_way():
    curve = scaling_curve(MODEL, CLUSTER, BATCH, Layout(zero_stage=3), [16, 64, 256, 1024, 4096])
    comm = [p.comm_time["data_parallel"] for p in curve]
    assert comm == sorted(comm)  # more devices: more (N-1)/N volume and more ring latency
    efficiency = [p.efficiency_no_overlap for p in curve]
    assert efficiency == sorted(efficiency, reverse=True)
    for p in curve:
        assert 0 < p.efficiency_no_overlap <= p.efficiency_overlap <= 1
    # ZeRO-3 moves 1.5x the bytes of ZeRO-1 per micro-batch round (3 vs 2 elements per parameter)
    single = replace(BATCH, micro_batches=1)
    zero1 = plan(MODEL, CLUSTER, single, Layout(zero_stage=1)).comm_bytes["data_parallel"]
    zero3 = plan(MODEL, CLUSTER, single, Layout(zero_stage=3)).comm_bytes["data_parallel"]
    assert zero3 == pytest.approx(1.5 * zero1)
    faster = plan(MODEL, replace(CLUSTER, inter_bandwidth=4 * CLUSTER.inter_bandwidth), BATCH, Layout(zero_stage=3))
    assert faster.efficiency_no_overlap > plan(MODEL, CLUSTER, BATCH, Layout(zero_stage=3)).efficiency_no_overlap


def test_tensor_and_expert_parallel_traffic_by_hand():
    one_layer = ModelSpec(num_parameters=1e8, num_layers=1, hidden_size=1024, num_attention_heads=8)
    batch = BatchSpec(sequence_length=2048, micro_batch_size=1, micro_batches=1)
    tp = plan(one_layer, ClusterSpec(num_gpus=2), batch, Layout(tp=2))
    # 4 all-reduces of 2048 x 1024 bf16 activations, ring: 2 (n-1)/n of the buffer each
    assert tp.comm_bytes["tensor_parallel"] == pytest.approx(4 * 2 * 0.5 * 2048 * 1024 * 2)
    moe = ModelSpec(num_parameters=1e9, num_layers=2, hidden_size=512, num_attention_heads=8,
                    expert_parameters=8e8, num_moe_layers=2, experts_per_token=2, active_parameters=3e8)
    ep = plan(moe, ClusterSpec(num_gpus=8), batch, Layout(ep=4))
    assert ep.comm_bytes["expert_parallel"] == pytest.approx(4 * 2 * 2048 * 2 * 512 * 2 * 3 / 4)
    dense = plan(moe, ClusterSpec(num_gpus=8), batch, Layout())
    assert ep.memory["optimizer"] < dense.memory["optimizer"]  # experts sharded 4 ways


def test_the_articles_zero3_point():
    """92% at 1,000 GPUs for ZeRO-3 under the stated assumptions (planner docstring); a consistency check."""
    point = article_zero3_point()
    assert point.num_gpus == 1000 and point.fits
    assert point.efficiency_overlap == pytest.approx(0.92, abs=0.015)
    assert point.efficiency_no_overlap < point.efficiency_overlap
    ddp = plan(ARTICLE_MODEL, ARTICLE_CLUSTER, ARTICLE_BATCH, Layout(zero_stage=0))
    assert not ddp.fits  # 175B x 16 bytes does not fit in 80 GB without sharding


def test_model_spec_from_a_lightarch_config():
    from lightarch import SparseMoeForCausalLM
    from lightarch.evaluation.parameters import parameter_counts

    config = tiny_sparse_moe_config(first_k_dense_layers=1)
    spec = model_spec_from_config(config)
    counts = parameter_counts(SparseMoeForCausalLM(config))
    assert spec.num_parameters == counts["total"]
    assert spec.expert_parameters == counts["routed_experts"] > 0
    assert spec.num_moe_layers == 2 and spec.num_layers == 3


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="mfu"):
        ClusterSpec(num_gpus=8, mfu=0)
    with pytest.raises(ValueError, match="tp=16"):
        plan(MODEL, ClusterSpec(num_gpus=64), BATCH, Layout(tp=16))
    with pytest.raises(ValueError, match="multiple"):
        plan(MODEL, ClusterSpec(num_gpus=10), BATCH, Layout(pp=4))


def test_script_writes_json_markdown_and_png(tmp_path):
    out = tmp_path / "plan"
    result = run_script("plan_parallel", "--num_parameters", "7.5e9", "--num_layers", "32", "--hidden_size", "4096",
                        "--num_gpus", "64", "--gpu_counts", "8,64,512", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "plan.json").read_text())
    names = [s["strategy"] for s in report["strategies"]]
    assert {"DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP (full shard)"} <= set(names)
    assert any(n.startswith("TP") for n in names) and any(n.startswith("PP") for n in names)
    assert [p["num_gpus"] for p in report["curves"]["ZeRO-3"]] == [8, 64, 512]
    assert (out / "plan.md").read_text().startswith("| strategy |")
    assert (out / "efficiency.png").read_bytes()[:4] == b"\x89PNG"
    bad = run_script("plan_parallel", "--output_dir", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--num_parameters" in bad.stderr
