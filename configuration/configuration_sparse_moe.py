"""Configuration of lightarch's sparse mixture-of-experts decoder (`model_type="lightarch_sparse_moe"`).

This file imports only transformers: it is copied next to `modeling_sparse_moe.py` when a model is saved, so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where lightarch is not installed.
"""

import copy
import os
import re

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.utils import CONFIG_NAME
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

ROUTER_MODES = ("top_k", "top_p")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
SLIDING_WINDOW_IMPLEMENTATIONS = ("windowed", "mask")


_HUB_REPO_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]+\b$")  # huggingface_hub's `validate_repo_id` pattern


def check_model_location(pretrained_model_name_or_path) -> None:
    """OSError naming the path when it can only be a local folder (it is no Hub repo id) and does not exist: the Hub
    client would otherwise answer "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    path = str(pretrained_model_name_or_path)
    if not os.path.exists(path) and (not _HUB_REPO_ID.match(path) or ".." in path or "--" in path):
        raise OSError(f"The model folder {path} does not exist (nor is it a Hub repo id 'name' or 'namespace/name'); "
                      "check the path.")


def check_config_location(pretrained_model_name_or_path, subfolder: str = "") -> None:
    """OSError naming the folder when `from_pretrained` is given a local path that does not exist (transformers
    reports "Repo id must be in the form ...") or a folder without config.json (transformers returns the defaults)."""
    path = str(pretrained_model_name_or_path)
    folder = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise OSError(f"The folder {folder} has no {CONFIG_NAME}: it is not a saved model folder (make one with "
                          "save_pretrained), or the path points one level too high or too low.")
    else:
        check_model_location(path)



class CheckedConfigLoadingMixin:
    """`get_config_dict` for lightarch's configs (the one loading guard `from_pretrained` goes through): a missing
    local folder or one without config.json is refused with a message naming it (`check_config_location`)."""

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As transformers', refusing a missing local folder or one without config.json with a message naming it."""
        check_config_location(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        return super().get_config_dict(pretrained_model_name_or_path, **kwargs)


@strict
class SparseMoeConfig(CheckedConfigLoadingMixin, PreTrainedConfig):
    r"""
    A decoder-only transformer whose feed-forward layers are sparse mixtures of experts.

    Attention follows Mistral / Qwen3: RMSNorm, rotary embeddings (`rope_parameters`), grouped-query attention,
    and per-layer `layer_types` mixing `"full_attention"` and `"sliding_attention"` (window `sliding_window`).

    The feed-forward of layer `i` is a dense SwiGLU MLP for `i < first_k_dense_layers`, otherwise a mixture of
    `num_experts` SwiGLU experts (plus `num_shared_experts` that every token uses, as in DeepSeekMoE).

    Routing (`router_mode`):
        - `"top_k"`: each token takes its `num_experts_per_tok` most probable experts (Mixtral / Qwen3-MoE);
          `norm_topk_prob` renormalises their weights to sum to one.
        - `"top_p"`: dynamic. A token takes experts in order of probability until their mass reaches
          `router_top_p`, at least one and at most `max_experts_per_token`. Confident tokens use one expert,
          uncertain ones use more. `norm_topk_prob` renormalises the selected weights here too.

    Load balancing:
        - `router_aux_loss_coef`: Switch-Transformer auxiliary loss, per layer, padding masked.
        - `router_z_loss_coef`: ST-MoE router z-loss (keeps router logits small).
        - `router_jitter_noise`: multiplicative noise on the router input while training.
        - `router_bias_update_rate`: DeepSeek-V3 auxiliary-loss-free balancing. A per-expert bias is added to the
          scores used for *selection only*; after every optimizer step it moves by this rate towards equal load.
          0 disables it. The update is registered by the training loop, not by the model:
          `lightarch.training.RouterBiasUpdateCallback()` in a Trainer, `register_router_bias_hook(optimizer, model)`
          in a custom loop.

    Position encoding (Llama 4 / SmolLM3 field names):
        - `no_rope_layers`: one entry per layer, 1 = rotary embeddings, 0 = no position encoding (NoPE). None: all
          rotary. NoPE global layers next to rotary sliding layers (iRoPE) generalise beyond the trained length.
        - `attn_temperature_tuning`: on NoPE layers, scale queries by `log(floor((pos + 1) / floor_scale) + 1) *
          attn_scale + 1`, sharpening attention over long contexts (Llama 4).

    Example:

    ```python
    >>> from lightarch import SparseMoeConfig
    >>> config = SparseMoeConfig(num_hidden_layers=4, layer_types=["sliding_attention"] * 3 + ["full_attention"])
    ```
    """

    model_type = "lightarch_sparse_moe"
    keys_to_ignore_at_inference = ["cache"]

    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    # Decoder
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    use_qk_norm: bool = False
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    sliding_window_implementation: str = "windowed"
    prefill_chunk_size: int | None = None
    num_sink_tokens: int = 0
    no_rope_layers: list[int] | None = None
    attn_temperature_tuning: bool = False
    floor_scale: int = 8192
    attn_scale: float = 0.1

    # Mixture of experts
    num_experts: int = 8
    moe_intermediate_size: int = 512
    first_k_dense_layers: int = 0
    num_shared_experts: int = 0
    router_mode: str = "top_k"
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    router_top_p: float = 0.5
    max_experts_per_token: int = 4

    # Load balancing
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0
    router_bias_update_rate: float = 0.0
    output_router_logits: bool = False

    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            attention = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [attention] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        self._check_values()

    def _check_values(self) -> None:
        """Raise a ValueError naming the field and the fix for each inconsistent value."""

        def positive(name: str) -> None:
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "num_experts", "moe_intermediate_size"):
            positive(name)
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must divide `hidden_size` ({self.hidden_size}); "
                "change one of them or set `head_dim` explicitly."
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if (self.head_dim < 2 or self.head_dim % 2):
            raise ValueError(f"`head_dim` must be an even number >= 2 for rotary embeddings, got {self.head_dim}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_key_value_heads` ({self.num_key_value_heads}) must divide `num_attention_heads` "
                f"({self.num_attention_heads}) for grouped-query attention."
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`layer_types` has {len(self.layer_types)} entries but `num_hidden_layers` is "
                f"{self.num_hidden_layers}; give one entry per layer."
            )
        for layer_type in self.layer_types:
            if layer_type not in ATTENTION_LAYER_TYPES:
                raise ValueError(f"`layer_types` entry {layer_type!r} is unknown; use one of {ATTENTION_LAYER_TYPES}.")
        if "sliding_attention" in self.layer_types:
            if self.sliding_window is None:
                raise ValueError("`layer_types` contains 'sliding_attention' but `sliding_window` is None; set it.")
            if self.sliding_window < 1:
                raise ValueError(f"`sliding_window` must be >= 1, got {self.sliding_window}.")
        if self.sliding_window_implementation not in SLIDING_WINDOW_IMPLEMENTATIONS:
            raise ValueError(
                f"`sliding_window_implementation` must be one of {SLIDING_WINDOW_IMPLEMENTATIONS}, got "
                f"{self.sliding_window_implementation!r}."
            )
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError(
                f"`prefill_chunk_size` must be a positive number of tokens (or None to disable chunked prefill), "
                f"got {self.prefill_chunk_size}."
            )
        if self.num_sink_tokens < 0:
            raise ValueError(f"`num_sink_tokens` must be >= 0, got {self.num_sink_tokens}.")
        if self.num_sink_tokens > 0:
            if any(layer_type != "sliding_attention" for layer_type in self.layer_types):
                raise ValueError(
                    "`num_sink_tokens` > 0 (attention sinks, bounded streaming cache) needs every layer to be "
                    "'sliding_attention'; a full-attention layer's cache grows with the sequence. Set `layer_types` "
                    "to all sliding layers or `num_sink_tokens=0`."
                )
            if self.sliding_window_implementation != "windowed":
                raise ValueError("`num_sink_tokens` > 0 needs `sliding_window_implementation='windowed'`.")
        if self.no_rope_layers is not None:
            if len(self.no_rope_layers) != self.num_hidden_layers or any(v not in (0, 1) for v in self.no_rope_layers):
                raise ValueError(
                    f"`no_rope_layers` must hold one 0 (no position encoding) or 1 (rotary) per layer "
                    f"({self.num_hidden_layers} layers), got {self.no_rope_layers}."
                )
        if self.floor_scale < 1:
            raise ValueError(f"`floor_scale` must be >= 1 token, got {self.floor_scale}.")
        if self.attn_scale < 0:
            raise ValueError(f"`attn_scale` must be >= 0, got {self.attn_scale}.")
        if not 0 <= self.first_k_dense_layers <= self.num_hidden_layers:
            raise ValueError(
                f"`first_k_dense_layers` must be between 0 and `num_hidden_layers` ({self.num_hidden_layers}), "
                f"got {self.first_k_dense_layers}."
            )
        if self.num_shared_experts < 0:
            raise ValueError(f"`num_shared_experts` must be >= 0, got {self.num_shared_experts}.")
        if self.router_mode not in ROUTER_MODES:
            raise ValueError(f"`router_mode` must be one of {ROUTER_MODES}, got {self.router_mode!r}.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"`num_experts_per_tok` ({self.num_experts_per_tok}) must be between 1 and `num_experts` "
                f"({self.num_experts}); lower it or add experts."
            )
        if not 0.0 < self.router_top_p <= 1.0:
            raise ValueError(f"`router_top_p` must be in (0, 1], got {self.router_top_p}.")
        if not 1 <= self.max_experts_per_token <= self.num_experts:
            raise ValueError(
                f"`max_experts_per_token` ({self.max_experts_per_token}) must be between 1 and `num_experts` "
                f"({self.num_experts}); lower it or add experts."
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "router_bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.router_jitter_noise >= 1:
            raise ValueError(f"`router_jitter_noise` must be < 1 (it scales inputs by 1 ± noise), got "
                             f"{self.router_jitter_noise}.")
        self._check_numerics()

    def _check_numerics(self) -> None:
        """Values that pass the type checks but break the model later: norms, RoPE, init, dropout, activation, ids."""
        if not self.rms_norm_eps > 0 or self.rms_norm_eps == float("inf"):  # `not x > 0` also refuses NaN
            raise ValueError(f"`rms_norm_eps` must be a small positive number (e.g. 1e-6), got {self.rms_norm_eps}.")
        if not 0 <= self.initializer_range < float("inf"):
            raise ValueError(f"`initializer_range` (the init std) must be >= 0, got {self.initializer_range}.")
        if not 0 <= self.attention_dropout <= 1:
            raise ValueError(f"`attention_dropout` is a probability in [0, 1], got {self.attention_dropout}.")
        from transformers.activations import ACT2CLS  # lazy: the activations module imports torch

        if self.hidden_act not in ACT2CLS:
            raise ValueError(f"`hidden_act` {self.hidden_act!r} is unknown; use one of transformers' activations, "
                             f"e.g. 'silu' (SwiGLU), 'gelu', 'relu' ({len(ACT2CLS)} names in "
                             "transformers.activations.ACT2CLS).")
        rope = self.rope_parameters if isinstance(self.rope_parameters, dict) else {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"`rope_parameters['rope_type']` {rope_type!r} is unknown; use 'default' or one of "
                             f"{sorted(ROPE_INIT_FUNCTIONS)}.")
        theta = rope.get("rope_theta")
        if theta is not None and (isinstance(theta, bool) or not 0 < theta < float("inf")):
            raise ValueError(f"`rope_parameters['rope_theta']` (the RoPE base) must be a positive number such as "
                             f"10000.0, got {theta}.")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            for token_id in value if isinstance(value, list) else [value]:
                if token_id is not None and not 0 <= token_id < self.vocab_size:
                    raise ValueError(
                        f"`{name}` is {value} but the vocabulary has ids [0, {self.vocab_size - 1}] "
                        f"(vocab_size={self.vocab_size}); use the tokenizer's id, or None."
                    )

    def validate_values(self) -> None:
        """`@strict` class validator: `config.validate()` (run by `save_pretrained` and by lightarch's models when
        they are built) re-checks every value, so a field assigned after `__init__` is checked before it is used."""
        self._check_values()

    @staticmethod
    def presets() -> dict[str, dict]:
        """The named presets, name -> fields (`SPARSE_MOE_PRESETS`)."""
        return SPARSE_MOE_PRESETS

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SparseMoeConfig":
        """A named starting point (see `presets()`); keyword arguments override its fields. Subclasses with presets of
        their own override `presets()` only."""
        presets = cls.presets()
        if name not in presets:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(presets)}.")
        return cls(**{**copy.deepcopy(presets[name]), **overrides})  # a config never shares a list with its preset

    @property
    def experts_per_token_limit(self) -> int:
        """How many expert slots a token can fill: `num_experts_per_tok` (top_k) or `max_experts_per_token` (top_p)."""
        return self.num_experts_per_tok if self.router_mode == "top_k" else self.max_experts_per_token


_SMALL = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, num_experts=8, router_mode="top_p", router_top_p=0.6,
    max_experts_per_token=3,
)

# The main job's architecture (scripts/train.py): narrow and shallow so that it trains on the standard library in under
# ten minutes on two CPU cores; 3 sliding : 1 global layers, and the vocabulary of the byte-level BPE the job trains.
_MAIN_JOB = dict(
    vocab_size=2048, hidden_size=96, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, num_experts=8, sliding_window=64,
    layer_types=["sliding_attention"] * 3 + ["full_attention"], max_position_embeddings=1024,
)

# Named starting points. Long-context presets combine sliding layers (cache bounded by the window) with few global
# layers; `prefill_chunk_size` bounds prefill memory.
SPARSE_MOE_PRESETS: dict[str, dict] = {
    # all layers see everything: the simplest model, limited to its trained length
    "full-attention": dict(_SMALL, max_position_embeddings=4096),
    # passkey retrieval from scratch (scripts/train_passkey.py, lightarch.training.passkey): 993K parameters over the
    # 56-token vocabulary (and special-token ids) of lightarch.data.passkey's word-level tokenizer. iRoPE: three
    # rotary sliding layers with a 32-token window, so that already in short training prompts the key is out of the
    # window and only the global layer can fetch it, and one global NoPE layer (content-only matching, no unseen
    # rotary angle past the training length) with Llama 4 attention temperature tuning every 128 positions.
    "passkey": dict(
        vocab_size=56, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, router_mode="top_k", num_experts_per_tok=2,
        max_experts_per_token=2, sliding_window=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, no_rope_layers=[1, 1, 0, 1],
        attn_temperature_tuning=True, floor_scale=128, attn_scale=0.1, prefill_chunk_size=1024,
        max_position_embeddings=262144, tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    ),
    # 5 sliding : 1 global, for documents up to 256K tokens on a CPU
    "hybrid-long": dict(
        _SMALL, sliding_window=512, max_position_embeddings=262144, prefill_chunk_size=4096,
        layer_types=["sliding_attention"] * 5 + ["full_attention"], rope_parameters={"rope_type": "default",
                                                                                     "rope_theta": 1000000.0},
    ),
    # all sliding with attention sinks: unbounded streaming generation at constant memory
    "streaming": dict(
        _SMALL, sliding_window=512, num_sink_tokens=4, prefill_chunk_size=4096,
        layer_types=["sliding_attention"] * 6,
    ),
    # scripts/train.py's default model (the main job, lightarch.training.sparse_moe): ~1.7M parameters with dynamic
    # top-p routing (a token takes experts until half of the probability mass, at most 3)
    "tiny": dict(_MAIN_JOB, router_mode="top_p", router_top_p=0.5, max_experts_per_token=3),
    # interactive use on a CPU (scripts/bench_inference.py, which trains it with `scripts/train.py --preset realtime`):
    # the main job's architecture, narrow and shallow because at batch 1 a decoding step costs per-layer overhead, not
    # FLOPs, but with top-2 routing instead of the main job's top-p: static shapes for ONNX and paged batching.
    "realtime": dict(_MAIN_JOB, router_mode="top_k", num_experts_per_tok=2),
    # the distilled student of scripts/distill.py (lightarch.training.distillation): the main job's architecture with
    # narrower experts, so that with its own byte-level BPE it stays under 1/20 of all-MiniLM-L6-v2's 22.7M
    # parameters (~0.9M, embeddings included)
    "distill-student": dict(_MAIN_JOB, router_mode="top_p", router_top_p=0.5, max_experts_per_token=3,
                            moe_intermediate_size=64),
    # the language-model student of scripts/distill.py --task lm: the `tiny` preset narrowed to 153K parameters
    # (with the main job's 2048-token vocabulary, tied embeddings), 1/11 of the main job's 1.69M-parameter teacher
    "distill-lm-student": dict(_MAIN_JOB, router_mode="top_p", router_top_p=0.5, max_experts_per_token=3,
                               hidden_size=40, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                               num_attention_heads=2, num_key_value_heads=1, num_experts=4, moe_intermediate_size=64,
                               intermediate_size=128, tie_word_embeddings=True),
}


__all__ = ["SPARSE_MOE_PRESETS", "SparseMoeConfig", "check_config_location"]
