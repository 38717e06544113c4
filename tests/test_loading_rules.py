"""The missing-weights rule of `from_pretrained` (issue 12), one for every lightarch class: a checkpoint that lacks a
weight it should hold is refused, heads included (tied weights excepted), naming the keys and
`allow_missing_weights=True`; a new head (a causal-LM checkpoint loaded into a classifier) is initialised and
reported as transformers does; `output_loading_info=True` reports instead of raising."""

import logging

import pytest
import torch
from conftest import tiny_sparse_moe_config
from deploy_helpers import tiny_adaptive_config
from safetensors.torch import load_file, save_file
from test_multimodal import tiny_config
from transformers import AutoModelForCausalLM

from lightarch import (
    AdaptiveDepthForCausalLM,
    AdaptiveDepthForSequenceClassification,
    MultiModalConfig,
    MultiModalForConditionalGeneration,
    MultiModalModel,
    SparseMoeConfig,
    SparseMoeForCausalLM,
    SparseMoeForSequenceClassification,
    SparseMoeModel,
)


def saved(tmp_path, model, drop=(), name="model"):
    """Save `model` into tmp_path/name, then delete the `drop` tensors from its safetensors file."""
    folder = tmp_path / name
    model.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    for key in drop:
        del weights[key]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


CAUSAL_LMS = {
    "sparse_moe": (SparseMoeForCausalLM, lambda **kw: tiny_sparse_moe_config(**kw)),
    "adaptive_depth": (AdaptiveDepthForCausalLM, lambda **kw: tiny_adaptive_config(**kw)),
}


@pytest.mark.parametrize("name", sorted(CAUSAL_LMS))
def test_missing_untied_lm_head_is_refused_not_random(name, tmp_path):
    model_class, make_config = CAUSAL_LMS[name]
    torch.manual_seed(0)
    folder = saved(tmp_path, model_class(make_config(tie_word_embeddings=False)), drop=["lm_head.weight"])
    with pytest.raises(OSError, match=r"lacks 1 weight\(s\) the model needs: lm_head\.weight\. .*"
                                      r"allow_missing_weights=True"):
        AutoModelForCausalLM.from_pretrained(folder)
    loaded = model_class.from_pretrained(folder, allow_missing_weights=True)  # asked for: initialised
    assert loaded.lm_head.weight.abs().sum() > 0


def test_tied_lm_head_is_not_missing(tmp_path):
    torch.manual_seed(0)
    model = SparseMoeForCausalLM(tiny_sparse_moe_config(tie_word_embeddings=True))
    folder = saved(tmp_path, model)
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")  # transformers saves the source only
    loaded = SparseMoeForCausalLM.from_pretrained(folder)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("load", ["causal_lm", "multimodal_generation", "multimodal_model"])
def test_output_loading_info_reports_missing_weights_instead_of_raising(load, tmp_path, caplog):
    torch.manual_seed(0)
    if load == "causal_lm":
        model_class, model, key = SparseMoeForCausalLM, SparseMoeForCausalLM(tiny_sparse_moe_config()), \
            "model.layers.2.mlp.experts.down_proj"
    else:
        model_class = MultiModalForConditionalGeneration if load == "multimodal_generation" else MultiModalModel
        model = model_class(tiny_config())
        key = next(k for k in model.state_dict() if k.endswith("image_projector.linear_1.weight"))
    folder = saved(tmp_path, model, drop=[key])
    with pytest.raises(OSError, match=rf"{key}.*allow_missing_weights=True"):  # without it: still refused
        model_class.from_pretrained(folder)
    with caplog.at_level(logging.WARNING, logger="lightarch.checkpoint_checks"):
        loaded, info = model_class.from_pretrained(folder, output_loading_info=True)
    assert isinstance(loaded, model_class)
    assert info["missing_keys"] == {key}
    assert set(info) >= {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}  # transformers' dict
    assert any(key in record.getMessage() and "Not raised" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("classifier,causal_lm,make_config", [
    (SparseMoeForSequenceClassification, SparseMoeForCausalLM, tiny_sparse_moe_config),
    (AdaptiveDepthForSequenceClassification, AdaptiveDepthForCausalLM, tiny_adaptive_config),
], ids=["sparse_moe", "adaptive_depth"])
def test_new_head_is_initialised_and_reported_like_transformers(classifier, causal_lm, make_config, tmp_path,
                                                                 caplog):
    """A guard of the rule's exception (it held before the fix too): `score` is new, not refused."""
    torch.manual_seed(0)
    folder = saved(tmp_path, causal_lm(make_config(num_labels=3)))
    model, info = classifier.from_pretrained(folder, num_labels=3, output_loading_info=True)
    assert info["missing_keys"] == {"score.weight"}
    transformers_logger = logging.getLogger("transformers")  # it does not propagate to the root logger
    transformers_logger.addHandler(caplog.handler)
    try:
        model = classifier.from_pretrained(folder, num_labels=3)  # no refusal without output_loading_info either
    finally:
        transformers_logger.removeHandler(caplog.handler)
    assert model.score.weight.abs().sum() > 0
    report = caplog.text  # transformers' LOAD REPORT, logged as a warning
    assert "LOAD REPORT" in report and "score.weight" in report and "MISSING" in report


def test_backbone_weight_missing_under_a_new_head_is_still_refused(tmp_path):
    torch.manual_seed(0)
    folder = saved(tmp_path, SparseMoeForCausalLM(tiny_sparse_moe_config()), drop=["model.norm.weight"])
    with pytest.raises(OSError, match=r"model\.norm\.weight"):
        SparseMoeForSequenceClassification.from_pretrained(folder, num_labels=2)


def test_bare_model_checkpoint_gives_an_untied_causal_lm_a_new_lm_head(tmp_path):
    torch.manual_seed(0)
    folder = saved(tmp_path, SparseMoeModel(tiny_sparse_moe_config(tie_word_embeddings=False)))
    model, info = SparseMoeForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"}
    SparseMoeForCausalLM.from_pretrained(folder)  # not refused: the head is new


def test_one_missing_weights_rule_and_one_config_loading_guard():
    """The multimodal model has no second copy of the rule; the configs share one `get_config_dict`."""
    assert "from_pretrained" not in vars(MultiModalModel) and "from_pretrained" not in vars(
        MultiModalForConditionalGeneration)
    assert MultiModalConfig.get_config_dict.__func__ is SparseMoeConfig.get_config_dict.__func__
