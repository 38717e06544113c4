"""The model-selection matrix: which lightarch model fits a scenario and a budget, from measured results only.

The article's matrix has three scenarios, each with the architecture it suggests and the measurement that decides:

| scenario | architecture | decided by |
|---|---|---|
| realtime | quantized lightweight model | latency p50 < 200 ms (bench_inference, the fastest variant measured) |
| reasoning | modular deep model | factual accuracy > 95% (bench_adaptive, else train_adaptive's calibration) |
| multimodal | dynamic sparse architecture | modality alignment error < 0.1 (the multimodal evaluation) |

A record with a top-level `factual_accuracy` (and `model` / `model_dir`) is read too, for a QA evaluation that
states it; no lightarch script writes one yet (eval_retrieval measures kNN-LM perplexity, not accuracy).

`collect_measurements` reads the results.json files the benchmarks and recipes write (given, or found under a
folder) and groups them by model folder; `selection_matrix` fills the matrix with pass / fail / missing;
`recommend` picks a model for a scenario and constraints. A measurement a model lacks is reported as missing and
never stands in for a pass: a model whose constraint cannot be checked is not recommended.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

MEASURES = ("latency_p50_ms", "latency_p95_ms", "factual_accuracy", "alignment_error", "throughput_tokens_per_s",
            "memory_mb", "parameters")


@dataclass(frozen=True)
class Scenario:
    """One row of the article's matrix: the measure that decides it, and its threshold."""

    name: str
    architecture: str
    measure: str
    threshold: float
    below: bool  # True: the measure must be below the threshold (latency, error); False: above (accuracy)

    def passes(self, value: float | None) -> bool | None:
        """True / False against the threshold; None when the value was not measured."""
        if value is None:
            return None
        return value < self.threshold if self.below else value > self.threshold

    @property
    def rule(self) -> str:
        return f"{self.measure} {'<' if self.below else '>'} {self.threshold:g}"


SCENARIOS = {
    "realtime": Scenario("realtime", "quantized lightweight model", "latency_p50_ms", 200.0, True),
    "reasoning": Scenario("reasoning", "modular deep model", "factual_accuracy", 0.95, False),
    "multimodal": Scenario("multimodal", "dynamic sparse architecture", "alignment_error", 0.1, True),
}
MIB = 2**20  # --max_memory_mb counts MiB (2^20 bytes)


# ------------------------------------------------------------------------------------------ reading results


def model_folder(path: str | os.PathLike, results_file: Path) -> Path:
    """The model folder a results file names. The benchmarks record `--model_dir` as given, usually relative to the
    folder they ran from (`outputs/realtime`, run from the repository root): a relative path is looked up beside
    the results file and then in each folder above it (nearest first), and only then in the current directory, so
    that the matrix joins a benchmark to its model's own records wherever select_model.py runs from."""
    path = Path(path)
    if path.is_absolute():
        return path.resolve()
    for base in results_file.resolve().parents:
        if (base / path).exists():
            return (base / path).resolve()
    return path.resolve()


def _model_key(path: str | os.PathLike | None, fallback: Path) -> str:
    """`fallback` is the results file's own folder (a training record describes the folder holding it)."""
    return model_folder(path, fallback / "results.json").as_posix() if path else fallback.resolve().as_posix()


def _pooled_accuracy(splits: dict, policy: str) -> float | None:
    """Question-weighted exact-match accuracy of `policy` over the bench's splits."""
    rows = [(s.get("questions", 1), s.get(policy, {}).get("accuracy")) for s in splits.values()]
    rows = [(n, a) for n, a in rows if a is not None]
    total = sum(n for n, _ in rows)
    return sum(n * a for n, a in rows) / total if total else None


def _adaptive_bench_runs(results: dict) -> list[dict]:
    """bench_adaptive's measured runs: `runs` (one per --model_dir folder), or the record itself in the older
    one-model format (`splits` and `exit_layers` at the top); [] for any other record."""
    def is_run(run) -> bool:
        return isinstance(run, dict) and isinstance(run.get("splits"), dict) and "exit_layers" in run

    if isinstance(results.get("runs"), list) and results["runs"] and all(map(is_run, results["runs"])):
        return results["runs"]
    return [results] if is_run(results) else []


def measurements_from_results(results: dict, path: Path) -> dict[str, dict]:
    """Model folder -> the measures (`MEASURES`) that one results.json gives, each with its source file. Records
    of an unknown kind give nothing. `path` is the results.json (training records describe the folder holding it)."""
    folder, found = path.parent, {}

    def put(model: str, measure: str, value, detail: str = "") -> None:
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            found.setdefault(model, {})[measure] = {"value": float(value), "source": path.as_posix(),
                                                    **({"detail": detail} if detail else {})}

    if isinstance(results.get("latency"), dict) and "memory_bytes" in results:  # bench_inference
        model = _model_key(results.get("model_dir"), folder)
        latency = {name: row for name, row in results["latency"].items() if "p50_ms" in row}
        if latency:
            fastest = min(latency, key=lambda name: latency[name]["p50_ms"])
            put(model, "latency_p50_ms", latency[fastest]["p50_ms"], fastest)
            put(model, "latency_p95_ms", latency[fastest].get("p95_ms"), fastest)
            memory = results["memory_bytes"].get(fastest, results["memory_bytes"].get(f"{fastest}_file"))
            put(model, "memory_mb", None if memory is None else memory / MIB, fastest)
        rates = [(f"{workload}: {mode}", row["tokens_per_second"])
                 for workload, entry in results.get("throughput", {}).items()
                 for mode, row in entry.get("modes", {}).items() if "tokens_per_second" in row]
        if rates:
            label, best = max(rates, key=lambda item: item[1])
            put(model, "throughput_tokens_per_s", best, label)
        put(model, "parameters", results.get("parameters"))
    elif _adaptive_bench_runs(results):  # bench_adaptive: one run per model folder (one per training seed)
        for run in _adaptive_bench_runs(results):
            put(_model_key(run.get("model_dir"), folder), "factual_accuracy",
                _pooled_accuracy(run["splits"], "estimator"),
                "estimator policy, exact match pooled over " + ", ".join(run["splits"]))
    elif isinstance(results.get("models"), dict) and "model_dir" in results:  # eval_multimodal
        for name, run in results["models"].items():
            base = model_folder(results["model_dir"], path)
            model = _model_key(base / name if (base / name / "config.json").is_file() else base, folder)
            put(model, "alignment_error", run.get("alignment_error", {}).get("error"), "held-out, eval_multimodal")
    elif "factual_accuracy" in results:  # a retrieval / QA evaluation that states it
        # a record inside a model folder (a QA reader's own results.json) is that folder's, wherever it was moved
        named = None if (folder / "config.json").is_file() else results.get("model") or results.get("model_dir")
        model = _model_key(named, folder)
        put(model, "factual_accuracy", results["factual_accuracy"])
        put(model, "parameters", results.get("num_parameters"))
    elif isinstance(results.get("heldout"), dict) and "alignment_error" in results["heldout"]:  # train_multimodal
        put(_model_key(None, folder), "alignment_error", results["heldout"]["alignment_error"].get("error"),
            "held-out, at training")
        put(_model_key(None, folder), "parameters", results.get("num_parameters"))
    elif isinstance(results.get("calibration"), dict):  # train_adaptive
        full = results["calibration"].get("estimator", {})
        accuracies = [full[s]["accuracy"] for s in ("easy", "hard") if isinstance(full.get(s), dict)]
        put(_model_key(None, folder), "factual_accuracy", sum(accuracies) / len(accuracies) if accuracies else None,
            "estimator policy on the calibration questions (mean of splits)")
        put(_model_key(None, folder), "parameters", results.get("num_parameters"))
    elif "num_parameters" in results:  # the other training recipes
        put(_model_key(None, folder), "parameters", results["num_parameters"])
    return found


def find_results(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """results.json files: each path is one, or a folder searched recursively (Trainer checkpoints skipped)."""
    files = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("results.json") if not any(part.startswith("checkpoint-")
                                                                                 for part in p.parts))
        else:
            raise ValueError(f"--results {path}: no such file or folder; give results.json files or folders "
                             "holding them (e.g. outputs/).")
    return files


# Where two files measure the same thing, the dedicated evaluation wins over the record written at training time.
_PRIORITY = ("at training", "calibration questions")


def _is_weak(entry: dict) -> bool:
    return any(phrase in entry.get("detail", "") for phrase in _PRIORITY)


def collect_measurements(paths: Iterable[str | os.PathLike]) -> dict[str, dict]:
    """Model folder -> {measure: {"value", "source", "detail"?}} from every results.json under `paths`."""
    models: dict[str, dict] = {}
    for path in find_results(paths):
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # not a results file of ours: nothing measured there
        if not isinstance(results, dict):
            continue
        for model, measures in measurements_from_results(results, path).items():
            current = models.setdefault(model, {})
            for measure, entry in measures.items():
                old = current.get(measure)
                if old is None or (_is_weak(old) and not _is_weak(entry)):
                    current[measure] = entry
    return models


def model_names(models: Iterable[str]) -> dict[str, str]:
    """Model folder -> the shortest distinct trailing path (e.g. 'outputs/realtime' -> 'realtime')."""
    folders = list(models)
    names = {}
    for folder in folders:
        parts = Path(folder).parts
        for n in range(1, len(parts) + 1):
            tail = "/".join(parts[-n:])
            if sum(1 for other in folders if "/".join(Path(other).parts[-n:]) == tail) == 1:
                names[folder] = tail
                break
        else:
            names[folder] = folder
    return names


# ---------------------------------------------------------------------------------------------- the matrix


def selection_matrix(models: dict[str, dict]) -> dict:
    """The article's matrix filled with measurements: per scenario, per model, the value and pass / fail /
    missing; plus every measure of every model (None where not measured)."""
    names = model_names(models)
    rows = {}
    for scenario in SCENARIOS.values():
        cells = {}
        for folder, measures in models.items():
            value = measures.get(scenario.measure, {}).get("value")
            verdict = scenario.passes(value)
            cells[names[folder]] = {"value": value,
                                    "verdict": {True: "pass", False: "fail", None: "missing"}[verdict]}
        rows[scenario.name] = {"architecture": scenario.architecture, "rule": scenario.rule,
                               "passing": sorted(n for n, c in cells.items() if c["verdict"] == "pass"),
                               "models": cells}
    table = {names[folder]: {"folder": folder, **{m: measures.get(m, {}).get("value") for m in MEASURES},
                             "sources": {m: e["source"] for m, e in measures.items()},
                             "details": {m: e["detail"] for m, e in measures.items() if "detail" in e}}
             for folder, measures in models.items()}
    return {"scenarios": rows, "models": table}


def recommend(matrix: dict, scenario: str | None = None, max_latency_ms: float | None = None,
              min_accuracy: float | None = None, max_memory_mb: float | None = None) -> dict:
    """The model to use for `scenario` (its threshold must pass) within the constraints, best first by the
    scenario's measure (lowest latency / error, highest accuracy; without a scenario: lowest latency, then fewest
    parameters). A model missing a measurement a requirement needs is excluded with the reason, never assumed to
    pass. Returns {"choice": name or None, "ranking": [...], "excluded": {name: reason}, "requirements": [...]}."""
    if scenario is not None and scenario not in SCENARIOS:
        raise ValueError(f"--scenario {scenario!r} is not one of {', '.join(SCENARIOS)}.")
    for option, value in (("--max_latency_ms", max_latency_ms), ("--min_accuracy", min_accuracy),
                          ("--max_memory_mb", max_memory_mb)):
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise ValueError(f"{option} must be a positive number, got {value}.")
    if min_accuracy is not None and min_accuracy > 1:
        raise ValueError(f"--min_accuracy is a fraction in (0, 1] (0.95 for 95%), got {min_accuracy}.")
    requirements = []  # (description, measure, test)
    if scenario:
        rule = SCENARIOS[scenario]
        requirements.append((rule.rule, rule.measure, rule.passes))
    if max_latency_ms is not None:
        requirements.append((f"latency_p50_ms <= {max_latency_ms:g}", "latency_p50_ms",
                             lambda v: v <= max_latency_ms))
    if min_accuracy is not None:
        requirements.append((f"factual_accuracy >= {min_accuracy:g}", "factual_accuracy",
                             lambda v: v >= min_accuracy))
    if max_memory_mb is not None:
        requirements.append((f"memory_mb <= {max_memory_mb:g}", "memory_mb", lambda v: v <= max_memory_mb))
    if not requirements:
        raise ValueError("nothing to choose by: give --scenario and / or --max_latency_ms, --min_accuracy, "
                         "--max_memory_mb.")
    kept, excluded = [], {}
    for name, row in matrix["models"].items():
        for text, measure, test in requirements:
            if row[measure] is None:
                excluded[name] = f"{measure} not measured (needed for {text})"
                break
            if not test(row[measure]):
                excluded[name] = f"fails {text} ({measure} = {row[measure]:.4g})"
                break
        else:
            kept.append(name)

    def order(name: str):
        row = matrix["models"][name]
        inf = float("inf")
        if scenario == "reasoning":
            return (-row["factual_accuracy"], row["latency_p50_ms"] if row["latency_p50_ms"] is not None else inf)
        if scenario == "multimodal":
            return (row["alignment_error"], row["parameters"] if row["parameters"] is not None else inf)
        return (row["latency_p50_ms"] if row["latency_p50_ms"] is not None else inf,
                row["parameters"] if row["parameters"] is not None else inf)

    ranking = sorted(kept, key=order)
    return {"choice": ranking[0] if ranking else None, "ranking": ranking, "excluded": excluded,
            "requirements": [text for text, _, _ in requirements], "scenario": scenario}


# --------------------------------------------------------------------------------------------- the outputs


def _format(measure: str, value: float | None) -> str:
    if value is None:
        return "not measured"
    if measure == "factual_accuracy":
        return f"{100 * value:.1f}%"
    if measure == "parameters":
        return f"{value:,.0f}"
    return f"{value:.3g}" if measure == "alignment_error" else f"{value:.1f}"


def markdown(matrix: dict, recommendation: dict | None = None) -> str:
    """The matrix (one row per scenario, one column per model: value and pass / fail / not measured), every
    measure per model, and the recommendation."""
    names = list(matrix["models"])
    marks = {"pass": "pass", "fail": "FAIL", "missing": "not measured"}
    lines = ["# Model-selection matrix", "",
             "| scenario | architecture | rule | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for scenario, row in matrix["scenarios"].items():
        measure = SCENARIOS[scenario].measure
        cells = []
        for name in names:
            cell = row["models"][name]
            cells.append(marks["missing"] if cell["value"] is None
                         else f"{_format(measure, cell['value'])} {marks[cell['verdict']]}")
        lines.append(f"| {scenario} | {row['architecture']} | {row['rule']} | " + " | ".join(cells) + " |")
    lines += ["", "| model | " + " | ".join(MEASURES) + " |", "|---|" + "---|" * len(MEASURES)]
    for name, row in matrix["models"].items():
        lines.append(f"| {name} | " + " | ".join(_format(m, row[m]) for m in MEASURES) + " |")
    lines += ["", ("Latency, p95 and memory: the fastest variant bench_inference measured for the model; memory in "
                   "MiB (2^20 bytes). Not measured means no results file gave it: run the benchmark, nothing is "
                   "estimated.")]
    if recommendation is not None:
        lines += ["", f"## Recommendation ({', '.join(recommendation['requirements'])})", ""]
        if recommendation["choice"]:
            lines.append(f"**{recommendation['choice']}**" + (
                f"; then {', '.join(recommendation['ranking'][1:])}" if len(recommendation["ranking"]) > 1 else ""))
        else:
            lines.append("**No measured model meets every requirement.**")
        lines += [f"- {name}: {reason}" for name, reason in recommendation["excluded"].items()]
    return "\n".join(lines) + "\n"


def plot(matrix: dict, recommendation: dict | None = None) -> bytes:
    """PNG: the models with latency and factual accuracy measured on the latency / accuracy plane (log latency),
    the realtime and reasoning thresholds drawn; below it a strip for models with a latency but no accuracy (never
    drawn at a guessed accuracy); models with neither are listed."""
    from matplotlib.ticker import ScalarFormatter

    from .plots import figure_to_png, pyplot

    plt = pyplot()
    fig, (ax, strip) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [5, 1]})
    realtime, reasoning = SCENARIOS["realtime"], SCENARIOS["reasoning"]
    chosen = recommendation.get("choice") if recommendation else None
    both, latency_only, unplaced = [], [], []
    for name, row in matrix["models"].items():
        if row["latency_p50_ms"] is not None and row["factual_accuracy"] is not None:
            both.append((name, row))
        elif row["latency_p50_ms"] is not None:
            latency_only.append((name, row))
        else:
            unplaced.append(name)

    def label(name: str, row: dict) -> str:
        extra = f" (alignment error {row['alignment_error']:.3g})" if row["alignment_error"] is not None else ""
        return name + extra + (" - recommended" if name == chosen else "")

    for name, row in both:
        ax.scatter(row["latency_p50_ms"], row["factual_accuracy"], s=160 if name == chosen else 60,
                   marker="*" if name == chosen else "o", zorder=3)
        ax.annotate(label(name, row), (row["latency_p50_ms"], row["factual_accuracy"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    for i, (name, row) in enumerate(latency_only):
        y = 0.3 + 0.4 * (i % 2)
        strip.scatter(row["latency_p50_ms"], y, s=160 if name == chosen else 60,
                      marker="*" if name == chosen else "s", zorder=3)
        strip.annotate(label(name, row), (row["latency_p50_ms"], y), textcoords="offset points", xytext=(6, -3),
                       fontsize=8)
    for axis in (ax, strip):
        axis.axvline(realtime.threshold, color="tab:red", ls="--")
        axis.grid(alpha=0.3)
    ax.axvline(realtime.threshold, color="tab:red", ls="--", label=f"realtime: p50 < {realtime.threshold:g} ms")
    ax.axhline(reasoning.threshold, color="tab:blue", ls="--",
               label=f"reasoning: factual accuracy > {100 * reasoning.threshold:g}%")
    latencies = [row["latency_p50_ms"] for _, row in both + latency_only] + [realtime.threshold]
    ax.set_xscale("log")
    ax.set_xlim(min(latencies) / 2, max(latencies) * 2)
    strip.xaxis.set_major_formatter(ScalarFormatter())
    strip.xaxis.set_minor_formatter(ScalarFormatter())
    strip.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_ylim(0, 1.05)
    strip.set_ylim(0, 1)
    strip.set_yticks([])
    strip.set_ylabel("accuracy\nnot measured", fontsize=8)
    strip.set_xlabel("latency p50 (ms, log scale; the fastest variant bench_inference measured)")
    ax.set_ylabel("factual accuracy")
    ax.set_title("lightarch models: latency vs factual accuracy (measured values only)")
    ax.legend(loc="lower left", fontsize=8)
    if unplaced:
        fig.text(0.01, 0.005, "Latency not measured: " + ", ".join(unplaced), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return figure_to_png(fig)


SELECT_SCRIPT = "select_model.py"  # the writer named in the output folder's marker (`check_output_dir`)


def select_model(paths: Sequence[str | os.PathLike], output_dir: str | os.PathLike | None = None,
                 scenario: str | None = None, max_latency_ms: float | None = None, min_accuracy: float | None = None,
                 max_memory_mb: float | None = None) -> dict:
    """Read every results.json under `paths`, fill the matrix, recommend when asked (a scenario or a constraint),
    and write results.json, results.md and matrix.png into `output_dir` atomically (when given). Returns
    {"matrix", "recommendation" (or None), "markdown"}."""
    models = collect_measurements(paths)
    if not models:
        raise ValueError(f"--results {', '.join(map(str, paths))}: no results.json of a lightarch benchmark or "
                         "training run there; run scripts/bench_inference.py etc. first.")
    matrix = selection_matrix(models)
    asked = scenario is not None or any(v is not None for v in (max_latency_ms, min_accuracy, max_memory_mb))
    recommendation = recommend(matrix, scenario, max_latency_ms, min_accuracy, max_memory_mb) if asked else None
    text = markdown(matrix, recommendation)
    output = {"matrix": matrix, "recommendation": recommendation,
              "thresholds": {name: s.rule for name, s in SCENARIOS.items()}}
    if output_dir is not None:
        from ..training.checkpoints import atomic_save_pretrained, check_output_dir

        inputs = {f"--results {p}": p for p in paths if Path(p).is_dir()}
        folder = check_output_dir(output_dir, SELECT_SCRIPT, inputs)
        atomic_save_pretrained(folder, extra_files={"results.json": json.dumps(output, indent=2) + "\n",
                                                    "results.md": text, "matrix.png": plot(matrix, recommendation)},
                               keep=(), script=SELECT_SCRIPT)
    return {**output, "markdown": text}
