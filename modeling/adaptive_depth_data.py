"""A generated question-answering suite with a labelled easy / hard split, and the measurements of an adaptive-depth
model on it (used by `scripts/train_adaptive.py`, `scripts/bench_adaptive.py` and the tests).

- easy, one step: `a op b=` with single digits and op in + - * (300 distinct questions), e.g. `7*8=56`;
- hard, multi-step: `a op b op c=` with the usual precedence (9,000 questions), e.g. `7+2*3=13`.

Questions are characters, answers are decimal integers followed by `<eos>`; only the answer is trained (the prompt's
labels are -100). Hard evaluation questions are held out of training (`exclude=`); the easy space is small enough
that a model sees all of it, as a simple lookup.

Accuracy and depth are measured by teacher forcing, which is exact for greedy decoding: a route to exit `e` answers
right iff exit `e` predicts every answer token (and `<eos>`) given the right prefix; under the confidence policy a
forward over the whole sequence equals cached decoding (per-token exits and key/value filling depend on the prefix
only). Wall time is measured separately with `generate`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

OPERATORS = "+-*"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
ALPHABET = "0123456789+-*="
SPLITS = ("easy", "hard")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: `<pad>`=0, `<bos>`=1, `<eos>`=2, then digits and `+-*=`; saved with the model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + list(ALPHABET))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@dataclass(frozen=True)
class Problem:
    prompt: str  # "7+2*3="
    answer: str  # "13"
    split: str  # "easy" | "hard"


def _problem(operands: Sequence[int], operators: Sequence[str], split: str) -> Problem:
    expression = "".join(f"{a}{op}" for a, op in zip(operands, operators)) + str(operands[-1])
    return Problem(expression + "=", str(eval(expression)), split)  # digits and + - * only


def all_problems(split: str) -> list[Problem]:
    """Every distinct question of a split (300 easy, 9,000 hard)."""
    digits = range(10)
    if split == "easy":
        return [_problem((a, b), (op,), "easy") for a in digits for b in digits for op in OPERATORS]
    if split == "hard":
        return [_problem((a, b, c), (op1, op2), "hard") for a in digits for b in digits for c in digits
                for op1 in OPERATORS for op2 in OPERATORS]
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def sample_problems(count: int, hard_fraction: float, seed: int, exclude: set[str] | None = None) -> list[Problem]:
    """`count` random questions, a `hard_fraction` of them hard, none whose prompt is in `exclude`."""
    rng = random.Random(seed)
    pools = {split: [p for p in all_problems(split) if not exclude or p.prompt not in exclude] for split in SPLITS}
    return [rng.choice(pools["hard" if rng.random() < hard_fraction else "easy"]) for _ in range(count)]


def heldout_problems(per_split: int, seed: int) -> dict[str, list[Problem]]:
    """Evaluation questions per split, distinct within a split (hard ones are then excluded from training)."""
    rng = random.Random(seed)
    chosen = {}
    for split in SPLITS:
        pool = all_problems(split)
        chosen[split] = rng.sample(pool, min(per_split, len(pool)))
    return chosen


def encode(problem: Problem, tokenizer) -> dict[str, list[int]]:
    """`<bos> prompt answer <eos>` with labels on the answer and `<eos>` only."""
    prompt = [tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(list(problem.prompt))
    answer = tokenizer.convert_tokens_to_ids(list(problem.answer)) + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


class ProblemDataset(torch.utils.data.Dataset):
    def __init__(self, problems: Sequence[Problem], tokenizer) -> None:
        self.problems = list(problems)
        self.examples = [encode(p, tokenizer) for p in self.problems]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


class PadCollator:
    """Right-pads `input_ids` (pad id), `labels` (-100) and builds `attention_mask` and `estimator_mask` (the prompt:
    the estimator routes on the question alone, as in `generate`)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            attention_mask[i, :n] = 1
        estimator_mask = attention_mask.bool() & (labels == -100)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "estimator_mask": estimator_mask}


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
    from .modeling_adaptive_depth import route_from_estimate

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
        ids = [tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(list(problem.prompt))
        input_ids = torch.tensor([ids])
        start = time.perf_counter()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, exit_policy=policy, exit_threshold=threshold,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        seconds += time.perf_counter() - start
        new = out.sequences[0, len(ids):].tolist()
        text = tokenizer.decode(new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new)
        right += int(text == problem.answer and tokenizer.eos_token_id in new)
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
        input_ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(list(problem.prompt))])
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
        right += int(eos in new and tokenizer.decode(new[: new.index(eos)]) == problem.answer)
    return {"seconds": seconds, "accuracy": right / max(1, len(problems))}


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


__all__ = [
    "PadCollator",
    "Problem",
    "ProblemDataset",
    "SPLITS",
    "all_problems",
    "build_tokenizer",
    "choose_threshold",
    "confidence_operating_point",
    "encode",
    "estimator_operating_point",
    "exit_measurements",
    "heldout_problems",
    "sample_problems",
    "threshold_grid",
    "time_generation",
    "time_greedy_loop",
]
