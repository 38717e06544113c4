"""Configuration of lightarch's adaptive-depth decoder (`model_type="lightarch_adaptive"`).

It extends `SparseMoeConfig` (every decoder and mixture-of-experts field, and their validation, is inherited) with
early exits, a complexity estimator and the inference policies. This file imports only transformers and its sibling
`configuration_sparse_moe.py`: both are copied into a saved model folder, so `trust_remote_code=True` works where
lightarch is not installed.
"""


from huggingface_hub.dataclasses import strict

from .configuration_sparse_moe import SparseMoeConfig

EXIT_POLICIES = ("full", "estimator", "confidence")
ESTIMATOR_TARGETS = ("correct", "loss")
ESTIMATOR_OBJECTIVES = ("earliest", "sufficiency")
ESTIMATOR_FEATURES = ("mean", "max", "last", "exit_confidence")


@strict
class AdaptiveDepthConfig(SparseMoeConfig):
    r"""
    A SparseMoe decoder (dense when `first_k_dense_layers == num_hidden_layers`) with early exits.

    Exits:
        - `exit_layers`: strictly increasing depths in `[1, num_hidden_layers]`, the last one `num_hidden_layers`
          (the deep path). Exit `d` reads the residual stream after `d` layers through its own RMSNorm and the shared
          LM head (or classifier). A shallow path is a prefix of the deep one: nothing is computed twice.
          Default: every `max(1, num_hidden_layers // 4)` layers, plus the last.
        - `exit_loss_weights`: one weight per exit for training (LayerSkip / DeeBERT train every exit). The loss is
          `sum(w_i * loss_i) / sum(w_i)`. Default: all 1.

    Complexity estimator (whole-input routing):
        - `estimator_input_layer`: it reads the hidden states after this many layers (0: the embeddings); at most
          `exit_layers[0]`, so those layers belong to every path. None: the first exit.
        - `estimator_hidden_size`: width of its small MLP.
        - `estimator_objective`: `"earliest"` predicts a distribution over "the earliest exit that suffices"
          (softmax, cross-entropy) and routing takes the earliest exit whose cumulative probability reaches
          `estimator_threshold`; `"sufficiency"` predicts for every exit on its own the probability that it suffices
          (sigmoid, binary cross-entropy against each exit's own correctness) and routing takes the earliest exit
          whose probability reaches the threshold. The second keeps the information "exit 4 would do but exit 2
          would not" that the first collapses into one class.
        - `estimator_features`: what the estimator reads, any of `"mean"`, `"max"` (pooled per-token features of
          the input), `"last"` (the last input token's features: under causal attention it has seen the whole
          input) and `"exit_confidence"` (the softmax margin, top probability and normalised entropy of the exit at
          `estimator_input_layer` on the last input token; needs that depth to be an exit). Default `["mean",
          "max"]`.
        - `estimator_loss_weight`, `estimator_target` (`"correct"`: the earliest exit whose answer tokens are all
          right; `"loss"`: the earliest exit whose loss is within `estimator_loss_tolerance` nats of the last
          exit's), `estimator_detach_features` (True: the estimator's loss does not train the backbone).

    Inference (`exit_policy`, or `exit_policy=` / `exit_threshold=` per call to `forward` and `generate`):
        - `"full"`: every layer, the plain model.
        - `"estimator"`: whole-input routing, threshold `estimator_threshold`.
        - `"confidence"`: per-token early exit (CALM): a token leaves at the first exit where the softmax margin
          (top-1 minus top-2 probability) reaches `confidence_threshold`; later layers get its key/value from its
          exit hidden state so later tokens attend to every layer.
        A threshold of 0 always takes the first exit; 1 always the last.

    Example:

    ```python
    >>> from lightarch import AdaptiveDepthConfig
    >>> config = AdaptiveDepthConfig(num_hidden_layers=8, first_k_dense_layers=8, exit_layers=[2, 4, 8])
    ```
    """

    model_type = "lightarch_adaptive"

    exit_layers: list[int] | None = None
    exit_loss_weights: list[float | int] | None = None
    exit_policy: str = "full"
    estimator_threshold: float = 0.5
    confidence_threshold: float = 0.9
    estimator_input_layer: int | None = 1
    estimator_hidden_size: int = 64
    estimator_loss_weight: float = 1.0
    estimator_target: str = "correct"
    estimator_loss_tolerance: float = 0.1
    estimator_detach_features: bool = True
    estimator_objective: str = "earliest"
    estimator_features: list[str] | None = None

    def __post_init__(self, **kwargs):
        if self.exit_layers is None:
            step = max(1, self.num_hidden_layers // 4)
            self.exit_layers = sorted(set(range(step, self.num_hidden_layers + 1, step)) | {self.num_hidden_layers})
        if self.exit_loss_weights is None:
            self.exit_loss_weights = [1.0] * len(self.exit_layers)
        if self.estimator_features is None:
            self.estimator_features = ["mean", "max"]
        if self.estimator_input_layer is None:  # "at the first exit" (the `arithmetic` preset), wherever that is
            self.estimator_input_layer = self.exit_layers[0] if self.exit_layers else 1
        self.exit_loss_weights = [float(w) for w in self.exit_loss_weights]  # [2, 1] as written on a command line
        super().__post_init__(**kwargs)

    def _check_values(self) -> None:
        super()._check_values()
        layers, n = self.exit_layers, self.num_hidden_layers
        if not layers:
            raise ValueError(f"`exit_layers` must not be empty; give at least the last layer, e.g. [{n}].")
        if any(not isinstance(d, int) or isinstance(d, bool) for d in layers):
            raise ValueError(f"`exit_layers` must hold integer depths, got {layers}.")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"`exit_layers` must be strictly increasing (sorted, no repeats), got {layers}.")
        if layers[0] < 1 or layers[-1] > n:
            raise ValueError(
                f"`exit_layers` entries must be depths in [1, num_hidden_layers={n}], got {layers}."
            )
        if layers[-1] != n:
            raise ValueError(
                f"`exit_layers` must end with num_hidden_layers ({n}), the deep path; got {layers}. Append {n}."
            )
        weights = self.exit_loss_weights
        if len(weights) != len(layers):
            raise ValueError(
                f"`exit_loss_weights` has {len(weights)} entries but `exit_layers` has {len(layers)}; give one weight "
                "per exit (or None for equal weights)."
            )
        if not all(0 <= w < float("inf") for w in weights) or sum(weights) <= 0:  # `0 <= w` is False for NaN
            raise ValueError(f"`exit_loss_weights` must be >= 0 with a positive sum, got {weights}.")
        if self.exit_policy not in EXIT_POLICIES:
            raise ValueError(f"`exit_policy` must be one of {EXIT_POLICIES}, got {self.exit_policy!r}.")
        for name in ("estimator_threshold", "confidence_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1] (0: always the first exit, 1: always the last), "
                                 f"got {value}.")
        if not 0 <= self.estimator_input_layer <= layers[0]:
            raise ValueError(
                f"`estimator_input_layer` must be between 0 (the embeddings) and the first exit ({layers[0]}) so its "
                f"layers belong to every path, got {self.estimator_input_layer}."
            )
        if self.estimator_hidden_size < 1:
            raise ValueError(f"`estimator_hidden_size` must be >= 1, got {self.estimator_hidden_size}.")
        for name in ("estimator_loss_weight", "estimator_loss_tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.estimator_objective not in ESTIMATOR_OBJECTIVES:
            raise ValueError(f"`estimator_objective` must be one of {ESTIMATOR_OBJECTIVES}, got "
                             f"{self.estimator_objective!r}.")
        features = self.estimator_features
        if not features or any(f not in ESTIMATOR_FEATURES for f in features) or len(set(features)) != len(features):
            raise ValueError(f"`estimator_features` must be a non-empty list of distinct names from "
                             f"{ESTIMATOR_FEATURES}, got {features!r}.")
        if "exit_confidence" in features and self.estimator_input_layer not in layers:
            raise ValueError(f"`estimator_features` has 'exit_confidence' but `estimator_input_layer` "
                             f"({self.estimator_input_layer}) is not an exit depth {layers}; read after the first exit "
                             f"(estimator_input_layer={layers[0]}) or drop 'exit_confidence'.")
        if self.estimator_target not in ESTIMATOR_TARGETS:
            raise ValueError(f"`estimator_target` must be one of {ESTIMATOR_TARGETS}, got {self.estimator_target!r}.")
        if self.prefill_chunk_size is not None:
            raise ValueError("`prefill_chunk_size` (chunked prefill) is not supported by adaptive depth; set it to "
                             "None.")
        if self.num_sink_tokens:
            raise ValueError("`num_sink_tokens` (attention sinks) is not supported by adaptive depth; set it to 0.")

    def threshold_for(self, policy: str) -> float:
        """The configured threshold of `policy` (the full policy has none: 1.0, never exit early)."""
        if policy == "estimator":
            return self.estimator_threshold
        if policy == "confidence":
            return self.confidence_threshold
        return 1.0

    @staticmethod
    def presets() -> dict[str, dict]:
        """The named presets, name -> fields (`ADAPTIVE_DEPTH_PRESETS`; not `SparseMoeConfig`'s)."""
        return ADAPTIVE_DEPTH_PRESETS


# Named starting points.
ADAPTIVE_DEPTH_PRESETS: dict[str, dict] = {
    # the easy / hard arithmetic suite (scripts/train_adaptive.py, lightarch.training.adaptive_depth): a dense
    # 8-layer decoder (1.2M parameters, dense SwiGLU layers are the fastest on a CPU) over the 17-token vocabulary and
    # special-token ids of lightarch.data.arithmetic's character-level tokenizer, prompts of at most ~12 tokens. Exits
    # every 2 layers; the first exit's loss weighs double (it must answer the easy questions alone). The estimator
    # reads the states at the first exit (pooled features and that exit's confidence on the question's last token, so
    # routing costs no extra layer) and learns each exit's odds of answering right. For a
    # mixture of experts in every layer override first_k_dense_layers=0, num_experts=N, num_experts_per_tok=k,
    # max_experts_per_token=k.
    "arithmetic": dict(
        vocab_size=17, hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, first_k_dense_layers=8, num_experts=1,
        num_experts_per_tok=1, max_experts_per_token=1, moe_intermediate_size=128, router_mode="top_k",
        exit_layers=[2, 4, 6, 8], exit_loss_weights=[2.0, 1.0, 1.0, 1.0], estimator_input_layer=None,
        estimator_hidden_size=64, estimator_loss_weight=0.1, estimator_target="correct", estimator_loss_tolerance=0.1,
        estimator_objective="sufficiency", estimator_features=["mean", "max", "last", "exit_confidence"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
}


__all__ = ["ADAPTIVE_DEPTH_PRESETS", "AdaptiveDepthConfig", "ESTIMATOR_FEATURES", "ESTIMATOR_OBJECTIVES", "EXIT_POLICIES"]
