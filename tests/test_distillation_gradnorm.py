"""GradNorm task weighting: the closed-form weight gradient, detached weights in the loss, renormalization, and a
multi-task DistillationTrainer run that learns and logs the weights."""

import math

import pytest
import torch
from conftest import tiny_sparse_moe_config
from lightarch import SparseMoeForSequenceClassification
from lightarch.training.distillation import DistillationTrainer, TaskWeighting
from test_distillation_topk import _args


def test_gradnorm_weight_gradient_closed_form():
    """W = [1, 2]; L1 = |W|^2 (||grad|| = 2 sqrt 5), L2 = sum(W) / 2 (||grad|| = sqrt 0.5). At the first step every
    loss ratio is 1, so the target is mean(G) and d/dw_t sum |G_t - mean G| = sign(G_t - mean G) * ||grad_W L_t||."""
    shared = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    weighting = TaskWeighting(3, "gradnorm")
    losses = torch.stack([(shared**2).sum(), shared.sum() / 2, torch.zeros(())])
    present = torch.tensor([True, True, False])
    gradnorm_loss = weighting.gradnorm_update(losses, present, [shared], alpha=1.5)
    g1, g2 = 2 * math.sqrt(5), math.sqrt(0.5)
    torch.testing.assert_close(weighting.gradnorm_weights.grad, torch.tensor([g1, -g2, 0.0]))
    torch.testing.assert_close(gradnorm_loss, torch.tensor(abs(g1 - g2)))
    torch.testing.assert_close(weighting.initial_losses[:2], losses[:2].detach())
    assert weighting.initial_losses[2] == -1  # task 3 not seen yet
    # the task loss itself never moves the weights: they enter it detached
    total = weighting(losses, present)
    torch.testing.assert_close(total, losses[0] + losses[1])
    before = weighting.gradnorm_weights.grad.clone()
    total.backward()
    torch.testing.assert_close(weighting.gradnorm_weights.grad, before)
    with torch.no_grad():
        weighting.gradnorm_weights.copy_(torch.tensor([3.0, 1.0, 0.0]))
    weighting.renormalize()
    assert weighting.gradnorm_weights.min() > 0
    torch.testing.assert_close(weighting.gradnorm_weights.sum(), torch.tensor(3.0))
    with pytest.raises(ValueError, match="gradnorm_update needs task_weighting='gradnorm'"):
        TaskWeighting(2, "sum").gradnorm_update(losses[:2], present[:2], [shared])


def test_gradnorm_slower_task_gets_a_larger_target():
    """Equal gradient norms, but task 1's loss has not moved from its start while task 2's halved: GradNorm raises
    w_1 (negative gradient) and lowers w_2."""
    shared = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    weighting = TaskWeighting(2, "gradnorm")
    weighting.initial_losses.copy_(torch.tensor([2.0, 4.0]))
    losses = torch.stack([shared.sum(), shared.sum()])  # both 2.0, same gradients
    weighting.gradnorm_update(losses, torch.tensor([True, True]), [shared], alpha=1.0)
    grad = weighting.gradnorm_weights.grad
    assert grad[0] < 0 < grad[1]


def test_trainer_learns_and_logs_gradnorm_weights(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    tasks = [("a", 3), ("b", 2)]
    teacher = BertForSequenceClassification(BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=5))
    student = SparseMoeForSequenceClassification(tiny_sparse_moe_config(num_labels=5))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 97, (6,), generator=g), "labels": torch.tensor(i % tasks[i % 2][1]),
             "task_ids": torch.tensor(i % 2)} for i in range(16)]
    args = _args(tmp_path, task_weighting="gradnorm", max_steps=4, gradnorm_alpha=1.5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, tasks=tasks, train_dataset=rows)
    with torch.no_grad():  # off the simplex: the step hook must bring them back to summing to 2
        trainer.distillation_modules["task_weighting"].gradnorm_weights.copy_(torch.tensor([1.5, 1.0]))
    trainer.train()
    weights = trainer.distillation_modules["task_weighting"].gradnorm_weights.detach()
    torch.testing.assert_close(weights.sum(), torch.tensor(2.0))
    assert not torch.allclose(weights, torch.tensor([1.2, 0.8]))  # learned, not only rescaled
    log = trainer.state.log_history[0]
    assert {"task_weight/a", "task_weight/b", "loss_gradnorm"} <= set(log)
    assert trainer._shared_parameters == [student.base_model.norm.weight]
