"""The adaptive-depth benchmark (`scripts/bench_adaptive.py`): models from `lightarch.training.adaptive_depth` (one,
or one per training seed) on their held-out easy / hard test questions.

For each model and split it reports, for full depth, the estimator policy (whole-input routing) and the confidence
policy (per-token early exit, CALM) side by side:

- exact-match accuracy and mean layers per token at the thresholds stored in the model's config (calibrated in
  training on separate calibration questions), and the change against full depth;
- the measured wall time of greedy decoding one question at a time (batch 1), as a ratio to full depth, through
  `generate` and through a bare forward loop, and of self-speculative decoding (`assistant_early_exit`);
- the accuracy-compute curves of both policies as the threshold moves, beside the oracle's (exit correctness known in
  advance), and the estimator's routes against the oracle's exits (a confusion matrix).

Then, over the models: every target figure per seed, its mean, spread and worst seed.

Accuracy and layers come from teacher-forced forwards, which are exact for greedy decoding (see
`lightarch.data.arithmetic`); the timed generations re-measure accuracy and must agree. For the confidence policy the
compute is `executed_layers`, the layers a batch-1 generation runs in full per token fed (the question's tokens leave
with its last one), with `kv_filled_layers` beside it (deeper layers that only computed a token's key/value).

Targets (`TARGETS`, from the issue, on every seed): estimator on easy >= 70% fewer layers within 0.5 point of full
depth, and generate in <= 0.5x its wall time; hard within 0.5 point (both policies); confidence on easy >= 35% fewer
layers run within 1 point.
"""

from __future__ import annotations

import json
import os
import platform
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from ...data.arithmetic import SPLITS, Problem, problems_from_prompts
from ...training.checkpoints import atomic_save_pretrained, check_output_dir
from ..adaptive_depth import (
    confidence_operating_point,
    estimator_operating_point,
    exit_measurements,
    threshold_grid,
    time_generation,
    time_greedy_loop,
    time_self_speculative,
)
from ...modeling_adaptive_depth import route_from_estimate
from ..plots import figure_to_png, pyplot

# The targets, on every seed: the estimator saves >= 70% of the layers on easy questions within 0.5 point of
# full depth and halves generate's wall time there; both policies stay within 0.5 point on hard questions; the
# confidence policy runs >= 35% fewer layers on easy questions within 1 point.
TARGETS = {"easy_min_layer_reduction": 0.70, "easy_max_accuracy_drop": 0.005, "easy_max_generate_time_ratio": 0.5,
           "hard_max_accuracy_drop": 0.005, "confidence_easy_min_executed_reduction": 0.35,
           "confidence_easy_max_accuracy_drop": 0.01}
POLICIES = ("full", "estimator", "confidence")


def load_test_problems(model_dir: str | os.PathLike) -> dict[str, list[Problem]]:
    """The test questions per split of a trained model folder (its heldout.json)."""
    return problems_from_prompts(json.loads((Path(model_dir) / "heldout.json").read_text())["test"])


def time_policies(model, tokenizer, subsets: dict[str, list[Problem]], rounds: int = 3,
                  show_progress: bool = True) -> dict:
    """Per split and variant: wall time of batch-1 greedy decoding, two ways, as a ratio to full depth.

    `generate`: the real API; `loop`: cached decoding calling forward directly, which leaves out generate's per-step
    bookkeeping. Self-speculative decoding exists only through generate. Every question is decoded by every variant
    back to back (order rotated), in `rounds` rounds; each (question, variant) keeps its fastest round, the
    least disturbed by other processes, and a variant's time is the sum over questions of those minima.
    """
    first_exit = model.config.exit_layers[0]
    variants = [(mode, policy) for policy in POLICIES for mode in ("generate", "loop")]
    variants.append(("generate", "self_speculative"))
    names = [f"{mode}/{policy}" for mode, policy in variants]
    out = {}
    for split in SPLITS:
        questions = subsets[split]
        best = {name: [float("inf")] * len(questions) for name in names}
        correct = {name: [0.0] * len(questions) for name in names}
        tokens = {name: [None] * len(questions) for name in names}
        depths: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(rounds):
            for q, problem in enumerate(tqdm(questions, desc=f"Timing {split}, round {round_index + 1}",
                                             disable=not show_progress)):
                shift = (q + round_index) % len(variants)
                for mode, policy in variants[shift:] + variants[:shift]:
                    name = f"{mode}/{policy}"
                    if policy == "self_speculative":
                        result = time_self_speculative(model, [problem], tokenizer, first_exit)
                    elif mode == "generate":
                        result = time_generation(model, [problem], tokenizer, policy, None)
                        if round_index == 0:
                            depths[name].append(result["mean_exit_layer"])
                    else:
                        result = time_greedy_loop(model, [problem], tokenizer, policy, None)
                    best[name][q] = min(best[name][q], result["seconds"])
                    correct[name][q] = result["accuracy"]
                    tokens[name][q] = result.get("answers", [None])[0]
        seconds = {name: sum(values) for name, values in best.items()}
        base = {"generate": seconds["generate/full"], "loop": seconds["loop/full"]}
        out[split] = {
            "examples": len(questions),
            "seconds": seconds,
            "wall_time_ratio": {name: seconds[name] / base[name.split("/")[0]] for name in names},
            "generated_accuracy": {name: sum(values) / len(values) for name, values in correct.items()},
            "mean_exit_layer_of_generated_tokens": {name.split("/")[1]: sum(v) / len(v)
                                                    for name, v in depths.items() if v},
            "self_speculative_equals_greedy": tokens["generate/self_speculative"] == tokens["generate/full"],
        }
    return out


def measure(model, tokenizer, problems: dict[str, list[Problem]], threshold_steps: int = 41, batch_size: int = 256,
            show_progress: bool = True) -> dict:
    """Teacher-forced accuracy and layers per split: every exit, full depth, both policies at the thresholds in the
    config and along a threshold grid (the curves), and the oracle router (the earliest right exit)."""
    config = model.config
    exit_layers = list(config.exit_layers)
    num_layers = config.num_hidden_layers
    grid = sorted(set(threshold_grid(threshold_steps)) | {config.estimator_threshold,
                                                               config.confidence_threshold})
    measured = {s: exit_measurements(model, problems[s], tokenizer, batch_size) for s in SPLITS}
    results = {"exit_layers": exit_layers, "num_layers": num_layers, "splits": {},
               "estimator_cost_in_layers": estimator_cost_in_layers(model)}
    for split in SPLITS:
        m = measured[split]
        full_accuracy = m["correct"][:, -1].float().mean().item()
        estimator_curve = [estimator_operating_point(m, exit_layers, t) for t in grid]
        confidence_curve = [confidence_operating_point(model, problems[split], tokenizer, t, batch_size)
                            for t in tqdm(grid, desc=f"Confidence sweep ({split})", disable=not show_progress)]
        estimator = estimator_operating_point(m, exit_layers, config.estimator_threshold)
        confidence = confidence_operating_point(model, problems[split], tokenizer, config.confidence_threshold,
                                                batch_size)
        oracle_route = m["correct"].int().argmax(1).masked_fill(~m["correct"].any(1), len(exit_layers) - 1)
        oracle_depth = torch.tensor(exit_layers, dtype=torch.float)[oracle_route]
        estimator_route = route_from_estimate(m["estimator_logits"], config.estimator_threshold,
                                              config.estimator_objective)
        results["splits"][split] = {
            "questions": len(problems[split]),
            "exit_accuracy": dict(zip(map(str, exit_layers), m["correct"].float().mean(0).tolist())),
            "full": {"accuracy": full_accuracy, "mean_layers": float(num_layers)},
            "estimator": estimator,
            "confidence": confidence,
            "oracle": {"accuracy": m["correct"].any(1).float().mean().item(), "mean_layers": oracle_depth.mean().item(),
                       "note": "earliest right exit per question, known in advance: a bound for any router"},
            "oracle_curve": oracle_curve(m["correct"], exit_layers),
            "confusion": route_confusion(m["correct"], estimator_route, exit_layers),
            "estimator_curve": estimator_curve,
            "confidence_curve": confidence_curve,
        }
    return results


def oracle_curve(correct: torch.Tensor, exit_layers: list[int], points: int = 40) -> list[dict]:
    """The best accuracy for each compute budget when every question's exit correctness is known in advance.

    From the oracle router (each question at its earliest right exit, questions no exit answers at the first), the
    question that saves the most layers is moved to the first exit, one at a time (each move loses one right
    answer), down to everything at the first exit. correct: (N, num_exits) bool -> points {mean_layers, accuracy}.
    """
    n = correct.shape[0]
    depths = torch.tensor(exit_layers, dtype=torch.float)
    any_right = correct.any(1)
    route = correct.int().argmax(1).masked_fill(~any_right, 0)  # nothing right: the cheapest exit loses nothing
    depth = depths[route]
    right = int(any_right.sum())
    total = float(depth.sum())
    savings = (depth[route > 0] - exit_layers[0]).sort(descending=True).values.tolist()
    curve = [{"mean_layers": total / n, "accuracy": right / n}]
    for saving in savings:
        total -= saving
        right -= 1
        curve.append({"mean_layers": total / n, "accuracy": right / n})
    step = max(1, len(curve) // points)
    return curve[::step] + ([curve[-1]] if (len(curve) - 1) % step else [])


def route_confusion(correct: torch.Tensor, route: torch.Tensor, exit_layers: list[int]) -> dict:
    """Rows: each question's oracle exit (the earliest right one, or "none right"); columns: the estimator's route.
    Counts, with the labels."""
    num_exits = len(exit_layers)
    oracle = correct.int().argmax(1).masked_fill(~correct.any(1), num_exits)  # num_exits = none right
    counts = torch.zeros(num_exits + 1, num_exits, dtype=torch.long)
    counts.index_put_((oracle, route.cpu()), torch.ones_like(oracle), accumulate=True)
    return {"rows_oracle_exit": [f"exit {d}" for d in exit_layers] + ["none right"],
            "columns_route": [f"exit {d}" for d in exit_layers], "counts": counts.tolist()}


def estimator_cost_in_layers(model) -> float:
    """The estimator's per-token multiply-adds as a fraction of a decoder layer's (weights only; attention scores
    over this task's ~10-token contexts are negligible). Its per-input MLP is ignored (one token's worth)."""
    estimator = model.model.estimator
    layer_weights = sum(p.numel() for name, p in model.model.layers[0].named_parameters()
                        if p.dim() == 2 and "norm" not in name)
    return estimator.token_proj.weight.numel() / layer_weights


def check_targets(run: dict) -> dict:
    """Whether each policy of one benchmarked model meets the issue's targets (`TARGETS`), with the margins."""
    num_layers = run["num_layers"]
    easy, hard = run["splits"]["easy"], run["splits"]["hard"]
    out = {}
    for policy in ("estimator", "confidence"):
        layers_key = "executed_layers" if policy == "confidence" else "mean_layers"
        t = {
            "easy_layer_reduction": 1 - easy[policy][layers_key] / num_layers,
            "easy_layer_reduction_per_token_exits": 1 - easy[policy]["mean_layers"] / num_layers,
            "easy_accuracy_drop": easy["full"]["accuracy"] - easy[policy]["accuracy"],
            "hard_accuracy_drop": hard["full"]["accuracy"] - hard[policy]["accuracy"],
            "easy_generate_time_ratio": run["timing"]["easy"]["wall_time_ratio"][f"generate/{policy}"],
        }
        if policy == "estimator":
            t["meets_easy_compute"] = t["easy_layer_reduction"] >= TARGETS["easy_min_layer_reduction"]
            t["meets_easy_accuracy"] = t["easy_accuracy_drop"] <= TARGETS["easy_max_accuracy_drop"] + 1e-9
            t["meets_easy_wall_time"] = t["easy_generate_time_ratio"] <= TARGETS["easy_max_generate_time_ratio"]
        else:
            t["meets_easy_compute"] = t["easy_layer_reduction"] >= TARGETS["confidence_easy_min_executed_reduction"]
            t["meets_easy_accuracy"] = t["easy_accuracy_drop"] <= TARGETS["confidence_easy_max_accuracy_drop"] + 1e-9
        t["meets_hard_accuracy"] = t["hard_accuracy_drop"] <= TARGETS["hard_max_accuracy_drop"] + 1e-9
        t["meets_all"] = all(v for k, v in t.items() if k.startswith("meets_"))
        out[policy] = t
    return out


# The per-seed figures the summary gathers: (name, policy, key in check_targets, "higher" or "lower" is better).
SUMMARY_FIGURES = (
    ("estimator: easy layers saved", "estimator", "easy_layer_reduction", "higher"),
    ("estimator: easy accuracy drop", "estimator", "easy_accuracy_drop", "lower"),
    ("estimator: easy generate time vs full", "estimator", "easy_generate_time_ratio", "lower"),
    ("estimator: hard accuracy drop", "estimator", "hard_accuracy_drop", "lower"),
    ("confidence: easy layers run saved", "confidence", "easy_layer_reduction", "higher"),
    ("confidence: easy accuracy drop", "confidence", "easy_accuracy_drop", "lower"),
    ("confidence: hard accuracy drop", "confidence", "hard_accuracy_drop", "lower"),
)


def summarize(runs: list[dict]) -> dict:
    """Mean, spread (min, max, population std) and worst seed of every target figure over the runs."""
    out = {}
    for name, policy, key, better in SUMMARY_FIGURES:
        values = [run["targets"][policy][key] for run in runs]
        mean = sum(values) / len(values)
        out[name] = {"values": values, "mean": mean, "min": min(values), "max": max(values),
                     "std": (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5,
                     "worst": min(values) if better == "higher" else max(values)}
    out["every_run_meets_all"] = {policy: all(run["targets"][policy]["meets_all"] for run in runs)
                                  for policy in ("estimator", "confidence")}
    return out


def plot_curves(runs: list[dict]) -> bytes:
    """PNG: accuracy against mean layers per token as the threshold moves, per split: every run's estimator and
    confidence curves, its oracle curve, full depth and the calibrated points."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(13, 5))
    num_layers = runs[0]["num_layers"]
    for ax, split in zip(axes, SPLITS):
        shown = []
        for i, run in enumerate(runs):
            r = run["splits"][split]
            label = (lambda text: text) if i == 0 else (lambda text: None)
            est = sorted((p["mean_layers"], 100 * p["accuracy"]) for p in r["estimator_curve"])
            conf = sorted((p["executed_layers"], 100 * p["accuracy"]) for p in r["confidence_curve"])
            oracle = sorted((p["mean_layers"], 100 * p["accuracy"]) for p in r["oracle_curve"])
            ax.plot(*zip(*est), "o-", color="tab:blue", ms=2, lw=1.2, alpha=0.8, label=label("estimator (whole input)"))
            ax.plot(*zip(*conf), "s-", color="tab:orange", ms=2, lw=1.2, alpha=0.8,
                    label=label("confidence (layers a batch-1 generate runs)"))
            ax.plot(*zip(*oracle), "-", color="tab:green", lw=1.2, alpha=0.8,
                    label=label("oracle (exit correctness known in advance)"))
            ax.plot([num_layers], [100 * r["full"]["accuracy"]], "k*", ms=10, label=label("full depth"))
            ax.plot([r["estimator"]["mean_layers"]], [100 * r["estimator"]["accuracy"]], "o", ms=10, mfc="none",
                    mec="tab:blue", mew=2, label=label("estimator, calibrated threshold"))
            ax.plot([r["confidence"]["executed_layers"]], [100 * r["confidence"]["accuracy"]], "s", ms=10, mfc="none",
                    mec="tab:orange", mew=2, label=label("confidence, calibrated threshold"))
            shown += [a for curve in (est, conf) for _, a in curve if _ >= run["exit_layers"][0]]
            shown.append(100 * r["full"]["accuracy"])
        if split == "easy":
            ax.axvline(num_layers * (1 - TARGETS["easy_min_layer_reduction"]), color="gray", ls=":", lw=1)
        ax.set_xlabel("mean decoder layers per token")
        ax.set_ylabel("exact-match accuracy (%)")
        ax.set_title(f"{split} split ({runs[0]['splits'][split]['questions']} held-out questions, {len(runs)} run(s))")
        ax.set_xlim(min(runs[0]["exit_layers"][0] - 0.5, 1.0), num_layers + 0.3)
        ax.set_ylim(max(0.0, min(shown) - 5), min(101.0, max(shown) + 2))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Accuracy-compute curves as the threshold moves (exits at " +
                 ", ".join(map(str, runs[0]["exit_layers"])) + "; dotted: the 70% saving target on easy)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return figure_to_png(fig)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def run_markdown(run: dict) -> list[str]:
    """One model's tables: the policies side by side per split, exit accuracy and the oracle, the confusion matrix."""
    num_layers = run["num_layers"]
    lines = [f"## `{run['model_dir']}` (training seed {run.get('training_seed', '?')})", "",
             "| split | policy | threshold | accuracy | vs full | mean layers / token | layer computations saved "
             "| wall time vs full: generate | wall time vs full: forward loop |", "|---" * 9 + "|"]
    for split in SPLITS:
        r = run["splits"][split]
        timing = run["timing"][split]["wall_time_ratio"]
        full = r["full"]["accuracy"]
        for policy in POLICIES:
            p = r[policy]
            threshold = "-" if policy == "full" else f"{p['threshold']:.4g}"
            layers = p["executed_layers"] if policy == "confidence" else p["mean_layers"]
            layer_text = f"{layers:.2f}" + (f" (+{p['kv_filled_layers']:.2f} kv-only)" if policy == "confidence"
                                            else "")
            lines.append(f"| {split} | {policy} | {threshold} | {_pct(p['accuracy'])} | "
                         f"{100 * (p['accuracy'] - full):+.1f} pt | {layer_text} | {_pct(1 - layers / num_layers)} | "
                         f"{timing['generate/' + policy]:.2f}x | {timing['loop/' + policy]:.2f}x |")
        spec = run["timing"][split]
        lines.append(f"| {split} | self-speculative (exit {run['exit_layers'][0]} drafts) | - | "
                     f"{_pct(spec['generated_accuracy']['generate/self_speculative'])} (timing subset) | "
                     f"{'identical to greedy' if spec['self_speculative_equals_greedy'] else 'DIFFERS from greedy'}"
                     f" | {num_layers} (verified) | - | "
                     f"{spec['wall_time_ratio']['generate/self_speculative']:.2f}x | - |")
    lines += ["", "| split | " + " | ".join(f"exit {d}" for d in run["exit_layers"]) + " | oracle router |",
              "|---" * (len(run["exit_layers"]) + 2) + "|"]
    for split in SPLITS:
        r = run["splits"][split]
        lines.append(f"| {split} | " + " | ".join(_pct(a) for a in r["exit_accuracy"].values())
                     + f" | {_pct(r['oracle']['accuracy'])} at {r['oracle']['mean_layers']:.2f} layers |")
    for split in SPLITS:
        confusion = run["splits"][split]["confusion"]
        lines += ["", f"Estimator route against the oracle's exit, {split} split (rows: the earliest right exit; "
                  "columns: the route taken):", "",
                  "| oracle \\ route | " + " | ".join(confusion["columns_route"]) + " |",
                  "|---" * (len(confusion["columns_route"]) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(map(str, row)) + " |"
                  for label, row in zip(confusion["rows_oracle_exit"], confusion["counts"])]
    return lines


def markdown(results: dict) -> str:
    """results.md: the targets per seed with their spread, then each model's tables."""
    runs, summary = results["runs"], results["summary"]
    env = results["environment"]
    lines = ["# Adaptive depth benchmark", "",
             f"{len(runs)} model(s), exits at {runs[0]['exit_layers']} of {runs[0]['num_layers']} layers. torch "
             f"{env['torch']}, transformers {env['transformers']}, {env['threads']} thread(s). Wall time: greedy "
             f"decoding, batch 1, {runs[0]['timing']['easy']['examples']} questions per split, every variant run back "
             f"to back per question, fastest of {results['timing_rounds']} rounds per question, summed.", "",
             "Targets (every seed): estimator on easy >= 70% fewer layers within 0.5 pt and generate <= 0.5x the time "
             "of full depth; hard within 0.5 pt (both policies); confidence on easy >= 35% fewer layers run within "
             "1 pt.", "",
             "| model (seed) | estimator: easy layers saved | easy acc. drop | easy generate time | hard acc. drop "
             "| met | confidence: easy layers run saved | easy acc. drop | hard acc. drop | met |", "|---" * 10 + "|"]
    for run in runs:
        e, c = run["targets"]["estimator"], run["targets"]["confidence"]
        lines.append(f"| `{run['model_dir']}` ({run.get('training_seed', '?')}) | {_pct(e['easy_layer_reduction'])} | "
                     f"{100 * e['easy_accuracy_drop']:.2f} pt | {e['easy_generate_time_ratio']:.2f}x | "
                     f"{100 * e['hard_accuracy_drop']:.2f} pt | {'yes' if e['meets_all'] else 'no'} | "
                     f"{_pct(c['easy_layer_reduction'])} | {100 * c['easy_accuracy_drop']:.2f} pt | "
                     f"{100 * c['hard_accuracy_drop']:.2f} pt | {'yes' if c['meets_all'] else 'no'} |")
    lines += ["", "| figure | mean | min | max | std | worst seed |", "|---|---|---|---|---|---|"]
    for name, *_ in SUMMARY_FIGURES:
        f = summary[name]
        scale, unit = (1.0, "x") if "time" in name else (100.0, " pt" if "drop" in name else "%")
        lines.append(f"| {name} | " + " | ".join(f"{scale * f[k]:.2f}{unit}" for k in ("mean", "min", "max", "std",
                                                                                       "worst")) + " |")
    met = summary["every_run_meets_all"]
    lines += ["", f"Every run meets all targets: estimator {'yes' if met['estimator'] else 'no'}, confidence "
              f"{'yes' if met['confidence'] else 'no'}.", "",
              f"The estimator costs about {runs[0]['estimator_cost_in_layers']:.3f} of a decoder layer per token (not "
              "in the layer counts). kv-only: the deeper layers whose key/value the confidence policy fills from a "
              "token's exit state (two projections each). Self-speculative decoding must give the same tokens as "
              "greedy full depth (checked on the timing questions); answers here are 2-4 tokens long.", ""]
    for run in runs:
        lines += run_markdown(run) + [""]
    lines += ["![curves](curves.png)", ""]
    return "\n".join(lines)


def check_bench_options(model_dir: str | os.PathLike | Sequence[str | os.PathLike], threshold_steps: int = 41,
                        timing_examples: int = 150, timing_rounds: int = 3, batch_size: int = 256,
                        output_dir: str | os.PathLike | None = None) -> None:
    """Raise a ValueError naming the option and the fix if `bench_adaptive_depth` cannot run with these: a
    `model_dir` (one or several) that is not a scripts/train_adaptive.py folder (a heldout.json with its test
    questions, a config.json of an adaptive-depth model), bad counts, or an `output_dir` the output-folder rule refuses
    (`check_output_dir`)."""
    from ...configuration import AdaptiveDepthConfig

    model_dirs = [model_dir] if isinstance(model_dir, (str, os.PathLike)) else list(model_dir)
    if not model_dirs:
        raise ValueError("--model_dir needs at least one folder written by scripts/train_adaptive.py.")
    if len({Path(d).resolve() for d in model_dirs}) != len(model_dirs):
        raise ValueError(f"--model_dir lists a folder twice ({[str(d) for d in model_dirs]}); give each run once.")
    written_by = "train it with scripts/train_adaptive.py"
    for name, value, low in (("threshold_steps", threshold_steps, 2), ("timing_examples", timing_examples, 1),
                             ("timing_rounds", timing_rounds, 1), ("batch_size", batch_size, 1)):
        if value < low:
            raise ValueError(f"--{name} must be >= {low}, got {value}.")
    for folder in model_dirs:
        if not (Path(folder) / "heldout.json").is_file():
            raise ValueError(f"--model_dir {folder} has no heldout.json; {written_by}.")
    if output_dir is not None:
        check_output_dir(output_dir, BENCH_SCRIPT, inputs={
            "--model_dir" if len(model_dirs) == 1 else f"--model_dir (#{i + 1})": d for i, d in enumerate(model_dirs)})
    for folder in model_dirs:
        if not (Path(folder) / "config.json").is_file():
            raise ValueError(f"--model_dir {folder} has no config.json; {written_by}.")
        try:
            model_type = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as error:
            raise ValueError(f"--model_dir {folder}: config.json is not a model config ({error}).") from None
        if model_type != AdaptiveDepthConfig.model_type:
            raise ValueError(f"--model_dir {folder} holds a {model_type!r} model, not an adaptive-depth one "
                             f"({AdaptiveDepthConfig.model_type!r}); {written_by}.")
        try:
            load_test_problems(folder)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"--model_dir {folder}: heldout.json does not hold the test questions scripts/"
                             f"train_adaptive.py saves ({type(error).__name__}: {error}); {written_by}.") from None


BENCH_SCRIPT = "bench_adaptive.py"  # the writer named in the output folder's marker (`check_output_dir`)


def bench_model(model_dir: str | os.PathLike, threshold_steps: int = 41, timing_examples: int = 150,
                timing_rounds: int = 3, batch_size: int = 256, seed: int = 0, show_progress: bool = True) -> dict:
    """Every measurement of one trained model folder on its test questions (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    problems = load_test_problems(model_dir)
    model_dir = Path(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    results = measure(model, tokenizer, problems, threshold_steps, batch_size, show_progress)
    results["model_dir"] = model_dir.as_posix()
    training = model_dir / "results.json"
    if training.is_file():
        results["training_seed"] = json.loads(training.read_text()).get("seed")
    rng = random.Random(seed)
    subsets = {s: rng.sample(problems[s], min(timing_examples, len(problems[s]))) for s in SPLITS}
    results["timing"] = time_policies(model, tokenizer, subsets, timing_rounds, show_progress)
    for split in SPLITS:  # decoding must agree with the teacher-forced measurement on the same questions
        timing = results["timing"][split]
        measured = exit_measurements(model, subsets[split], tokenizer, batch_size)
        estimator = estimator_operating_point(measured, config.exit_layers, config.estimator_threshold)
        forced = {
            "full": measured["correct"][:, -1].float().mean().item(),
            "estimator": estimator["accuracy"],
            "confidence": confidence_operating_point(model, subsets[split], tokenizer, config.confidence_threshold,
                                                     batch_size)["accuracy"],
        }
        timing["teacher_forced_accuracy"] = forced
        timing["teacher_forced_estimator_mean_layers"] = estimator["mean_layers"]
        generated = timing["generated_accuracy"]
        same_accuracy = all(abs(generated[f"{mode}/{policy}"] - forced[policy]) < 0.5 / len(subsets[split])
                            for mode in ("generate", "loop") for policy in POLICIES)
        same_depth = abs(estimator["mean_layers"] - timing["mean_exit_layer_of_generated_tokens"]["estimator"]) < 1e-6
        timing["decoding_agrees_with_teacher_forcing"] = same_accuracy and same_depth
    results["targets"] = check_targets(results)
    return results


def bench_adaptive_depth(model_dir: str | os.PathLike | Sequence[str | os.PathLike], output_dir: str | os.PathLike,
                         threshold_steps: int = 41, timing_examples: int = 150, timing_rounds: int = 3,
                         batch_size: int = 256, seed: int = 0, show_progress: bool = True) -> dict:
    """Measure each model in `model_dir` (one folder, or one per training seed) on its test questions, time
    `timing_examples` of them per split (a random subset, `seed`) in `timing_rounds` interleaved rounds, and write
    results.json (`runs`: every model's measurements; `summary`: mean, spread and worst seed of each target figure),
    results.md and curves.png into `output_dir` atomically; returns the results. torch's thread count is the
    caller's."""
    check_bench_options(model_dir, threshold_steps, timing_examples, timing_rounds, batch_size, output_dir)
    model_dirs = [model_dir] if isinstance(model_dir, (str, os.PathLike)) else list(model_dir)
    runs = [bench_model(folder, threshold_steps, timing_examples, timing_rounds, batch_size, seed, show_progress)
            for folder in model_dirs]
    results = {
        "runs": runs,
        "summary": summarize(runs),
        "targets_definition": TARGETS,
        "timing_rounds": timing_rounds,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "threads": torch.get_num_threads(),
                        "machine": platform.machine()},
        "arguments": {"model_dir": [Path(d).as_posix() for d in model_dirs], "output_dir": Path(output_dir).as_posix(),
                      "threshold_steps": threshold_steps, "timing_examples": timing_examples,
                      "timing_rounds": timing_rounds, "batch_size": batch_size, "seed": seed},
    }
    atomic_save_pretrained(output_dir, extra_files={
        "results.json": json.dumps(results, indent=2),
        "results.md": markdown(results),
        "curves.png": plot_curves(runs),
    }, keep=(), script=BENCH_SCRIPT)
    return results


__all__ = ["POLICIES", "SUMMARY_FIGURES", "TARGETS", "bench_adaptive_depth", "bench_model", "check_bench_options",
           "check_targets", "estimator_cost_in_layers", "load_test_problems", "markdown", "measure", "oracle_curve",
           "plot_curves", "route_confusion", "run_markdown", "summarize", "time_policies"]
