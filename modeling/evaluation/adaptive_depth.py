"""Measurements of an adaptive-depth model on the arithmetic suite (`lightarch.data.arithmetic`): accuracy and
layers per exit, the operating points of the estimator and confidence policies, threshold calibration, and the wall
time of batch-1 greedy decoding (`lightarch.evaluation.benchmarks.adaptive_depth` puts them together)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from ..data.arithmetic import SPLITS, PadCollator, Problem, encode, prompt_ids


def _batches(problems: Sequence[Problem], tokenizer, batch_size: int):
    collate = PadCollator(tokenizer.pad_token_id)
    for start in range(0, len(problems), batch_size):
        yield collate([encode(p, tokenizer) for p in problems[start : start + batch_size]])


def _answer_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B,) every labelled next token is the argmax."""
    shift = labels[:, 1:]
    mask = shift != -100
    return ((logits[:, :-1].argmax(-1) == shift) | ~mask).all(1)


@torch.no_grad()
def exit_measurements(model, problems: Sequence[Problem], tokenizer, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """One full-depth forward per batch: which exits answer each question right `(N, num_exits)`, the estimator's
    logits `(N, num_exits)` (read under `objective`, the model's `estimator_objective`), and the real token count
    `(N,)`."""
    model.eval()
    correct, logits, lengths = [], [], []
    for batch in _batches(problems, tokenizer, batch_size):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_exit_logits=True,
                    prompt_mask=batch["prompt_mask"], use_cache=False)
        correct.append(torch.stack([_answer_correct(l, batch["labels"]) for l in out.exit_logits], 1))
        logits.append(out.estimator_logits.float())
        lengths.append(batch["attention_mask"].sum(1))
    return {"correct": torch.cat(correct), "estimator_logits": torch.cat(logits), "lengths": torch.cat(lengths),
            "objective": model.config.estimator_objective}


# One-sided 90% normal quantile of the bound calibration reports beside each accuracy drop.
DROP_BOUND_Z = 1.2816


def accuracy_drop_bound(full_correct: torch.Tensor, policy_correct: torch.Tensor, z: float = DROP_BOUND_Z
                        ) -> dict[str, float]:
    """The accuracy a policy loses against full depth on the same questions, and a one-sided upper confidence bound
    on it from the paired per-question differences (normal approximation): what the drop may be on new questions.

    (N,) bool, (N,) bool -> {"accuracy_drop", "drop_upper_bound"}. No question answered differently: the bound is the
    drop itself (0)."""
    differences = full_correct.float() - policy_correct.float()  # 1: lost, -1: gained, 0: same
    n = max(1, differences.numel())
    drop = differences.mean().item() if differences.numel() else 0.0
    spread = differences.std(unbiased=False).item() if differences.numel() > 1 else 0.0
    return {"accuracy_drop": drop, "drop_upper_bound": drop + z * spread / math.sqrt(n)}


def estimator_operating_point(measured: dict[str, torch.Tensor], exit_layers: Sequence[int], threshold: float
                              ) -> dict[str, float]:
    """Accuracy, mean layers per token and the accuracy drop against full depth (with its upper bound,
    `accuracy_drop_bound`) when each question is routed by the estimator at `threshold`."""
    from ..modeling_adaptive_depth import route_from_estimate

    route = route_from_estimate(measured["estimator_logits"], threshold, measured["objective"])
    correct = measured["correct"].gather(1, route[:, None]).squeeze(1)
    depth = torch.tensor(exit_layers, dtype=torch.float)[route]
    return {"threshold": threshold, "accuracy": correct.float().mean().item(), "mean_layers": depth.mean().item(),
            "route_histogram": torch.bincount(route, minlength=len(exit_layers)).tolist(),
            **accuracy_drop_bound(measured["correct"][:, -1], correct)}


@torch.no_grad()
def confidence_operating_point(model, problems: Sequence[Problem], tokenizer, threshold: float,
                               batch_size: int = 256, full_correct: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy and layers under the per-token confidence policy at `threshold` (teacher forcing with the question as
    `prompt_mask`, exact for greedy decoding).

    Per token fed to a batch-1 generation (the question, then every answer token but the final `<eos>`):
    `executed_layers`, the layers run in full (the question's tokens leave with its last one, each answer token at
    its own exit), and `kv_filled_layers`, the deeper layers that only computed its key/value (two projections, a
    small fraction of a layer). `mean_layers`: the mean exit depth over all real tokens. Given `full_correct` (N,),
    full depth's correctness on the same questions, it adds the accuracy drop and its upper bound
    (`accuracy_drop_bound`).
    """
    model.eval()
    num_layers = model.config.num_hidden_layers
    correct, token_layers, executed, filled = [], [], [], []
    for batch in _batches(problems, tokenizer, batch_size):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], exit_policy="confidence",
                    exit_threshold=threshold, prompt_mask=batch["prompt_mask"], use_cache=False)
        correct.append(_answer_correct(out.logits, batch["labels"]))
        mask = batch["attention_mask"].bool()
        depth = out.exit_layer.float()
        token_layers.append((depth * mask).sum(1) / mask.sum(1))
        fed = mask.clone()  # the tokens a generation feeds: all but the final <eos>
        fed[torch.arange(len(fed)), mask.sum(1) - 1] = False
        count = fed.sum(1)
        executed.append((depth * fed).sum(1) / count)
        filled.append(((num_layers - depth) * fed).sum(1) / count)
    correct = torch.cat(correct)
    point = {"threshold": threshold, "accuracy": correct.float().mean().item(),
             "mean_layers": torch.cat(token_layers).mean().item(), "executed_layers": torch.cat(executed).mean().item(),
             "kv_filled_layers": torch.cat(filled).mean().item()}
    if full_correct is not None:
        point.update(accuracy_drop_bound(full_correct, correct))
    return point


@torch.no_grad()
def time_generation(model, problems: Sequence[Problem], tokenizer, policy: str, threshold: float | None,
                    max_new_tokens: int = 5) -> dict[str, float]:
    """Greedy `generate` one question at a time (batch 1, the latency setting): seconds, accuracy, mean exit depth."""
    model.eval()
    seconds, right, depths, answers = 0.0, 0, [], []
    for problem in problems:
        input_ids = torch.tensor([prompt_ids(problem, tokenizer)])
        start = time.perf_counter()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, exit_policy=policy, exit_threshold=threshold,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        seconds += time.perf_counter() - start
        new = out.sequences[0, input_ids.shape[1]:].tolist()
        right += _answers_right(new, problem, tokenizer)
        depths.extend(out.exit_layers[0].tolist())
        answers.append(new)
    return {"seconds": seconds, "accuracy": right / max(1, len(problems)),
            "mean_exit_layer": sum(depths) / max(1, len(depths)), "answers": answers}


@torch.no_grad()
def time_greedy_loop(model, problems: Sequence[Problem], tokenizer, policy: str, threshold: float | None,
                     max_new_tokens: int = 5) -> dict[str, float]:
    """Greedy cached decoding calling `forward` directly, one question at a time: the model's own time, without
    `generate`'s per-step machinery (logits processors, stopping criteria, kwargs bookkeeping)."""
    model.eval()
    seconds, right = 0.0, 0
    eos = tokenizer.eos_token_id
    for problem in problems:
        input_ids = torch.tensor([prompt_ids(problem, tokenizer)])
        start = time.perf_counter()
        out = model(input_ids, exit_policy=policy, exit_threshold=threshold, use_cache=True, logits_to_keep=1)
        route, new = out.exit_route, []
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            new.append(token)
            if token == eos or len(new) == max_new_tokens:
                break
            out = model(torch.tensor([[token]]), cache=out.cache, exit_policy=policy, exit_threshold=threshold,
                        exit_route=route, use_cache=True, logits_to_keep=1)
        seconds += time.perf_counter() - start
        right += _answers_right(new, problem, tokenizer)
    return {"seconds": seconds, "accuracy": right / max(1, len(problems))}


@torch.no_grad()
def time_self_speculative(model, problems: Sequence[Problem], tokenizer, early_exit: int,
                          max_new_tokens: int = 5) -> dict:
    """Self-speculative greedy `generate` (`assistant_early_exit`: exit `early_exit` drafts, full depth verifies),
    one question at a time: seconds, accuracy, and the generated tokens (they must equal full-depth greedy's)."""
    model.eval()
    seconds, right, answers = 0.0, 0, []
    for problem in problems:
        input_ids = torch.tensor([prompt_ids(problem, tokenizer)])
        start = time.perf_counter()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, assistant_early_exit=early_exit, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        seconds += time.perf_counter() - start
        new = out[0, input_ids.shape[1]:].tolist()
        right += _answers_right(new, problem, tokenizer)
        answers.append(new)
    return {"seconds": seconds, "accuracy": right / max(1, len(problems)), "answers": answers}


def _answers_right(new_tokens: list[int], problem: Problem, tokenizer) -> bool:
    """Whether generated tokens are the answer followed by `<eos>`."""
    eos = tokenizer.eos_token_id
    return eos in new_tokens and tokenizer.decode(new_tokens[: new_tokens.index(eos)]) == problem.answer


def choose_threshold(points: Sequence[dict], full_accuracy: dict[str, float], tolerance: dict[str, float]) -> dict:
    """The operating point with the fewest layers (summed over splits) whose accuracy stays within `tolerance` of
    full depth on every split; `points` hold per-split results `{"easy": {...}, "hard": {...}, "threshold": t}`.
    Falls back to the most accurate point.

    The points also carry `drop_upper_bound` (`accuracy_drop_bound`), reported but not used here: on 500
    calibration questions a 90% bound below 0.5 point admits at most one changed answer, which pushes the
    thresholds to 1 and saves nothing."""
    admissible = [p for p in points
                  if all(p[s]["accuracy"] >= full_accuracy[s] - tolerance[s] - 1e-9 for s in full_accuracy)]
    if admissible:
        return min(admissible, key=lambda p: (sum(p[s]["mean_layers"] for s in full_accuracy), -p["threshold"]))
    return max(points, key=lambda p: (sum(p[s]["accuracy"] for s in full_accuracy), p["threshold"]))


def threshold_grid(steps: int = 41) -> list[float]:
    """Thresholds from 0 to 1, denser near 1 where routing and confidence decisions are most sensitive."""
    values = {round(i / (steps - 1), 4) for i in range(steps)}
    values |= {round(1 - 10 ** (-k / 4), 6) for k in range(4, 21, max(1, 40 // steps))}  # 0.9 ... 0.99999
    return sorted(v for v in values if 0.0 <= v <= 1.0 and not math.isnan(v))


def calibrate(model, tokenizer, problems: dict[str, list[Problem]], easy_tolerance: float, hard_tolerance: float,
              threshold_steps: int = 41) -> dict:
    """Per-exit accuracy, full-depth accuracy, the threshold sweeps of both policies (each point with its accuracy
    drop and that drop's 90% upper bound) and the chosen thresholds (the cheapest whose accuracy stays within the
    tolerance of full depth on both splits), on `problems` per split."""
    exit_layers = list(model.config.exit_layers)
    measured = {split: exit_measurements(model, problems[split], tokenizer) for split in SPLITS}
    full = {split: measured[split]["correct"][:, -1].float().mean().item() for split in SPLITS}
    tolerance = {"easy": easy_tolerance, "hard": hard_tolerance}
    grid = threshold_grid(threshold_steps)
    estimator_points = [
        {"threshold": t, **{s: estimator_operating_point(measured[s], exit_layers, t) for s in SPLITS}} for t in grid
    ]
    confidence_points = [
        {"threshold": t, **{s: confidence_operating_point(model, problems[s], tokenizer, t,
                                                          full_correct=measured[s]["correct"][:, -1]) for s in SPLITS}}
        for t in grid
    ]
    return {
        "exit_accuracy": {s: measured[s]["correct"].float().mean(0).tolist() for s in SPLITS},
        "full_accuracy": full,
        "estimator": choose_threshold(estimator_points, full, tolerance),
        "confidence": choose_threshold(confidence_points, full, tolerance),
        "estimator_sweep": estimator_points,
        "confidence_sweep": confidence_points,
    }
