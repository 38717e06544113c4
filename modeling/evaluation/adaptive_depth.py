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
    probabilities `(N, num_exits)`, and the real token count `(N,)`."""
    model.eval()
    correct, probabilities, lengths = [], [], []
    for batch in _batches(problems, tokenizer, batch_size):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_exit_logits=True,
                    estimator_mask=batch["estimator_mask"], use_cache=False)
        correct.append(torch.stack([_answer_correct(l, batch["labels"]) for l in out.exit_logits], 1))
        probabilities.append(out.estimator_logits.float().softmax(-1))
        lengths.append(batch["attention_mask"].sum(1))
    return {"correct": torch.cat(correct), "probabilities": torch.cat(probabilities), "lengths": torch.cat(lengths)}


def estimator_operating_point(measured: dict[str, torch.Tensor], exit_layers: Sequence[int], threshold: float
                              ) -> dict[str, float]:
    """Accuracy and mean layers per token when each question is routed by the estimator at `threshold`."""
    from ..modeling_adaptive_depth import route_from_estimate

    route = route_from_estimate(measured["probabilities"].log(), threshold)
    correct = measured["correct"].gather(1, route[:, None]).squeeze(1)
    depth = torch.tensor(exit_layers, dtype=torch.float)[route]
    return {"threshold": threshold, "accuracy": correct.float().mean().item(), "mean_layers": depth.mean().item(),
            "route_histogram": torch.bincount(route, minlength=len(exit_layers)).tolist()}


@torch.no_grad()
def confidence_operating_point(model, problems: Sequence[Problem], tokenizer, threshold: float,
                               batch_size: int = 256) -> dict[str, float]:
    """Accuracy and layers under the per-token confidence policy at `threshold` (teacher forcing, exact for greedy).

    `mean_layers`: per token, the depth of its exit (what per-token exit can save at best). `executed_layers`: per
    token, the layers a batch-1 generation really runs: the prompt is one forward, which runs until its last token
    leaves, then each answer token its own depth (key/value filling of skipped layers not counted).
    """
    model.eval()
    correct, token_layers, executed = [], [], []
    for batch in _batches(problems, tokenizer, batch_size):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], exit_policy="confidence",
                    exit_threshold=threshold, use_cache=False)
        correct.append(_answer_correct(out.logits, batch["labels"]))
        mask = batch["attention_mask"].bool()
        depth = out.exit_layer.float()
        token_layers.append((depth * mask).sum(1) / mask.sum(1))
        prompt_mask = mask & (batch["labels"] == -100)
        prompt_len = prompt_mask.sum(1)
        # tokens fed during generation: the prompt, then every answer token except the final <eos>
        fed = mask.clone()
        last = mask.sum(1) - 1
        fed[torch.arange(len(last)), last] = False
        prompt_cost = depth.masked_fill(~prompt_mask, 0).amax(1) * prompt_len
        answer_cost = (depth * (fed & ~prompt_mask)).sum(1)
        executed.append((prompt_cost + answer_cost) / fed.sum(1))
    correct = torch.cat(correct)
    return {"threshold": threshold, "accuracy": correct.float().mean().item(),
            "mean_layers": torch.cat(token_layers).mean().item(), "executed_layers": torch.cat(executed).mean().item()}


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
    Falls back to the most accurate point."""
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
    """Per-exit accuracy, full-depth accuracy, the threshold sweeps of both policies and the chosen thresholds (the
    cheapest whose accuracy stays within the tolerance of full depth on both splits), on `problems` per split."""
    exit_layers = list(model.config.exit_layers)
    measured = {split: exit_measurements(model, problems[split], tokenizer) for split in SPLITS}
    full = {split: measured[split]["correct"][:, -1].float().mean().item() for split in SPLITS}
    tolerance = {"easy": easy_tolerance, "hard": hard_tolerance}
    grid = threshold_grid(threshold_steps)
    estimator_points = [
        {"threshold": t, **{s: estimator_operating_point(measured[s], exit_layers, t) for s in SPLITS}} for t in grid
    ]
    confidence_points = [
        {"threshold": t, **{s: confidence_operating_point(model, problems[s], tokenizer, t) for s in SPLITS}}
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
