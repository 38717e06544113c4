#!/usr/bin/env python
"""Benchmark an adaptive-depth model (from scripts/train_adaptive.py) on its held-out easy / hard test questions.

For each split it reports, for full depth, the estimator policy (whole-input routing) and the confidence policy
(per-token early exit, CALM) side by side:

- exact-match accuracy and mean layers per token at the thresholds stored in the model's config (calibrated by the
  training script on separate calibration questions), and the change against full depth;
- the measured wall time of greedy `generate` one question at a time (batch 1), as a ratio to full depth, from
  interleaved rounds (median of the per-round ratios), and self-speculative decoding (`assistant_early_exit`) too;
- the accuracy-compute curve of both policies as the threshold moves (`curves.png`).

Accuracy and layers come from teacher-forced forwards, which are exact for greedy decoding (see
`lightarch.data.arithmetic`); the timed generations re-measure accuracy and must agree. For the confidence
policy two compute numbers are given: `mean_layers` (each token's own exit depth) and `executed_layers` (what a
batch-1 generation runs: the prompt's forward lasts until its deepest token leaves).

Targets (from the issue): easy split >= 60% fewer layer computations with accuracy within 1 point of full depth;
hard split accuracy within 0.5 point of full depth.

Writes results.json, results.md and curves.png into --output_dir (atomically: a temporary folder, then rename).

    python scripts/bench_adaptive.py                          # reads outputs/adaptive_depth
    python scripts/bench_adaptive.py --model_dir outputs/quick --timing_examples 50
"""

from __future__ import annotations

import json
import platform
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser


import lightarch  # noqa: E402,F401  (registers the lightarch Auto classes)
from lightarch.data.arithmetic import SPLITS, all_problems
from lightarch.evaluation.adaptive_depth import (
    confidence_operating_point,
    estimator_operating_point,
    exit_measurements,
    threshold_grid,
    time_generation,
    time_greedy_loop,
)
from lightarch.evaluation.plots import figure_to_png, pyplot  # noqa: E402
from lightarch.training.checkpoints import atomic_save_pretrained  # noqa: E402

TARGETS = {"easy_min_layer_reduction": 0.60, "easy_max_accuracy_drop": 0.01, "hard_max_accuracy_drop": 0.005}
POLICIES = ("full", "estimator", "confidence")


@dataclass
class BenchArguments:
    model_dir: str = field(default="outputs/adaptive_depth",
                           metadata={"help": "A folder written by scripts/train_adaptive.py (needs heldout.json)."})
    output_dir: str = field(default="outputs/bench_adaptive", metadata={"help": "Where results are written."})
    threshold_steps: int = field(default=41, metadata={"help": "Evenly spaced thresholds in [0, 1] for the curves "
                                                       "(plus a few between 0.9 and 0.99999)."})
    timing_examples: int = field(default=150, metadata={"help": "Questions per split timed with generate (batch 1)."})
    timing_rounds: int = field(default=3, metadata={"help": "Interleaved timing rounds; ratios use the median."})
    num_threads: int = field(default=1, metadata={"help": "torch threads (1 is steadiest on a shared CPU; 0: torch's "
                                                  "default)."})
    batch_size: int = field(default=256, metadata={"help": "Batch size of the teacher-forced measurements."})
    seed: int = field(default=0, metadata={"help": "Seed of the timing subset."})


def parse_args(argv: list[str] | None = None) -> BenchArguments:
    parser = HfArgumentParser(BenchArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if not (Path(args.model_dir) / "heldout.json").is_file():
        parser.error(f"--model_dir {args.model_dir} has no heldout.json; train it with scripts/train_adaptive.py.")
    for name, low in (("threshold_steps", 2), ("timing_examples", 1), ("timing_rounds", 1), ("batch_size", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(args, name)}.")
    if args.num_threads < 0:
        parser.error("--num_threads must be >= 0.")
    return args


def load_test_problems(model_dir: Path) -> dict[str, list]:
    heldout = json.loads((model_dir / "heldout.json").read_text())
    by_prompt = {p.prompt: p for split in SPLITS for p in all_problems(split)}
    return {split: [by_prompt[prompt] for prompt in heldout["test"][split]] for split in SPLITS}


def time_policies(model, tokenizer, subsets: dict[str, list], args: BenchArguments) -> dict:
    """Per split and variant: wall time of batch-1 greedy decoding, two ways, as a ratio to full depth.

    `generate`: the real API; `loop`: cached decoding calling forward directly, which leaves out generate's per-step
    bookkeeping. Self-speculative decoding exists only through generate. Every question is decoded by every variant
    back to back (order rotated), in `timing_rounds` rounds; each (question, variant) keeps its fastest round, the
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
        for round_index in range(args.timing_rounds):
            for q, problem in enumerate(tqdm(questions, desc=f"Timing {split}, round {round_index + 1}")):
                shift = (q + round_index) % len(variants)
                for mode, policy in variants[shift:] + variants[:shift]:
                    name = f"{mode}/{policy}"
                    if policy == "self_speculative":
                        result = _time_speculative(model, tokenizer, [problem], first_exit)
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


@torch.no_grad()
def _time_speculative(model, tokenizer, problems, early_exit: int) -> dict:
    """Self-speculative greedy decoding, batch 1; also checks it reproduces full-depth greedy output."""
    import time

    seconds, right, answers = 0.0, 0, []
    for problem in problems:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(list(problem.prompt))])
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             assistant_early_exit=early_exit, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        seconds += time.perf_counter() - start
        new = out[0, ids.shape[1]:].tolist()
        eos = tokenizer.eos_token_id
        right += int(eos in new and tokenizer.decode(new[: new.index(eos)]) == problem.answer)
        answers.append(new)
    return {"seconds": seconds, "accuracy": right / max(1, len(problems)), "answers": answers}


def measure(model, tokenizer, problems: dict[str, list], args: BenchArguments) -> dict:
    config = model.config
    exit_layers = list(config.exit_layers)
    num_layers = config.num_hidden_layers
    grid = sorted(set(threshold_grid(args.threshold_steps)) | {config.estimator_threshold,
                                                               config.confidence_threshold})
    measured = {s: exit_measurements(model, problems[s], tokenizer, args.batch_size) for s in SPLITS}
    results = {"exit_layers": exit_layers, "num_layers": num_layers, "splits": {},
               "estimator_cost_in_layers": estimator_cost_in_layers(model)}
    for split in SPLITS:
        m = measured[split]
        full_accuracy = m["correct"][:, -1].float().mean().item()
        estimator_curve = [estimator_operating_point(m, exit_layers, t) for t in grid]
        confidence_curve = [confidence_operating_point(model, problems[split], tokenizer, t, args.batch_size)
                            for t in tqdm(grid, desc=f"Confidence sweep ({split})")]
        estimator = estimator_operating_point(m, exit_layers, config.estimator_threshold)
        confidence = confidence_operating_point(model, problems[split], tokenizer, config.confidence_threshold,
                                                args.batch_size)
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model_dir = Path(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    problems = load_test_problems(model_dir)
    results = measure(model, tokenizer, problems, args)
    results["model_dir"] = model_dir.as_posix()
    results["timing_rounds"] = args.timing_rounds
    rng = random.Random(args.seed)
    subsets = {s: rng.sample(problems[s], min(args.timing_examples, len(problems[s]))) for s in SPLITS}
    results["timing"] = time_policies(model, tokenizer, subsets, args)
    for split in SPLITS:  # decoding must agree with the teacher-forced measurement on the same questions
        measured = exit_measurements(model, subsets[split], tokenizer, args.batch_size)
        forced = {
            "full": measured["correct"][:, -1].float().mean().item(),
            "estimator": estimator_operating_point(measured, model.config.exit_layers,
                                                   model.config.estimator_threshold)["accuracy"],
            "confidence": confidence_operating_point(model, subsets[split], tokenizer,
                                                     model.config.confidence_threshold, args.batch_size)["accuracy"],
        }
        generated = results["timing"][split]["generated_accuracy"]
        results["timing"][split]["teacher_forced_accuracy"] = forced
        forced_depth = estimator_operating_point(measured, model.config.exit_layers,
                                                 model.config.estimator_threshold)["mean_layers"]
        generated_depth = results["timing"][split]["mean_exit_layer_of_generated_tokens"]["estimator"]
        results["timing"][split]["teacher_forced_estimator_mean_layers"] = forced_depth
        same_accuracy = all(abs(generated[f"{mode}/{policy}"] - forced[policy]) < 0.5 / len(subsets[split])
                            for mode in ("generate", "loop") for policy in POLICIES)
        results["timing"][split]["decoding_agrees_with_teacher_forcing"] = (
            same_accuracy and abs(forced_depth - generated_depth) < 1e-6)
    results["targets"] = check_targets(results)
    results["environment"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "python": platform.python_version(), "threads": torch.get_num_threads(),
                              "machine": platform.machine()}
    results["arguments"] = asdict(args)
    atomic_save_pretrained(args.output_dir, extra_files={
        "results.json": json.dumps(results, indent=2),
        "results.md": markdown(results),
        "curves.png": plot_curves(results),
    })
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
