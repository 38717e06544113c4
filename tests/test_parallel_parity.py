"""DDP and FSDP2 on 2 CPU processes (gloo) equal one process over 10 AdamW steps, for MoE (top-k, top-p) and
AdaptiveDepth, including experts that receive no token on one rank and the all-reduced router-bias update; a
2-stage pipeline (GPipe, 1F1B) equals one process accumulating the same micro-batches."""

import json

import pytest
import torch
from conftest import tiny_sparse_moe_config, torchrun
from lightarch import SparseMoeForCausalLM
from lightarch.training.parallel import data_parallel_moe_loss, local_balance_loss_gap
from lightarch.training.parallel.parity import tiny_config

# the README's `-n 2 --dist loadgroup` runs this module on one xdist worker, so its module-scoped launch runs once
pytestmark = pytest.mark.xdist_group("test_parallel_parity")

CASES = [f"{kind}/{engine}" for kind in ("sparse_moe_top_k", "sparse_moe_top_p", "adaptive_depth")
         for engine in ("ddp", "fsdp2")]
# pipeline parallelism: one stage per rank, 2 micro-batches per step, both schedules
PIPELINE_CASES = ["sparse_moe_top_k/pp_gpipe", "sparse_moe_top_p/pp_1f1b", "sparse_moe_shared_qk_norm/pp_1f1b"]


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> list[dict]:
    """One torchrun launch runs every case (launching costs more than the tiny models' training)."""
    out = tmp_path_factory.mktemp("parity")
    torchrun("-m", "lightarch.training.parallel.parity", str(out), "--steps", "10",
             "--cases", ",".join(CASES + PIPELINE_CASES))
    return [json.loads((out / f"parity-rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("case", CASES)
def test_data_parallel_training_equals_one_process(parity, case):
    for rank in parity:
        result = rank["cases"][case]
        assert len(result["losses"]) == 10
        assert result["loss_max_diff"] < 1e-5, result
        assert result["grad_max_rel"] < 1e-5, result  # per parameter: |g - g_ref| / |g_ref|, every step
        # rank 1 routes no token to some expert that rank 0 uses, in every MoE layer at every step
        num_moe_layers = 3 if case.startswith("adaptive_depth") else 2
        assert result["zero_token_layer_steps"] == 10 * num_moe_layers


@pytest.mark.parametrize("kind", ["sparse_moe_top_k", "adaptive_depth"])
def test_fsdp2_ranks_hold_half_of_the_training_state(parity, kind):
    for rank in parity:
        sharded, replicated = rank["cases"][f"{kind}/fsdp2"], rank["cases"][f"{kind}/ddp"]
        for key in ("held_parameters", "held_gradients", "held_optimizer_state"):
            assert sharded[key] <= 0.5 + 0.02, (key, sharded[key])  # dim-0 shards: padding rows at most
            assert replicated[key] == pytest.approx(1.0)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_router_bias_update_sees_global_counts(parity, engine):
    for rank in parity:
        result = rank["cases"][f"sparse_moe_top_k/{engine}"]
        assert result["biases_moved"]
        assert result["bias_max_diff"] == 0.0  # sign steps of rate 0.01 from the same loads: bit-identical
    # the run can tell: on some rank and step, that rank's own counts alone would have moved a bias differently
    assert max(rank["cases"][f"sparse_moe_top_k/{engine}"]["local_update_would_differ"] for rank in parity) > 0


def test_each_ranks_own_loss_is_not_the_one_process_loss(parity):
    """Negative control: backpropagating each rank's `outputs.loss` (local balance loss) breaks parity."""
    result = parity[0]["cases"]["sparse_moe_top_k/ddp/local_loss"]
    assert result["loss_max_diff"] > 1e-3
    assert result["grad_max_rel"] > 1e-2


def test_data_parallel_loss_in_one_process_is_the_model_loss():
    torch.manual_seed(0)
    config = tiny_sparse_moe_config(router_aux_loss_coef=0.1, router_z_loss_coef=0.01, router_mode="top_p")
    model = SparseMoeForCausalLM(config).train()
    ids = torch.randint(3, 97, (2, 9))
    loss, global_loss, records = data_parallel_moe_loss(model, config, {"input_ids": ids, "labels": ids})
    expected = model(input_ids=ids, labels=ids).loss
    assert len(records) == 3  # one Router call per MoE layer
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(global_loss, expected.detach(), rtol=0, atol=1e-6)


def test_local_balance_loss_explains_the_sharded_trainer_gap():
    """Averaging per-shard losses differs from the full-batch loss only through the balance loss (the 3e-4 gap)."""
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (4, 16))
    batch = {"input_ids": ids, "labels": ids}
    with_balance = SparseMoeForCausalLM(tiny_sparse_moe_config()).train()  # router_aux_loss_coef=0.01
    assert abs(local_balance_loss_gap(with_balance, batch, world_size=2)) > 1e-5  # 2.8e-5 measured
    torch.manual_seed(0)
    without = SparseMoeForCausalLM(tiny_sparse_moe_config(router_aux_loss_coef=0.0, router_z_loss_coef=0.01)).train()
    assert abs(local_balance_loss_gap(without, batch, world_size=2)) < 1e-6  # LM loss and z-loss are linear means


def test_unequal_shards_are_refused_in_one_process_too():
    config = tiny_sparse_moe_config()
    with pytest.raises(ValueError, match="labels"):
        data_parallel_moe_loss(SparseMoeForCausalLM(config), config, {"input_ids": torch.randint(3, 97, (1, 5))})


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_pipeline_training_equals_one_process_over_the_same_micro_batches(parity, case):
    """Each stage's gradients (by parameter name) and the loss equal one process accumulating the same 2 micro-batches;
    the router auxiliary loss crosses the stages (carried beside the hidden states), and together the two stages
    check every parameter once."""
    checked = []
    for rank in parity:
        result = rank["cases"][case]
        assert len(result["losses"]) == 10
        assert result["loss_max_diff"] < 1e-5, result
        assert result["grad_max_rel"] < 1e-5, result
        assert 0 < result["held_parameters"] < 1
        # the second micro-batch repeats one token: its tokens route to the same experts, the others get none
        assert result["zero_token_records"] >= 10
        checked += result["checked_parameters"]
    assert parity[0]["cases"][case]["layers"] == [0, 2] and parity[1]["cases"][case]["layers"] == [2, 3]
    assert sorted(checked) == sorted(set(checked))  # no parameter on both stages
    kind = case.split("/")[0]
    model = SparseMoeForCausalLM(tiny_config(kind))
    assert set(checked) == {name for name, _ in model.named_parameters()}
    assert sum(rank["cases"][case]["held_parameters"] for rank in parity) == pytest.approx(1.0)


def test_pipeline_router_bias_updates_per_stage(parity):
    """Each stage's balanced routers move exactly as in one process (their loads are not summed with another stage's
    layers: the update runs over the stage's own data-parallel group)."""
    for rank in parity:
        result = rank["cases"]["sparse_moe_top_k/pp_gpipe"]
        assert result["biases_moved"]
        assert result["bias_max_diff"] == 0.0


def test_pipeline_stage_refuses_what_it_cannot_cut():
    from lightarch import AdaptiveDepthConfig, AdaptiveDepthForCausalLM
    from lightarch.training.parallel import pipeline_stage

    with pytest.raises(ValueError, match="num_stages=5 is more than the model's 3 decoder layers"):
        pipeline_stage(SparseMoeForCausalLM(tiny_sparse_moe_config()), 0, 5)
    adaptive = AdaptiveDepthForCausalLM(AdaptiveDepthConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, exit_layers=[1, 2], estimator_input_layer=1))
    with pytest.raises(TypeError, match="AdaptiveDepth"):
        pipeline_stage(adaptive, 0, 2)
