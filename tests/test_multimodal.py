"""Multimodal model: config, forward, alignment losses against naive references, generation, modularity, saving,
remote code, processor. Tiny configs and generated fixtures only (random images, synthetic sine / noise audio)."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_without_lightarch, tiny_sparse_moe_config
from scipy.signal import resample_poly
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlamaConfig,
    ParakeetEncoderConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    TrainingArguments,
    ViTConfig,
)

from lightarch import MultiModalConfig
from lightarch import (
    MultiModalForConditionalGeneration,
    MultiModalModel,
    MultiModalProcessor,
    SparseMoeForCausalLM,
    loss_parts,
)
from lightarch.modeling_multimodal import masked_adaptive_avg_pool
from lightarch.training.multimodal_trainer import MultiModalTrainer

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "what", "is", "shown", "?", "does", "the", "voice", "name", "it",
         "shirt", "boot", "bag", "yes", "no"]
IMAGE_ID, AUDIO_ID = len(WORDS), len(WORDS) + 1  # the processor appends the two placeholders


def make_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def tiny_vision_config(**overrides) -> ViTConfig:
    values = dict(image_size=28, patch_size=7, num_channels=1, hidden_size=16, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=32)
    return ViTConfig(**{**values, **overrides})


def tiny_audio_config(**overrides) -> ParakeetEncoderConfig:
    values = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  subsampling_factor=4, subsampling_conv_channels=4, num_mel_bins=16, conv_kernel_size=3,
                  dropout=0.0, dropout_positions=0.0, layerdrop=0.0, activation_dropout=0.0, attention_dropout=0.0)
    return ParakeetEncoderConfig(**{**values, **overrides})


def tiny_config(**overrides) -> MultiModalConfig:
    values = dict(decoder_config=tiny_sparse_moe_config(), vision_config=tiny_vision_config(),
                  audio_config=tiny_audio_config(), image_token_id=IMAGE_ID, audio_token_id=AUDIO_ID,
                  audio_seq_length=3, alignment_embed_dim=8)
    return MultiModalConfig(**{**values, **overrides})


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)


def clip(seed: int, seconds: float = 0.3, rate: int = 22050) -> np.ndarray:
    """A sine at a seed-dependent pitch plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def processor() -> MultiModalProcessor:
    return MultiModalProcessor.from_config(tiny_config(), make_tokenizer())


@pytest.fixture(scope="module")
def vqa_batch(processor):
    """Three prompts: image only, audio + image, text only; answers give labels."""
    return processor(
        text=["<image> what is shown ?", "<image> <audio> does the voice name it ?", "what is shown ?"],
        images=[image(0), [image(1)], None], audio=[None, clip(1), []], sampling_rate=22050,
        answers=["shirt", "yes", "no"],
    )


@pytest.fixture(scope="module")
def alignment_batch(processor):
    """Five examples: all three modalities for 0-2, image missing for 3, audio missing for 4."""
    return processor.alignment_batch(
        text=["shirt", "boot", "bag", "shirt", "boot"],
        images=[image(0), image(1), image(2), None, image(4)],
        audio=[clip(0), clip(1), clip(2), clip(3), None],
        sampling_rate=22050,
    )


# -- config --

@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_token_id=500), "image_token_id"),
        (dict(audio_token_id=IMAGE_ID), "distinct"),
        (dict(image_seq_length=9), "image_seq_length"),
        (dict(audio_seq_length=0), "audio_seq_length"),
        (dict(alignment_pairs=["text_video"]), "alignment_pairs"),
        (dict(alignment_loss_weights={"text": 1.0, "image": 0.5}), "alignment_loss_weights"),
        (dict(alignment_loss_weights={"text": -1.0, "image": 0.5, "audio": 0.1}), "alignment_loss_weights"),
        (dict(alignment_loss_weight=-0.1), "alignment_loss_weight"),
        (dict(logit_scale_init_value=9.0), "logit_scale_init_value"),
        (dict(vision_config=LlamaConfig()), "vision_config"),
    ],
)
def test_config_validation_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_defaults_and_round_trip_with_any_decoder(tmp_path):
    config = MultiModalConfig()
    assert config.decoder_config.model_type == "lightarch_sparse_moe"
    assert config.image_seq_length == 16 and config.alignment_loss_weights == {"text": 0.6, "image": 0.3, "audio": 0.1}
    assert config.get_text_config(decoder=True) is config.decoder_config
    llama = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4)
    config = tiny_config(decoder_config=llama, alignment_pairs=["text_image", "text_audio"])
    config.save_pretrained(tmp_path)
    loaded = MultiModalConfig.from_pretrained(tmp_path)
    assert type(loaded.decoder_config) is LlamaConfig and loaded.decoder_config.hidden_size == 32
    assert loaded.vision_config.num_channels == 1 and loaded.audio_config.num_mel_bins == 16
    assert loaded.alignment_pairs == ["text_image", "text_audio"]
    preset = MultiModalConfig.from_preset("tiny", decoder_config=dict(vocab_size=300))
    assert preset.decoder_config.vocab_size == 300 and preset.decoder_config.num_hidden_layers == 3


# -- forward and losses --

def test_forward_shapes_and_loss_parts(vqa_batch, alignment_batch):
    model = MultiModalForConditionalGeneration(tiny_config())
    align = {f"align_{key}": value for key, value in alignment_batch.items()}
    outputs = model(**vqa_batch, **align)
    assert outputs.logits.shape == (*vqa_batch["input_ids"].shape, 97)
    parts = loss_parts(outputs)
    assert set(parts) == {"loss", "generation_loss", "aux_loss", "alignment_loss", "text_image_loss",
                          "text_audio_loss", "image_audio_loss"}
    expected = outputs.generation_loss + model.config.alignment_loss_weight * outputs.alignment_loss
    torch.testing.assert_close(outputs.loss, expected)
    outputs.loss.backward()
    assert model.model.image_alignment_head.proj.weight.grad is not None
    assert model.model.audio_projector.linear_1.weight.grad is not None

    # each placeholder run got one projected input: changing the image changes the logits after it only
    with torch.no_grad():
        base = model(**vqa_batch).logits
        other = dict(vqa_batch, pixel_values=vqa_batch["pixel_values"].flip(0))
        changed = model(**other).logits
    assert not torch.allclose(base[0], changed[0]) and torch.equal(base[2], changed[2])


def naive_infonce(a: torch.Tensor, b: torch.Tensor, scale: float, labels=None) -> torch.Tensor:
    """Row by row: -log(sum of exp over positives / sum of exp over all), averaged over both directions."""
    def direction(x, y):
        total = 0.0
        for i in range(x.shape[0]):
            scores = [scale * float(x[i] @ y[j]) for j in range(y.shape[0])]
            positives = [j for j in range(y.shape[0]) if (j == i if labels is None else labels[j] == labels[i])]
            total += -math.log(sum(math.exp(scores[j]) for j in positives) / sum(math.exp(s) for s in scores))
        return total / x.shape[0]
    return torch.tensor((direction(a, b) + direction(b, a)) / 2)


def test_infonce_matches_naive_reference_and_missing_modalities_are_excluded(alignment_batch):
    model = MultiModalModel(tiny_config()).eval()
    with torch.no_grad():
        outputs = model(**alignment_batch)
    present = {m: alignment_batch[f"{m}_present"] for m in ("text", "image", "audio")}
    assert outputs.text_embeds.shape == (5, 8) and outputs.image_embeds.shape == (4, 8)
    assert outputs.audio_embeds.shape == (4, 8)
    torch.testing.assert_close(outputs.image_embeds.norm(dim=-1), torch.ones(4))
    scale = float(outputs.logit_scale)
    assert scale == pytest.approx(math.exp(2.6592), rel=1e-5)

    def rows(modality, keep):  # embeddings of the examples in `keep`, from the rows of the present ones
        index = torch.cumsum(present[modality].long(), 0) - 1
        return getattr(outputs, f"{modality}_embeds")[index[keep]]

    expected = {}
    for first, second in (("text", "image"), ("text", "audio"), ("image", "audio")):
        keep = present[first] & present[second]
        expected[f"{first}_{second}"] = naive_infonce(rows(first, keep), rows(second, keep), scale)
        torch.testing.assert_close(getattr(outputs, f"{first}_{second}_loss"), expected[f"{first}_{second}"])
    # 0.6 / 0.3 / 0.1 -> 0.45 text-image + 0.35 text-audio + 0.2 image-audio
    joint = 0.45 * expected["text_image"] + 0.35 * expected["text_audio"] + 0.2 * expected["image_audio"]
    torch.testing.assert_close(outputs.alignment_loss, joint)

    # the text-image loss only sees examples 0, 1, 2, 4: the same as a batch of those alone
    keep = torch.tensor([0, 1, 2, 4])
    with torch.no_grad():
        alone = model(input_ids=alignment_batch["input_ids"][keep],
                      attention_mask=alignment_batch["attention_mask"][keep],
                      pixel_values=alignment_batch["pixel_values"])
    torch.testing.assert_close(alone.text_image_loss, outputs.text_image_loss)
    # a pair with fewer than two shared examples has no negatives: no loss
    with torch.no_grad():
        single = model(**dict(alignment_batch, audio_present=torch.tensor([1, 0, 0, 0, 0]).bool(),
                              input_features=alignment_batch["input_features"][:1],
                              input_features_mask=alignment_batch["input_features_mask"][:1]))
    assert single.text_audio_loss is None and single.image_audio_loss is None
    torch.testing.assert_close(single.alignment_loss, single.text_image_loss)


def test_same_label_items_are_all_positives(alignment_batch):
    model = MultiModalModel(tiny_config()).eval()
    labels = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        outputs = model(**alignment_batch, alignment_classes=labels)
    # text-audio: examples 0-3 have both; 0 and 3 share label 0
    keep = torch.tensor([0, 1, 2, 3])
    reference = naive_infonce(outputs.text_embeds[keep], outputs.audio_embeds, float(outputs.logit_scale),
                              labels[keep].tolist())
    torch.testing.assert_close(outputs.text_audio_loss, reference)


def test_weights_and_trained_pairs_are_configurable(alignment_batch):
    model = MultiModalModel(tiny_config(alignment_pairs=["text_image", "text_audio"],
                                        alignment_loss_weights={"text": 0.5, "image": 0.5, "audio": 0.0}))
    outputs = model(**alignment_batch)
    # text term (ti + ta) / 2, image term ti, audio weight 0: (0.5 (ti + ta) / 2 + 0.5 ti) / 1.0
    expected = 0.5 * (outputs.text_image_loss + outputs.text_audio_loss) / 2 + 0.5 * outputs.text_image_loss
    torch.testing.assert_close(outputs.alignment_loss, expected)
    # image-audio is reported (the emergent pair) but does not train
    assert outputs.image_audio_loss is not None and not outputs.image_audio_loss.requires_grad
    assert outputs.text_image_loss.requires_grad


def test_alignment_loss_weight_zero_trains_generation_only(vqa_batch, alignment_batch):
    model = MultiModalForConditionalGeneration(tiny_config(alignment_loss_weight=0.0))
    align = {f"align_{key}": value for key, value in alignment_batch.items()}
    outputs = model(**vqa_batch, **align)
    torch.testing.assert_close(outputs.loss, outputs.generation_loss)
    assert outputs.alignment_loss is not None and not outputs.alignment_loss.requires_grad


def test_masked_adaptive_pool_equals_torch_pool_on_the_real_frames():
    states = torch.randn(3, 11, 4)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for row, length in enumerate((11, 7, 2)):
        mask[row, :length] = 1
    pooled = masked_adaptive_avg_pool(states, mask, 3)
    for row, length in enumerate((11, 7, 2)):
        reference = torch.nn.functional.adaptive_avg_pool1d(states[row, :length].t()[None], 3)[0].t()
        torch.testing.assert_close(pooled[row], reference)


def test_placeholder_count_mismatch_is_refused_by_the_model(vqa_batch):
    model = MultiModalForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match="placeholder tokens but 1 image"):
        model(**dict(vqa_batch, pixel_values=vqa_batch["pixel_values"][:1]))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(**{k: v for k, v in vqa_batch.items() if k != "pixel_values"})


# -- generation --

def test_generate_with_images_and_audio_cached_equals_uncached(processor):
    model = MultiModalForConditionalGeneration(tiny_config()).eval()
    inputs = processor(text=["<image> <audio> does the voice name it ?", "<image> what ?"],
                       images=[image(3), image(4)], audio=[clip(2), None], sampling_rate=22050)
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6, use_cache=False)
    assert cached.shape == (2, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    # placeholders are never generated, even by a model that prefers them
    assert model.generation_config.suppress_tokens == [IMAGE_ID, AUDIO_ID]
    with torch.no_grad():
        head = model.model.decoder.lm_head.weight
        head[IMAGE_ID] = 10 * head[cached[0, inputs["input_ids"].shape[1]]]  # 10x the logit of the first answer
        assert model(**inputs).logits[0, -1].argmax() == IMAGE_ID
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    new_tokens = generated[:, inputs["input_ids"].shape[1]:]
    assert (new_tokens != IMAGE_ID).all() and (new_tokens != AUDIO_ID).all()


# -- modularity --

def test_from_modules_composes_pretrained_parts_and_swaps_the_decoder(tmp_path, vqa_batch):
    decoder = SparseMoeForCausalLM(tiny_sparse_moe_config())
    decoder.save_pretrained(tmp_path / "decoder")
    pretrained_decoder = AutoModelForCausalLM.from_pretrained(tmp_path / "decoder")  # its own weights
    vision = AutoModel.from_config(tiny_vision_config(), add_pooling_layer=False)
    audio = AutoModel.from_config(tiny_audio_config())
    model = MultiModalForConditionalGeneration.from_modules(
        vision=vision, audio=audio, decoder=pretrained_decoder, image_token_id=IMAGE_ID, audio_token_id=AUDIO_ID,
        audio_seq_length=3,
    )
    assert model.model.vision_model is vision and model.model.audio_model is audio
    assert model.model.decoder is pretrained_decoder and model.config.decoder_config is pretrained_decoder.config
    torch.testing.assert_close(model.model.decoder.lm_head.weight, decoder.lm_head.weight)
    assert model(**vqa_batch).logits.shape[-1] == 97

    for decoder_config in (
        LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    ):
        swapped = MultiModalForConditionalGeneration(tiny_config(decoder_config=decoder_config)).eval()
        assert type(swapped.model.decoder).__name__ == type(decoder_config).__name__.replace("Config", "ForCausalLM")
        outputs = swapped(**vqa_batch)
        assert outputs.generation_loss is not None and outputs.aux_loss is None
        generated = swapped.generate(**vqa_batch, max_new_tokens=3, do_sample=False)
        assert generated.shape[1] == vqa_batch["input_ids"].shape[1] + 3

    with pytest.raises(ValueError, match="causal LM with an LM head"):
        MultiModalForConditionalGeneration.from_modules(decoder=decoder.model)


def test_frozen_parts_get_no_gradient(vqa_batch, alignment_batch):
    model = MultiModalForConditionalGeneration(tiny_config())
    model.freeze(["vision_model", "decoder"])
    align = {f"align_{key}": value for key, value in alignment_batch.items()}
    model(**vqa_batch, **align).loss.backward()
    assert all(p.grad is None for p in model.model.vision_model.parameters())
    assert all(p.grad is None for p in model.model.decoder.parameters())
    assert all(p.grad is not None for p in model.model.image_projector.parameters())
    assert all(p.grad is not None for p in model.model.audio_model.parameters() if p.requires_grad)
    assert model.model.logit_scale.grad is not None
    model.freeze("decoder", frozen=False)
    assert all(p.requires_grad for p in model.model.decoder.parameters())
    with pytest.raises(ValueError, match="Unknown part"):
        model.freeze(["text_model"])


# -- saving, loading, remote code --

@pytest.fixture(scope="module")
def saved(tmp_path_factory, processor, vqa_batch):
    torch.manual_seed(0)
    model = MultiModalForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        model.model.logit_scale.fill_(3.0)  # a trained, non-initial value must survive
    folder = tmp_path_factory.mktemp("multimodal")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    with torch.no_grad():
        logits = model(**vqa_batch).logits
    return folder, model, logits


def test_save_load_round_trip_identical_outputs(saved, vqa_batch, alignment_batch):
    folder, model, logits = saved
    loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(loaded) is MultiModalForConditionalGeneration
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(**vqa_batch).logits, logits, atol=0, rtol=0)
    retrieval = AutoModel.from_pretrained(folder).eval()  # the aligned-embedding model from the same folder
    assert type(retrieval) is MultiModalModel
    with torch.no_grad():
        torch.testing.assert_close(retrieval.get_image_features(alignment_batch["pixel_values"]).pooler_output,
                                   model.get_image_features(alignment_batch["pixel_values"]).pooler_output,
                                   atol=0, rtol=0)
    assert retrieval.logit_scale.item() == 3.0
    reloaded = AutoProcessor.from_pretrained(folder)
    assert type(reloaded) is MultiModalProcessor and reloaded.image_seq_length == 16
    again = reloaded(text=["<image> what is shown ?", "<image> <audio> does the voice name it ?", "what is shown ?"],
                     images=[image(0), [image(1)], None], audio=[None, clip(1), []], sampling_rate=22050,
                     answers=["shirt", "yes", "no"])
    assert all(torch.equal(again[key], vqa_batch[key]) for key in vqa_batch)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_multimodal.MultiModalModel"
    assert auto_map["AutoModelForImageTextToText"] == "modeling_multimodal.MultiModalForConditionalGeneration"


def test_missing_weights_are_named_instead_of_silently_reinitialised(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, *_ = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in folder.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = load_file(broken / "model.safetensors")
    del weights["model.image_projector.linear_1.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    for auto_class in (AutoModelForImageTextToText, AutoModel):  # the generation model and the retrieval model
        with pytest.raises(OSError, match=r"image_projector\.linear_1\.weight"):
            auto_class.from_pretrained(broken)
    assert type(AutoModel.from_pretrained(broken, allow_missing_weights=True)) is MultiModalModel


def test_remote_code_loads_in_a_fresh_process_without_lightarch(saved, vqa_batch, tmp_path):
    folder, _, logits = saved
    torch.save({"inputs": dict(vqa_batch), "logits": logits}, tmp_path / "expected.pt")
    run_without_lightarch(
        f"""
        import numpy as np, torch
        from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        model = AutoModelForImageTextToText.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(**expected["inputs"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-4)
        generated = model.generate(**expected["inputs"], max_new_tokens=2, do_sample=False)
        assert generated.shape[1] == expected["inputs"]["input_ids"].shape[1] + 2
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        batch = processor(text=["<image> what ?"], images=[np.zeros((28, 28), np.uint8)])
        assert batch["input_ids"].shape[1] == 16 + 2
        retrieval = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(retrieval).__name__ == "MultiModalModel"
        print("REMOTE-CODE-OK")
        """,
        tmp_path,
    )


# -- processor --

def test_processor_expands_placeholders_and_batches_missing_modalities(processor, vqa_batch):
    ids, labels = vqa_batch["input_ids"], vqa_batch["labels"]
    assert processor.image_token_id == IMAGE_ID and processor.audio_token_id == AUDIO_ID
    assert (ids == IMAGE_ID).sum(dim=1).tolist() == [16, 16, 0]
    assert (ids == AUDIO_ID).sum(dim=1).tolist() == [0, 3, 0]
    assert vqa_batch["pixel_values"].shape == (2, 1, 28, 28) and vqa_batch["input_features"].shape[0] == 1
    assert vqa_batch["pixel_values"].min() >= -1 and vqa_batch["pixel_values"].max() <= 1
    # left padding; labels are the answer + eos only
    assert vqa_batch["attention_mask"][2, 0] == 0 and vqa_batch["attention_mask"][:, -1].all()
    answer_rows = [row[row != -100].tolist() for row in labels]
    assert answer_rows == [[WORDS.index("shirt"), 2], [WORDS.index("yes"), 2], [WORDS.index("no"), 2]]
    # PIL, channels-first, float in [0, 1] and torch inputs give the same pixels
    from PIL import Image

    grey = image(7)
    variants = [Image.fromarray(grey), grey[None], torch.from_numpy(grey), grey.astype(np.float32) / 255.0]
    reference = processor(text="<image>", images=grey)["pixel_values"]
    for variant in variants:
        torch.testing.assert_close(processor(text="<image>", images=variant)["pixel_values"], reference)


def test_processor_resamples_audio_to_the_model_rate(processor):
    wave = clip(5, seconds=0.5, rate=22050)
    features = processor(text="<audio>", audio=wave, sampling_rate=22050)
    reference = processor.feature_extractor(resample_poly(wave, 320, 441).astype(np.float32), sampling_rate=16000,
                                            return_tensors="pt")
    torch.testing.assert_close(features["input_features"], reference["input_features"])
    # the same half second at 8 kHz and at 44.1 kHz gives as many frames as at 16 kHz
    frames = {rate: processor(text="<audio>", audio=clip(5, 0.5, rate), sampling_rate=rate)["input_features"].shape[1]
              for rate in (8000, 16000, 44100)}
    assert len(set(frames.values())) == 1, frames


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(text="<image>", images=np.zeros((32, 32), np.uint8) + 5), "32x32 but the model takes 28x28"),
        (dict(text="<image>", images=np.full((28, 28, 3), 9, np.uint8)), "3 channel"),
        (dict(text="<audio>", audio=np.zeros(0, np.float32), sampling_rate=16000), "empty"),
        (dict(text="<audio>", audio=np.zeros(8000, np.float32), sampling_rate=16000), "silent"),
        (dict(text="<audio>", audio=clip(0, 0.01, 16000), sampling_rate=16000), "at least 512 samples"),
        (dict(text="<image> <image>", images=[image(0)]), "more placeholders than inputs"),
        (dict(text=["what", "<image>"], images=[image(0), image(1)]), "more inputs than placeholders"),
        (dict(text="<audio>", audio=clip(0), sampling_rate=44101), "cannot be resampled"),
        (dict(text="<audio>", audio=clip(0), sampling_rate=22050.5), "cannot be resampled"),
        (dict(text="<audio>", audio=clip(0), sampling_rate=100), "cannot be resampled"),
        (dict(text="<audio>", audio=clip(0)), "Pass `sampling_rate`"),
        (dict(text=["<image>", "<image>"], images=[image(0)]), "one entry per prompt"),
    ],
)
def test_processor_bad_input_names_the_problem(processor, call, message):
    with pytest.raises(ValueError, match=message):
        processor(**call)


def test_alignment_batch_layout_and_errors(processor, alignment_batch):
    assert alignment_batch["image_present"].tolist() == [True, True, True, False, True]
    assert alignment_batch["audio_present"].tolist() == [True, True, True, True, False]
    assert alignment_batch["pixel_values"].shape[0] == 4 and alignment_batch["input_features"].shape[0] == 4
    prefixed = processor.alignment_batch(text=["shirt", "boot"], labels=[3, 3], prefix="align_")
    assert set(prefixed) == {"align_input_ids", "align_attention_mask", "align_text_present",
                             "align_alignment_classes"}
    with pytest.raises(ValueError, match="one entry per example"):
        processor.alignment_batch(text=["shirt", "boot"], images=[image(0)])
    with pytest.raises(ValueError, match="take no <image>"):
        processor.alignment_batch(text=["<image> shirt"], images=[image(0)])
    model = MultiModalModel(tiny_config())
    with pytest.raises(ValueError, match="`image_present`"):
        model(input_ids=alignment_batch["input_ids"], pixel_values=alignment_batch["pixel_values"])


# -- Trainer --

def test_trainer_logs_each_loss_part(tmp_path, processor):
    model = MultiModalForConditionalGeneration(tiny_config())
    align = processor.alignment_batch(text=["shirt", "boot", "bag"], images=[image(0), image(1), image(2)],
                                      audio=[clip(0), clip(1), None], sampling_rate=22050, prefix="align_")
    vqa = processor(text=["<image> what is shown ?", "<audio> what ?"], images=[image(0), None],
                    audio=[None, clip(0)], sampling_rate=22050, answers=["shirt", "boot"])
    batch = {**vqa, **align}

    class OneBatch(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return batch

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, logging_steps=1, per_device_train_batch_size=1,
                             report_to=[], use_cpu=True, save_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True)
    trainer = MultiModalTrainer(model=model, args=args, train_dataset=OneBatch(), eval_dataset=OneBatch(),
                                data_collator=lambda items: items[0])
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_generation_loss", "eval_alignment_loss", "eval_text_image_loss"} <= set(metrics)
    predictions = trainer.predict(OneBatch())
    assert predictions.predictions.shape == (*batch["input_ids"].shape, 97)  # the logits, no cache or loss parts
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for name in ("generation_loss", "aux_loss", "alignment_loss", "text_image_loss", "text_audio_loss",
                 "image_audio_loss"):
        assert all(math.isfinite(entry[name]) for entry in logged), name
    assert "text_audio_loss" in logged[0] and logged[0]["alignment_loss"] > 0
