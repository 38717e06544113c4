"""Differential privacy (issue 16): per-sample gradients of every lightarch layer, DP-SGD through Trainer, the
accountant, the scripts."""

import json

import pytest
import torch
from conftest import run_script, tiny_sparse_moe_config
from lightarch import (
    AdaptiveDepthForCausalLM,
    AdaptiveDepthForSequenceClassification,
    SparseMoeForCausalLM,
    SparseMoeForSequenceClassification,
)
from lightarch.layers import Experts, RMSNorm, Router
from lightarch.training.privacy import (
    finish_per_sample_gradients,
    prepare_per_sample_gradients,
    private_loss,
)
from opacus import GradSampleModule
from test_adaptive_depth import tiny_config


def per_sample_and_naive(model, batch, dtype=torch.float64):
    """Opacus's per-sample gradients of `private_loss` on the batch, and each example's gradient computed alone."""
    model = model.to(dtype).train()
    wrapped = GradSampleModule(model, loss_reduction="mean")
    prepare_per_sample_gradients(wrapped)
    private_loss(model, batch).backward()
    finish_per_sample_gradients(model)
    batch_size = batch["input_ids"].shape[0]
    per_sample = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    wrapped.disable_hooks()
    naive = {name: [] for name in per_sample}
    for example in range(batch_size):
        model.zero_grad(set_to_none=True)
        model(**{key: value[example:example + 1] for key, value in batch.items()}).loss.backward()
        for name, p in model.named_parameters():
            naive[name].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    return per_sample, {name: torch.stack(grads) for name, grads in naive.items()}


def assert_oracle(model, batch):
    per_sample, naive = per_sample_and_naive(model, batch)
    kinds = set()
    for name, expected in naive.items():
        assert per_sample[name].shape == expected.shape, name
        torch.testing.assert_close(per_sample[name], expected, atol=1e-6, rtol=0, msg=name)
        kinds.add(type(model.get_submodule(name.rsplit(".", 1)[0])).__name__)
    return kinds


def lm_batch(batch_size=3, length=8):
    input_ids = torch.randint(3, 97, (batch_size, length))
    return {"input_ids": input_ids, "labels": input_ids}


@pytest.mark.parametrize("mode", ["top_k", "top_p"])
def test_sparse_moe_per_sample_gradients_equal_a_per_example_loop(mode):
    config = tiny_sparse_moe_config(router_mode=mode, num_shared_experts=1, use_qk_norm=True,
                                    experts_implementation="eager")
    kinds = assert_oracle(SparseMoeForCausalLM(config), lm_batch())
    assert {"Router", "Experts", "RMSNorm", "Linear", "Embedding"} <= kinds
    classifier = SparseMoeForSequenceClassification(
        tiny_sparse_moe_config(router_mode=mode, num_labels=3, experts_implementation="eager"))
    ids = torch.randint(3, 97, (3, 8))
    assert_oracle(classifier, {"input_ids": ids, "labels": torch.tensor([0, 2, 1])})


def test_grouped_mm_experts_per_sample_gradients_in_float32():
    """transformers' grouped_mm kernel (the default; float32 only) through the same experts sampler."""
    model = SparseMoeForCausalLM(tiny_sparse_moe_config(experts_implementation="grouped_mm"))
    per_sample, naive = per_sample_and_naive(model, lm_batch(), dtype=torch.float32)
    for name in naive:
        torch.testing.assert_close(per_sample[name], naive[name], atol=2e-5, rtol=1e-4, msg=name)


def test_adaptive_depth_per_sample_gradients_equal_a_per_example_loop():
    kinds = assert_oracle(AdaptiveDepthForCausalLM(tiny_config(experts_implementation="eager")), lm_batch())
    assert {"Router", "Experts", "RMSNorm", "Linear"} <= kinds  # exits' norms, estimator's layers, LM head
    classifier = AdaptiveDepthForSequenceClassification(tiny_config(num_labels=3, experts_implementation="eager"))
    ids = torch.randint(3, 97, (3, 8))
    assert_oracle(classifier, {"input_ids": ids, "labels": torch.tensor([0, 2, 1])})


def one_expert_model(mode: str) -> SparseMoeForCausalLM:
    """Every token of every example routes to expert 0 alone: experts 1..3 get no token."""
    config = tiny_sparse_moe_config(router_mode=mode, num_experts_per_tok=1, router_top_p=0.5,
                                    experts_implementation="eager")
    model = SparseMoeForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0  # a large shared component in every hidden state
        for layer in model.model.layers:
            if isinstance(layer.mlp.gate, Router):
                layer.mlp.gate.weight.zero_()
                layer.mlp.gate.weight[0, 0] = 3.0
    return model


@pytest.mark.parametrize("mode", ["top_k", "top_p"])
def test_per_sample_gradients_exact_when_every_token_picks_one_expert(mode):
    model = one_expert_model(mode)
    batch = lm_batch()
    selected = []
    for router in (m for m in model.modules() if isinstance(m, Router)):
        router.register_forward_hook(lambda module, args, output: selected.append(output[2]))
    with torch.no_grad():
        out = model(**batch)
    assert torch.all(out.experts_per_token == 1.0)
    assert all(bool((s[:, 0] == 0).all()) for s in selected)  # experts 1..3: no token in this batch
    per_sample, naive = per_sample_and_naive(model, batch)
    for name in naive:
        torch.testing.assert_close(per_sample[name], naive[name], atol=1e-6, rtol=0, msg=name)
    idle = per_sample["model.layers.0.mlp.experts.down_proj"][:, 1:]
    assert torch.count_nonzero(idle) == 0 and torch.count_nonzero(per_sample["model.layers.0.mlp.experts.down_proj"])


def test_jittered_router_is_refused():
    model = SparseMoeForCausalLM(tiny_sparse_moe_config(router_jitter_noise=0.1))
    with pytest.raises(ValueError, match="router_jitter_noise"):
        prepare_per_sample_gradients(GradSampleModule(model))


def test_uneven_label_counts_are_refused():
    model = SparseMoeForCausalLM(tiny_sparse_moe_config())
    batch = lm_batch()
    batch["labels"] = batch["labels"].clone()
    batch["labels"][0, -2:] = -100
    with pytest.raises(ValueError, match="same number of labelled tokens"):
        private_loss(model, batch)


def test_samplers_are_registered():
    from opacus.grad_sample import GradSampleModule as Module

    assert {RMSNorm, Experts} <= set(Module.GRAD_SAMPLERS)


# ---- DP-SGD through Trainer ----


def private_trainer(tmp_path, max_steps=6, save_steps=3, model=None, callbacks=None, **privacy):
    from lightarch.data.corpus import BlockDataset
    from lightarch.training.privacy import PrivacyArguments, PrivateTrainer
    from transformers import TrainingArguments, default_data_collator

    torch.manual_seed(0)
    model = model if model is not None else SparseMoeForCausalLM(tiny_sparse_moe_config(router_mode="top_p"))
    args = TrainingArguments(str(tmp_path), use_cpu=True, max_steps=max_steps, per_device_train_batch_size=8,
                             max_grad_norm=privacy.pop("max_grad_norm", 0.0), logging_steps=2, save_steps=save_steps,
                             report_to="none", learning_rate=1e-2, disable_tqdm=True, seed=0)
    data = BlockDataset(torch.randint(3, 97, (64, 8), generator=torch.Generator().manual_seed(1)))
    return PrivateTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                          callbacks=callbacks, privacy=PrivacyArguments(**privacy))


def test_private_training_logs_epsilon_within_target_and_independent_accountant(tmp_path):
    from lightarch.training.privacy import independent_epsilon

    trainer = private_trainer(tmp_path, target_epsilon=3.0, max_physical_batch_size=3)
    trainer.train()
    report = trainer.privacy_report()
    logged = [entry["epsilon"] for entry in trainer.state.log_history if "epsilon" in entry]
    assert len(logged) >= 3 and logged == sorted(logged) and all("grad_norm" not in e for e in trainer.state.log_history)
    assert report["steps"] == 6 and report["sample_rate"] == 1 / 8 and report["delta"] == 1 / 64
    assert 2.5 < report["epsilon"] <= 3.0
    independent = independent_epsilon(report["noise_multiplier"], report["sample_rate"], 6, report["delta"])
    assert abs(report["epsilon"] - independent) <= 0.05 * independent


@pytest.mark.parametrize("sigma,rate,steps,delta", [(1.0, 0.01, 1000, 1e-5), (0.7, 0.05, 300, 1e-4)])
def test_opacus_epsilon_agrees_with_dp_accounting(sigma, rate, steps, delta):
    from lightarch.training.privacy import independent_epsilon, opacus_epsilon

    ours = opacus_epsilon([(sigma, rate, steps)], delta, "rdp")
    assert abs(ours - independent_epsilon(sigma, rate, steps, delta, "rdp")) <= 0.05 * ours
    prv = opacus_epsilon([(sigma, rate, steps)], delta, "prv")
    assert abs(prv - independent_epsilon(sigma, rate, steps, delta, "pld")) <= 0.05 * prv


def test_resume_keeps_the_accountant_state(tmp_path):
    from lightarch.training.privacy import opacus_epsilon

    straight = private_trainer(tmp_path / "straight", target_epsilon=4.0)
    straight.train()
    interrupted = private_trainer(tmp_path / "resumed", target_epsilon=4.0)
    interrupted.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    state = json.loads((checkpoint / "privacy_accountant.json").read_text())
    assert state["steps"] == 3 and state["history"]
    resumed = private_trainer(tmp_path / "resumed", target_epsilon=4.0)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.privacy_report()["steps"] == 6
    assert resumed.epsilon() == pytest.approx(straight.epsilon(), rel=1e-12)
    report = resumed.privacy_report()
    restarted = opacus_epsilon([(report["noise_multiplier"], report["sample_rate"], 3)], report["delta"])
    assert resumed.epsilon() > restarted + 0.5  # not an accountant restarted at the checkpoint


def test_resume_from_a_non_private_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    trainer = private_trainer(tmp_path / "run", target_epsilon=4.0)
    with pytest.raises(ValueError, match="privacy_accountant.json"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_physical_chunks_give_the_same_step_as_the_whole_batch(tmp_path):
    weights = []
    for chunk in (None, 3):
        trainer = private_trainer(tmp_path / str(chunk), max_steps=2, save_steps=10, noise_multiplier=0.0,
                                  max_physical_batch_size=chunk, per_sample_max_grad_norm=0.05)
        trainer.train()
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=1e-6, rtol=1e-5, msg=key)


def test_an_empty_poisson_batch_still_adds_noise_and_is_accounted(tmp_path):
    trainer = private_trainer(tmp_path, noise_multiplier=1.0)
    trainer.get_train_dataloader()  # makes the model, optimizer and accountant private
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    empty = {"input_ids": torch.zeros((0, 8), dtype=torch.long), "labels": torch.zeros((0, 8), dtype=torch.long)}
    assert trainer.training_step(trainer.model, empty).item() == 0.0
    trainer.optimizer.step()
    assert trainer.privacy_report()["steps"] == 1 and trainer.epsilon() > 0
    moved = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert len(moved) == len(before)  # noise on every parameter, no data


@pytest.mark.parametrize("setting,match", [
    ({"max_grad_norm": 1.0}, "max_grad_norm=1.0"),
    ({"poisson_sampling": False}, "poisson_sampling=False"),
    ({"model": "bias"}, "router_bias_update_rate"),
    ({"callbacks": "bias"}, "RouterBiasUpdateCallback"),
    ({"target_delta": 1.5}, "target_delta"),
])
def test_settings_that_void_the_guarantee_are_refused(tmp_path, setting, match):
    from lightarch.training import RouterBiasUpdateCallback

    setting = dict(setting)
    if setting.get("model") == "bias":
        setting["model"] = SparseMoeForCausalLM(tiny_sparse_moe_config(router_bias_update_rate=0.01))
    if setting.get("callbacks") == "bias":
        setting["callbacks"] = [RouterBiasUpdateCallback()]
    with pytest.raises(ValueError, match=match):
        private_trainer(tmp_path, **setting)


# ---- scripts ----

TINY_MODEL = ("hidden_size=32,num_attention_heads=2,num_key_value_heads=1,num_experts=4,moe_intermediate_size=32,"
              "max_experts_per_token=2,sliding_window=8,vocab_size=320,router_bias_update_rate=0.001")
TINY_RUN = ["--config_overrides", TINY_MODEL, "--block_size", "32", "--max_train_files", "4", "--max_eval_files", "2",
            "--max_file_bytes", "12000", "--per_device_train_batch_size", "8", "--disable_tqdm", "True"]


def test_train_private_script_writes_model_results_and_card(tmp_path):
    out = tmp_path / "private"
    result = run_script("train_private", *TINY_RUN, "--max_steps", "4", "--save_steps", "2", "--target_epsilon", "5",
                        "--max_grad_norm", "0.5", "--output_dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "router_bias_update_rate=0.001 switched off under DP" in result.stderr
    results = json.loads((out / "results.json").read_text())
    privacy = results["privacy"]
    assert privacy["steps"] == 4 and privacy["epsilon"] <= 5.0 and privacy["per_sample_max_grad_norm"] == 0.5
    assert privacy["delta"] == pytest.approx(1 / results["data"]["train_blocks"])
    assert abs(results["independent_epsilon"] - privacy["epsilon"]) <= 0.05 * privacy["epsilon"]
    card = (out / "README.md").read_text()
    for value in (f"{privacy['epsilon']:.3f}", f"{privacy['delta']:.3g}", "RDP", f"{privacy['sample_rate']:.5g}",
                  f"{privacy['noise_multiplier']:.4f}", "| steps | 4", "clipping norm | 0.5"):
        assert value in card, value
    assert (out / "checkpoint-4" / "privacy_accountant.json").is_file()
    assert json.loads((out / "config.json").read_text())["router_bias_update_rate"] == 0.0


def test_train_private_script_refuses_a_bad_delta(tmp_path):
    result = run_script("train_private", *TINY_RUN, "--target_delta", "2", "--output_dir", str(tmp_path / "o"),
                        cwd=tmp_path)
    assert result.returncode == 2 and "target_delta must be in (0, 1)" in result.stderr


# ---- audit ----


def test_canaries_are_distinct_and_inserted_as_often_as_asked():
    from lightarch.training.privacy.audit import insert_canaries, make_canaries

    canaries = make_canaries(per_group=3, non_members=5, references=7, digits=6, seed=3)
    secrets = [s for group in canaries.members.values() for s in group] + canaries.non_members + canaries.references
    assert len(set(secrets)) == len(secrets) == 3 * 3 + 5 + 7
    texts = insert_canaries(["a", "b", "c"], canaries, seed=0)
    for repeats, group in canaries.members.items():
        assert all(texts.count(canaries.text(secret)) == repeats for secret in group)
    assert all(canaries.text(secret) not in texts for secret in canaries.non_members + canaries.references)
    assert [t for t in texts if t in "abc"] == ["a", "b", "c"]


def test_exposure_and_membership_metrics():
    from lightarch.training.privacy.audit import exposure, membership_metrics

    references = torch.arange(1.0, 1024.0)  # 1023 references: ceiling log2(1024) = 10 bits
    bits = exposure(torch.tensor([0.5, 511.0, 2000.0]), references)  # 0, 511, 1023 ranked ahead
    torch.testing.assert_close(bits, torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64))
    others = torch.arange(100.0, 200.0)  # 100 non-members; lower log-perplexity = more member-like
    separated = membership_metrics(torch.arange(0.0, 10.0), others)
    assert separated["auc"] == 1.0 and separated["tpr_at_fpr"] == 1.0 and separated["achieved_fpr"] <= 0.01
    mixed = membership_metrics(torch.tensor([100.5, 150.5, 300.0, 50.0]), others)
    assert mixed["auc"] == pytest.approx((0.99 + 0.49 + 0.0 + 1.0) / 4)
    assert mixed["tpr_at_fpr"] == 0.5 and mixed["achieved_fpr"] == 0.01  # 100.5 and 50 beat all but 100


def test_audit_script_writes_json_table_and_png(tmp_path):
    out = tmp_path / "audit"
    result = run_script("audit_privacy", *TINY_RUN, "--max_steps", "3", "--canaries_per_group", "2",
                        "--non_members", "10", "--references", "20", "--output_dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    audit = json.loads((out / "audit.json").read_text())
    assert set(audit["audits"]) == {"non-DP", "DP"} and audit["runs"]["DP"]["privacy"]["epsilon"] <= 8.0
    for model in audit["audits"].values():
        assert {"1", "4", "16"} <= set(model) and 0 <= model["16"]["auc"] <= 1
    assert "| DP | 16x |" in (out / "audit.md").read_text()
    assert (out / "audit.png").read_bytes().startswith(b"\x89PNG")
