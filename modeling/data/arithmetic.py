"""A generated question-answering suite with a labelled easy / hard split, the data of the adaptive-depth model
(`lightarch.training.adaptive_depth` trains on it, `lightarch.evaluation.adaptive_depth` measures on it).

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

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

from .tokenizers import word_level_tokenizer

OPERATORS = "+-*"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}  # ids 0-2
ALPHABET = "0123456789+-*="
SPLITS = ("easy", "hard")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: `<pad>`=0, `<bos>`=1, `<eos>`=2, then digits and `+-*=`; saved with the model.

    No `<unk>` (a character outside the alphabet is an error) and no `<bos>` added by encoding: `encode` builds the
    sequences. `decode` joins characters with nothing."""
    return word_level_tokenizer(ALPHABET, SPECIAL_TOKENS, pattern=".", add_bos=False, join_with="")


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


def sample_problems(count: int, hard_fraction: float, seed: int, exclude: set[str] | None = None,
                    hard_prompts: Sequence[str] | None = None) -> list[Problem]:
    """`count` random questions, a `hard_fraction` of them hard, none whose prompt is in `exclude`; the hard ones
    drawn from `hard_prompts` only when it is given."""
    rng = random.Random(seed)
    pools = {split: [p for p in all_problems(split) if not exclude or p.prompt not in exclude] for split in SPLITS}
    if hard_prompts is not None:
        allowed = set(hard_prompts)
        pools["hard"] = [p for p in pools["hard"] if p.prompt in allowed]
    return [rng.choice(pools["hard" if rng.random() < hard_fraction else "easy"]) for _ in range(count)]


@dataclass(frozen=True)
class SuiteSizes:
    """How many questions a run trains on and holds out.

    - `train_examples` generated training questions, a `hard_fraction` of them hard;
    - `heldout_hard` hard questions never trained on: the first `calibration_hard` calibrate the exit thresholds, the
      rest are the test set; of the 300 easy questions (all trained on), `calibration_easy` calibrate and the rest
      are the test set (1,000 each by default: the cheapest threshold within a 0.5-point budget on noisy calibration
      questions is an optimistic choice, and more calibration questions narrow the gap to new ones);
    - `estimator_hard` more hard questions held out of the backbone's training (phase 1) and used to train the
      estimator (phase 2): on them the exits fail as they fail on new questions, which the estimator must learn
      (on questions the backbone was trained on, every exit looks better than it is).
    """

    train_examples: int = 128_000
    hard_fraction: float = 0.6
    heldout_hard: int = 2000
    calibration_hard: int = 1000
    calibration_easy: int = 150
    estimator_hard: int = 1000

    def __post_init__(self) -> None:
        if self.train_examples < 1:
            raise ValueError(f"--train_examples must be >= 1, got {self.train_examples}.")
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise ValueError(f"--hard_fraction must be in [0, 1], got {self.hard_fraction}.")
        if not 1 <= self.calibration_hard < self.heldout_hard <= 4500:
            raise ValueError("--calibration_hard must be >= 1 and below --heldout_hard, which is at most 4500 (half "
                             f"the hard space); got {self.calibration_hard} and {self.heldout_hard}.")
        if not 0 <= self.estimator_hard <= 4500 - self.heldout_hard:
            raise ValueError(f"--estimator_hard must be in [0, 4500 - heldout_hard = {4500 - self.heldout_hard}] (half "
                             f"the hard space at most is held out), got {self.estimator_hard}.")
        if not 1 <= self.calibration_easy < 300:
            raise ValueError(f"--calibration_easy must be in [1, 299] (300 easy questions exist), got "
                             f"{self.calibration_easy}.")


def split_heldout(sizes: SuiteSizes, seed: int) -> dict[str, dict[str, list[str]]]:
    """`{"calibration" | "test": {"easy" | "hard": prompts}, "estimator": {"hard": prompts}}`. Hard ones are held out
    of the backbone's training; easy ones are all trained on (the space is small)."""
    rng = random.Random(seed + 1)
    hard = rng.sample([p.prompt for p in all_problems("hard")], sizes.heldout_hard + sizes.estimator_hard)
    easy = [p.prompt for p in all_problems("easy")]
    rng.shuffle(easy)
    return {
        "calibration": {"easy": easy[: sizes.calibration_easy], "hard": hard[: sizes.calibration_hard]},
        "test": {"easy": easy[sizes.calibration_easy :], "hard": hard[sizes.calibration_hard : sizes.heldout_hard]},
        "estimator": {"hard": hard[sizes.heldout_hard :]},
    }


def problems_from_prompts(prompts: dict[str, list[str]]) -> dict[str, list[Problem]]:
    """`{"easy" | "hard": prompts}` (one part of `split_heldout`, e.g. from a saved heldout.json) -> the problems."""
    by_prompt = {p.prompt: p for split in SPLITS for p in all_problems(split)}
    return {split: [by_prompt[prompt] for prompt in prompts[split]] for split in SPLITS}


def prompt_ids(problem: Problem, tokenizer) -> list[int]:
    """`<bos> prompt`: what a model is given to answer `problem`."""
    return [tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(list(problem.prompt))


def encode(problem: Problem, tokenizer) -> dict[str, list[int]]:
    """`<bos> prompt answer <eos>` with labels on the answer and `<eos>` only."""
    prompt = prompt_ids(problem, tokenizer)
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
    """Right-pads `input_ids` (pad id), `labels` (-100) and builds `attention_mask` and `prompt_mask` (the question:
    the model decides on it alone, as in `generate`)."""

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
        prompt_mask = attention_mask.bool() & (labels == -100)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "prompt_mask": prompt_mask}
