"""Bad inputs that used to slip through (issue 12): each is refused with a one-line error naming the argument, the
field or the folder, before it fails deep inside torch, ONNX Runtime or numpy, or gives a silent NaN."""

import numpy as np
import pytest
import torch
from conftest import tiny_sparse_moe_config
from deploy_helpers import tiny_adaptive_config, tiny_byte_config
from huggingface_hub.errors import StrictDataclassClassValidationError
from test_multimodal import image, make_tokenizer, tiny_config

from lightarch import (
    AdaptiveDepthConfig,
    AdaptiveDepthForCausalLM,
    MultiModalConfig,
    MultiModalForConditionalGeneration,
    MultiModalProcessor,
    SparseMoeConfig,
    SparseMoeForCausalLM,
)

MODELS = {
    "sparse_moe": lambda: SparseMoeForCausalLM(tiny_sparse_moe_config()).eval(),
    "adaptive_depth": lambda: AdaptiveDepthForCausalLM(tiny_adaptive_config()).eval(),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]()


IDS = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(0))

# (name, forward kwargs, message pattern)
BAD_FORWARDS = [
    ("empty sequence", dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), r"input_ids is empty .* = \(2, 0\)"),
    ("batch 0", dict(input_ids=torch.zeros(0, 5, dtype=torch.long)), r"input_ids is empty .* = \(0, 5\)"),
    ("1-D input_ids", dict(input_ids=IDS[0]), r"input_ids must have shape \(batch_size, sequence_length\), got \(5,\)"),
    ("3-D input_ids", dict(input_ids=IDS[None]), r"input_ids must have shape .* got \(1, 2, 5\)"),
    ("float input_ids", dict(input_ids=IDS.float()), r"input_ids must hold integer token ids .* torch.float32"),
    ("inputs_embeds width", dict(inputs_embeds=torch.randn(2, 5, 16)),
     r"inputs_embeds must have shape \(batch_size, sequence_length, hidden_size=32\), got \(2, 5, 16\)"),
    ("2-D inputs_embeds", dict(inputs_embeds=torch.randn(5, 32)), r"inputs_embeds must have shape .* got \(5, 32\)"),
    ("1-D attention_mask", dict(input_ids=IDS, attention_mask=torch.ones(5, dtype=torch.long)),
     r"attention_mask must have shape \(batch_size, sequence_length\).* got \(5,\)"),
    ("labels of the wrong shape", dict(input_ids=IDS, labels=IDS[:, :3]),
     r"labels have shape \(2, 3\) but the inputs have \(batch_size, sequence_length\) = \(2, 5\)"),
    ("labels all -100", dict(input_ids=IDS, labels=torch.full_like(IDS, -100)), r"labels hold no target"),
    ("labels -100 after the first position", dict(input_ids=IDS, labels=torch.cat(
        [IDS[:, :1], torch.full_like(IDS[:, 1:], -100)], dim=1)), r"labels hold no target"),
]


@pytest.mark.parametrize("kwargs,match", [case[1:] for case in BAD_FORWARDS], ids=[case[0] for case in BAD_FORWARDS])
def test_forward_names_the_bad_argument(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_labels_without_target_under_gradient_accumulation_give_zero_like_transformers(model):
    """With `num_items_in_batch` (Trainer's gradient accumulation) the loss is a sum share: a micro-batch without
    targets adds 0, as Qwen3-MoE and Mistral return. Without it they return NaN, which lightarch refuses."""
    labels = torch.full_like(IDS, -100)
    loss = model(IDS, labels=labels, num_items_in_batch=torch.tensor(4)).loss
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    assert torch.isfinite(model(IDS, labels=IDS).loss)


@pytest.mark.parametrize("prompt,match", [
    (torch.zeros(1, 0, dtype=torch.long), r"input_ids is empty"),
    (torch.zeros(0, 3, dtype=torch.long), r"input_ids is empty"),
    (IDS[0], r"generate: input_ids must have shape \(batch_size, sequence_length\), got \(5,\) \(one prompt"),
    (IDS[None], r"input_ids must have shape .* got \(1, 2, 5\)"),
    (IDS.float(), r"input_ids must hold integer token ids"),
], ids=["empty prompt", "batch 0", "1-D", "3-D", "float"])
def test_generate_names_the_bad_prompt(model, prompt, match):
    with pytest.raises(ValueError, match=match):
        model.generate(prompt, max_new_tokens=2, do_sample=False)


def test_valid_inputs_still_generate(model):
    out = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 8)


# -- config values that passed validation and broke later --

BAD_FIELDS = [
    (dict(rms_norm_eps=-1e-6), r"`rms_norm_eps` must be a small positive number"),
    (dict(rms_norm_eps=float("nan")), r"`rms_norm_eps` must be a small positive number"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), r"`rope_parameters\['rope_theta'\]`"),
    (dict(rope_parameters={"rope_type": "bogus", "rope_theta": 1e4}), r"`rope_parameters\['rope_type'\]` 'bogus'"),
    (dict(initializer_range=-0.02), r"`initializer_range` \(the init std\) must be >= 0"),
    (dict(attention_dropout=1.5), r"`attention_dropout` is a probability in \[0, 1\], got 1.5"),
    (dict(attention_dropout=-0.1), r"`attention_dropout` is a probability"),
    (dict(hidden_act="swoosh"), r"`hidden_act` 'swoosh' is unknown"),
    (dict(pad_token_id=97), r"`pad_token_id` is 97 but the vocabulary has ids \[0, 96\]"),
    (dict(eos_token_id=[2, -1]), r"`eos_token_id` is \[2, -1\] but the vocabulary"),
    (dict(bos_token_id=-1), r"`bos_token_id` is -1"),
]


@pytest.mark.parametrize("fields,match", BAD_FIELDS, ids=[str(f) for f, _ in BAD_FIELDS])
def test_config_refuses_values_that_break_later(fields, match):
    with pytest.raises(ValueError, match=match):
        tiny_sparse_moe_config(**fields)


def test_adaptive_config_refuses_nan_exit_loss_weights():
    with pytest.raises(ValueError, match=r"`exit_loss_weights` must be >= 0"):
        tiny_adaptive_config(exit_loss_weights=[float("nan")] + [1.0] * (len(tiny_adaptive_config().exit_layers) - 1))


@pytest.mark.parametrize("model_class,config_fn", [
    (SparseMoeForCausalLM, tiny_sparse_moe_config),
    (AdaptiveDepthForCausalLM, tiny_adaptive_config),
], ids=["sparse_moe", "adaptive_depth"])
def test_assignment_after_init_is_checked_when_the_model_is_built_and_saved(model_class, config_fn, tmp_path):
    config = config_fn()
    config.num_experts_per_tok = 99  # passes the field's type check only
    with pytest.raises(ValueError, match=r"`num_experts_per_tok` \(99\) must be between 1 and `num_experts`"):
        model_class(config)
    with pytest.raises(StrictDataclassClassValidationError, match=r"num_experts_per_tok"):  # `@strict` validator
        config.save_pretrained(tmp_path)


@pytest.mark.parametrize("vision,match", [
    (dict(patch_size=0), r"`vision_config.image_size` \(28\) and `vision_config.patch_size` \(0\) must be positive"),
    (dict(patch_size=56), r"`vision_config.patch_size` \(56\) is larger than `vision_config.image_size` \(28\)"),
    (dict(num_channels=-1), r"`vision_config.num_channels` must be a positive integer, got -1"),
    (dict(hidden_size=17), r"`vision_config.num_attention_heads` \(2\) must divide `vision_config.hidden_size` \(17\)"),
], ids=["patch 0", "patch > image", "negative channels", "heads do not divide"])
def test_multimodal_config_refuses_bad_vit_sizes(vision, match):
    from test_multimodal import tiny_vision_config

    with pytest.raises(ValueError, match=match):
        tiny_config(vision_config=tiny_vision_config(**vision))


def test_multimodal_config_refuses_unknown_projector_activation():
    with pytest.raises(ValueError, match=r"`projector_hidden_act` 'swoosh' is unknown"):
        tiny_config(projector_hidden_act="swoosh")


def test_multimodal_config_refuses_placeholder_equal_to_pad():
    with pytest.raises(ValueError, match=r"`image_token_id` is 0, the decoder's `pad_token_id`"):
        tiny_config(image_token_id=0)
    with pytest.raises(ValueError, match=r"`audio_token_id` is 0, the decoder's `pad_token_id`"):
        tiny_config(audio_token_id=0)


def test_multimodal_assignment_after_init_is_checked_when_the_model_is_built():
    config = tiny_config()
    config.image_token_id = config.decoder_config.pad_token_id
    with pytest.raises(ValueError, match=r"`image_token_id` is 0, the decoder's `pad_token_id`"):
        MultiModalForConditionalGeneration(config)


# -- images and prompts in the multimodal model and processor --

@pytest.fixture(scope="module")
def processor():
    return MultiModalProcessor.from_config(tiny_config(), make_tokenizer())


@pytest.fixture(scope="module")
def multimodal_model():
    torch.manual_seed(0)
    return MultiModalForConditionalGeneration(tiny_config()).eval()


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_model_refuses_non_finite_pixels(multimodal_model, processor, value):
    batch = processor(text=["<image> what is shown ?"], images=[image(0)])
    pixel_values = batch["pixel_values"].clone()
    pixel_values[0, 0, 3, 3] = value
    with pytest.raises(ValueError, match=r"pixel_values contain NaN or infinite values"):
        multimodal_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=pixel_values)
    with pytest.raises(ValueError, match=r"pixel_values contain NaN or infinite values"):
        multimodal_model.get_image_features(pixel_values)


def test_multimodal_forward_names_bad_text_inputs(multimodal_model):
    ids = torch.tensor([[1, 4, 5, 6]])
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch_size, sequence_length\), got \(4,\)"):
        multimodal_model(input_ids=ids[0])
    with pytest.raises(ValueError, match=r"labels have shape \(1, 2\)"):
        multimodal_model(input_ids=ids, labels=ids[:, :2])
    with pytest.raises(ValueError, match=r"labels hold no target"):
        multimodal_model(input_ids=ids, labels=torch.full_like(ids, -100))


@pytest.mark.parametrize("bad,match", [
    (lambda a: np.where(a == a[0, 0], np.nan, a / 255.0), r"Example 0: an image contains NaN or infinite pixel"),
    (lambda a: np.full(a.shape, np.inf), r"Example 0: an image contains NaN or infinite pixel"),
    (lambda a: a / 127.5 - 1.0, r"Example 0: a float image has pixel values in \[-1, "),
    (lambda a: a.astype(np.float32) * 2.0, r"Example 0: a float image has pixel values in \[0, "),
    (lambda a: a.astype(np.int32) + 300, r"Example 0: an integer image has pixel values in \[300, "),
], ids=["nan", "inf", "normalised [-1, 1]", "float above 255", "int above 255"])
def test_processor_refuses_non_finite_and_out_of_range_images(processor, bad, match):
    pixels = image(0).astype(np.float64)
    pixels[0, 0] = 0.0
    with pytest.raises(ValueError, match=match):
        processor(text=["<image> what is shown ?"], images=[bad(pixels)])


def test_processor_still_reads_uint8_and_unit_float_images_alike(processor):
    pixels = image(0)
    from_uint8 = processor(text=["<image> what"], images=[pixels])["pixel_values"]
    from_float = processor(text=["<image> what"], images=[pixels.astype(np.float32) / 255.0])["pixel_values"]
    torch.testing.assert_close(from_uint8, from_float, atol=1e-5, rtol=0)


def test_processor_refuses_empty_batch_and_empty_prompt(processor):
    with pytest.raises(ValueError, match=r"`text` is an empty list: give at least one prompt"):
        processor(text=[])
    with pytest.raises(ValueError, match=r"Example 1: the prompt '' gives no tokens"):
        processor(text=["what is shown ?", ""])


# -- OrtDecoder --

@pytest.fixture(scope="module")
def ort_decoder(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from lightarch.deploy.onnx import OrtDecoder, export_onnx_decoder

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("onnx")
    model = SparseMoeForCausalLM(tiny_byte_config(num_hidden_layers=2, max_position_embeddings=16,
                                                  layer_types=["sliding_attention", "full_attention"])).eval()
    export_onnx_decoder(model, folder / "model.onnx")
    return OrtDecoder(folder / "model.onnx", num_threads=1)


ORT_IDS = np.array([[5, 6, 7], [8, 9, 10]], dtype=np.int64)


@pytest.mark.parametrize("call,match", [
    (lambda d: d.logits(ORT_IDS[0]), r"logits: input_ids must have shape \(batch_size, sequence_length\), got \(3,\)"),
    (lambda d: d.logits(ORT_IDS.astype(np.float32)), r"logits: input_ids must hold integer token ids"),
    (lambda d: d.logits(np.array([[5, -1, 7]])), r"logits: input_ids contain token id -1, outside .* \[0, 258\]"),
    (lambda d: d.logits(np.array([[5, 259, 7]])), r"logits: input_ids contain token id 259"),
    (lambda d: d.logits(ORT_IDS, np.ones((2, 2))), r"logits: attention_mask has shape \(2, 2\) .* needs \(2, 3\)"),
    (lambda d: d.logits(np.full((1, 17), 5)), r"logits: the sequence reaches 17 tokens .*_embeddings is 16"),
    (lambda d: d.logits(np.zeros((1, 0), np.int64)), r"logits: input_ids is empty"),
    (lambda d: d.step(ORT_IDS, np.ones((2, 4)), d.empty_cache(2)), r"step: attention_mask has shape \(2, 4\)"),
    (lambda d: d.step(ORT_IDS, np.ones((2, 3)), d.empty_cache(2)[:1]), r"step: past has 1 arrays .* needs 2 x 2"),
    (lambda d: d.generate(ORT_IDS, max_new_tokens=0), r"generate: max_new_tokens must be an integer >= 1, got 0"),
    (lambda d: d.generate(np.zeros((1, 0), np.int64), max_new_tokens=2), r"generate: input_ids is empty"),
    (lambda d: d.generate(np.array([[5, -1]]), max_new_tokens=2), r"generate: input_ids contain token id -1"),
], ids=["1-D", "float", "id -1", "id >= vocab", "mask length", "too long", "empty", "step mask", "step past",
        "max_new_tokens 0", "generate empty prompt", "generate id -1"])
@pytest.mark.xdist_group("test_bad_inputs_ort_decoder")  # one worker exports the module-scoped decoder, not two
def test_ort_decoder_names_the_bad_argument(ort_decoder, call, match):
    with pytest.raises(ValueError, match=match):
        call(ort_decoder)


@pytest.mark.xdist_group("test_bad_inputs_ort_decoder")
def test_ort_decoder_still_runs_valid_inputs(ort_decoder):
    assert ort_decoder.logits(ORT_IDS).shape == (2, 3, 259)
    assert ort_decoder.generate(ORT_IDS, max_new_tokens=2).shape == (2, 5)
    assert ort_decoder.logits(torch.from_numpy(ORT_IDS)).shape == (2, 3, 259)  # torch inputs, as documented


# -- misleading loading messages --

@pytest.mark.parametrize("loader", [
    SparseMoeForCausalLM.from_pretrained, AdaptiveDepthForCausalLM.from_pretrained,
    MultiModalForConditionalGeneration.from_pretrained, SparseMoeConfig.from_pretrained,
    AdaptiveDepthConfig.from_pretrained, MultiModalConfig.from_pretrained,
], ids=["sparse_moe", "adaptive_depth", "multimodal", "sparse_moe config", "adaptive config", "multimodal config"])
def test_missing_folder_is_named(loader, tmp_path):
    missing = tmp_path / "no" / "such_model"
    with pytest.raises(OSError, match=rf"The model folder {missing} does not exist"):
        loader(missing)


@pytest.mark.parametrize("loader,match", [
    (SparseMoeForCausalLM.from_pretrained, r"has no config.json"),
    (SparseMoeConfig.from_pretrained, r"The folder .* has no config.json: it is not a saved model folder"),
    (AdaptiveDepthConfig.from_pretrained, r"has no config.json"),
    (MultiModalConfig.from_pretrained, r"has no config.json"),
], ids=["model", "sparse_moe config", "adaptive config", "multimodal config"])
def test_folder_without_config_json_is_refused_not_defaulted(loader, match, tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(OSError, match=match):
        loader(tmp_path)


def test_hub_style_ids_still_reach_transformers(tmp_path, monkeypatch):
    """'namespace/name' may be a Hub repo: the guard leaves it to transformers (offline here: its own error)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError) as error:
        SparseMoeForCausalLM.from_pretrained("lightarch-test/no-such-repo")
    assert "does not exist" not in str(error.value)
