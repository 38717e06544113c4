"""Every training recipe's output folder is Hub-ready as it is: its README.md carries the YAML metadata and a
`model-index` holding every figure of its results.json (one shared writer, `model_cards.hub_card`), it validates
with `huggingface_hub.ModelCard`, and the push's own rendering (`hub_model_card`) finds nothing to change.

Each folder comes from a tiny run that the recipe's own test module already makes (same helpers and sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_script
from huggingface_hub import ModelCard
from lightarch.evaluation.model_cards import hub_card, hub_model_card, measured_results, validate_card


def assert_hub_ready(folder: Path, record: Path | None = None, model: str = "student") -> ModelCard:
    """The saved card validates, its model-index is exactly `measured_results` of the record on disk (names and
    values), and rendering it again for the push changes nothing."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    card = validate_card(text)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and "lightarch" in data["tags"] and data["pipeline_tag"]
    results = json.loads((record or folder / "results.json").read_text(encoding="utf-8"))
    expected = {r.metric_name: r.metric_value for r in measured_results(results, model=model)}
    saved = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert saved == pytest.approx(expected) and len(saved) == len(card.data.eval_results)
    assert hub_model_card(folder) == text  # the push renders the same card: the folder is ready as it is
    return card


def test_train_py_sparse_moe_folder(tmp_path):
    from test_train_script import train_in_process

    folder = tmp_path / "sparse_moe"
    train_in_process(folder, max_steps=2)
    card = assert_hub_ready(folder)
    assert card.data.eval_results[0].dataset_type == "python-source"  # the template's data set is kept


def test_train_passkey_folder(tmp_path):
    from lightarch import SparseMoeConfig
    from lightarch.training.cli import config_from_preset
    from lightarch.training.passkey import train_passkey
    from test_long_context_scripts import MICRO_CURRICULUM, MICRO_PASSKEY, micro_training_args

    folder = tmp_path / "passkey"
    config = config_from_preset(SparseMoeConfig, "passkey", MICRO_PASSKEY)
    train_passkey(config, micro_training_args(folder, max_steps=2), MICRO_CURRICULUM, eval_samples=1)
    assert_hub_ready(folder)


def test_train_multimodal_variant_folder(tmp_path):
    from test_multimodal_scripts import micro_run

    micro_run(tmp_path / "mm", ablation=False, max_steps=2)
    (variant,) = [p for p in (tmp_path / "mm").iterdir() if (p / "config.json").is_file()]
    card = assert_hub_ready(variant)
    assert "datasets" not in card.data.to_dict()  # synthetic data: no Hub data set to name
    assert {r.metric_type for r in card.data.eval_results} == {"vqa_accuracy", "retrieval_recall",
                                                               "modality_alignment_error"}


def test_train_private_folder(tmp_path):
    from test_privacy import TINY_RUN

    folder = tmp_path / "private"
    result = run_script("train_private", *TINY_RUN, "--max_steps", "2", "--target_epsilon", "5",
                        "--output_dir", str(folder), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_hub_ready(folder)


def test_distillation_student_card(tmp_path):
    """write_report (what scripts/eval_distill.py calls) on a run folder holding a tiny student's config and the
    evaluation record of tests/test_hub.py (a real distill.py run is not quick)."""
    from conftest import tiny_sparse_moe_config
    from lightarch.training.distillation.report import write_report
    from test_hub import RESULTS

    run = tmp_path / "run"
    tiny_sparse_moe_config().save_pretrained(run / "student")
    write_report(run, RESULTS["distilled"])
    card = assert_hub_ready(run / "student", record=run / "eval.json")
    assert card.data.to_dict()["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_hub_card_is_the_one_writer_and_is_idempotent():
    """A card with several data sets (adaptive depth: one per split) keeps them when rendered again."""
    from test_hub import RESULTS, _front_matter

    card = f"---\n{_front_matter('adaptive_depth')}---\n\n# body\n"
    once = hub_card(card, RESULTS["adaptive_depth"], model_name="tiny")
    assert hub_card(once, RESULTS["adaptive_depth"], model_name="tiny") == once
    names = {r.dataset_name for r in ModelCard(once).data.eval_results}
    assert names == {"Generated arithmetic (easy)", "Generated arithmetic (hard)"}
    assert ModelCard(once).text.strip() == "# body"
