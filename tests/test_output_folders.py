"""Outputs that are never deleted: one rule (`lightarch.training.checkpoints.check_output_dir`) for every script's
output folder, and an atomic save whose crash window is recovered on the next start."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_script, tiny_sparse_moe_config
from lightarch.training import checkpoints
from lightarch.training.checkpoints import (
    OUTPUT_MARKER,
    atomic_save_pretrained,
    check_output_dir,
    output_marker,
    prepare_output_dir,
    recover_interrupted_save,
)
from transformers import TrainingArguments


def foreign_folder(path):
    path.mkdir(parents=True)
    (path / "results.json").write_text("{}")  # what the old guards took for "a previous run"
    (path / "notes.txt").write_text("mine")
    return path


def test_the_rule(tmp_path):
    assert check_output_dir(tmp_path / "new", "train.py") == (tmp_path / "new").absolute()
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "train.py")
    with pytest.raises(ValueError, match=r"--output_dir .*foreign is not empty and holds no output of train.py"):
        check_output_dir(foreign_folder(tmp_path / "foreign"), "train.py")
    prepare_output_dir(tmp_path / "ours", "train.py")
    (tmp_path / "ours" / "model.safetensors").write_text("x")
    check_output_dir(tmp_path / "ours", "train.py")  # a previous run of the same script
    with pytest.raises(ValueError, match=r"holds the output of train.py, not of export_onnx.py"):
        check_output_dir(tmp_path / "ours", "export_onnx.py")
    with pytest.raises(ValueError, match=r"--output_dir .*ours is the input --model_dir"):
        check_output_dir(tmp_path / "ours", "train.py", inputs={"--model_dir": tmp_path / "ours"})
    with pytest.raises(ValueError, match=r"--output_dir .* contains the input --model_dir"):
        check_output_dir(tmp_path, "train.py", inputs={"--model_dir": tmp_path / "ours"})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file", "train.py")
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def saved_model(folder):
    from lightarch import SparseMoeForCausalLM

    SparseMoeForCausalLM(tiny_sparse_moe_config()).save_pretrained(folder)
    return folder


def test_train_recipes_refuse_a_foreign_folder_and_accept_their_own(tmp_path):
    from lightarch import AdaptiveDepthConfig, MultiModalConfig, SparseMoeConfig
    from lightarch.data.passkey import PasskeyCurriculum
    from lightarch.training.adaptive_depth import check_adaptive_run
    from lightarch.training.multimodal import check_multimodal_run
    from lightarch.training.passkey import check_passkey_run
    from lightarch.training.sparse_moe import check_train_options

    def args(folder, **overrides):
        return TrainingArguments(output_dir=str(folder), use_cpu=True, max_steps=2, report_to="none",
                                 **{"per_device_train_batch_size": 2, **overrides})

    checks = {
        "train.py": lambda out: check_train_options(
            SparseMoeConfig.from_preset("tiny"), args(out), block_size=32, tokenizer_min_frequency=2,
            time_budget_minutes=0, sample_prompt="x", sample_max_new_tokens=8),
        "train_passkey.py": lambda out: check_passkey_run(
            SparseMoeConfig.from_preset("passkey"), args(out, per_device_train_batch_size=1), PasskeyCurriculum()),
        "train_adaptive.py": lambda out: check_adaptive_run(AdaptiveDepthConfig.from_preset("arithmetic"), args(out)),
        "train_multimodal.py": lambda out: check_multimodal_run(MultiModalConfig.from_preset("trimodal-qa"),
                                                                args(out)),
    }
    for script, check in checks.items():
        folder = foreign_folder(tmp_path / script / "foreign")
        with pytest.raises(ValueError, match=rf"--output_dir {folder} is not empty and holds no output of {script}"):
            check(folder)
        assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "results.json"]
        ours = prepare_output_dir(tmp_path / script / "ours", script)
        (ours / "results.json").write_text("{}")
        check(ours)  # a previous run of the same script may be replaced
        other = next(s for s in checks if s != script)
        foreign_run = prepare_output_dir(tmp_path / script / "other", other)
        (foreign_run / "results.json").write_text("{}")
        with pytest.raises(ValueError, match=f"holds the output of {other}"):
            check(foreign_run)


def test_deploy_and_evaluation_refuse_their_input_folder(tmp_path):
    from lightarch.deploy.onnx import check_export_options
    from lightarch.deploy.peft import check_finetune_options
    from lightarch.evaluation.multimodal import check_evaluation_output_dir

    model_dir = saved_model(tmp_path / "model")
    with pytest.raises(ValueError, match=rf"--output_dir {model_dir} is the input --model_dir"):
        check_export_options(model_dir, output_dir=model_dir)
    with pytest.raises(ValueError, match=r"--output_dir .* is not empty and holds no output of export_onnx.py"):
        check_export_options(model_dir, output_dir=foreign_folder(tmp_path / "foreign_onnx"))
    check_export_options(model_dir, output_dir=tmp_path / "onnx")
    with pytest.raises(ValueError, match=rf"--output_dir {model_dir} is the input --model_dir"):
        check_finetune_options(model_dir, None, False, False, 0.1, 8, 32, 2, 2, output_dir=model_dir)
    with pytest.raises(ValueError, match=r"holds no output of finetune_lora.py"):
        check_finetune_options(model_dir, None, False, False, 0.1, 8, 32, 2, 2,
                               output_dir=foreign_folder(tmp_path / "foreign_lora"))

    run = tmp_path / "multimodal"  # a train_multimodal output: two model folders
    for variant in ("aligned", "no_alignment"):
        (run / variant).mkdir(parents=True)
        (run / variant / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"--output_dir {run} is the input --model_dir"):
        check_evaluation_output_dir(run, run)
    with pytest.raises(ValueError, match=r"is the input model aligned/"):
        check_evaluation_output_dir(run, run / "aligned")
    assert check_evaluation_output_dir(run, None) == (run / "eval").absolute()  # the default


def test_atomic_save_marks_the_folder_and_recovers_a_crash_between_the_renames(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    atomic_save_pretrained(folder, extra_files={"results.json": '{"run": 1}'}, script="train.py")
    assert output_marker(folder)["script"] == "train.py"
    (folder / "checkpoint-5").mkdir()

    real_replace = os.replace

    def crash_on_second_rename(src, dst):  # the previous run moved aside, then the process dies
        if os.fspath(dst) == os.fspath(folder.absolute()):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic_save_pretrained(folder, extra_files={"results.json": '{"run": 2}'}, script="train.py")
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    assert not folder.exists()  # the crash window: previous run in .out.old-*, the new one complete in .out.tmp-*

    recover_interrupted_save(folder)  # what the next start (prepare_output_dir / atomic_save_pretrained) runs
    assert json.loads((folder / "results.json").read_text()) == {"run": 2}  # the complete new save, not deleted
    assert (folder / "checkpoint-5").is_dir() and (folder / OUTPUT_MARKER).is_file()  # checkpoints carried over
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_crash_before_the_new_save_is_complete_restores_the_previous_run(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    atomic_save_pretrained(folder, extra_files={"results.json": '{"run": 1}'}, script="train.py")
    old = tmp_path / ".out.old-deadbeef"
    os.replace(folder, old)  # moved aside; the new save's temporary folder was already cleaned up
    prepare_output_dir(folder, "train.py")
    assert json.loads((folder / "results.json").read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_export_onnx_script_refuses_its_model_dir(tmp_path):
    model_dir = saved_model(tmp_path / "model")
    before = sorted(p.name for p in model_dir.iterdir())
    result = run_script("export_onnx", "--model_dir", str(model_dir), "--output_dir", str(model_dir), "--no_check")
    assert result.returncode == 2, result.stderr
    assert f"--output_dir {model_dir} is the input --model_dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_train_passkey_script_refuses_a_foreign_folder(tmp_path):
    folder = foreign_folder(tmp_path / "foreign")
    result = run_script("train_passkey", "--output_dir", str(folder), "--max_steps", "1")
    assert result.returncode == 2, result.stderr
    assert f"--output_dir {folder} is not empty and holds no output of train_passkey.py" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "results.json"]


def test_evaluations_and_benchmarks_refuse_foreign_and_input_folders(tmp_path):
    from lightarch.evaluation.benchmarks.adaptive_depth import bench_adaptive_depth
    from lightarch.evaluation.benchmarks.inference import run_inference_benchmark
    from lightarch.evaluation.benchmarks.long_context_report import write_results
    from lightarch.evaluation.passkey import check_results_dir

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "heldout.json").write_text("{}")
    foreign = foreign_folder(tmp_path / "foreign")

    # eval_long_context.py: never --model itself, nor a shard being merged; the default folder is inside the model
    with pytest.raises(ValueError, match=rf"--output_dir {model_dir} is the input --model"):
        check_results_dir(model_dir, model_dir)
    with pytest.raises(ValueError, match=r"is the input --merge .*shard"):
        check_results_dir(model_dir, tmp_path / "shard", merged=[tmp_path / "shard"])
    with pytest.raises(ValueError, match="holds no output of eval_long_context.py"):
        check_results_dir(model_dir, foreign)
    default = (model_dir / "long_context_eval_distractors2").absolute()
    assert check_results_dir(model_dir, None, distractors=2) == default

    with pytest.raises(ValueError, match=rf"--output_dir {model_dir} is the input --model_dir"):
        bench_adaptive_depth(model_dir, model_dir)
    with pytest.raises(ValueError, match=rf"--output_dir {model_dir} is the input --model_dir"):
        run_inference_benchmark(str(model_dir), str(model_dir))
    with pytest.raises(ValueError, match="holds no output of bench_long_context.py"):
        write_results(foreign, {})
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt", "results.json"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["heldout.json"]


def test_eval_multimodal_and_bench_moe_scripts_refuse_without_deleting(tmp_path):
    run = tmp_path / "multimodal"  # a train_multimodal output: two model folders
    for variant in ("aligned", "no_alignment"):
        (run / variant).mkdir(parents=True)
        (run / variant / "config.json").write_text("{}")
    result = run_script("eval_multimodal", "--model_dir", str(run), "--output_dir", str(run))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"--output_dir {run} is the input --model_dir" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["aligned", "no_alignment"]

    foreign = foreign_folder(tmp_path / "foreign")
    result = run_script("bench_moe", "--output_dir", str(foreign))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"--output_dir {foreign} is not empty and holds no output of bench_moe.py" in result.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt", "results.json"]


def test_finetune_lora_and_export_onnx_folder_never_write_over_their_input_or_a_foreign_folder(tmp_path):
    from deploy_helpers import save_tiny_model
    from lightarch.deploy.onnx import export_onnx_folder
    from lightarch.deploy.peft import finetune_lora

    model_dir = save_tiny_model(tmp_path / "base")
    (model_dir / "results.json").write_text('{"base": true}')
    before = sorted(p.name for p in model_dir.iterdir())
    with pytest.raises(ValueError, match=rf"--output_dir {model_dir} is the input --model_dir"):
        finetune_lora(model_dir, model_dir, block_size=16, batch_size=2, max_steps=1)
    with pytest.raises(ValueError, match=rf"--output_dir {model_dir} is the input --model_dir"):
        export_onnx_folder(model_dir, model_dir, int8=False, check=False)
    foreign = foreign_folder(tmp_path / "foreign")
    with pytest.raises(ValueError, match="holds no output of export_onnx.py"):
        export_onnx_folder(model_dir, foreign, int8=False, check=False)
    assert sorted(p.name for p in model_dir.iterdir()) == before
    assert json.loads((model_dir / "results.json").read_text()) == {"base": True}
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt", "results.json"]
