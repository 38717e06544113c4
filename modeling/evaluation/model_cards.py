"""Model cards: templates filled with measured results."""

from __future__ import annotations

import string
from importlib import resources

MODEL_CARD_TEMPLATES = (
    "adaptive_depth", "distilled", "multimodal", "passkey", "private", "retrieval", "safety", "sparse_moe",
)


def model_card_template(name: str) -> str:
    """The text of a shipped model-card template (`model_cards/<name>.md`, installed as `lightarch.model_cards`), so
    that a script run from an installed wheel finds it as well as one run from a checkout."""
    if name not in MODEL_CARD_TEMPLATES:
        raise ValueError(f"No model-card template {name!r}; lightarch ships {', '.join(MODEL_CARD_TEMPLATES)}.")
    return resources.files("lightarch.model_cards").joinpath(f"{name}.md").read_text(encoding="utf-8")


def format_seconds(seconds: float) -> str:
    """75.2 -> '1 min 15 s'."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def render_model_card(template: str, values: dict) -> str:
    """Fill a `string.Template` (`${name}` placeholders); a missing value raises KeyError naming it."""
    return string.Template(template).substitute({k: str(v) for k, v in values.items()})


def code_fence(text: str, language: str = "") -> str:
    """`text` in a Markdown code block whose fence is longer than any backtick run inside it."""
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


# ------------------------------------------------------------------------------- Hub metadata from results.json

# What a lightarch folder is, told by its results.json (the recipes write different records): kind -> a key only
# that recipe's record has.
RESULT_KINDS = {"sparse_moe": "heldout_perplexity", "passkey": "accuracy_at_max_length",
                "adaptive_depth": "calibration", "multimodal": "heldout"}
# Hub data sets the recipes train on (model-card `datasets:` takes Hub ids only; generated data has none).
HUB_DATASETS = {"fashion_mnist": "zalando-datasets/fashion_mnist"}


def result_kind(results: dict) -> str:
    """Which recipe wrote `results` (a results.json record): one of `RESULT_KINDS`; a ValueError otherwise."""
    for kind, key in RESULT_KINDS.items():
        if key in results:
            return kind
    raise ValueError("results.json: not written by a lightarch training recipe (none of the keys "
                     f"{', '.join(RESULT_KINDS.values())}); train with a script of scripts/ first.")


def _result(task: tuple[str, str], dataset: tuple[str, str, str | None], metric: str, value: float, name: str):
    from huggingface_hub import EvalResult

    return EvalResult(task_type=task[0], task_name=task[1], dataset_type=dataset[0], dataset_name=dataset[1],
                      dataset_split=dataset[2], metric_type=metric, metric_value=float(value), metric_name=name)


def measured_results(results: dict, dataset: tuple[str, str] | None = None) -> list:
    """Every measured figure of a recipe's results.json as `huggingface_hub.EvalResult`s (the card's `model-index`).

    Metric types name lightarch's `evaluate` metrics (`lightarch.evaluation.metrics`) where one computed the figure
    (perplexity, passkey_accuracy, exact_match, vqa_accuracy, retrieval_recall, modality_alignment_error); `nll`
    and `mean_layers` are the recipes' own measurements.
    `dataset` (type, name) overrides the data set named in the record (the sparse-MoE corpus is only in its card).
    """
    kind = result_kind(results)
    lm = ("text-generation", "Causal language modeling")
    if kind == "sparse_moe":
        data = (*(dataset or ("text", "held-out corpus")), "held-out")
        return [_result(lm, data, "perplexity", results["heldout_perplexity"], "Held-out perplexity"),
                _result(lm, data, "nll", results["heldout_loss"], "Held-out loss (nats per token)")]
    if kind == "passkey":
        length = results["data"].get("max_length")
        task = ("text-generation", "Passkey retrieval")
        data = (*(dataset or ("passkey-generated", f"Generated passkey prompts of {length} tokens")), "eval")
        out = [_result(task, data, "passkey_accuracy", results["accuracy_at_max_length"],
                       f"Passkey exact match at {length} tokens"),
               _result(task, data, "passkey_accuracy", results["digit_accuracy_at_max_length"],
                       f"Passkey digits right at {length} tokens")]
        out += [_result(task, data, "passkey_accuracy", value, f"Passkey exact match at {length} tokens, depth {d}")
                for d, value in results.get("accuracy_by_depth_at_max_length", {}).items()]
        return out
    if kind == "adaptive_depth":
        task = ("text-generation", "Arithmetic question answering")
        calibration, out = results["calibration"], []
        for split, accuracy in calibration.get("full_accuracy", {}).items():
            data = (*(dataset or ("arithmetic-generated", f"Generated arithmetic ({split})")), "calibration")
            out.append(_result(task, data, "exact_match", accuracy, f"Exact match, full depth ({split})"))
            for policy in ("estimator", "confidence"):
                point = calibration.get(policy, {}).get(split)
                if point:
                    out.append(_result(task, data, "exact_match", point["accuracy"],
                                       f"Exact match, {policy} exits ({split})"))
                    out.append(_result(task, data, "mean_layers", point["mean_layers"],
                                       f"Mean layers run, {policy} exits ({split})"))
        return out
    heldout, name = results["heldout"], results.get("data", {}).get("dataset", "multimodal")
    data = (*(dataset or (HUB_DATASETS.get(name, name), f"{name} + espeak-ng voices (held-out)")), "test")
    vqa = ("visual-question-answering", "Visual and spoken question answering")
    out = [_result(vqa, data, "vqa_accuracy", heldout["vqa"]["accuracy"], "VQA accuracy, all kinds")]
    out += [_result(vqa, data, "vqa_accuracy", value, f"VQA accuracy: {k}")
            for k, value in heldout["vqa"].get("per_kind", {}).items()]
    retrieval = ("zero-shot-classification", "Cross-modal retrieval")
    out += [_result(retrieval, data, "retrieval_recall", value, f"R@1 {direction}")
            for direction, value in heldout.get("retrieval_r_at_1", {}).items()]
    alignment = ("feature-extraction", "Modality alignment")
    out.append(_result(alignment, data, "modality_alignment_error", heldout["alignment_error"]["error"],
                       "Modality alignment error"))
    out += [_result(alignment, data, "modality_alignment_error", value, f"Alignment error {pair}")
            for pair, value in heldout["alignment_error"].get("pairs", {}).items()]
    return out


REQUIRED_METADATA = ("license", "library_name", "pipeline_tag", "tags", "model-index")


def validate_card(text: str):
    """Parse `text` with `huggingface_hub.ModelCard` and check the metadata the Hub shows: the fields of
    `REQUIRED_METADATA`, `library_name: transformers`, and a `model-index` whose every result has a numeric value.
    Returns the ModelCard; a ValueError names the first missing or bad field (offline: the Hub's own YAML check
    needs the network)."""
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    data = card.data.to_dict()
    missing = [field for field in REQUIRED_METADATA if not data.get(field)]
    if missing:
        raise ValueError(f"model card: the YAML front matter lacks {', '.join(missing)}; render it with "
                         "lightarch.evaluation.model_cards.hub_model_card(folder).")
    if data["library_name"] != "transformers":
        raise ValueError(f"model card: library_name is {data['library_name']!r}; it must be 'transformers'.")
    for result in card.data.eval_results or []:
        if not isinstance(result.metric_value, (int, float)):
            raise ValueError(f"model card: model-index result {result.metric_name!r} has the non-numeric value "
                             f"{result.metric_value!r}.")
    if not card.data.eval_results:
        raise ValueError("model card: model-index holds no result.")
    return card


def hub_model_card(folder, base_model: str | None = None, datasets: list[str] | None = None) -> str:
    """The folder's model card (README.md, written by its training recipe) with Hub metadata completed from its
    results.json: `model-index` with every measured result (`measured_results`), `datasets` (Hub ids), and
    `base_model` (given, or the adapter's base for a PEFT folder); validated (`validate_card`). Returns the text."""
    import json
    from pathlib import Path

    from huggingface_hub import ModelCard

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise ValueError(f"folder {folder}: no README.md model card (train it with a script of scripts/).")
    if not (folder / "results.json").is_file():
        raise ValueError(f"folder {folder}: no results.json, so no measured result for the card's model-index.")
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    card = ModelCard((folder / "README.md").read_text(encoding="utf-8"))
    dataset = None
    if card.data.eval_results:  # the template's own model-index names the data set (the sparse-MoE corpus)
        first = card.data.eval_results[0]
        dataset = (first.dataset_type, first.dataset_name)
    card.data.eval_results = measured_results(results, dataset)
    card.data.model_name = card.data.model_name or folder.resolve().name
    hub_ids = list(datasets or []) or [d for d in (r.dataset_type for r in card.data.eval_results)
                                      if d in HUB_DATASETS.values()][:1]
    if hub_ids:
        card.data.datasets = hub_ids
    adapter = folder / "adapter_config.json"
    base_model = base_model or (json.loads(adapter.read_text()).get("base_model_name_or_path")
                                if adapter.is_file() else None)
    if base_model:
        card.data.base_model = base_model
    text = str(card)
    validate_card(text)
    return text
