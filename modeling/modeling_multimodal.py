"""lightarch's modular multimodal model: image and audio perception, a causal-LM decoder, and a joint alignment loss.

Parts (each a transformers `PreTrainedModel` built from its own sub-config, loadable, swappable and freezable):
    vision_model     ViTModel                 (N, C, H, W)  -> (N, 1 + patches, Hv)
    audio_model      ParakeetEncoder          (N, T, mels)  -> (N, T / subsampling, Ha)
    decoder          any causal LM (SparseMoe by default, or Llama / Qwen3 / ...), with its LM head
    image_projector, audio_projector          2-layer MLPs into the decoder's embedding space (LLaVA)
    text/image/audio_alignment_head, logit_scale   CLIP-style retrieval embeddings and temperature

`MultiModalModel` embeds each modality for retrieval and computes the contrastive losses; 
`MultiModalForConditionalGeneration` wraps it, puts projected image / audio tokens in place of the `<image>` /
`<audio>` placeholder embeddings of the prompt (LLaVA) and answers with the decoder's `generate()`.

Imports are relative so a saved folder loads with `trust_remote_code=True` without lightarch installed.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.tokenization_utils_base import AddedToken
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .checkpoint_checks import CheckedLoadingMixin
from .configuration_multimodal import MultiModalConfig
from .modeling_sparse_moe import (
    SparseMoeForCausalLM,
    add_remote_code_auto_map,
    aux_loss_share,
    check_input_shapes,
    check_labels,
)

# Decoders this file can build without the Auto registry (remote code has no lightarch registrations).
LIGHTARCH_CAUSAL_LMS = {"lightarch_sparse_moe": SparseMoeForCausalLM}
PAIR_MODALITIES = {"text_image": ("text", "image"), "text_audio": ("text", "audio"), "image_audio": ("image", "audio")}
FREEZABLE_PARTS = ("vision_model", "audio_model", "decoder", "image_projector", "audio_projector", "alignment")
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the inverse temperature at 100


@dataclass
class MultiModalOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`): `alignment_loss` (the joint weighted objective, see `MultiModalConfig`).
    alignment_loss (`torch.FloatTensor`): sum_m w_m L_m / sum_m w_m over the trained pairs present in the batch.
    text_image_loss, text_audio_loss, image_audio_loss (`torch.FloatTensor`):
        Symmetric InfoNCE of each pair over the examples that have both modalities; None with fewer than 2 such
        examples. A pair not in `config.alignment_pairs` is reported detached.
    text_embeds, image_embeds, audio_embeds (`torch.FloatTensor` of shape `(num_present, alignment_embed_dim)`):
        L2-normalised embeddings of the examples that have the modality, in batch order.
    logit_scale (`torch.FloatTensor`): the clamped inverse temperature, exp(logit_scale).
    """

    loss: torch.FloatTensor | None = None
    alignment_loss: torch.FloatTensor | None = None
    text_image_loss: torch.FloatTensor | None = None
    text_audio_loss: torch.FloatTensor | None = None
    image_audio_loss: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None


@dataclass
class MultiModalCausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor`): `generation_loss + config.alignment_loss_weight * alignment_loss`.
    generation_loss (`torch.FloatTensor`): the decoder's loss on the answer labels (it includes the decoder's own
        auxiliary loss, e.g. SparseMoe's router `aux_loss`, also reported alone).
    alignment_loss, text_image_loss, text_audio_loss, image_audio_loss: see `MultiModalOutput`, computed on the
        `align_*` inputs when given.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    generation_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    alignment_loss: torch.FloatTensor | None = None
    text_image_loss: torch.FloatTensor | None = None
    text_audio_loss: torch.FloatTensor | None = None
    image_audio_loss: torch.FloatTensor | None = None


def build_decoder(config) -> PreTrainedModel:
    """The causal LM for a decoder config: lightarch's from this folder, any other through AutoModelForCausalLM."""
    decoder_class = LIGHTARCH_CAUSAL_LMS.get(config.model_type)
    if decoder_class is not None:
        return decoder_class._from_config(config)
    return AutoModelForCausalLM.from_config(config)


def masked_adaptive_avg_pool(states: torch.Tensor, mask: torch.Tensor | None, output_size: int) -> torch.Tensor:
    """`AdaptiveAvgPool1d(output_size)` over time of each sequence's real frames only.

    states `(B, T, H)`, mask `(B, T)` (1 = real frame, a prefix) -> `(B, output_size, H)`. Segment `s` of a sequence of
    length `L` averages frames `[floor(s L / S), ceil((s + 1) L / S))`, as torch's adaptive pooling does.
    """
    batch_size, num_frames, _ = states.shape
    if mask is None:
        lengths = torch.full((batch_size,), num_frames, device=states.device)
    else:
        lengths = mask.to(states.device).long().sum(dim=1).clamp(min=1)
    segment = torch.arange(output_size, device=states.device)
    start = (segment[None, :] * lengths[:, None]) // output_size  # (B, S)
    end = ((segment[None, :] + 1) * lengths[:, None] + output_size - 1) // output_size
    frame = torch.arange(num_frames, device=states.device)
    weights = ((frame[None, None, :] >= start[..., None]) & (frame[None, None, :] < end[..., None])).to(states.dtype)
    weights = weights / weights.sum(dim=-1, keepdim=True)  # (B, S, T)
    return weights @ states


def contrastive_loss(
    embeds_a: torch.Tensor, embeds_b: torch.Tensor, logit_scale: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned, L2-normalised embeddings `(N, D)` (CLIP).

    Without `labels` row i's only positive is column i. With `labels` `(N,)` every item of the same label is a
    positive (multi-positive InfoNCE: -log of the softmax mass on the positives), so same-class duplicates in a batch
    are not pushed apart.
    """
    logits = logit_scale * embeds_a @ embeds_b.t()  # (N, N)
    if labels is None:
        positives = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    else:
        labels = labels.to(logits.device)
        positives = labels[:, None] == labels[None, :]

    def one_direction(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positive_mass = torch.logsumexp(scores.masked_fill(~targets, float("-inf")), dim=-1)
        return (torch.logsumexp(scores, dim=-1) - positive_mass).mean()

    return (one_direction(logits, positives) + one_direction(logits.t(), positives.t())) / 2


class MultiModalProjector(nn.Module):
    """Encoder states -> decoder embedding space: LayerNorm, Linear, activation, Linear (LLaVA's MLP, with the input
    norm of InternVL / Qwen2-VL's mergers).

    The norm makes the projector independent of the encoder's output scale: a freshly initialised encoder without a
    final norm (Parakeet's) emits states around 0.02, which would reach the decoder and the alignment heads ~1e-4 in
    size and blow up their gradients.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, activation: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(input_size)
        self.linear_1 = nn.Linear(input_size, hidden_size)
        self.act = ACT2FN[activation]
        self.linear_2 = nn.Linear(hidden_size, output_size)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.norm(states))))


class MultiModalAlignmentHead(nn.Module):
    """A pooled representation -> the shared retrieval space, L2-normalised: LayerNorm, then a linear map (CLIP's
    post-LayerNorm and projection). The norm keeps the vector that `F.normalize` divides far from zero."""

    def __init__(self, input_size: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(input_size)
        self.proj = nn.Linear(input_size, embed_dim, bias=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.norm(pooled)), dim=-1)


class MultiModalPreTrainedModel(CheckedLoadingMixin, PreTrainedModel):
    config: MultiModalConfig
    config_class = MultiModalConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "audio", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = []
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _can_set_experts_implementation_cached_value = True

    def __init__(self, config: MultiModalConfig, *args, **kwargs) -> None:
        # Re-check the values: a field assigned after the config was built passed only its type check.
        config._check_sub_configs()
        config._check_values()
        super().__init__(config, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MultiModalModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers', and a remote-code folder maps both AutoModel and AutoModelForImageTextToText to this
        file whichever of the two classes saved it."""
        add_remote_code_auto_map(self, {"AutoModel": "MultiModalModel",
                                        "AutoModelForImageTextToText": "MultiModalForConditionalGeneration"})
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _parts(self) -> "MultiModalModel":
        return self if isinstance(self, MultiModalModel) else self.model

    def freeze(self, parts: Iterable[str], frozen: bool = True) -> None:
        """Stop (or, with `frozen=False`, restart) training the named parts.

        Parts: `vision_model`, `audio_model`, `decoder`, `image_projector`, `audio_projector`, `alignment`
        (the three alignment heads and `logit_scale`). Equivalent to `requires_grad_(False)` on their parameters;
        frozen parameters get no gradient, so optimizers built afterwards (or AdamW with grad None) leave them as is.
        """
        if isinstance(parts, str):
            parts = [parts]
        model = self._parts()
        for part in parts:
            if part not in FREEZABLE_PARTS:
                raise ValueError(f"Unknown part {part!r} to freeze; choose from {FREEZABLE_PARTS}.")
            if part == "alignment":
                modules = [model.text_alignment_head, model.image_alignment_head, model.audio_alignment_head]
                model.logit_scale.requires_grad_(not frozen)
            else:
                modules = [getattr(model, part)]
            for module in modules:
                module.requires_grad_(not frozen)

    @classmethod
    def from_modules(
        cls,
        vision: PreTrainedModel | None = None,
        audio: PreTrainedModel | None = None,
        decoder: PreTrainedModel | None = None,
        tokenizer=None,
        **config_kwargs,
    ) -> "MultiModalPreTrainedModel":
        """Compose already-built (e.g. pretrained) parts; missing parts, projectors and heads are new.

        `vision`: a `ViTModel`; `audio`: a `ParakeetEncoder`; `decoder`: a causal LM (`SparseMoeForCausalLM`,
        `LlamaForCausalLM`, ...). Their configs become the sub-configs; `config_kwargs` set the other
        `MultiModalConfig` fields. The given modules are used as they are, not copied.

        `tokenizer` (recommended): the tokenizer the processor will use. `<image>` / `<audio>` are added to it as
        special tokens if missing (as `MultiModalProcessor` does) and their ids become `image_token_id` /
        `audio_token_id`, so that processor and model agree by construction; a decoder whose vocabulary is smaller
        than the tokenizer is resized to it. Without it, pass `image_token_id` / `audio_token_id` yourself:
        `MultiModalProcessor.from_config` refuses a tokenizer whose ids differ.
        """
        if decoder is not None and decoder.get_output_embeddings() is None:
            raise ValueError(
                f"`decoder` must be a causal LM with an LM head (e.g. AutoModelForCausalLM), got "
                f"{type(decoder).__name__}."
            )
        if "config" in config_kwargs:
            raise ValueError("from_modules builds the config from the modules; pass MultiModalConfig fields instead.")
        for name, module in (("vision", vision), ("audio", audio)):
            if module is not None and module.base_model is not module:
                raise ValueError(
                    f"`{name}` must be the bare encoder (e.g. ViTModel / ParakeetEncoder), got "
                    f"{type(module).__name__}; pass its `.base_model`."
                )
        if tokenizer is not None:
            config_kwargs.update(cls._placeholder_ids(tokenizer, config_kwargs))
            if decoder is not None and decoder.config.vocab_size < len(tokenizer):
                # the new rows are placeholders (their embeddings are replaced) or tokens the decoder never saw
                decoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        sub_configs = {
            key: module.config
            for key, module in (("vision_config", vision), ("audio_config", audio), ("decoder_config", decoder))
            if module is not None
        }
        model = cls(MultiModalConfig(**sub_configs, **config_kwargs))
        parts = model._parts()
        for name, module in (("vision_model", vision), ("audio_model", audio), ("decoder", decoder)):
            if module is not None:
                setattr(parts, name, module)
        return model

    @staticmethod
    def _placeholder_ids(tokenizer, config_kwargs: dict) -> dict[str, int]:
        """`image_token_id` / `audio_token_id` of `<image>` / `<audio>` in `tokenizer`, adding them if missing; an id
        also given in `config_kwargs` must be the same."""
        ids = {}
        for name, token in (("image_token_id", "<image>"), ("audio_token_id", "<audio>")):
            if token not in tokenizer.get_vocab():
                tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
            ids[name] = tokenizer.convert_tokens_to_ids(token)
            if config_kwargs.get(name, ids[name]) != ids[name]:
                raise ValueError(
                    f"`{name}={config_kwargs[name]}` but the tokenizer gives {token} the id {ids[name]}; leave "
                    f"`{name}` out when you pass `tokenizer` (its ids are used), or pass a tokenizer that maps "
                    f"{token} to {config_kwargs[name]}."
                )
        return ids


class MultiModalModel(MultiModalPreTrainedModel):
    """The perception and reasoning parts, and CLIP-style aligned embeddings for retrieval.

    `forward` takes one caption, at most one image and at most one clip per example and returns the normalised
    embeddings of each modality plus the contrastive losses between the pairs present.
    """

    def __init__(self, config: MultiModalConfig) -> None:
        super().__init__(config)
        decoder_size = config.decoder_config.hidden_size
        projector_size = config.projector_hidden_size or decoder_size
        self.vision_model = AutoModel.from_config(config.vision_config, add_pooling_layer=False)
        self.audio_model = AutoModel.from_config(config.audio_config)
        self.decoder = build_decoder(config.decoder_config)
        self.image_projector = MultiModalProjector(config.vision_config.hidden_size, projector_size, decoder_size,
                                                   config.projector_hidden_act)
        self.audio_projector = MultiModalProjector(config.audio_config.hidden_size, projector_size, decoder_size,
                                                   config.projector_hidden_act)
        embed_dim = config.alignment_embed_dim
        self.text_alignment_head = MultiModalAlignmentHead(decoder_size, embed_dim)
        self.image_alignment_head = MultiModalAlignmentHead(decoder_size, embed_dim)
        self.audio_alignment_head = MultiModalAlignmentHead(decoder_size, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    # -- tokens for the decoder --
    def get_image_tokens(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """(N, C, H, W) -> (N, image_seq_length, decoder hidden): projected ViT patch states (CLS dropped)."""
        return self._encode_image(pixel_values)[1]

    def _encode_image(self, pixel_values: torch.FloatTensor, **kwargs) -> tuple[ModelOutput, torch.FloatTensor]:
        """(the ViT's output, its projected patch tokens `(N, image_seq_length, decoder hidden)`)."""
        expected = (self.config.vision_config.num_channels, *self._image_size())
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but the vision model takes (N, {expected[0]}, "
                f"{expected[1]}, {expected[2]}); prepare images with MultiModalProcessor."
            )
        if not bool(torch.isfinite(pixel_values).all()):  # one read per image batch (prefill), never per token
            raise ValueError(
                "pixel_values contain NaN or infinite values; check the image files, or prepare images with "
                "MultiModalProcessor, which refuses them."
            )
        dtype = self.image_projector.linear_1.weight.dtype
        outputs = self.vision_model(pixel_values=pixel_values.to(dtype), return_dict=True, **kwargs)
        return outputs, self.image_projector(outputs.last_hidden_state[:, 1:])

    def get_audio_tokens(
        self, input_features: torch.FloatTensor, input_features_mask: torch.Tensor | None = None
    ) -> torch.FloatTensor:
        """(N, T, mels) log-mel frames -> (N, audio_seq_length, decoder hidden): the encoder's frames (after
        convolutional subsampling), average-pooled over real frames only, then projected."""
        return self._encode_audio(input_features, input_features_mask)[1]

    def _encode_audio(self, input_features: torch.FloatTensor, input_features_mask: torch.Tensor | None = None,
                      **kwargs) -> tuple[ModelOutput, torch.FloatTensor]:
        """(the audio encoder's output, its pooled and projected tokens `(N, audio_seq_length, decoder hidden)`)."""
        mels = self.config.audio_config.num_mel_bins
        if input_features.dim() != 3 or input_features.shape[-1] != mels:
            raise ValueError(
                f"input_features has shape {tuple(input_features.shape)} but the audio model takes (N, frames, "
                f"{mels}) log-mel features; prepare audio with MultiModalProcessor."
            )
        dtype = self.audio_projector.linear_1.weight.dtype
        outputs = self.audio_model(input_features=input_features.to(dtype), attention_mask=input_features_mask,
                                   return_dict=True, **kwargs)
        pooled = masked_adaptive_avg_pool(outputs.last_hidden_state, outputs.attention_mask,
                                          self.config.audio_seq_length)  # (N, audio_seq_length, Ha)
        return outputs, self.audio_projector(pooled)

    def _image_size(self) -> tuple[int, int]:
        size = self.config.vision_config.image_size
        return tuple(size) if isinstance(size, (list, tuple)) else (size, size)

    # -- aligned embeddings for retrieval (transformers' CLIP / CLAP signature) --
    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """(N, L) captions -> `BaseModelOutputWithPooling`: `pooler_output` `(N, alignment_embed_dim)` is the
        L2-normalised text embedding (the decoder's last hidden states averaged over the real tokens, through the
        text head); `last_hidden_state` `(N, L, decoder hidden)`, and `hidden_states` / `attentions` with
        `output_hidden_states` / `output_attentions`, are the decoder's. `return_dict=False` gives a tuple."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.decoder.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, use_cache=False, return_dict=True, **kwargs)
        states = outputs.last_hidden_state  # (N, L, H)
        weights = attention_mask.to(states.dtype)[..., None]
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (N, H)
        return BaseModelOutputWithPooling(last_hidden_state=states, pooler_output=self.text_alignment_head(pooled),
                                          hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple | BaseModelOutputWithPooling:
        """(N, C, H, W) -> `BaseModelOutputWithPooling`: `pooler_output` `(N, alignment_embed_dim)` is the
        L2-normalised image embedding (the mean projected image token, through the image head); `last_hidden_state`
        `(N, 1 + patches, Hv)`, `hidden_states`, `attentions` are the ViT's. `return_dict=False` gives a tuple."""
        outputs, tokens = self._encode_image(pixel_values, **kwargs)
        return BaseModelOutputWithPooling(last_hidden_state=outputs.last_hidden_state,
                                          pooler_output=self.image_alignment_head(tokens.mean(dim=1)),
                                          hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    @can_return_tuple
    def get_audio_features(
        self,
        input_features: torch.FloatTensor,
        input_features_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """(N, T, mels) -> `BaseModelOutputWithPooling`: `pooler_output` `(N, alignment_embed_dim)` is the
        L2-normalised audio embedding (the mean projected audio token, through the audio head); `last_hidden_state`
        `(N, T / subsampling, Ha)`, `hidden_states`, `attentions` are the audio encoder's. `return_dict=False` gives
        a tuple."""
        outputs, tokens = self._encode_audio(input_features, input_features_mask, **kwargs)
        return BaseModelOutputWithPooling(last_hidden_state=outputs.last_hidden_state,
                                          pooler_output=self.audio_alignment_head(tokens.mean(dim=1)),
                                          hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def clamped_logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), the inverse temperature, at most 100 (CLIP)."""
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
        image_present: torch.Tensor | None = None,
        audio_present: torch.Tensor | None = None,
        alignment_classes: torch.Tensor | None = None,
        return_loss: bool = True,
        **kwargs,
    ) -> MultiModalOutput:
        r"""
        input_ids, attention_mask (`(B, L)`): one caption per example (no placeholders).
        pixel_values (`(B_img, C, H, W)`): the images of the examples flagged by `image_present` `(B,)` bool, in batch
            order; or one row per example (`B_img == B`, `image_present` then selects the real rows). Without
            `image_present` every example has an image.
        input_features, input_features_mask (`(B_aud, T, mels)`, `(B_aud, T)`), `audio_present`: the same for audio.
        text_present (`(B,)` bool, optional): examples whose caption takes part (default: all).
        alignment_classes (`(B,)` int, optional): class of each example; items of the same class are positives.
            (Not named `*labels*`: Trainer takes every forward argument with "label" in its name for a label.)
        """
        embeds, present = {}, {}
        for modality, data, flags in (("text", input_ids, text_present), ("image", pixel_values, image_present),
                                      ("audio", input_features, audio_present)):
            if data is None:
                continue
            batch_size = input_ids.shape[0] if input_ids is not None else None
            present[modality], rows = self._presence(modality, data.shape[0], flags, batch_size)
            if modality == "text":
                text_mask = attention_mask[rows] if attention_mask is not None else None
                embeds[modality] = self.get_text_features(data[rows], text_mask, return_dict=True).pooler_output
            elif modality == "image":
                embeds[modality] = self.get_image_features(data[rows], return_dict=True).pooler_output
            else:
                audio_mask = input_features_mask[rows] if input_features_mask is not None else None
                embeds[modality] = self.get_audio_features(data[rows], audio_mask, return_dict=True).pooler_output
        losses = self.alignment_losses(embeds, present, alignment_classes) if return_loss else {}
        return MultiModalOutput(
            loss=losses.get("alignment_loss"),
            text_embeds=embeds.get("text"),
            image_embeds=embeds.get("image"),
            audio_embeds=embeds.get("audio"),
            logit_scale=self.clamped_logit_scale(),
            **losses,
        )

    @staticmethod
    def _presence(modality: str, num_rows: int, flags: torch.Tensor | None, batch_size: int | None):
        """(presence flags (B,), rows of the data to embed) for one modality; see `forward` for the two layouts."""
        if flags is None:
            if batch_size is not None and num_rows != batch_size:
                raise ValueError(
                    f"{num_rows} {modality} inputs for a batch of {batch_size}; pass `{modality}_present` (B,) to say "
                    "which examples have one."
                )
            return torch.ones(num_rows, dtype=torch.bool), torch.arange(num_rows)
        flags = flags.bool().cpu()
        if batch_size is not None and flags.shape[0] != batch_size:
            raise ValueError(f"`{modality}_present` has {flags.shape[0]} entries for a batch of {batch_size}.")
        if num_rows == int(flags.sum()):
            return flags, torch.arange(num_rows)
        if num_rows == flags.shape[0]:
            return flags, flags.nonzero().squeeze(-1)
        raise ValueError(
            f"{num_rows} {modality} inputs but `{modality}_present` flags {int(flags.sum())} of {flags.shape[0]} "
            "examples; give one row per flagged example or one row per example."
        )

    def alignment_losses(
        self,
        embeds: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Pair losses over the examples having both modalities, and the joint weighted `alignment_loss`.

        `embeds[m]` has one row per True entry of `present[m]` `(B,)`. A pair with fewer than 2 shared examples has
        no negatives and gives None. Pairs outside `config.alignment_pairs` are computed on detached embeddings.
        """
        scale = self.clamped_logit_scale()
        losses: dict[str, torch.Tensor | None] = {f"{pair}_loss": None for pair in PAIR_MODALITIES}
        for pair, (first, second) in PAIR_MODALITIES.items():
            if first not in embeds or second not in embeds:
                continue
            both = present[first] & present[second]  # (B,)
            if int(both.sum()) < 2:
                continue
            # row of each shared example inside each modality's embeddings
            a = embeds[first][both[present[first]].to(embeds[first].device)]
            b = embeds[second][both[present[second]].to(embeds[second].device)]
            pair_labels = labels[both.to(labels.device)] if labels is not None else None
            trained = pair in self.config.alignment_pairs
            if not trained:
                a, b, pair_scale = a.detach(), b.detach(), scale.detach()
            else:
                pair_scale = scale
            losses[f"{pair}_loss"] = contrastive_loss(a, b, pair_scale, pair_labels)

        weights = self.config.alignment_loss_weights
        weighted, total_weight = [], 0.0
        for modality in ("text", "image", "audio"):
            terms = [losses[f"{pair}_loss"] for pair, members in PAIR_MODALITIES.items()
                     if modality in members and pair in self.config.alignment_pairs
                     and losses[f"{pair}_loss"] is not None]
            if terms:
                weighted.append(weights[modality] * torch.stack(terms).mean())
                total_weight += weights[modality]
        alignment_loss = torch.stack(weighted).sum() / total_weight if weighted and total_weight > 0 else None
        return {"alignment_loss": alignment_loss, **losses}


class MultiModalForConditionalGeneration(MultiModalPreTrainedModel, GenerationMixin):
    """Answers questions about images and audio: LLaVA-style placeholder replacement, then the decoder's LM.

    Training batches can carry an alignment batch too (`align_*` inputs, the inputs of `MultiModalModel.forward`):
    `loss = generation_loss + config.alignment_loss_weight * alignment_loss`.
    """

    _checkpoint_conversion_mapping = {}

    def __init__(self, config: MultiModalConfig) -> None:
        super().__init__(config)
        self.model = MultiModalModel(config)
        self.post_init()
        # An answer never contains a placeholder: generating one would ask for an input that does not exist.
        if self.generation_config is not None and not self.generation_config.suppress_tokens:
            self.generation_config.suppress_tokens = [config.image_token_id, config.audio_token_id]

    @property
    def decoder(self) -> PreTrainedModel:
        return self.model.decoder

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.decoder.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.decoder.set_output_embeddings(value)

    # Retrieval from the same model (see `MultiModalModel`).
    def get_text_features(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                          position_ids: torch.LongTensor | None = None, **kwargs: Unpack[TransformersKwargs]
                          ) -> tuple | BaseModelOutputWithPooling:
        return self.model.get_text_features(input_ids, attention_mask, position_ids, **kwargs)

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]
                           ) -> tuple | BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    def get_audio_features(self, input_features: torch.FloatTensor, input_features_mask: torch.Tensor | None = None,
                           **kwargs: Unpack[TransformersKwargs]) -> tuple | BaseModelOutputWithPooling:
        return self.model.get_audio_features(input_features, input_features_mask, **kwargs)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def merge_multimodal_embeddings(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.FloatTensor,
        pixel_values: torch.FloatTensor | None,
        input_features: torch.FloatTensor | None,
        input_features_mask: torch.Tensor | None,
        is_prefill: bool,
    ) -> torch.FloatTensor:
        """Replace each run of `image_seq_length` `<image>` (and `audio_seq_length` `<audio>`) placeholder embeddings
        by one input's projected tokens, inputs in prompt order."""
        for modality, token_id, data in (("image", self.config.image_token_id, pixel_values),
                                         ("audio", self.config.audio_token_id, input_features)):
            placeholder = input_ids == token_id  # (B, L)
            count = int(placeholder.sum())
            if data is None:
                if count and is_prefill:
                    raise ValueError(
                        f"The prompt has {count} <{modality}> placeholder tokens but no "
                        f"{'pixel_values' if modality == 'image' else 'input_features'} were given."
                    )
                continue
            tokens = (self.model.get_image_tokens(data) if modality == "image"
                      else self.model.get_audio_tokens(data, input_features_mask))
            needed = tokens.shape[0] * tokens.shape[1]
            if count == 0:  # the usual cause: a processor whose tokenizer gives the placeholder another id
                counts = torch.bincount(input_ids.flatten().clamp(min=0).cpu())
                others = [i for i in (counts == needed).nonzero().flatten().tolist()
                          if i not in (self.config.image_token_id, self.config.audio_token_id)][:3]
                hint = (f" (id {' / '.join(map(str, others))} occurs exactly {needed} times: is that the processor's "
                        f"{modality}_token_id?)" if others else "")
                raise ValueError(
                    f"The prompt has 0 <{modality}> placeholder tokens (model.config.{modality}_token_id="
                    f"{token_id}) but {tokens.shape[0]} {modality} input(s) need {needed}{hint}. Processor and "
                    f"model must use the same id: build the model with from_modules(..., tokenizer=tokenizer) or "
                    f"MultiModalConfig({modality}_token_id=processor.{modality}_token_id), or build the processor "
                    "with MultiModalProcessor.from_config(model.config, tokenizer), which checks it."
                )
            if count != needed:
                raise ValueError(
                    f"The prompt has {count} <{modality}> placeholder tokens but {tokens.shape[0]} {modality} input(s) "
                    f"of {tokens.shape[1]} tokens each need {tokens.shape[0] * tokens.shape[1]}; expand placeholders "
                    "with MultiModalProcessor (one placeholder per input)."
                )
            inputs_embeds = inputs_embeds.masked_scatter(placeholder[..., None].to(inputs_embeds.device),
                                                         tokens.to(inputs_embeds.dtype))
        return inputs_embeds

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        align_input_ids: torch.LongTensor | None = None,
        align_attention_mask: torch.Tensor | None = None,
        align_pixel_values: torch.FloatTensor | None = None,
        align_input_features: torch.FloatTensor | None = None,
        align_input_features_mask: torch.Tensor | None = None,
        align_text_present: torch.Tensor | None = None,
        align_image_present: torch.Tensor | None = None,
        align_audio_present: torch.Tensor | None = None,
        align_alignment_classes: torch.Tensor | None = None,
        **kwargs,
    ) -> MultiModalCausalLMOutputWithPast:
        r"""
        input_ids (`(B, L)`): prompts with expanded placeholders (MultiModalProcessor).
        pixel_values (`(N_img, C, H, W)`): every image of the batch, in placeholder order.
        input_features, input_features_mask (`(N_aud, T, mels)`, `(N_aud, T)`): every clip, in placeholder order.
        labels (`(B, L)`): answer targets (shifted inside), -100 ignored.
        align_* : an alignment batch, the inputs of `MultiModalModel.forward` with an `align_` prefix.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        check_input_shapes(input_ids, inputs_embeds, attention_mask, self.config.decoder_config.hidden_size)
        if labels is not None:
            check_labels(labels, (input_ids if input_ids is not None else inputs_embeds).shape[:2],
                         kwargs.get("num_items_in_batch"))
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            past_length = cache.get_seq_length() if cache is not None else 0
            inputs_embeds = self.merge_multimodal_embeddings(input_ids, inputs_embeds, pixel_values, input_features,
                                                             input_features_mask, is_prefill=past_length == 0)
        outputs = self.model.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        generation_loss = outputs.loss
        aux_loss = getattr(outputs, "aux_loss", None)

        alignment = {}
        if align_input_ids is not None or align_pixel_values is not None or align_input_features is not None:
            weight = self.config.alignment_loss_weight
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
                aligned = self.model(
                    input_ids=align_input_ids, attention_mask=align_attention_mask, pixel_values=align_pixel_values,
                    input_features=align_input_features, input_features_mask=align_input_features_mask,
                    text_present=align_text_present, image_present=align_image_present,
                    audio_present=align_audio_present, alignment_classes=align_alignment_classes,
                )
            alignment = {key: getattr(aligned, key) for key in
                         ("alignment_loss", "text_image_loss", "text_audio_loss", "image_audio_loss")}

        loss = generation_loss
        if alignment.get("alignment_loss") is not None and self.config.alignment_loss_weight > 0:
            share = alignment["alignment_loss"] * self.config.alignment_loss_weight
            if labels is not None:  # under gradient accumulation, this micro-batch's share (as the LM loss)
                share = aux_loss_share(share, labels, kwargs.get("num_items_in_batch"))
            loss = share if loss is None else loss + share.to(loss.device)

        return MultiModalCausalLMOutputWithPast(
            loss=loss,
            logits=outputs.logits,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            generation_loss=generation_loss,
            aux_loss=aux_loss,
            **alignment,
        )


def loss_parts(outputs: ModelOutput) -> dict[str, float]:
    """The loss parts an output carries, as floats (parts that are None are left out), e.g. for logging."""
    names = ("loss", "generation_loss", "aux_loss", "alignment_loss", "text_image_loss", "text_audio_loss",
             "image_audio_loss")
    return {name: float(value.detach()) for name in names
            if isinstance(value := getattr(outputs, name, None), torch.Tensor) and value.numel() == 1}


__all__ = [
    "MultiModalCausalLMOutputWithPast",
    "MultiModalForConditionalGeneration",
    "MultiModalModel",
    "MultiModalOutput",
    "MultiModalPreTrainedModel",
    "contrastive_loss",
    "loss_parts",
    "masked_adaptive_avg_pool",
]
