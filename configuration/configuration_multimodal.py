"""Configuration of lightarch's modular multimodal model (`model_type="lightarch_multimodal"`).

Three parts, each with its own config, so each can be built, loaded, swapped and frozen on its own:
perception (a ViT image encoder and a log-mel audio encoder, both transformers classes), reasoning and generation
(any causal-LM decoder; lightarch's SparseMoe by default), and the projectors / alignment heads joining them.

This file imports only transformers and its sibling `configuration_sparse_moe.py`: both are copied into a saved model
folder, so `trust_remote_code=True` works where lightarch is not installed.
"""

import copy

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, ParakeetEncoderConfig, ViTConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from .configuration_sparse_moe import CheckedConfigLoadingMixin, SparseMoeConfig

MODALITIES = ("text", "image", "audio")
ALIGNMENT_PAIRS = ("text_image", "text_audio", "image_audio")

# Small defaults: a 28x28 grey image in 7x7 patches (16 tokens), 80-bin log-mel at 16 kHz subsampled 4x, and a
# 4-layer SparseMoe decoder. Real runs pass their own sizes (or a preset).
# The audio encoder starts from initializer_range 0.1, not Parakeet's 0.02: at these widths 0.02 leaves the subsampled
# frames near LayerNorm's eps, and the encoder's gradient norm at the first steps is ~100x the rest of the model's
# (measured with the "tiny" preset: 319 vs <= 23 on a question batch, 2412 vs <= 38 with alignment; 0.1: 2 and 9).
DEFAULT_VISION = dict(image_size=28, patch_size=7, num_channels=1, hidden_size=128, num_hidden_layers=4,
                      num_attention_heads=4, intermediate_size=256)
DEFAULT_AUDIO = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                     subsampling_factor=4, subsampling_conv_channels=64, num_mel_bins=80, conv_kernel_size=9,
                     dropout=0.0, dropout_positions=0.0, layerdrop=0.0, activation_dropout=0.0,
                     attention_dropout=0.0, initializer_range=0.1)
DEFAULT_DECODER = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)


def decoder_config_from_dict(values: dict) -> PreTrainedConfig:
    """Rebuild a decoder config from its dict (as in a saved config.json).

    `lightarch_sparse_moe` resolves to the sibling file, so this works in a remote-code folder where the lightarch
    Auto registrations do not exist; every other `model_type` goes through transformers' AutoConfig.
    """
    values = dict(values)
    model_type = values.pop("model_type", SparseMoeConfig.model_type)
    if model_type == SparseMoeConfig.model_type:
        return SparseMoeConfig(**values)
    return AutoConfig.for_model(model_type, **values)


@strict
class MultiModalConfig(CheckedConfigLoadingMixin, PreTrainedConfig):
    r"""
    Image and audio perception, a causal-LM decoder, LLaVA-style projectors and CLIP-style alignment heads.

    Sub-configs (a config instance, its dict, or None for the small default):
        - `decoder_config`: any causal-LM config: `SparseMoeConfig` (default), or a transformers one such as
          `LlamaConfig` / `Qwen3Config`. It answers questions and embeds text for retrieval.
        - `vision_config`: a transformers `ViTConfig` (`ViTModel`, no pooler). Its patch states are the image tokens.
        - `audio_config`: a transformers `ParakeetEncoderConfig` (`ParakeetEncoder`): log-mel frames, convolutional
          subsampling by `subsampling_factor`, conformer layers; variable length with a frame mask.

    Joining the parts:
        - `image_token_id`, `audio_token_id`: the tokenizer ids of `<image>` / `<audio>`. Each placeholder of the
          expanded prompt is replaced by one projected image / audio token.
        - `image_seq_length`: tokens per image, the number of ViT patches (derived when None).
        - `audio_seq_length`: tokens per clip; the encoder frames are average-pooled (padding excluded) to this many.
        - `projector_hidden_size` (default: decoder hidden size), `projector_hidden_act`: the 2-layer MLP that maps
          encoder states into the decoder's embedding space.

    Alignment (retrieval embeddings and contrastive loss):
        - `alignment_embed_dim`: size of the L2-normalised embeddings. Text: mean decoder state over the caption;
          image / audio: mean of the projected tokens; each through its own linear head.
        - `logit_scale_init_value`: initial log inverse temperature (CLIP: ln(1/0.07)); `exp` is clamped to 100.
        - `alignment_pairs`: the pairs whose symmetric InfoNCE trains the model. A pair left out (ImageBind's
          image-audio) is still reported, without gradient.
        - `alignment_loss_weights`: one weight per modality (text 0.6, image 0.3, audio 0.1). Modality `m` gets the
          term `L_m` = mean of the trained pair losses involving `m`; `alignment_loss = sum_m w_m L_m / sum_m w_m`
          over the modalities that have a term. All three pairs: 0.45 text-image + 0.35 text-audio + 0.2 image-audio.
        - `alignment_loss_weight`: the generation model's loss is `generation_loss + alignment_loss_weight *
          alignment_loss`; 0 turns alignment training off (the ablation).

    Example:

    ```python
    >>> from lightarch import MultiModalConfig
    >>> from transformers import LlamaConfig
    >>> config = MultiModalConfig(decoder_config=LlamaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=500))
    ```
    """

    model_type = "lightarch_multimodal"
    # Trainer's evaluation keeps only the logits as predictions; the cache and the scalar loss parts stay out.
    keys_to_ignore_at_inference = ["cache", "hidden_states", "attentions", "generation_loss", "aux_loss",
                                   "alignment_loss", "text_image_loss", "text_audio_loss", "image_audio_loss"]
    sub_configs_defaults = {
        # Concrete classes, not AutoConfig: a remote-code folder cannot resolve lightarch model types through
        # AutoConfig. Dicts of other decoder types are converted in `__post_init__` before these apply.
        "decoder_config": SubConfigSpec(config_class=SparseMoeConfig, init_kwargs=DEFAULT_DECODER),
        "vision_config": SubConfigSpec(config_class=ViTConfig, init_kwargs=DEFAULT_VISION),
        "audio_config": SubConfigSpec(config_class=ParakeetEncoderConfig, init_kwargs=DEFAULT_AUDIO),
    }

    decoder_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None

    image_token_id: int = 3
    audio_token_id: int = 4
    image_seq_length: int | None = None
    audio_seq_length: int = 8
    projector_hidden_size: int | None = None
    projector_hidden_act: str = "gelu"

    alignment_embed_dim: int = 64
    logit_scale_init_value: float | int = 2.6592
    alignment_pairs: list[str] | None = None
    alignment_loss_weights: dict[str, float | int] | None = None
    alignment_loss_weight: float | int = 1.0

    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.decoder_config is None:
            self.decoder_config = SparseMoeConfig(**DEFAULT_DECODER)
        elif isinstance(self.decoder_config, dict):
            self.decoder_config = decoder_config_from_dict(self.decoder_config)
        for name, config_class, defaults in (("vision_config", ViTConfig, DEFAULT_VISION),
                                             ("audio_config", ParakeetEncoderConfig, DEFAULT_AUDIO)):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != "model_type"}
                setattr(self, name, config_class(**{**defaults, **value}))
        if self.alignment_pairs is None:
            self.alignment_pairs = list(ALIGNMENT_PAIRS)
        if self.alignment_loss_weights is None:
            self.alignment_loss_weights = {"text": 0.6, "image": 0.3, "audio": 0.1}
        super().__post_init__(**kwargs)
        self._check_sub_configs()
        self._check_vision()
        if self.image_seq_length is None:
            self.image_seq_length = self.num_image_patches
        self._check_values()

    @property
    def num_image_patches(self) -> int:
        """Patches of one image: the ViT sequence without its CLS token."""
        image_size, patch_size = self.vision_config.image_size, self.vision_config.patch_size
        image_size = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
        patch_size = patch_size if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)
        return (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The decoder's config: `generate` builds its cache and reads its special tokens from it."""
        return self.decoder_config

    def _check_sub_configs(self) -> None:
        """The sub-configs must be of the kinds the model builds."""
        if not isinstance(self.vision_config, ViTConfig):
            raise ValueError(
                f"`vision_config` must be a ViTConfig (or its dict), got {type(self.vision_config).__name__}; other "
                "image encoders plug in through `MultiModalForConditionalGeneration.from_modules(vision=...)` only "
                "if they return ViT-style `last_hidden_state` (CLS + patches)."
            )
        if not isinstance(self.audio_config, ParakeetEncoderConfig):
            raise ValueError(
                f"`audio_config` must be a ParakeetEncoderConfig (or its dict), got "
                f"{type(self.audio_config).__name__}."
            )
        for name in ("hidden_size", "vocab_size"):
            if not hasattr(self.decoder_config, name):
                raise ValueError(
                    f"`decoder_config` ({type(self.decoder_config).__name__}) has no `{name}`; pass a causal-LM "
                    "config such as SparseMoeConfig, LlamaConfig or Qwen3Config."
                )

    def _check_vision(self) -> None:
        """The ViT sizes, which `ViTConfig` accepts unchecked: a patch size of 0 or larger than the image, a channel
        count < 1 or a width the heads do not divide fail (or give no image token) only when the model runs."""
        vision = self.vision_config
        image_size = vision.image_size if isinstance(vision.image_size, (list, tuple)) else (vision.image_size,) * 2
        patch_size = vision.patch_size if isinstance(vision.patch_size, (list, tuple)) else (vision.patch_size,) * 2
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in (*image_size, *patch_size)):
            raise ValueError(f"`vision_config.image_size` ({vision.image_size}) and `vision_config.patch_size` "
                             f"({vision.patch_size}) must be positive integers.")
        if any(patch > image for patch, image in zip(patch_size, image_size)):
            raise ValueError(f"`vision_config.patch_size` ({vision.patch_size}) is larger than "
                             f"`vision_config.image_size` ({vision.image_size}): the image would give no patch; use a "
                             "patch size that divides the image size.")
        for name in ("num_channels", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"):
            value = getattr(vision, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`vision_config.{name}` must be a positive integer, got {value!r}.")
        if vision.hidden_size % vision.num_attention_heads:
            raise ValueError(f"`vision_config.num_attention_heads` ({vision.num_attention_heads}) must divide "
                             f"`vision_config.hidden_size` ({vision.hidden_size}); change one of them.")

    def _check_values(self) -> None:
        """Raise a ValueError naming the field and the fix for each inconsistent value."""
        self._check_vision()
        vocab_size = self.decoder_config.vocab_size
        for name in ("image_token_id", "audio_token_id"):
            value = getattr(self, name)
            if not 0 <= value < vocab_size:
                raise ValueError(
                    f"`{name}` is {value} but the decoder vocabulary has {vocab_size} ids; set it to the tokenizer's "
                    "id for the placeholder (processor.image_token_id / processor.audio_token_id) and make "
                    "`decoder_config.vocab_size` cover the tokenizer."
                )
        pad_token_id = getattr(self.decoder_config, "pad_token_id", None)
        for name in ("image_token_id", "audio_token_id"):
            if getattr(self, name) == pad_token_id:
                raise ValueError(
                    f"`{name}` is {pad_token_id}, the decoder's `pad_token_id`: every padding token would be taken for "
                    f"an <{name.split('_')[0]}> placeholder. Give the placeholder its own id (processor.{name})."
                )
        if self.image_token_id == self.audio_token_id:
            raise ValueError(
                f"`image_token_id` and `audio_token_id` are both {self.image_token_id}; give `<image>` and `<audio>` "
                "distinct token ids."
            )
        if self.image_seq_length != self.num_image_patches:
            raise ValueError(
                f"`image_seq_length` is {self.image_seq_length} but the ViT makes {self.num_image_patches} patches "
                f"(image_size {self.vision_config.image_size}, patch_size {self.vision_config.patch_size}); leave it "
                "None to derive it."
            )
        for name in ("audio_seq_length", "alignment_embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        from transformers.activations import ACT2CLS  # lazy: the activations module imports torch

        if self.projector_hidden_act not in ACT2CLS:
            raise ValueError(f"`projector_hidden_act` {self.projector_hidden_act!r} is unknown; use one of "
                             "transformers' activations, e.g. 'gelu' or 'silu'.")
        if self.projector_hidden_size is not None and self.projector_hidden_size < 1:
            raise ValueError(f"`projector_hidden_size` must be >= 1 or None, got {self.projector_hidden_size}.")
        unknown = [pair for pair in self.alignment_pairs if pair not in ALIGNMENT_PAIRS]
        if unknown or len(set(self.alignment_pairs)) != len(self.alignment_pairs):
            raise ValueError(
                f"`alignment_pairs` must be distinct entries of {ALIGNMENT_PAIRS}, got {self.alignment_pairs}."
            )
        if set(self.alignment_loss_weights) != set(MODALITIES):
            raise ValueError(
                f"`alignment_loss_weights` needs exactly the keys {MODALITIES}, got "
                f"{sorted(self.alignment_loss_weights)}; "
                "e.g. {'text': 0.6, 'image': 0.3, 'audio': 0.1}."
            )
        if any(weight < 0 for weight in self.alignment_loss_weights.values()) or not any(
            self.alignment_loss_weights.values()
        ):
            raise ValueError(
                f"`alignment_loss_weights` must be >= 0 and not all 0, got {self.alignment_loss_weights}; to train "
                "without alignment set `alignment_loss_weight=0` instead."
            )
        if self.alignment_loss_weight < 0:
            raise ValueError(f"`alignment_loss_weight` must be >= 0 (0 disables alignment), got "
                             f"{self.alignment_loss_weight}.")
        if not 0 < self.logit_scale_init_value <= 4.6052:
            raise ValueError(
                f"`logit_scale_init_value` must be in (0, ln(100)=4.6052] (the scale is clamped to 100), got "
                f"{self.logit_scale_init_value}; CLIP uses 2.6592 = ln(1/0.07)."
            )

    def validate_values(self) -> None:
        """`@strict` class validator: `config.validate()` (run by `save_pretrained` and by lightarch's models when
        they are built) re-checks every value, so a field assigned after `__init__` is checked before it is used."""
        self._check_sub_configs()
        self._check_values()
        if isinstance(self.decoder_config, SparseMoeConfig):
            self.decoder_config._check_values()

    @staticmethod
    def presets() -> dict[str, dict]:
        """The named presets, name -> fields (`MULTIMODAL_PRESETS`)."""
        return MULTIMODAL_PRESETS

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MultiModalConfig":
        """A named starting point (see `MULTIMODAL_PRESETS`); keyword arguments override its top-level fields."""
        if name not in MULTIMODAL_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(MULTIMODAL_PRESETS)}.")
        preset = MULTIMODAL_PRESETS[name]
        values = copy.deepcopy(preset)  # a config never shares a list or dict with its preset
        for key in ("decoder_config", "vision_config", "audio_config"):
            if isinstance(overrides.get(key), dict):
                values[key] = {**values.get(key, {}), **overrides.pop(key)}
        return cls(**{**values, **overrides})


# "tiny" trains in minutes on 2 CPU cores (28x28 grey images, clips under ~2 s).
_TINY = dict(
    decoder_config=dict(DEFAULT_DECODER, vocab_size=256, hidden_size=128, intermediate_size=256,
                        moe_intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    vision_config=dict(DEFAULT_VISION, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128),
    audio_config=dict(DEFAULT_AUDIO, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, subsampling_conv_channels=32, num_mel_bins=64),
    audio_seq_length=8,
    alignment_embed_dim=64,
)

# Named starting points.
MULTIMODAL_PRESETS: dict[str, dict] = {
    "tiny": _TINY,
    # the built-in tri-modal question answering (scripts/train_multimodal.py, lightarch.training.multimodal): "tiny"
    # over the 74-token vocabulary, special-token and placeholder ids (<image>=4, <audio>=5) of
    # lightarch.data.multimodal's word-level tokenizer, trained on the text-image and text-audio pairs only, so that
    # image-audio retrieval measures the alignment that emerges through text (ImageBind). The ablation run of the
    # script sets alignment_loss_weight=0.
    "trimodal-qa": dict(
        _TINY, decoder_config=dict(_TINY["decoder_config"], vocab_size=74, pad_token_id=0, bos_token_id=2,
                                   eos_token_id=3),
        image_token_id=4, audio_token_id=5, alignment_pairs=["text_image", "text_audio"], alignment_loss_weight=1.0,
    ),
}


__all__ = ["ALIGNMENT_PAIRS", "MODALITIES", "MULTIMODAL_PRESETS", "MultiModalConfig"]
