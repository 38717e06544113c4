"""Offline distillation from stored top-k teacher logits: exact at k = vocab, a bounded lower bound below, round
trip, mismatch errors, and a trainer with no teacher."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_sparse_moe_config
from lightarch import SparseMoeForCausalLM, SparseMoeForSequenceClassification
from lightarch.data.corpus import BlockDataset
from lightarch.training.distillation import (
    DistillationConfig,
    DistillationTrainer,
    distillation_divergence,
)
from lightarch.training.distillation.topk import (
    BATCH_KEYS,
    TeacherTopK,
    compute_teacher_topk,
    topk_distillation_divergence,
)

VOCAB = 97


def _topk_of(logits, k, temperature):
    top = logits.topk(k, dim=-1)
    lse = torch.logsumexp(logits / temperature, dim=-1)
    tail = torch.logsumexp((logits / temperature).scatter(-1, top.indices, float("-inf")), dim=-1) - lse
    return top.values, top.indices, lse, tail


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_k_equal_to_vocab_is_the_full_divergence(beta):
    student, teacher = torch.randn(2, 6, VOCAB, dtype=torch.float64) * 3, torch.randn(2, 6, VOCAB, dtype=torch.float64) * 3
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    full = distillation_divergence(student, teacher, beta, 2.0, mask)
    stored = topk_distillation_divergence(student, *_topk_of(teacher, VOCAB, 2.0), beta, 2.0, mask)
    torch.testing.assert_close(stored, full)


def test_small_k_is_a_lower_bound_within_the_tail_mass_bound():
    """full - bucketed = m_t * KL(teacher tail || student tail) <= m_t * log max over the tail of the ratio of the
    renormalized tail probabilities (forward KL; per position, so also for the mean)."""
    torch.manual_seed(0)
    temperature, k = 1.5, 10
    student, teacher = torch.randn(3, 5, VOCAB, dtype=torch.float64) * 2, torch.randn(3, 5, VOCAB, dtype=torch.float64) * 4
    full = distillation_divergence(student, teacher, 0.0, temperature)
    values, indices, lse, _ = _topk_of(teacher, k, temperature)
    approx = topk_distillation_divergence(student, values, indices, lse, None, 0.0, temperature)
    torch.testing.assert_close(approx, topk_distillation_divergence(student, *_topk_of(teacher, k, temperature), 0.0,
                                                                    temperature))
    p_t, p_s = F.softmax(teacher / temperature, -1), F.softmax(student / temperature, -1)
    tail = torch.ones_like(p_t, dtype=torch.bool).scatter(-1, indices, False)
    m_t, m_s = (p_t * tail).sum(-1), (p_s * tail).sum(-1)  # [B, T]
    ratio = (p_t / m_t[..., None]) / (p_s / m_s[..., None])
    bound = (m_t * ratio.masked_fill(~tail, 0).amax(-1).log()).mean() * temperature**2
    gap = full - approx
    assert 0 < gap <= bound + 1e-12
    assert m_t.mean() > 0.05  # a real tail, not a vacuous check


def test_store_load_round_trip_and_mismatch_errors(tmp_path):
    teacher = SparseMoeForCausalLM(tiny_sparse_moe_config(hidden_size=48)).eval()
    data = BlockDataset(torch.randint(3, VOCAB, (5, 8)))
    topk = compute_teacher_topk(teacher, data, k=7, temperature=2.0, batch_size=2, teacher_name="tiny-teacher")
    with torch.no_grad():
        logits = teacher(input_ids=data.blocks).logits
    torch.testing.assert_close(topk.values, logits.topk(7, -1).values)
    torch.testing.assert_close(topk.logsumexp, torch.logsumexp(logits / 2.0, -1))
    topk.save(tmp_path / "topk")
    loaded = TeacherTopK.load(tmp_path / "topk")
    for name in ("values", "indices", "logsumexp", "tail_log_mass", "lengths"):
        torch.testing.assert_close(getattr(loaded, name), getattr(topk, name))
    assert loaded.indices.dtype == torch.long and loaded.manifest == topk.manifest
    assert loaded.manifest["teacher"] == "tiny-teacher" and loaded.manifest["k"] == 7
    assert "bucket" in loaded.manifest["tail_approximation"]
    loaded.check(data, VOCAB, 2.0)
    with pytest.raises(ValueError, match="cover 5 rows, but the training dataset has 4"):
        loaded.check(BlockDataset(data.blocks[:4]))
    other = data.blocks.clone()
    other[2, 3] = (other[2, 3] + 1) % VOCAB
    with pytest.raises(ValueError, match="computed on other data"):
        loaded.check(BlockDataset(other))
    with pytest.raises(ValueError, match="over 97 outputs .* the student has 120"):
        loaded.check(vocab_size=120)
    with pytest.raises(ValueError, match="temperature=1.0"):
        loaded.check(temperature=1.0)
    with pytest.raises(FileNotFoundError, match="teacher_topk"):
        TeacherTopK.load(tmp_path)


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                  max_steps=3, learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0,
                  dataloader_num_workers=0, disable_tqdm=True, alpha=0.5, temperature=2.0)
    values.update(overrides)
    return DistillationConfig(**values)


def test_trainer_from_stored_logits_needs_no_teacher_and_matches_the_live_loss(tmp_path):
    teacher = SparseMoeForCausalLM(tiny_sparse_moe_config(hidden_size=48))
    student = SparseMoeForCausalLM(tiny_sparse_moe_config())
    data = BlockDataset(torch.randint(3, VOCAB, (8, 8)))
    args = _args(tmp_path)
    stored = compute_teacher_topk(teacher, data, k=VOCAB, temperature=2.0)
    offline = DistillationTrainer(model=student, teacher_model=None, teacher_topk=stored, args=args,
                                  train_dataset=data)
    live = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    batch = offline.data_collator([offline.train_dataset[i] for i in range(4)])
    assert batch["teacher_topk_values"].shape == (4, 8, VOCAB)
    student.eval()  # no router jitter: both losses see the same student
    torch.testing.assert_close(offline.compute_loss(student, batch),
                               live.compute_loss(student, {k: v for k, v in batch.items() if k not in BATCH_KEYS}))
    before = [p.detach().clone() for p in student.parameters()]
    offline.train()
    log = offline.state.log_history[0]
    assert offline.state.global_step == 3 and log["loss_kd"] > 0 and "loss_router_aux" in log
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_trainer_refuses_logits_of_other_data_or_vocabulary(tmp_path):
    teacher = SparseMoeForCausalLM(tiny_sparse_moe_config(hidden_size=48))
    data = BlockDataset(torch.randint(3, VOCAB, (6, 8)))
    stored = compute_teacher_topk(teacher, data, k=5, temperature=2.0)
    student = SparseMoeForCausalLM(tiny_sparse_moe_config())
    with pytest.raises(ValueError, match="cover 6 rows"):
        DistillationTrainer(model=student, teacher_topk=stored, args=_args(tmp_path),
                            train_dataset=BlockDataset(data.blocks[:5]))
    with pytest.raises(ValueError, match="the student has 120"):
        DistillationTrainer(model=SparseMoeForCausalLM(tiny_sparse_moe_config(vocab_size=120)), teacher_topk=stored,
                            args=_args(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match="teacher_model is required"):
        DistillationTrainer(model=student, args=_args(tmp_path), train_dataset=data)
    # a plain student (alpha=0) needs no teacher at all
    DistillationTrainer(model=student, args=_args(tmp_path, alpha=0.0), train_dataset=data)


def test_classifier_from_stored_logits(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    teacher = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=5))
    rows = [{"input_ids": torch.randint(3, VOCAB, (6,)), "labels": torch.tensor(i % 5)} for i in range(8)]
    with pytest.raises(ValueError, match="k = num_labels = 5"):
        DistillationTrainer(model=SparseMoeForSequenceClassification(tiny_sparse_moe_config(num_labels=5)),
                            teacher_topk=compute_teacher_topk(teacher, rows, k=3, temperature=2.0),
                            args=_args(tmp_path), train_dataset=rows)
    stored = compute_teacher_topk(teacher, rows, k=5, temperature=2.0)
    student = SparseMoeForSequenceClassification(tiny_sparse_moe_config(num_labels=5))
    offline = DistillationTrainer(model=student, teacher_topk=stored, args=_args(tmp_path), train_dataset=rows)
    live = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=rows)
    batch = offline.data_collator([offline.train_dataset[i] for i in range(4)])
    student.eval()
    plain = {k: v for k, v in batch.items() if k in ("input_ids", "labels")}
    torch.testing.assert_close(offline.compute_loss(student, batch), live.compute_loss(student, plain))
    offline.train()
    assert offline.state.global_step == 3
