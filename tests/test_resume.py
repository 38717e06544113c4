"""`--resume_from_checkpoint` in every training recipe: a resumed run starts from the checkpoint's weights (all of
them), and a checkpoint that does not exist is a one-line error naming the option.

Each test trains a micro run that writes checkpoints, resumes from one of them, and compares the model's weights at
`on_train_begin` (right after Trainer loaded the checkpoint) with the checkpoint's, loaded by `from_pretrained`.
scripts/train.py's resume is tested in test_train_script.py.
"""

import shutil

import pytest
import torch

from conftest import run_script


@pytest.fixture
def weights_at_train_begin(monkeypatch):
    """The model's tensors at every `on_train_begin` of a Trainer with a `TimeBudgetCallback` (every recipe's main
    training has one), cloned."""
    from lightarch.training.callbacks import TimeBudgetCallback

    recorded = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        recorded.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    monkeypatch.setattr(TimeBudgetCallback, "on_train_begin", on_train_begin, raising=False)
    return recorded


def assert_same_weights(state: dict, checkpoint, model_class) -> None:
    expected = model_class.from_pretrained(checkpoint).state_dict()
    assert state.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(state[k], expected[k])]
    assert not different, f"{len(different)} tensors differ from {checkpoint}, e.g. {different[:3]}"


# ------------------------------------------------------------------------------------------------------ multimodal


def test_multimodal_resume_loads_every_tensor_of_the_checkpoint(tmp_path, weights_at_train_begin):
    """The ViT encoder is saved under legacy key names: Trainer's own loading left it at its random initialisation."""
    from lightarch import MultiModalForConditionalGeneration
    from test_multimodal_scripts import micro_run

    output_dir = tmp_path / "run"
    micro_run(output_dir, ablation=False, save_total_limit=None)  # checkpoint-3 and checkpoint-6
    variant_dir = output_dir / "aligned"
    (variant_dir / "results.json").unlink()  # as if the run had died after checkpoint-3
    shutil.rmtree(variant_dir / "checkpoint-6")
    weights_at_train_begin.clear()
    resumed = micro_run(output_dir, ablation=False, save_total_limit=None, resume_from_checkpoint="True")
    assert resumed["runs"]["aligned"]["resumed_from"].endswith("checkpoint-3")
    assert len(weights_at_train_begin) == 1
    state = weights_at_train_begin[0]
    assert any(".vision_model." in k for k in state)
    assert_same_weights(state, variant_dir / "checkpoint-3", MultiModalForConditionalGeneration)


def test_multimodal_checkpoint_of_another_model_is_refused_naming_it(tmp_path):
    from lightarch import MultiModalForConditionalGeneration
    from lightarch.training.multimodal_trainer import load_checkpoint_weights
    from test_multimodal_scripts import micro_config

    config = micro_config()
    MultiModalForConditionalGeneration(config).save_pretrained(tmp_path / "checkpoint-1")
    config.vision_config.intermediate_size = 96
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint: .*checkpoint-1 does not hold this model's "):
        load_checkpoint_weights(MultiModalForConditionalGeneration(config), str(tmp_path / "checkpoint-1"))


# --------------------------------------------------------------------------------------------------------- passkey


def test_passkey_resume_starts_from_the_checkpoint(tmp_path, weights_at_train_begin):
    from lightarch import SparseMoeConfig, SparseMoeForCausalLM
    from lightarch.training.cli import config_from_preset
    from lightarch.training.passkey import check_passkey_run, train_passkey
    from test_long_context_scripts import (
        MICRO_CURRICULUM,
        MICRO_PASSKEY,
        micro_training_args,
    )

    def config():  # a new one per run: Trainer sets the model's config.use_cache to False
        return config_from_preset(SparseMoeConfig, "passkey", MICRO_PASSKEY)

    args = dict(max_steps=4, save_strategy="steps", save_steps=2)
    train_passkey(config(), micro_training_args(tmp_path, **args), MICRO_CURRICULUM, eval_samples=1)
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()
    weights_at_train_begin.clear()
    results = train_passkey(config(), micro_training_args(tmp_path, resume_from_checkpoint=str(checkpoint), **args),
                            MICRO_CURRICULUM, eval_samples=1)
    assert_same_weights(weights_at_train_begin[0], checkpoint, SparseMoeForCausalLM)
    assert results["resumed_from"] == str(checkpoint) and results["train_steps"] == 4

    other = config_from_preset(SparseMoeConfig, "passkey", MICRO_PASSKEY + ",hidden_size=48")
    with pytest.raises(ValueError, match=r"^--resume_from_checkpoint .*checkpoint-2 was trained with other model "
                                         r"options: head_dim=24 \(checkpoint: 16\), hidden_size=48 "
                                         r"\(checkpoint: 32\)\. Pass that run's --preset"):
        check_passkey_run(other, micro_training_args(tmp_path, resume_from_checkpoint=str(checkpoint)),
                          MICRO_CURRICULUM)


# ---------------------------------------------------------------------------------------------------- adaptive depth


def test_adaptive_resume_continues_phase_1_from_the_checkpoint(tmp_path, weights_at_train_begin):
    from lightarch import AdaptiveDepthConfig, AdaptiveDepthForCausalLM
    from lightarch.data.arithmetic import SuiteSizes
    from lightarch.training.adaptive_depth import AdaptiveSchedule, train_adaptive
    from lightarch.training.cli import config_from_preset
    from test_adaptive_depth import TINY_MODEL, TINY_SCHEDULE, TINY_SIZES, TINY_TRAINING
    from transformers import TrainingArguments

    def tiny_run(output_dir, training):  # test_adaptive_depth.tiny_run, with checkpoints
        config = config_from_preset(AdaptiveDepthConfig, "arithmetic", TINY_MODEL)
        args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none", seed=42,
                                 **{**TINY_TRAINING, **training})
        return train_adaptive(config, args, SuiteSizes(**TINY_SIZES), AdaptiveSchedule(**TINY_SCHEDULE))

    args = dict(max_steps=4, save_strategy="steps", save_steps=2)
    tiny_run(tmp_path, args)
    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / "trainer_state.json").is_file()
    (tmp_path / "checkpoint-6").mkdir()  # cut short by a crash (no trainer_state.json): resume True skips it
    weights_at_train_begin.clear()
    results = tiny_run(tmp_path, {**args, "resume_from_checkpoint": "True"})
    assert_same_weights(weights_at_train_begin[0], checkpoint, AdaptiveDepthForCausalLM)
    assert results["phase1_resumed_from"] == str(checkpoint) and results["phase1_steps"] == 4


# ------------------------------------------------------------------------------------------------ bad checkpoints


@pytest.mark.parametrize("script", ["train_passkey", "train_adaptive"])
def test_a_checkpoint_that_does_not_exist_is_one_line_naming_the_option(script, tmp_path):
    from test_adaptive_depth import TINY_TRAIN
    from test_long_context_scripts import MICRO_CURRICULUM, MICRO_PASSKEY

    micro = {"train_adaptive": TINY_TRAIN,  # a run that would not stop at the error is over in seconds
             "train_passkey": ["--config_overrides", MICRO_PASSKEY, "--max_steps", "1", "--eval_samples", "1"]
             + [f"--{name}={getattr(MICRO_CURRICULUM, name)}" for name in ("min_length", "max_length",
                                                                              "tokens_per_batch")]}[script]
    missing = tmp_path / "checkpoint-7"
    result = run_script(script, *micro, "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", str(missing))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{script}.py: error: ")]
    assert errors == [f"{script}.py: error: --resume_from_checkpoint {missing}: not a complete Trainer checkpoint (no "
                      "trainer_state.json). Pass a checkpoint-<step> folder, or True for the last one in --output_dir."]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_resume_true_without_a_checkpoint_is_refused_naming_the_option(tmp_path):
    from lightarch.training.checkpoints import resume_or_start_fresh

    with pytest.raises(ValueError, match=r"^--resume_from_checkpoint True: no complete checkpoint-\* folder"):
        resume_or_start_fresh(True, tmp_path)
    (tmp_path / "checkpoint-5").mkdir()  # an earlier run's, cut short: removed when starting from scratch
    assert resume_or_start_fresh(None, tmp_path, remove_stale=False) is None and (tmp_path / "checkpoint-5").exists()
    assert resume_or_start_fresh("false", tmp_path) is None and not (tmp_path / "checkpoint-5").exists()
