"""Ghost / fast gradient clipping (issue 16): the clipped, summed gradient equals the per-sample path's, Trainer runs
give the same step and epsilon, unsupported settings are refused, and no per-sample gradients of the whole model
are kept."""

import copy

import pytest
import torch
from conftest import tiny_sparse_moe_config
from lightarch import (
    AdaptiveDepthForCausalLM,
    AdaptiveDepthForSequenceClassification,
    SparseMoeForCausalLM,
    SparseMoeForSequenceClassification,
)
from lightarch.training.privacy import (
    finish_per_sample_gradients,
    prepare_per_sample_gradients,
    private_loss,
)
from lightarch.training.privacy.ghost import (
    GhostClippingModule,
    ghost_backward,
    per_example_private_losses,
)
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from test_adaptive_depth import tiny_config
from test_privacy import one_expert_model, per_sample_and_naive, private_trainer
from transformers.training_args import OptimizerNames


def batch_for(model, batch_size=4, length=8):
    ids = torch.randint(3, 97, (batch_size, length), generator=torch.Generator().manual_seed(2))
    if "Classification" in type(model).__name__:
        return {"input_ids": ids, "labels": torch.tensor([0, 2, 1, 2][:batch_size])}
    return {"input_ids": ids, "labels": ids}


def per_sample_path(model, batch):
    """The standard path: every per-sample gradient (B, *shape) from Opacus's hooks and lightarch's samplers."""
    return per_sample_and_naive(model, batch)[0]


def ghost_path(model, batch, max_grad_norm):
    """Ghost clipping: (per-example norms (B,), the clipped summed gradient per parameter)."""
    wrapped = GhostClippingModule(model, max_grad_norm=max_grad_norm)
    prepare_per_sample_gradients(wrapped)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, _ = per_example_private_losses(model, batch)
    ghost_backward(wrapped, optimizer, losses)
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())  # none kept
    assert all(getattr(p, "_norm_sample", None) is None for p in model.parameters())  # no norm outlives its step
    return wrapped.per_sample_gradient_norms, {name: p.grad.clone() for name, p in model.named_parameters()}


MODELS = {
    "sparse_moe_top_p_shared_qk_norm": lambda: SparseMoeForCausalLM(tiny_sparse_moe_config(
        router_mode="top_p", num_shared_experts=1, use_qk_norm=True, experts_implementation="eager")),
    "sparse_moe_zero_token_experts": lambda: one_expert_model("top_k"),
    "sparse_moe_tied_embeddings": lambda: SparseMoeForCausalLM(tiny_sparse_moe_config(
        tie_word_embeddings=True, experts_implementation="eager")),
    "adaptive_depth": lambda: AdaptiveDepthForCausalLM(tiny_config(experts_implementation="eager")),
    "sparse_moe_classifier": lambda: SparseMoeForSequenceClassification(tiny_sparse_moe_config(
        num_labels=3, experts_implementation="eager")),
    "adaptive_depth_classifier": lambda: AdaptiveDepthForSequenceClassification(tiny_config(
        num_labels=3, experts_implementation="eager")),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_ghost_clipping_equals_the_per_sample_path(name):
    torch.manual_seed(0)
    model = MODELS[name]().to(torch.float64).train()
    batch = batch_for(model)
    twin = copy.deepcopy(model)
    samples = per_sample_path(model, batch)
    norms = torch.stack([s.reshape(len(s), -1).norm(2, dim=-1) for s in samples.values()]).norm(2, dim=0)  # (B,)
    max_grad_norm = float(norms.median())  # some examples clipped, some not
    coef = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus's factor in both paths
    assert bool((coef < 1).any()) and bool((coef == 1).any())
    ghost_norms, clipped = ghost_path(twin, batch, max_grad_norm)
    torch.testing.assert_close(ghost_norms, norms, atol=1e-6, rtol=0)
    for param, sample in samples.items():
        expected = torch.einsum("b,b...->...", coef, sample)
        torch.testing.assert_close(clipped[param], expected, atol=1e-6, rtol=0, msg=param)
    if name == "sparse_moe_zero_token_experts":
        idle = samples["model.layers.0.mlp.experts.down_proj"][:, 1:]
        assert torch.count_nonzero(idle) == 0 and torch.count_nonzero(clipped["model.layers.0.mlp.experts.down_proj"])


def test_opacus_ghost_alone_refuses_the_shared_exit_head():
    """Why the per-sample fallback exists: AdaptiveDepth calls its LM head once per exit."""
    model = AdaptiveDepthForCausalLM(tiny_config(experts_implementation="eager")).train()
    GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True)
    with pytest.raises(NotImplementedError, match="Parameter tying"):
        model(**batch_for(model))


def test_ghost_trainer_takes_the_same_steps_and_epsilon(tmp_path):
    weights = {}
    for mode, chunk in (("hooks", None), ("ghost", None), ("ghost", 3)):
        torch.manual_seed(0)  # SGD: AdamW's first steps (about lr * sign(grad)) would amplify rounding differences
        model = SparseMoeForCausalLM(tiny_sparse_moe_config(router_mode="top_p", experts_implementation="eager"))
        model = model.to(torch.float64)
        trainer = private_trainer(tmp_path / f"{mode}{chunk}", max_steps=2, save_steps=10, noise_multiplier=0.0,
                                  max_physical_batch_size=chunk, per_sample_max_grad_norm=0.05, grad_sample_mode=mode,
                                  model=model)
        trainer.args.optim = OptimizerNames.SGD
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        trainer.train()
        weights[mode, chunk] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        assert isinstance(trainer._dp_optimizer.original_optimizer, torch.optim.SGD)
        assert all(not torch.equal(initial[k], v) for k, v in weights[mode, chunk].items())  # every weight moved
    for run in (("ghost", None), ("ghost", 3)):
        for key, value in weights["hooks", None].items():
            torch.testing.assert_close(weights[run][key], value, atol=1e-6, rtol=1e-5, msg=f"{run} {key}")
    reports = {}
    for mode in ("hooks", "ghost"):
        trainer = private_trainer(tmp_path / f"eps-{mode}", max_steps=4, save_steps=10, target_epsilon=3.0,
                                  grad_sample_mode=mode)
        trainer.train()
        reports[mode] = trainer.privacy_report()
    assert reports["ghost"]["grad_sample_mode"] == "ghost" and reports["ghost"]["steps"] == 4
    assert reports["ghost"]["epsilon"] == pytest.approx(reports["hooks"]["epsilon"], rel=1e-9)
    assert 2.5 < reports["ghost"]["epsilon"] <= 3.0


def test_an_empty_poisson_batch_under_ghost_clipping_still_adds_noise(tmp_path):
    trainer = private_trainer(tmp_path, noise_multiplier=1.0, grad_sample_mode="ghost")
    trainer.get_train_dataloader()  # makes the model, optimizer and accountant private
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    empty = {"input_ids": torch.zeros((0, 8), dtype=torch.long), "labels": torch.zeros((0, 8), dtype=torch.long)}
    assert trainer.training_step(trainer.model, empty).item() == 0.0
    trainer.optimizer.step()
    assert trainer.privacy_report()["steps"] == 1 and trainer.epsilon() > 0
    assert all(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())  # noise only


def test_unsupported_ghost_settings_are_refused(tmp_path, monkeypatch):
    from lightarch.training.privacy import (
        PrivacyArguments,
        check_privacy_arguments,
        check_privacy_setup,
        ghost,
    )
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="grad_sample_mode must be one of hooks, ghost"):
        check_privacy_arguments(PrivacyArguments(grad_sample_mode="fast"))
    args = TrainingArguments(str(tmp_path), use_cpu=True, max_grad_norm=0.0, report_to="none")
    privacy = PrivacyArguments(grad_sample_mode="ghost")
    with pytest.raises(ValueError, match="grad_sample_mode='ghost': Linear has no per-example loss"):
        check_privacy_setup(privacy, args, torch.nn.Linear(2, 2))
    sufficiency = AdaptiveDepthForCausalLM(tiny_config(estimator_objective="sufficiency"))
    with pytest.raises(ValueError, match="estimator_objective='sufficiency'"):
        check_privacy_setup(privacy, args, sufficiency)
    model = SparseMoeForCausalLM(tiny_sparse_moe_config()).train()
    wrong = ghost._example_losses
    monkeypatch.setattr(ghost, "_example_losses", lambda *a: wrong(*a) * 1.01)  # a loss the model does not compute
    with pytest.raises(ValueError, match="per-example losses of SparseMoeForCausalLM average to"):
        per_example_private_losses(model, batch_for(model))


def live_per_sample_bytes(model) -> int:
    total = 0
    for param in model.parameters():
        for name in ("grad_sample", "_current_grad_sample"):
            value = getattr(param, name, None)
            for tensor in value if isinstance(value, list) else [value] if value is not None else []:
                total += tensor.numel() * tensor.element_size()
    return total


def test_ghost_clipping_keeps_no_whole_model_per_sample_gradients(monkeypatch):
    """A non-timing memory check: the peak bytes of per-sample gradient tensors alive during the backward."""
    import opacus.grad_sample.grad_sample_module as hooks_module
    import opacus.grad_sample.grad_sample_module_fast_gradient_clipping as ghost_module

    config = tiny_sparse_moe_config(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                                    experts_implementation="eager")
    peaks = {}
    for mode in ("hooks", "ghost"):
        torch.manual_seed(0)
        model = SparseMoeForCausalLM(config).train()
        peak = [0]
        for module in (hooks_module, ghost_module):
            original = module.create_or_accumulate_grad_sample

            def counting(*args, original=original, peak=peak, model=model, **kwargs):
                original(*args, **kwargs)
                peak[0] = max(peak[0], live_per_sample_bytes(model))

            monkeypatch.setattr(module, "create_or_accumulate_grad_sample", counting)
        batch = batch_for(model, batch_size=8)
        if mode == "hooks":
            wrapped = GradSampleModule(model, loss_reduction="mean")
            prepare_per_sample_gradients(wrapped)
            private_loss(model, batch).backward()
            finish_per_sample_gradients(model)
            peak[0] = max(peak[0], live_per_sample_bytes(model))  # all kept until the optimizer clips them
            assert peak[0] == sum(p.numel() for p in model.parameters()) * 8 * 4  # B = 8 copies, float32
            wrapped._close()
        else:
            ghost_path(model, batch, 1.0)
            assert live_per_sample_bytes(model) == 0
        peaks[mode] = peak[0]
        monkeypatch.undo()
    # under ghost clipping only an RMSNorm's (B, H) per-sample gradient exists, one at a time (the experts have a
    # norm sampler, the routers keep norms, Linear and Embedding are Opacus's ghost norms)
    assert 0 < peaks["ghost"] <= 8 * config.hidden_size * 4
    assert peaks["ghost"] * 100 < peaks["hooks"]


def test_train_private_script_with_ghost_clipping(tmp_path):
    import json

    from conftest import run_script
    from test_privacy import TINY_RUN

    out = tmp_path / "private"
    result = run_script("train_private", *TINY_RUN, "--max_steps", "2", "--save_strategy", "no", "--target_epsilon",
                        "5", "--grad_sample_mode", "ghost", "--output_dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    privacy = json.loads((out / "results.json").read_text())["privacy"]
    assert privacy["grad_sample_mode"] == "ghost" and privacy["steps"] == 2 and 0 < privacy["epsilon"] <= 5.0
    refused = run_script("train_private", *TINY_RUN, "--grad_sample_mode", "fast", "--output_dir", str(tmp_path / "o"),
                         cwd=tmp_path)
    assert refused.returncode == 2 and "grad_sample_mode must be one of hooks, ghost" in refused.stderr
