"""DeepSpeed ZeRO-3 (a custom loop and `TrainingArguments(deepspeed=...)`) and FSDP2 on 2 CPU processes (gloo)
equal one process over 10 AdamW steps for MoE (top-k, top-p), including experts that get no token on one rank;
their sharded checkpoints resume with the losses of an uninterrupted run and consolidate into folders that
`from_pretrained` loads in one process with the sharded model's outputs."""

import importlib.util
import json

import pytest
import torch
from conftest import torchrun
from lightarch import SparseMoeForCausalLM
from lightarch.training.parallel import parity
from lightarch.training.parallel.zero3 import (
    deepspeed_config,
    deepspeed_config_path,
    set_moe_leaf_modules,
    zero3_training_arguments,
)

# the README's `-n 2 --dist loadgroup` runs this module on one xdist worker, so its module-scoped launch runs once
pytestmark = pytest.mark.xdist_group("test_parallel_zero3")

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (the parallel extra)")
KINDS = ["sparse_moe_top_k", "sparse_moe_top_p"]
RESUME_AT = 5


# FSDP2's own parity is tests/test_parallel_parity.py's; here it is the sharded-checkpoint case
ZERO3_CASES = [f"{kind}/zero3" for kind in KINDS] + [f"sparse_moe_top_k/{engine}" for engine in
                                                    ("trainer_zero3", "trainer_zero3_local")]
CASES = ["sparse_moe_top_k/fsdp2"] + (ZERO3_CASES if HAS_DEEPSPEED else [])
SHARDED = [case for case in CASES if case.endswith(("/fsdp2", "/zero3"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch: ZeRO-3 parity (loop and Trainer); FSDP2 / ZeRO-3 checkpoints after 5 steps, resumed runs."""
    out = tmp_path_factory.mktemp("zero3")
    torchrun("-m", "lightarch.training.parallel.parity", str(out), "--steps", "10", "--cases", ",".join(CASES),
              "--resume_at", str(RESUME_AT))
    return out, [json.loads((out / f"parity-rank{rank}.json").read_text())["cases"] for rank in (0, 1)]


def _logits(folder, input_ids) -> torch.Tensor:
    model = SparseMoeForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits  # (B, T, V)


@needs_deepspeed
@pytest.mark.parametrize("kind", KINDS)
def test_zero3_training_equals_one_process(runs, kind):
    for cases in runs[1]:
        result = cases[f"{kind}/zero3"]
        assert len(result["losses"]) == 10
        assert result["loss_max_diff"] < 1e-5, result
        assert result["grad_max_rel"] < 1e-5, result  # per parameter, every step: the gathered ZeRO-3 gradient
        assert result["zero_token_layer_steps"] == 10 * 2  # rank 1 leaves an expert rank 0 uses, every layer/step
        assert result["leaf_modules"] == 2  # the shipped config's leaf_module flagged both MoE blocks
        assert result["bias_max_diff"] == 0.0
        assert result["biases_moved"] == (kind == "sparse_moe_top_k")


@needs_deepspeed
def test_zero3_ranks_hold_half_of_the_training_state(runs):
    for cases in runs[1]:
        for kind in KINDS:
            for key in ("held_parameters", "held_gradients", "held_optimizer_state"):
                assert 0.45 <= cases[f"{kind}/zero3"][key] <= 0.5 + 0.02, (kind, key)


@pytest.mark.parametrize("case", SHARDED)
def test_resumed_run_has_the_uninterrupted_losses(runs, case):
    for cases in runs[1]:
        uninterrupted, resumed = cases[case], cases[f"{case}/resumed"]
        assert len(resumed["losses"]) == 10 - RESUME_AT
        for a, b in zip(uninterrupted["losses"][RESUME_AT:], resumed["losses"]):
            assert abs(a - b) < 1e-6, (uninterrupted["losses"], resumed["losses"])
        assert resumed["loss_max_diff"] < 1e-5 and resumed["grad_max_rel"] < 1e-5  # still the one-process run


def test_consolidated_fsdp2_folder_loads_with_the_sharded_outputs(runs):
    out, _ = runs
    kind = "sparse_moe_top_k"
    folder = out / "checkpoints" / f"{kind}-fsdp2-consolidated"
    saved = torch.load(out / "checkpoints" / f"{kind}-fsdp2-outputs.pt")
    torch.testing.assert_close(_logits(folder, saved["input_ids"]), saved["logits"], rtol=0, atol=1e-5)
    # the folder is the model's own (remote code + auto_map), not torch's FSDP subclass
    assert (folder / "modeling_sparse_moe.py").is_file() and not list(folder.glob("_fsdp*.py"))
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_sparse_moe.SparseMoeForCausalLM"


@needs_deepspeed
@pytest.mark.parametrize("kind", KINDS)
def test_zero3_checkpoint_consolidates_with_zero_to_fp32(runs, kind, tmp_path):
    from lightarch.training.parallel.sharded_checkpoints import (
        consolidate_zero3_checkpoint,
    )

    out, _ = runs
    saved = torch.load(out / "checkpoints" / f"{kind}-zero3-outputs.pt")
    consolidate_zero3_checkpoint(out / "checkpoints" / f"{kind}-zero3", SparseMoeForCausalLM(parity.tiny_config(kind)),
                                 tmp_path / "consolidated")
    assert (tmp_path / "consolidated" / "model.safetensors").is_file()
    torch.testing.assert_close(_logits(tmp_path / "consolidated", saved["input_ids"]), saved["logits"],
                               rtol=0, atol=1e-5)


@needs_deepspeed
def test_trainer_runs_zero3_on_cpu_and_equals_one_process(runs):
    for cases in runs[1]:
        result = cases["sparse_moe_top_k/trainer_zero3"]
        assert result["world_size"] == 2 and result["accelerate_processes"] == 2  # no world-size disagreement
        assert result["engine"] == "DeepSpeedEngine" and result["zero_stage"] == 3
        assert result["partitioned"] and result["held_parameters"] == pytest.approx(0.5, abs=0.02)
        assert result["held_optimizer_state"] == pytest.approx(0.5, abs=0.02)
        assert result["leaf_modules"] == ["SparseMoeBlock", "SparseMoeBlock"]
        assert len(result["losses"]) == 10
        assert result["loss_max_diff"] < 1e-5, result  # the global-batch loss, router balance term included
        assert result["biases_moved"] and result["bias_max_diff"] == 0.0  # the callback under ZeRO-3


@needs_deepspeed
def test_a_plain_trainer_under_zero3_is_not_the_one_process_run(runs):
    """Negative control: without DataParallelMoeTrainer each rank backpropagates its own balance loss."""
    result = runs[1][0]["sparse_moe_top_k/trainer_zero3_local"]
    assert result["zero_stage"] == 3 and len(result["losses"]) == 10
    assert result["loss_max_diff"] > 1e-3  # 3.5e-2 measured


@needs_deepspeed
def test_trainer_zero3_resumes_from_its_sharded_checkpoint(runs):
    for cases in runs[1]:
        result = cases["sparse_moe_top_k/trainer_zero3"]
        assert "global_step5/zero_pp_rank_1_mp_rank_00_optim_states.pt" in result["checkpoint_files"]
        assert len(result["resumed_losses"]) == 10 - RESUME_AT
        for a, b in zip(result["losses"][RESUME_AT:], result["resumed_losses"]):
            assert abs(a - b) < 1e-6, (result["losses"], result["resumed_losses"])
        assert result["resumed_biases_max_diff"] == 0.0  # the router biases came back with the module state


@needs_deepspeed
def test_trainer_checkpoint_consolidates_to_its_gathered_weights(runs, tmp_path):
    """DeepSpeed's two consolidations of the Trainer's step-5 checkpoint agree: zero_to_fp32 over the rank files,
    and the weights the Trainer gathered into model.safetensors while saving."""
    from lightarch.training.parallel.sharded_checkpoints import (
        consolidate_zero3_checkpoint,
    )

    checkpoint = runs[0] / "trainer_zero3-sparse_moe_top_k" / "trainer" / f"checkpoint-{RESUME_AT}"
    rebuilt = consolidate_zero3_checkpoint(checkpoint, SparseMoeForCausalLM(parity.tiny_config("sparse_moe_top_k")),
                                           tmp_path / "consolidated", tag=None)
    gathered = SparseMoeForCausalLM.from_pretrained(checkpoint)
    for (name, a), (_, b) in zip(rebuilt.state_dict().items(), gathered.state_dict().items()):
        assert torch.equal(a, b), name


@needs_deepspeed
def test_trainer_zero3_save_model_loads_in_one_process(runs):
    out = runs[0] / "trainer_zero3-sparse_moe_top_k"
    reference = torch.load(out / "reference-outputs.pt")
    assert (out / "saved" / "model.safetensors").is_file()
    torch.testing.assert_close(_logits(out / "saved", reference["input_ids"]), reference["logits"],
                               rtol=0, atol=1e-4)  # 10 steps of parameters equal to ~1e-6


def test_shipped_config_is_package_data_and_fills_the_trainer_fields():
    path = deepspeed_config_path()
    assert path.name == "zero3_cpu.json" and path.is_file()
    config = deepspeed_config(micro_batch_size=2, gradient_accumulation_steps=3, world_size=2)
    assert config["zero_optimization"]["stage"] == 3 and "optimizer" not in config  # the Trainer's torch AdamW
    assert config["train_batch_size"] == 12 and config["train_micro_batch_size_per_gpu"] == 2
    assert deepspeed_config()["train_batch_size"] == "auto"
    with pytest.raises(ValueError, match="`name`='zero4'"):
        deepspeed_config_path("zero4")


@needs_deepspeed
def test_moe_blocks_become_leaf_modules_from_the_config_and_the_helper():
    from deepspeed.runtime.zero.leaf_module_config import DeepSpeedZeroLeafModuleConfig
    from deepspeed.utils.z3_leaf_module import apply_zero_leaf_module_config

    leaf_config = DeepSpeedZeroLeafModuleConfig(**deepspeed_config()["zero_optimization"]["leaf_module"])
    model = SparseMoeForCausalLM(parity.tiny_config("sparse_moe_top_k"))  # layers 1 and 2 are MoE
    assert [type(m).__name__ for m in apply_zero_leaf_module_config(model, leaf_config)] == ["SparseMoeBlock"] * 2
    fresh = SparseMoeForCausalLM(parity.tiny_config("sparse_moe_top_p"))
    assert len(set_moe_leaf_modules(fresh)) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU launch rule")
def test_zero3_arguments_refuse_the_cpu_settings_that_break_deepspeed(tmp_path):
    with pytest.raises(ValueError, match="`use_cpu`=False"):
        zero3_training_arguments(str(tmp_path), use_cpu=False)
    with pytest.raises(ValueError, match="`ddp_backend`='nccl'"):
        zero3_training_arguments(str(tmp_path), ddp_backend="nccl")
