"""Language-model distillation (scripts/distill.py --task lm): a tiny teacher folder end to end, the vocabulary
check, and the MoE student's router aux loss inside the distillation loss."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script, tiny_sparse_moe_config
from lightarch import SparseMoeForCausalLM
from lightarch.data.corpus import BlockDataset
from lightarch.training.distillation import DistillationTrainer
from lightarch.training.distillation.topk import (
    compute_teacher_topk,
    topk_distillation_divergence,
)
from test_distillation_topk import _args as topk_args


def _args(tmp_path, **overrides):
    """The top-k tests' tiny DistillationConfig with the LM recipe's alpha and temperature."""
    return topk_args(tmp_path, **{"alpha": 0.9, "temperature": 1.0, **overrides})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A scripts/train.py-like folder: a small SparseMoe LM and a byte-level BPE trained on a few stdlib files."""
    from lightarch.data.corpus import load_corpus
    from lightarch.data.tokenizers import train_bpe_tokenizer
    from lightarch.training.checkpoints import atomic_save_pretrained

    corpus = load_corpus(max_train_files=3, max_eval_files=1)
    tokenizer = train_bpe_tokenizer(corpus.train_texts, 300, show_progress=False)
    config = tiny_sparse_moe_config(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192,
                                    moe_intermediate_size=96, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("teacher") / "teacher"
    atomic_save_pretrained(folder, SparseMoeForCausalLM(config), tokenizer, script="train.py")
    return folder


def test_lm_distillation_end_to_end_from_stored_topk(teacher_dir, tmp_path):
    out = tmp_path / "lm"
    result = run_script("distill", "--task", "lm", "--teacher_dir", str(teacher_dir), "--max_train_files", "3",
                        "--max_eval_files", "1", "--block_size", "32", "--max_train_blocks", "24",
                        "--teacher_topk", "8", "--max_steps", "3", "--per_device_train_batch_size", "4",
                        "--config_overrides", "hidden_size=16,num_attention_heads=2,num_key_value_heads=1",
                        "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    assert record["student"]["steps"] == record["baseline"]["steps"] == 3
    assert record["student"]["alpha"] == 0.9 and record["baseline"]["alpha"] == 0.0
    assert record["student"]["teacher_topk"] == 8 and record["baseline"]["teacher_topk"] is None
    for name in ("teacher", "student", "baseline"):
        assert 1 < record[name]["heldout_perplexity"] < 1e4
    assert record["teacher_to_student_ratio"] > 10
    manifest = json.loads((out / "teacher_topk" / "teacher_topk.json").read_text())
    assert manifest["k"] == 8 and manifest["dataset_length"] == 24 and manifest["vocab_size"] == 300
    log = json.loads((out / "student" / "training_log.json").read_text())
    assert log[0]["loss_kd"] > 0 and "loss_router_aux" in log[0]
    assert "held-out perplexity" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    from lightarch.training.distillation.language_model import (
        evaluate_lm_run,
        is_lm_run,
    )

    assert is_lm_run(out) and not is_lm_run(tmp_path)
    evaluate_lm_run(out)  # scripts/eval_distill.py's work for an LM run, in this process (one interpreter less)
    evaluation = json.loads((out / "eval.json").read_text())
    for name in ("teacher", "student", "baseline"):  # the saved folders score what training measured
        assert evaluation["perplexity"][name] == pytest.approx(record[name]["heldout_perplexity"], rel=1e-4)
    assert "| distilled student |" in (out / "eval.md").read_text()
    # every trained folder of the run has a Hub-ready card with its own measured perplexity
    from lightarch.evaluation.model_cards import hub_model_card, validate_card

    for name, stored in (("student", "distilled student"), ("baseline", "without distillation")):
        card = validate_card((out / name / "README.md").read_text())
        assert stored in card.text or stored in card.text.lower()
        figures = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert figures["perplexity"] == pytest.approx(evaluation["perplexity"][name])
        assert ("relative_perplexity_reduction" in figures) == (name == "student")
        assert validate_card(hub_model_card(out / name)).data.eval_results[0].metric_value == figures["perplexity"]


def test_lm_run_needs_a_teacher_folder(tmp_path):
    from types import SimpleNamespace

    from lightarch.training.distillation.language_model import prepare_lm_run

    args = SimpleNamespace(teacher_dir=None, block_size=32, max_train_files=3, max_eval_files=1, max_train_blocks=0,
                           teacher_topk=0, num_threads=0, time_budget_minutes=1.0)
    with pytest.raises(ValueError, match="--task lm needs --teacher_dir"):
        prepare_lm_run(args, _args(tmp_path))
    with pytest.raises(ValueError, match="--teacher_dir .* holds no saved model"):
        prepare_lm_run(SimpleNamespace(**{**vars(args), "teacher_dir": str(tmp_path)}), _args(tmp_path))
    with pytest.raises(ValueError, match="--teacher_topk must be >= 0"):
        prepare_lm_run(SimpleNamespace(**{**vars(args), "teacher_dir": str(tmp_path), "teacher_topk": -1}),
                       _args(tmp_path))
    result = run_script("distill", "--task", "nope")  # answered before the heavy imports
    assert result.returncode == 2 and "--task must be one of" in result.stderr


def test_lm_vocabulary_mismatch_is_a_clear_error_live_and_stored(tmp_path):
    teacher = SparseMoeForCausalLM(tiny_sparse_moe_config(vocab_size=120))
    student = SparseMoeForCausalLM(tiny_sparse_moe_config(vocab_size=97))
    with pytest.raises(ValueError, match="vocab_size is 97 and the teacher's 120"):
        DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=[])
    data = BlockDataset(torch.randint(3, 97, (4, 8)))
    with pytest.raises(ValueError, match="over 120 outputs .* the student has 97"):
        DistillationTrainer(model=student, teacher_topk=compute_teacher_topk(teacher, data, k=4),
                            args=_args(tmp_path), train_dataset=data)


def test_stored_topk_lm_loss_keeps_the_router_aux_loss(tmp_path):
    teacher = SparseMoeForCausalLM(tiny_sparse_moe_config(hidden_size=64))
    student = SparseMoeForCausalLM(tiny_sparse_moe_config())
    data = BlockDataset(torch.randint(3, 97, (4, 8)))
    stored = compute_teacher_topk(teacher, data, k=6, temperature=1.0)
    trainer = DistillationTrainer(model=student, teacher_topk=stored, args=_args(tmp_path), train_dataset=data)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    student.train()
    torch.manual_seed(1)
    loss = trainer.compute_loss(student, batch)
    torch.manual_seed(1)
    out = student(input_ids=batch["input_ids"])
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    kd = topk_distillation_divergence(out.logits[:, :-1], stored.values[:, :-1], stored.indices[:, :-1],
                                      stored.logsumexp[:, :-1], stored.tail_log_mass[:, :-1], 0.0, 1.0)
    assert out.aux_loss > 0
    torch.testing.assert_close(loss, 0.1 * ce + 0.9 * kd + out.aux_loss)
