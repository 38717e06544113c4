"""The adaptive-depth benchmark (`scripts/bench_adaptive.py`): a model from `lightarch.training.adaptive_depth` on its
held-out easy / hard test questions.

For each split it reports, for full depth, the estimator policy (whole-input routing) and the confidence policy
(per-token early exit, CALM) side by side:

- exact-match accuracy and mean layers per token at the thresholds stored in the model's config (calibrated in
  training on separate calibration questions), and the change against full depth;
- the measured wall time of greedy decoding one question at a time (batch 1), as a ratio to full depth, through
  `generate` and through a bare forward loop, and of self-speculative decoding (`assistant_early_exit`);
- the accuracy-compute curve of both policies as the threshold moves (`curves.png`).

Accuracy and layers come from teacher-forced forwards, which are exact for greedy decoding (see
`lightarch.data.arithmetic`); the timed generations re-measure accuracy and must agree. For the confidence policy two
compute numbers are given: `mean_layers` (each token's own exit depth) and `executed_layers` (what a batch-1
generation runs: the prompt's forward lasts until its deepest token leaves).

Targets (`TARGETS`, from the issue): easy split >= 60% fewer layer computations with accuracy within 1 point of full
depth; hard split accuracy within 0.5 point of full depth.
"""

from __future__ import annotations

import json
import os
import platform
import random
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
from ..plots import figure_to_png, pyplot

TARGETS = {"easy_min_layer_reduction": 0.60, "easy_max_accuracy_drop": 0.01, "hard_max_accuracy_drop": 0.005}
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
        results["splits"][split] = {
            "questions": len(problems[split]),
            "exit_accuracy": dict(zip(map(str, exit_layers), m["correct"].float().mean(0).tolist())),
            "full": {"accuracy": full_accuracy, "mean_layers": float(num_layers)},
            "estimator": estimator,
            "confidence": confidence,
            "oracle": {"accuracy": m["correct"].any(1).float().mean().item(), "mean_layers": oracle_depth.mean().item(),
                       "note": "earliest right exit per question, known in advance: a bound for any router"},
            "estimator_curve": estimator_curve,
            "confidence_curve": confidence_curve,
        }
    return results


def estimator_cost_in_layers(model) -> float:
    """The estimator's per-token multiply-adds as a fraction of a decoder layer's (weights only; attention scores
    over this task's ~10-token contexts are negligible). Its per-input MLP is ignored (one token's worth)."""
    estimator = model.model.estimator
    layer_weights = sum(p.numel() for name, p in model.model.layers[0].named_parameters()
                        if p.dim() == 2 and "norm" not in name)
    return estimator.token_proj.weight.numel() / layer_weights


def check_targets(results: dict) -> dict:
    """Whether each policy meets the issue's targets, with the margins."""
    num_layers = results["num_layers"]
    out = {}
    for policy in ("estimator", "confidence"):
        easy, hard = results["splits"]["easy"], results["splits"]["hard"]
        layers_key = "executed_layers" if policy == "confidence" else "mean_layers"
        reduction = 1 - easy[policy][layers_key] / num_layers
        easy_drop = easy["full"]["accuracy"] - easy[policy]["accuracy"]
        hard_drop = hard["full"]["accuracy"] - hard[policy]["accuracy"]
        out[policy] = {
            "easy_layer_reduction": reduction,
            "easy_layer_reduction_per_token_exits": 1 - easy[policy]["mean_layers"] / num_layers,
            "easy_accuracy_drop": easy_drop,
            "hard_accuracy_drop": hard_drop,
            "meets_easy_compute": reduction >= TARGETS["easy_min_layer_reduction"],
            "meets_easy_accuracy": easy_drop <= TARGETS["easy_max_accuracy_drop"] + 1e-9,
            "meets_hard_accuracy": hard_drop <= TARGETS["hard_max_accuracy_drop"] + 1e-9,
        }
        out[policy]["meets_all"] = all(v for k, v in out[policy].items() if k.startswith("meets_"))
    return out


def plot_curves(results: dict) -> bytes:
    """PNG: accuracy against mean layers per token as the threshold moves, per split, both policies."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(13, 5))
    num_layers = results["num_layers"]
    for ax, split in zip(axes, SPLITS):
        r = results["splits"][split]
        est = sorted((p["mean_layers"], 100 * p["accuracy"]) for p in r["estimator_curve"])
        conf = sorted((p["mean_layers"], 100 * p["accuracy"]) for p in r["confidence_curve"])
        conf_exec = sorted((p["executed_layers"], 100 * p["accuracy"]) for p in r["confidence_curve"])
        ax.plot(*zip(*est), "o-", color="tab:blue", ms=3, lw=1.5, label="estimator (whole input)")
        ax.plot(*zip(*conf), "s-", color="tab:orange", ms=3, lw=1.5, label="confidence (per-token exit depth)")
        ax.plot(*zip(*conf_exec), "s--", color="tab:orange", ms=2, lw=1, alpha=0.6,
                label="confidence (layers a batch-1 generate runs)")
        ax.plot([num_layers], [100 * r["full"]["accuracy"]], "k*", ms=14, label="full depth")
        ax.plot([r["estimator"]["mean_layers"]], [100 * r["estimator"]["accuracy"]], "o", ms=12, mfc="none",
                mec="tab:blue", mew=2, label=f"estimator, calibrated t={r['estimator']['threshold']:.4g}")
        ax.plot([r["confidence"]["mean_layers"]], [100 * r["confidence"]["accuracy"]], "s", ms=12, mfc="none",
                mec="tab:orange", mew=2, label=f"confidence, calibrated t={r['confidence']['threshold']:.4g}")
        ax.plot([r["oracle"]["mean_layers"]], [100 * r["oracle"]["accuracy"]], "g^", ms=9,
                label="oracle (earliest right exit)")
        if split == "easy":
            ax.axvline(num_layers * (1 - TARGETS["easy_min_layer_reduction"]), color="gray", ls=":", lw=1)
        ax.set_xlabel("mean decoder layers per token")
        ax.set_ylabel("exact-match accuracy (%)")
        ax.set_title(f"{split} split ({r['questions']} held-out questions)")
        ax.set_xlim(min(results["exit_layers"][0] - 0.5, 1.0), num_layers + 0.3)
        shown = [a for curve in (est, conf, conf_exec) for _, a in curve] + [100 * r["oracle"]["accuracy"]]
        ax.set_ylim(max(0.0, min(shown) - 2), min(101.0, max(shown) + 2))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, [label.split(", calibrated")[0] + (", calibrated threshold" if "calibrated" in label else "")
                         for label in labels], loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Accuracy-compute curves as the threshold moves (exits at " +
                 ", ".join(map(str, results["exit_layers"])) + "; dotted: the 60% saving target on easy)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return figure_to_png(fig)


def markdown(results: dict) -> str:
    """results.md: the policies side by side per split, exit accuracy, the targets."""
    num_layers = results["num_layers"]
    lines = ["# Adaptive depth benchmark", "",
             f"Model `{results['model_dir']}`, exits at {results['exit_layers']}, {results['num_layers']} layers. "
             f"torch {results['environment']['torch']}, transformers {results['environment']['transformers']}, "
             f"{results['environment']['threads']} thread(s). Wall time: greedy decoding, batch 1, "
             f"{results['timing']['easy']['examples']} questions per split, every variant run back to back per "
             f"question, fastest of {results['timing_rounds']} rounds per question, summed.", "",
             "| split | policy | threshold | accuracy | vs full | mean layers / token | layer computations saved "
             "| wall time vs full: generate | wall time vs full: forward loop |", "|---" * 9 + "|"]
    for split in SPLITS:
        r = results["splits"][split]
        timing = results["timing"][split]["wall_time_ratio"]
        full = r["full"]["accuracy"]
        for policy in POLICIES:
            p = r[policy]
            threshold = "-" if policy == "full" else f"{p['threshold']:.4g}"
            layers = p["mean_layers"]
            layer_text = f"{layers:.2f}"
            saved = f"{100 * (1 - layers / num_layers):.1f}%"
            if policy == "confidence":
                layer_text += f" (runs {p['executed_layers']:.2f})"
                saved += f" (runs {100 * (1 - p['executed_layers'] / num_layers):.1f}%)"
            lines.append(f"| {split} | {policy} | {threshold} | {100 * p['accuracy']:.1f}% | "
                         f"{100 * (p['accuracy'] - full):+.1f} pt | {layer_text} | {saved} | "
                         f"{timing['generate/' + policy]:.2f}x | {timing['loop/' + policy]:.2f}x |")
        spec = results["timing"][split]
        lines.append(f"| {split} | self-speculative (exit {results['exit_layers'][0]} drafts) | - | "
                     f"{100 * spec['generated_accuracy']['generate/self_speculative']:.1f}% (timing subset) | "
                     f"{'identical to greedy' if spec['self_speculative_equals_greedy'] else 'DIFFERS from greedy'}"
                     f" | {num_layers} (verified) | - | "
                     f"{spec['wall_time_ratio']['generate/self_speculative']:.2f}x | - |")
    lines += ["", "Exit accuracy (teacher forced, exact for greedy):", "",
              "| split | " + " | ".join(f"exit {d}" for d in results["exit_layers"]) + " | oracle router |",
              "|---" * (len(results["exit_layers"]) + 2) + "|"]
    for split in SPLITS:
        r = results["splits"][split]
        lines.append(f"| {split} | " + " | ".join(f"{100 * a:.1f}%" for a in r["exit_accuracy"].values())
                     + f" | {100 * r['oracle']['accuracy']:.1f}% at {r['oracle']['mean_layers']:.2f} layers |")
    lines += ["", f"The estimator itself costs about {results['estimator_cost_in_layers']:.3f} of a decoder layer per "
              "token (not included in the layer counts above). Self-speculative decoding must give the same tokens as "
              "greedy full depth (checked on the timing questions); the answers here are 2-4 tokens long."]
    lines += ["", "Targets: easy >= 60% fewer layer computations within 1 pt of full-depth accuracy; hard within "
              "0.5 pt.", "", "| policy | easy layers saved | easy accuracy drop | hard accuracy drop | all met |",
              "|---|---|---|---|---|"]
    for policy, t in results["targets"].items():
        lines.append(f"| {policy} | {100 * t['easy_layer_reduction']:.1f}% | {100 * t['easy_accuracy_drop']:.2f} pt | "
                     f"{100 * t['hard_accuracy_drop']:.2f} pt | {'yes' if t['meets_all'] else 'no'} |")
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)



def check_bench_options(model_dir: str | os.PathLike, threshold_steps: int = 41, timing_examples: int = 150,
                        timing_rounds: int = 3, batch_size: int = 256, output_dir: str | os.PathLike | None = None
                        ) -> None:
    """Raise a ValueError naming the option and the fix if `bench_adaptive_depth` cannot run with these: a
    `model_dir` that is not a scripts/train_adaptive.py folder (a heldout.json with its test questions, a config.json
    of an adaptive-depth model), bad counts, or an `output_dir` the output-folder rule refuses (`check_output_dir`)."""
    from ...configuration import AdaptiveDepthConfig

    written_by = "train it with scripts/train_adaptive.py"
    if not (Path(model_dir) / "heldout.json").is_file():
        raise ValueError(f"--model_dir {model_dir} has no heldout.json; {written_by}.")
    for name, value, low in (("threshold_steps", threshold_steps, 2), ("timing_examples", timing_examples, 1),
                             ("timing_rounds", timing_rounds, 1), ("batch_size", batch_size, 1)):
        if value < low:
            raise ValueError(f"--{name} must be >= {low}, got {value}.")
    if output_dir is not None:
        check_output_dir(output_dir, BENCH_SCRIPT, inputs={"--model_dir": model_dir})
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"--model_dir {model_dir} has no config.json; {written_by}.")
    try:
        model_type = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"--model_dir {model_dir}: config.json is not a model config ({error}).") from None
    if model_type != AdaptiveDepthConfig.model_type:
        raise ValueError(f"--model_dir {model_dir} holds a {model_type!r} model, not an adaptive-depth one "
                         f"({AdaptiveDepthConfig.model_type!r}); {written_by}.")
    try:
        load_test_problems(model_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"--model_dir {model_dir}: heldout.json does not hold the test questions scripts/"
                         f"train_adaptive.py saves ({type(error).__name__}: {error}); {written_by}.") from None


BENCH_SCRIPT = "bench_adaptive.py"  # the writer named in the output folder's marker (`check_output_dir`)


def bench_adaptive_depth(model_dir: str | os.PathLike, output_dir: str | os.PathLike, threshold_steps: int = 41,
                         timing_examples: int = 150, timing_rounds: int = 3, batch_size: int = 256, seed: int = 0,
                         show_progress: bool = True) -> dict:
    """Measure the model in `model_dir` on its test questions, time `timing_examples` of them per split (a random
    subset, `seed`) in `timing_rounds` interleaved rounds, and write results.json, results.md and curves.png into
    `output_dir` atomically; returns the results. torch's thread count is the caller's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_bench_options(model_dir, threshold_steps, timing_examples, timing_rounds, batch_size, output_dir)
    problems = load_test_problems(model_dir)
    model_dir = Path(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    results = measure(model, tokenizer, problems, threshold_steps, batch_size, show_progress)
    results["model_dir"] = model_dir.as_posix()
    results["timing_rounds"] = timing_rounds
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
    results["environment"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "python": platform.python_version(), "threads": torch.get_num_threads(),
                              "machine": platform.machine()}
    results["arguments"] = {"model_dir": model_dir.as_posix(), "output_dir": Path(output_dir).as_posix(),
                            "threshold_steps": threshold_steps, "timing_examples": timing_examples,
                            "timing_rounds": timing_rounds, "batch_size": batch_size, "seed": seed}
    atomic_save_pretrained(output_dir, extra_files={
        "results.json": json.dumps(results, indent=2),
        "results.md": markdown(results),
        "curves.png": plot_curves(results),
    }, keep=(), script=BENCH_SCRIPT)
    return results


__all__ = ["POLICIES", "TARGETS", "bench_adaptive_depth", "check_bench_options", "check_targets",
           "estimator_cost_in_layers", "load_test_problems", "markdown", "measure", "plot_curves", "time_policies"]
