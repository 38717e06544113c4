"""DistillationTrainer and its losses: closed forms, a frozen teacher, projections, accumulation, resume, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_sparse_moe_config
from lightarch import SparseMoeForCausalLM, SparseMoeForSequenceClassification
from lightarch.training.distillation import (
    DistillationConfig,
    DistillationTrainer,
    FeatureProjector,
    TaskWeighting,
    distillation_divergence,
    layer_map,
)
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback

# ---- 1. distillation_divergence ------------------------------------------------------------------------------


def _logits(*shape):
    return torch.randn(*shape, dtype=torch.float64) * 2


@pytest.mark.parametrize("shape", [(4, 7), (2, 5, 11)])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_identical_logits_give_zero(shape, beta):
    logits = _logits(*shape)
    assert distillation_divergence(logits, logits.clone(), beta=beta, temperature=1.7).abs() < 1e-10


def test_beta_zero_is_forward_kl_and_one_is_reverse_kl():
    student, teacher = _logits(3, 6, 10), _logits(3, 6, 10)
    s_log, t_log = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    forward = F.kl_div(s_log, t_log, reduction="none", log_target=True).sum(-1).mean()  # KL(teacher || student)
    reverse = F.kl_div(t_log, s_log, reduction="none", log_target=True).sum(-1).mean()  # KL(student || teacher)
    torch.testing.assert_close(distillation_divergence(student, teacher, beta=0.0), forward)
    torch.testing.assert_close(distillation_divergence(student, teacher, beta=1.0), reverse)
    assert not torch.allclose(forward, reverse)


def test_generalized_jsd_closed_form_and_symmetry():
    student, teacher = _logits(5, 9), _logits(5, 9)
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    beta = 0.5
    m = beta * p_t + (1 - beta) * p_s
    kl = lambda p, q: (p * (p / q).log()).sum(-1)
    expected = (beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)).mean()
    torch.testing.assert_close(distillation_divergence(student, teacher, beta=0.5), expected)
    torch.testing.assert_close(distillation_divergence(student, teacher, beta=0.5),
                               distillation_divergence(teacher, student, beta=0.5))
    assert distillation_divergence(student, teacher, beta=0.5) <= math.log(2) + 1e-9  # JSD bound


def test_temperature_scales_softmax_and_multiplies_by_t_squared():
    student, teacher = _logits(4, 8), _logits(4, 8)
    t = 3.0
    reference = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean",
                         log_target=True) * t**2
    torch.testing.assert_close(distillation_divergence(student, teacher, temperature=t), reference)


def test_mask_ignores_padding():
    student, teacher = _logits(2, 6, 10), _logits(2, 6, 10)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    garbage_s, garbage_t = student.clone(), teacher.clone()
    garbage_s[~mask] = 1e3 * torch.randn_like(garbage_s[~mask])
    loss = distillation_divergence(student, teacher, mask=mask)
    torch.testing.assert_close(distillation_divergence(garbage_s, garbage_t, mask=mask), loss)
    kept = torch.cat([student[0, :3], student[1, :5]]), torch.cat([teacher[0, :3], teacher[1, :5]])
    torch.testing.assert_close(loss, distillation_divergence(*kept))


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="beta"):
        distillation_divergence(_logits(2, 3), _logits(2, 3), beta=1.5)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        distillation_divergence(_logits(2, 3), _logits(2, 4))


# ---- 2. the trainer --------------------------------------------------------------------------------------------

TASKS = [("a", 3), ("b", 2)]


def _teacher(num_labels=5, vocab_size=120):
    config = BertConfig(vocab_size=vocab_size, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def _student(num_labels=5, **overrides):
    return SparseMoeForSequenceClassification(tiny_sparse_moe_config(num_labels=num_labels, **overrides))


def _dataset(n=16, seed=0, tasks=TASKS, teacher_tokens=True):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        task = i % len(tasks)
        length = 5 + i % 4
        row = {"input_ids": torch.randint(3, 97, (8,), generator=g), "attention_mask": torch.zeros(8, dtype=torch.long),
               "labels": torch.tensor(i % tasks[task][1]), "task_ids": torch.tensor(task)}
        row["attention_mask"][:length] = 1
        row["input_ids"][length:] = 0
        if teacher_tokens:
            row["teacher_input_ids"] = torch.randint(3, 120, (10,), generator=g)
            row["teacher_attention_mask"] = torch.ones(10, dtype=torch.long)
        rows.append(row)
    return rows


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                  max_steps=3, learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0,
                  dataloader_num_workers=0, disable_tqdm=True)
    values.update(overrides)
    return DistillationConfig(**values)


def test_teacher_stays_frozen_and_parts_are_logged(tmp_path):
    teacher, student = _teacher(), _student()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = _args(tmp_path, feature_weight=1.0, task_weighting="uncertainty", alpha=0.5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, tasks=TASKS,
                                  train_dataset=_dataset())
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    logs = trainer.state.log_history[0]
    for key in ("loss_ce", "loss_kd", "loss_feature", "loss_router_aux", "task_weight/a", "task_loss/b"):
        assert key in logs, key
    assert logs["loss_router_aux"] > 0  # the MoE student's balance loss stays in its loss
    assert not torch.equal(trainer.distillation_modules["task_weighting"].log_variances.detach(), torch.zeros(2))


def test_layer_maps():
    assert layer_map("uniform", 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert layer_map("last-2", 3, 12) == [(2, 11), (3, 12)]
    assert layer_map("0:0, 3:12", 3, 12) == [(0, 0), (3, 12)]
    for bad in ("last-5", "1-2", "4:1"):
        with pytest.raises(ValueError, match="feature_layer_map"):
            layer_map(bad, 3, 4)


def test_projections_across_widths_and_depths_train(tmp_path):
    """Token-level alignment of a 32-wide, 3-layer student to a 64-wide, 6-layer teacher (same tokenizer)."""
    teacher = SparseMoeForCausalLM(tiny_sparse_moe_config(hidden_size=64, num_hidden_layers=6,
                                                          layer_types=["full_attention"] * 6))
    student = SparseMoeForCausalLM(tiny_sparse_moe_config())
    rows = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"],
             "labels": r["input_ids"].masked_fill(r["attention_mask"] == 0, -100)} for r in _dataset(teacher_tokens=False)]
    args = _args(tmp_path, feature_weight=1.0, feature_layer_map="uniform", feature_loss="cosine")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows)
    projector = trainer.distillation_modules["projector"]
    assert projector.pairs == [(1, 2), (2, 4), (3, 6)]
    assert projector.projections["1_2"].weight.shape == (64, 32)
    before = projector.projections["3_6"].weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, projector.projections["3_6"].weight)
    assert "loss_feature" in trainer.state.log_history[0]
    with pytest.raises(ValueError, match="feature_projection=True"):
        FeatureProjector([(1, 1)], 32, 64, project=False)


def _final_params(tmp_path, name, **overrides):
    torch.manual_seed(0)
    student, teacher = _student(num_labels=3, router_aux_loss_coef=0.0, router_z_loss_coef=0.0), _teacher(3)
    rows = _dataset(8, tasks=[("a", 3)])
    args = _args(tmp_path / name, max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, **overrides)
    DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows).train()
    return torch.cat([p.detach().flatten() for p in student.parameters()])


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big = _final_params(tmp_path, "big", per_device_train_batch_size=8)
    accumulated = _final_params(tmp_path, "acc", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in _student(num_labels=3).parameters()])
    assert not torch.allclose(big, initial)
    torch.testing.assert_close(accumulated, big, atol=2e-6, rtol=1e-5)


class _StopAt(TrainerCallback):
    """Interrupts a run after `step` optimizer steps (a crash, as far as the schedule knows)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _resume_run(tmp_path, stop_at=None, resume=None, weighting="uncertainty"):
    torch.manual_seed(0)
    student, teacher = _student(), _teacher()
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, feature_weight=1.0,
                 task_weighting=weighting)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, tasks=TASKS,
                                  train_dataset=_dataset(), callbacks=[_StopAt(stop_at)] if stop_at else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("weighting", ["uncertainty", "gradnorm"])
def test_resume_restores_projections_and_task_weights(tmp_path, weighting):
    straight = _resume_run(tmp_path / "a", weighting=weighting)
    _resume_run(tmp_path / "b", stop_at=2, weighting=weighting)
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    assert (checkpoint / "distillation_modules.safetensors").is_file()
    resumed = _resume_run(tmp_path / "b", resume=str(checkpoint), weighting=weighting)
    learned = {"uncertainty": "log_variances", "gradnorm": "gradnorm_weights"}[weighting]
    initial = 0.0 if weighting == "uncertainty" else 1.0
    assert not torch.allclose(getattr(straight.distillation_modules["task_weighting"], learned), torch.full((2,), initial))
    for (name, a), b in zip(straight.distillation_modules.state_dict().items(),
                            resumed.distillation_modules.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b)


def test_vocabulary_mismatch_is_a_clear_error(tmp_path):
    teacher = SparseMoeForCausalLM(tiny_sparse_moe_config(vocab_size=120))
    student = SparseMoeForCausalLM(tiny_sparse_moe_config(vocab_size=97))
    with pytest.raises(ValueError, match=r"vocab_size is 97 and the teacher's 120.*tokenizer.*feature"):
        DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=[])
    DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, alpha=0.0, feature_weight=1.0,
                                                                          feature_pooling="mean"), train_dataset=[])


def test_task_weighting_modes():
    losses, present = torch.tensor([1.0, 2.0, 5.0]), torch.tensor([True, False, True])
    assert TaskWeighting(3, "sum")(losses, present) == 6.0
    assert TaskWeighting(3, "fixed", [1.0, 9.0, 0.5])(losses, present) == 3.5
    learned = TaskWeighting(3, "uncertainty")
    with torch.no_grad():
        learned.log_variances.copy_(torch.tensor([0.0, 1.0, math.log(2.0)]))
    torch.testing.assert_close(learned(losses, present), torch.tensor(1.0 + 2.5 + 0.5 * math.log(2.0)))
    with pytest.raises(ValueError, match="task_weights"):
        TaskWeighting(3, "fixed", [1.0])


def test_precomputed_teacher_outputs_give_the_same_loss_without_running_the_teacher(tmp_path):
    teacher, student = _teacher(), _student()
    args = _args(tmp_path, feature_weight=1.0, feature_pooling="mean", feature_layer_map="last-2")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, tasks=TASKS, train_dataset=[])
    batch = {k: torch.stack([row[k] for row in _dataset(8)]) for k in _dataset(1)[0]}
    student.eval()  # no router jitter: the two losses see the same student
    live = trainer.compute_loss(student, batch)
    with torch.no_grad():
        out = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                      output_hidden_states=True)
    mask = batch["teacher_attention_mask"][..., None].float()
    pooled = [(out.hidden_states[t] * mask).sum(1) / mask.sum(1) for _, t in trainer.feature_pairs]
    offline = {**batch, "teacher_logits": out.logits, "teacher_features": torch.stack(pooled, dim=1)}
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(trainer.compute_loss(student, offline), live)
    assert not calls


def test_unlabelled_transfer_rows_learn_from_the_teacher_only(tmp_path):
    """Label -100 (a transfer example): no cross-entropy from it; the labelled rows' cross-entropy is their mean."""
    teacher, student = _teacher(), _student()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, alpha=0.5), tasks=TASKS,
                                  train_dataset=[])
    student.eval()
    rows = _dataset(8)
    batch = {k: torch.stack([row[k] for row in rows]) for k in rows[0]}
    only_a = {k: v[batch["task_ids"] == 0] for k, v in batch.items()}  # task a: rows 0, 2, 4, 6
    unlabelled = dict(only_a, labels=only_a["labels"].clone())
    unlabelled["labels"][1:] = -100  # one labelled row left
    loss = trainer.compute_loss(student, unlabelled)
    logits = student(input_ids=only_a["input_ids"], attention_mask=only_a["attention_mask"]).logits[:, :3]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=only_a["teacher_input_ids"],
                                 attention_mask=only_a["teacher_attention_mask"]).logits[:, :3]
    expected = (0.5 * F.cross_entropy(logits[:1], only_a["labels"][:1])
                + 0.5 * distillation_divergence(logits, teacher_logits))
    torch.testing.assert_close(loss, expected)
    unlabelled["labels"][:] = -100  # no label at all: the teacher's part only, finite
    torch.testing.assert_close(trainer.compute_loss(student, unlabelled),
                               0.5 * distillation_divergence(logits, teacher_logits))


def test_teacher_outputs_keep_the_rows_order_when_batched_by_length():
    from lightarch.training.distillation.multitask import MultiTaskCollator, encode_split

    class Tokenizer:
        def __call__(self, texts, **_):
            longest = max(len(t) for t in texts)
            ids = torch.tensor([[3 + ord(c) % 90 for c in t] + [0] * (longest - len(t)) for t in texts])
            return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    teacher = _teacher()
    texts = ["abcdefgh", "ab", "abcdefghijkl", "abc", "abcdef", "a b"]
    collator = MultiTaskCollator(Tokenizer(), max_length=16)
    rows = [{"text": t, "labels": 0, "task_ids": 0} for t in texts]
    logits, features = encode_split(teacher, collator, rows, batch_size=2, feature_layers=[2])
    for i, row in enumerate(rows):  # each row alone: the same outputs, in the rows' order
        alone_logits, alone_features = encode_split(teacher, collator, [row], batch_size=1, feature_layers=[2])
        torch.testing.assert_close(logits[i], alone_logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(features[i], alone_features[0], atol=1e-5, rtol=1e-5)


def test_distill_and_eval_scripts_end_to_end(tmp_path):
    """Two tasks, a few steps: every model folder, the results, the table, the plot and the card."""
    import json

    from conftest import run_script
    from lightarch.data.tasks import missing_requirements

    tasks = "shakespeare_genre,shakespeare_play"
    if any(missing_requirements(name) for name in tasks.split(",")):
        pytest.skip(f"needs {missing_requirements('shakespeare_play')}")
    out = tmp_path / "run"
    result = run_script("distill", "--tasks", tasks, "--max_examples", "60", "--max_length", "16",
                        "--teacher_epochs", "0.1", "--teacher_batch_size", "16", "--max_steps", "3",
                        "--per_device_train_batch_size", "8", "--student_vocab_size", "300",
                        "--config_overrides", "hidden_size=32,num_hidden_layers=2,layer_types=null,num_experts=4",
                        "--transfer_size", "20", "--logging_steps", "1", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "distill_results.json").read_text())
    assert record["student"]["steps"] == record["baseline"]["steps"] == 3
    assert 0 < record["training_rows"]["transfer"] <= 40 and record["training_rows"]["labelled"] > 0
    assert record["student_sum"]["task_weighting"] == "sum" and record["student"]["task_weighting"] == "uncertainty"
    assert record["student_fraction_of_teacher"] <= 1 / 20
    log = json.loads((out / "student" / "training_log.json").read_text())
    assert {"loss_kd", "loss_feature", "loss_router_aux", "task_weight/shakespeare_play"} <= set(log[0])
    result = run_script("eval_distill", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((out / "eval.json").read_text())
    assert set(evaluation["scores"]) == {"teacher", "student", "student_sum", "baseline", "majority"}
    assert set(evaluation["scores"]["student"]) == set(tasks.split(","))
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "student" / "README.md").read_text()
    assert "| shakespeare_play |" in card and "${" not in card


def test_bad_task_names_name_the_option():
    from lightarch.training.distillation.multitask import parse_names

    assert parse_names("a, b", ["a", "b", "c"], "--tasks") == ["a", "b"]
    with pytest.raises(ValueError, match=r"--tasks: unknown 'nope'; choose from \['a'\]"):
        parse_names("a,nope", ["a"], "--tasks")


def test_causal_lm_loss_is_shifted_masked_and_keeps_the_router_aux_loss(tmp_path):
    teacher = SparseMoeForCausalLM(tiny_sparse_moe_config(hidden_size=64))
    student = SparseMoeForCausalLM(tiny_sparse_moe_config())
    args = _args(tmp_path, alpha=0.25, beta=0.5, temperature=2.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=[])
    ids = torch.randint(3, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    student.train()
    torch.manual_seed(1)
    loss = trainer.compute_loss(student, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    torch.manual_seed(1)
    out = student(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    kd = distillation_divergence(out.logits[:, :-1], t_logits[:, :-1], 0.5, 2.0, labels[:, 1:] != -100)
    assert out.aux_loss > 0
    torch.testing.assert_close(loss, 0.75 * ce + 0.25 * kd + out.aux_loss)
