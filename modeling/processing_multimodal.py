"""`MultiModalProcessor`: tokenizer, image processor and audio feature extractor of the multimodal model.

It expands each `<image>` / `<audio>` placeholder to the number of tokens the model puts there, batches examples
with any number of images and clips (none included), resamples audio to the feature extractor's rate, and refuses
bad input (wrong image size or channel count, empty or silent audio, placeholder / input count mismatch, a sampling
rate that cannot be resampled) with a ValueError naming the example, before the model runs.

The sub-processors are transformers' own: `ViTImageProcessorPil` (the PIL backend of `ViTImageProcessor`, so it needs
Pillow, not torchvision) and `ParakeetFeatureExtractor` (log-mel). This file imports only transformers, numpy and, for
resampling audio that is not at 16 kHz, scipy (optional: without it such audio is refused with a message naming
scipy), so it can be shared as remote code next to the model.
"""

from math import gcd

import numpy as np
import torch
from transformers import ParakeetFeatureExtractor, ViTImageProcessorPil
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import AddedToken

MAX_RESAMPLE_FACTOR = 1000  # polyphase up/down factors above this make enormous filters: refuse
MIN_SAMPLING_RATE = 4000  # below, the speech band the log-mel features cover is gone
SILENCE_PEAK = 1e-4  # peak amplitude under -80 dBFS counts as silent


class MultiModalProcessor(ProcessorMixin):
    r"""
    Args:
        image_processor: a `ViTImageProcessor` for the model's image size and channels (see `from_config`).
        feature_extractor: a `ParakeetFeatureExtractor` whose `feature_size` is the model's `num_mel_bins`.
        tokenizer: any tokenizer with a pad token; `<image>` and `<audio>` are added as special tokens if missing.
        image_token, audio_token: the placeholder strings.
        image_seq_length, audio_seq_length: tokens per image / clip (the model config's values).
    """

    def __init__(
        self,
        image_processor=None,
        feature_extractor=None,
        tokenizer=None,
        image_token: str = "<image>",
        audio_token: str = "<audio>",
        image_seq_length: int = 16,
        audio_seq_length: int = 8,
        chat_template=None,
        **kwargs,
    ):
        self.image_token, self.audio_token = image_token, audio_token
        self.image_seq_length, self.audio_seq_length = image_seq_length, audio_seq_length
        missing = [token for token in (image_token, audio_token) if token not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in missing],
                                 special_tokens=True)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.audio_token_id = tokenizer.convert_tokens_to_ids(audio_token)
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` before building the processor.")
        super().__init__(image_processor, feature_extractor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_config(cls, config, tokenizer, **kwargs) -> "MultiModalProcessor":
        """Sub-processors matching a `MultiModalConfig`: image size and channels, mel bins, tokens per input.

        The tokenizer's ids for `<image>` / `<audio>` (added if missing) must be the config's `image_token_id` /
        `audio_token_id`, otherwise the model would find no placeholder in the prompts: a mismatch is refused here.
        `MultiModalForConditionalGeneration.from_modules(..., tokenizer=tokenizer)` builds a model that agrees.
        """
        vision, audio = config.vision_config, config.audio_config
        size = vision.image_size if isinstance(vision.image_size, (list, tuple)) else (vision.image_size,) * 2
        image_processor = ViTImageProcessorPil(
            size={"height": size[0], "width": size[1]}, do_resize=False, do_convert_rgb=False,
            image_mean=[0.5] * vision.num_channels, image_std=[0.5] * vision.num_channels,
        )
        feature_extractor = ParakeetFeatureExtractor(feature_size=audio.num_mel_bins, sampling_rate=16000,
                                                     return_attention_mask=True)
        processor = cls(image_processor, feature_extractor, tokenizer, image_seq_length=config.image_seq_length,
                        audio_seq_length=config.audio_seq_length, **kwargs)
        ours = (processor.image_token_id, processor.audio_token_id)
        theirs = (config.image_token_id, config.audio_token_id)
        if ours != theirs:
            raise ValueError(
                f"The tokenizer gives {processor.image_token} id {ours[0]} and {processor.audio_token} id {ours[1]}, "
                f"but the model config has image_token_id={theirs[0]} and audio_token_id={theirs[1]}: the model would "
                "find no placeholder in the prompts. Build the model with "
                "MultiModalForConditionalGeneration.from_modules(..., tokenizer=tokenizer), or its config with "
                f"image_token_id={ours[0]}, audio_token_id={ours[1]} (and a decoder vocab_size >= {len(tokenizer)})."
            )
        return processor

    # -- the two ways to call it --
    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        audio=None,
        sampling_rate: int | None = None,
        answers: list[str] | None = None,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Prompts for `MultiModalForConditionalGeneration` (training and `generate`).

        text: one prompt per example with `<image>` / `<audio>` where the inputs go, in order.
        images / audio: per example, None, one input, or a list of inputs (as many as the example's placeholders).
            An image is a PIL image, or a (H, W), (H, W, C) or (C, H, W) array / tensor (uint8, or float in [0, 1]);
            a clip is a 1-D float waveform at `sampling_rate` Hz.
        answers: optional, one per example: appended after the prompt with the EOS token; `labels` then train only
            the answer (prompt and padding are -100).
        Returns input_ids and attention_mask (left-padded), labels, pixel_values `(N_img, C, H, W)` and
        input_features / input_features_mask `(N_aud, T, mels)` with the inputs of all examples in prompt order.
        """
        if text is None:
            raise ValueError("`text` is required: one prompt per example, with <image> / <audio> placeholders.")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts:
            raise ValueError("`text` is an empty list: give at least one prompt (a batch of 0 examples has nothing to "
                             "run).")
        for index, prompt in enumerate(texts):
            if not isinstance(prompt, str):
                raise TypeError(f"Example {index}: the prompt is {type(prompt).__name__}, not a string.")
        images_per_example = self._per_example(images, len(texts), "images", single)
        audio_per_example = self._per_example(audio, len(texts), "audio", single)
        if answers is not None and len(answers) != len(texts):
            raise ValueError(f"{len(answers)} answers for {len(texts)} prompts; give one answer per prompt.")

        expanded = []
        for index, prompt in enumerate(texts):
            for token, inputs, name in ((self.image_token, images_per_example[index], "image"),
                                        (self.audio_token, audio_per_example[index], "audio")):
                placeholders = prompt.count(token)
                if placeholders != len(inputs):
                    problem = ("more placeholders than inputs" if placeholders > len(inputs)
                               else "more inputs than placeholders")
                    raise ValueError(
                        f"Example {index}: {problem}: the prompt has {placeholders} {token} placeholder(s) but "
                        f"{len(inputs)} {name} input(s) were given. Put one {token} per {name}, in order."
                    )
            prompt = prompt.replace(self.image_token, self.image_token * self.image_seq_length)
            expanded.append(prompt.replace(self.audio_token, self.audio_token * self.audio_seq_length))

        flat_images = [(index, image) for index, example in enumerate(images_per_example) for image in example]
        flat_audio = [(index, clip) for index, example in enumerate(audio_per_example) for clip in example]
        data = dict(self._images(flat_images))
        data.update(self._audio(flat_audio, sampling_rate))
        data.update(self._tokenize(expanded, answers))
        return BatchFeature(data, tensor_type=return_tensors)

    def alignment_batch(
        self,
        text: list[str | None] | None = None,
        images: list | None = None,
        audio: list | None = None,
        sampling_rate: int | None = None,
        labels: list[int] | None = None,
        prefix: str = "",
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """Inputs for `MultiModalModel.forward` (contrastive alignment): per example one caption, at most one image,
        at most one clip (None = missing).

        Returns input_ids / attention_mask (captions), pixel_values of the examples that have an image and
        `image_present` `(B,)`, input_features / input_features_mask and `audio_present`, `text_present`, and
        `alignment_classes` when `labels` are given. `prefix="align_"` names every key for
        `MultiModalForConditionalGeneration`'s alignment inputs.
        """
        sizes = {len(items) for items in (text, images, audio, labels) if items is not None}
        if len(sizes) != 1:
            raise ValueError(f"text, images, audio and labels must have one entry per example; got lengths {sizes}.")
        batch_size = sizes.pop()
        data = {}
        if text is not None:
            for index, caption in enumerate(text):
                if caption is not None and (self.image_token in caption or self.audio_token in caption):
                    raise ValueError(f"Example {index}: alignment captions take no {self.image_token} / "
                                     f"{self.audio_token} placeholders; the inputs are passed alongside.")
            data["text_present"] = [caption is not None for caption in text]
            data.update(self._tokenize([caption or "" for caption in text], None, with_labels=False,
                                       allow_empty=True))
        if images is not None:
            data["image_present"] = [image is not None for image in images]
            data.update(self._images([(i, image) for i, image in enumerate(images) if image is not None]))
        if audio is not None:
            data["audio_present"] = [clip is not None for clip in audio]
            data.update(self._audio([(i, clip) for i, clip in enumerate(audio) if clip is not None], sampling_rate))
        if labels is not None:
            data["alignment_classes"] = list(labels)
        if not data or batch_size == 0:
            raise ValueError("alignment_batch needs at least one example with text, images or audio.")
        return BatchFeature({prefix + key: value for key, value in data.items()}, tensor_type=return_tensors)

    # -- text --
    def _tokenize(self, texts: list[str], answers: list[str] | None, with_labels: bool = True,
                  allow_empty: bool = False) -> dict:
        """Left-padded ids and mask; with answers, the answer ids + EOS follow each prompt and `labels` mark them.
        A row without any token is refused unless `allow_empty` (alignment batches: examples without a caption)."""
        tokenizer = self.tokenizer
        rows, targets = [], []
        for index, prompt in enumerate(texts):
            ids = tokenizer(prompt)["input_ids"]
            target = [-100] * len(ids)
            if answers is not None:
                answer_ids = tokenizer(" " + answers[index], add_special_tokens=False)["input_ids"]
                if tokenizer.eos_token_id is not None:
                    answer_ids = answer_ids + [tokenizer.eos_token_id]
                ids, target = ids + answer_ids, target + answer_ids
            if not ids and not allow_empty:
                raise ValueError(f"Example {index}: the prompt {prompt!r} gives no tokens; give a non-empty prompt "
                                 "(the model needs at least one input token).")
            rows.append(ids)
            targets.append(target)
        length = max(len(ids) for ids in rows)
        pad = tokenizer.pad_token_id
        data = {
            "input_ids": [[pad] * (length - len(ids)) + ids for ids in rows],
            "attention_mask": [[0] * (length - len(ids)) + [1] * len(ids) for ids in rows],
        }
        if answers is not None and with_labels:
            data["labels"] = [[-100] * (length - len(target)) + target for target in targets]
        return data

    # -- images --
    @staticmethod
    def _per_example(items, batch_size: int, name: str, single: bool) -> list[list]:
        """Normalise the per-example inputs to one list per example ([] when missing)."""
        if items is None:
            return [[] for _ in range(batch_size)]
        if single:
            items = [items]
        if not isinstance(items, (list, tuple)) or len(items) != batch_size:
            count = len(items) if isinstance(items, (list, tuple)) else 1
            raise ValueError(
                f"`{name}` must have one entry per prompt ({batch_size}), got {count}; use None or [] for a prompt "
                f"without {name}."
            )
        return [[] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
                for entry in items]

    def _expected_image(self) -> tuple[int, int, int]:
        size = self.image_processor.size
        return len(self.image_processor.image_mean), size["height"], size["width"]

    def _image_array(self, image, example: int) -> np.ndarray:
        """One image as a float (H, W, C) array in [0, 255], checked against the model's size and channels."""
        channels, height, width = self._expected_image()
        if hasattr(image, "mode") and hasattr(image, "size"):  # PIL
            array = np.asarray(image)
        elif isinstance(image, torch.Tensor):
            array = image.detach().cpu().numpy()
        else:
            array = np.asarray(image)
        if array.ndim == 2:
            array = array[..., None]
        elif array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)  # channels first -> last
        if array.ndim != 3:
            raise ValueError(f"Example {example}: an image has shape {array.shape}; expected (H, W), (H, W, C) or "
                             "(C, H, W).")
        if array.shape[-1] != channels:
            raise ValueError(
                f"Example {example}: an image has {array.shape[-1]} channel(s) but the model takes {channels} "
                f"({'grey' if channels == 1 else 'RGB'}); convert it first (e.g. PIL `image.convert('L')`)."
            )
        if array.shape[:2] != (height, width):
            raise ValueError(
                f"Example {example}: an image is {array.shape[0]}x{array.shape[1]} but the model takes "
                f"{height}x{width}; resize it first."
            )
        integer = np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"Example {example}: an image contains NaN or infinite pixel values.")
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < 0.0 or high > 255.0:
            kind = "an integer" if integer else "a float"
            raise ValueError(
                f"Example {example}: {kind} image has pixel values in [{low:g}, {high:g}]; give uint8 in [0, 255] "
                "or float in [0, 1] (not already normalised: the processor normalises)."
            )
        if array.size and high <= 1.0 and not np.issubdtype(np.asarray(image).dtype, np.integer):
            array = array * 255.0  # float images in [0, 1]
        return array

    def _images(self, flat: list[tuple[int, object]]) -> dict:
        if not flat:
            return {}
        arrays = [self._image_array(image, example) for example, image in flat]
        pixel_values = self.image_processor(arrays, input_data_format="channels_last", return_tensors="np")
        return {"pixel_values": pixel_values["pixel_values"]}

    # -- audio --
    def _audio(self, flat: list[tuple[int, object]], sampling_rate: int | None) -> dict:
        if not flat:
            return {}
        target_rate = self.feature_extractor.sampling_rate
        if sampling_rate is None:
            raise ValueError(f"Pass `sampling_rate` (Hz) with the audio; it is resampled to {target_rate} Hz.")
        clips = [self._resample(self._waveform(clip, example), sampling_rate, example) for example, clip in flat]
        features = self.feature_extractor(clips, sampling_rate=target_rate, return_attention_mask=True,
                                          padding="longest", return_tensors="np")
        return {"input_features": features["input_features"], "input_features_mask": features["attention_mask"]}

    @staticmethod
    def _waveform(clip, example: int) -> np.ndarray:
        """A mono float32 waveform, refused if empty, non-finite or silent."""
        array = clip.detach().cpu().numpy() if isinstance(clip, torch.Tensor) else np.asarray(clip)
        if array.ndim == 2 and 1 in array.shape:
            array = array.reshape(-1)
        if array.ndim != 1:
            raise ValueError(f"Example {example}: audio has shape {array.shape}; pass a mono 1-D waveform "
                             "(average the channels first).")
        if array.size == 0:
            raise ValueError(f"Example {example}: the audio clip is empty (0 samples).")
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"Example {example}: the audio clip contains NaN or infinite samples.")
        if np.abs(array).max() < SILENCE_PEAK:
            raise ValueError(
                f"Example {example}: the audio clip is silent (peak amplitude {np.abs(array).max():.2e} < "
                f"{SILENCE_PEAK}); pass the recording, or leave the audio out for this example."
            )
        return array

    def _resample(self, waveform: np.ndarray, sampling_rate, example: int) -> np.ndarray:
        """Polyphase resampling (scipy) to the feature extractor's rate; refused where it cannot be done well."""
        target = self.feature_extractor.sampling_rate
        whole = not isinstance(sampling_rate, bool) and float(sampling_rate).is_integer()
        if not whole or sampling_rate < MIN_SAMPLING_RATE:
            raise ValueError(
                f"sampling_rate {sampling_rate!r} cannot be resampled to {target} Hz: it must be a whole number of Hz "
                f">= {MIN_SAMPLING_RATE}."
            )
        sampling_rate = int(sampling_rate)
        if sampling_rate != target:
            common = gcd(sampling_rate, target)
            up, down = target // common, sampling_rate // common
            if max(up, down) > MAX_RESAMPLE_FACTOR:
                raise ValueError(
                    f"sampling_rate {sampling_rate} Hz cannot be resampled to {target} Hz: the rational factor "
                    f"{up}/{down} needs a polyphase filter over {MAX_RESAMPLE_FACTOR}x; convert to a standard rate "
                    "(8000, 16000, 22050, 44100, 48000 Hz) first."
                )
            try:  # optional, and imported here: scipy.signal costs half a second at import, for audio at another rate
                from scipy.signal import resample_poly
            except ImportError:
                raise ImportError(
                    f"Resampling audio from {sampling_rate} Hz to {target} Hz needs scipy, which is not installed: "
                    f"`pip install scipy`, or pass audio already at {target} Hz (sampling_rate={target})."
                ) from None
            waveform = resample_poly(waveform, up, down).astype(np.float32)
        minimum = self.feature_extractor.n_fft
        if waveform.size < minimum:
            raise ValueError(
                f"Example {example}: the audio clip is {waveform.size / target * 1000:.1f} ms long at {target} Hz; "
                f"it needs at least {minimum} samples ({minimum / target * 1000:.0f} ms) for one log-mel window."
            )
        return waveform

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "input_features", "input_features_mask"]


__all__ = ["MultiModalProcessor"]
