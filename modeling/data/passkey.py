"""Passkey retrieval, the long-context probe of Landmark Attention and LongLoRA: a 5-digit number hidden in filler.

A prompt is

    <bos> There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz
    you about the important information there. The grass is green. The sky is blue. ... The pass key is 71432.
    Remember it. 71432 is the pass key. ... Here we go. There and back again. What is the pass key? The pass key is

and the model must continue with the digits `7 1 4 3 2`. The key line sits at a chosen depth of the filler (0.0:
right after the introduction, 1.0: right before the question).

Everything works on token ids of a tiny deterministic word-level tokenizer (`build_tokenizer`, from the `tokenizers`
library, saved with the model as a `PreTrainedTokenizerFast`): every word and punctuation mark is one token and
every digit is its own token, so a prompt of exactly `length` tokens is easy to build (`PasskeyTask.build`) and the
answer is exactly one token per digit.

`PasskeyCurriculum` and `CurriculumDataset` stream the training batches of `lightarch.training.passkey` (a length
curriculum, one length per batch); `lightarch.evaluation.passkey` measures accuracy by length x depth.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
# Distractors: other 5-digit numbers in the filler, in sentences of the filler's own words, so that retrieving the key
# means finding the number after "pass key", not copying the only digits in the prompt.
DISTRACTOR_LINES = ("The sky is {key}.", "The grass is {key}.", "The sun is {key}.")
QUESTION = "What is the pass key? The pass key is"
NUM_DIGITS = 5

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
DIGITS = tuple(str(d) for d in range(10))
_WORD_PATTERN = re.compile(r"\d|\w+|[^\w\s]")


def _words(text: str) -> list[str]:
    """How the tokenizer splits `text`: words, single punctuation marks and single digits."""
    return _WORD_PATTERN.findall(text)


def vocabulary() -> list[str]:
    """Special tokens, the ten digits, then every word / punctuation mark of the templates (sorted)."""
    words = set()
    for text in (INTRO, *FILLER_SENTENCES, KEY_LINE.format(key=""), QUESTION):
        words.update(_words(text))
    words -= set(DIGITS)
    return [*SPECIAL_TOKENS.values(), *DIGITS, *sorted(words)]


def build_tokenizer():
    """A `PreTrainedTokenizerFast`: word-level over `vocabulary()`, digits split one per token, `<bos>` prepended.

    `decode` joins tokens with spaces ("The pass key is 7 1 4 3 2 ."); `passkey_from_text` reads digits back.
    """
    from .tokenizers import word_level_tokenizer

    return word_level_tokenizer(vocabulary(), SPECIAL_TOKENS, whitespace="words", individual_digits=True,
                                model_max_length=1 << 30)


@dataclass
class PasskeyPrompt:
    """One prompt. `input_ids` has exactly the requested length and ends with the question; `answer_ids` are the
    digit tokens the model must generate next."""

    input_ids: list[int]
    answer_ids: list[int]
    passkey: str
    key_start: int  # index in input_ids of the key line's first token
    key_end: int  # index one past the key line's last token
    depth: float  # achieved depth: filler tokens before the key line / all filler tokens
    requested_depth: float


class PasskeyTask:
    """Builds passkey prompts of an exact token length at a chosen depth, and scores answers, for one tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        self.bos_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.intro_ids = ids(INTRO)
        self.sentence_ids = [ids(sentence) for sentence in FILLER_SENTENCES]
        self.question_ids = ids(QUESTION)
        self.digit_ids = [tokenizer.convert_tokens_to_ids(digit) for digit in DIGITS]
        if tokenizer.unk_token_id in {*self.intro_ids, *self.question_ids, *sum(self.sentence_ids, [])}:
            raise ValueError("The tokenizer does not cover the passkey templates; use passkey.build_tokenizer().")
        prefix, suffix = KEY_LINE.split("{key}", 1)[0], KEY_LINE.split("{key}", 1)[1]
        middle, end = suffix.split("{key}")
        self.key_parts = (ids(prefix), ids(middle), ids(end))
        self.key_line_length = sum(map(len, self.key_parts)) + 2 * NUM_DIGITS
        self.distractor_parts = [tuple(ids(part) for part in line.split("{key}")) for line in DISTRACTOR_LINES]

    @property
    def min_length(self) -> int:
        """The shortest prompt: bos, introduction, key line and question with no filler."""
        return len(self.bos_ids) + len(self.intro_ids) + self.key_line_length + len(self.question_ids)

    def random_passkey(self, rng: random.Random) -> str:
        return str(rng.randint(10 ** (NUM_DIGITS - 1), 10**NUM_DIGITS - 1))

    def key_line_ids(self, passkey: str) -> list[int]:
        digits = [self.digit_ids[int(d)] for d in passkey]
        prefix, middle, end = self.key_parts
        return prefix + digits + middle + digits + end

    def filler(self, num_tokens: int, first_sentence: int = 0) -> tuple[list[int], list[int]]:
        """`num_tokens` filler tokens cycling through the sentences from `first_sentence`, and the sentence
        boundaries (token offsets where a sentence starts, plus the end); the last sentence may be cut short."""
        tokens, boundaries, index = [], [0], first_sentence
        while len(tokens) < num_tokens:
            tokens.extend(self.sentence_ids[index % len(self.sentence_ids)])
            boundaries.append(min(len(tokens), num_tokens))
            index += 1
        return tokens[:num_tokens], boundaries

    def distractor_ids(self, number: str, template: int) -> list[int]:
        prefix, end = self.distractor_parts[template]
        return prefix + [self.digit_ids[int(d)] for d in number] + end

    def build(self, length: int, depth: float, passkey: str | None = None, rng: random.Random | None = None,
              first_sentence: int | None = None, distractors: int = 0) -> PasskeyPrompt:
        """A prompt of exactly `length` tokens with the key line at `depth` (0..1) of the filler.

        The key line starts at the sentence boundary nearest to `depth * filler_tokens`, so the achieved depth
        differs from the requested one by at most half a sentence (`PasskeyPrompt.depth` is the exact value).
        `rng` draws the passkey (when not given) and the first filler sentence (when not given). `distractors`
        other 5-digit numbers ("The sky is 40817.") go at sentence boundaries of the filler drawn by `rng`.
        """
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        if length < self.min_length:
            raise ValueError(f"A passkey prompt needs at least {self.min_length} tokens, got length={length}.")
        rng = rng or random.Random(0)
        passkey = passkey if passkey is not None else self.random_passkey(rng)
        if len(passkey) != NUM_DIGITS or not passkey.isdigit():
            raise ValueError(f"passkey must be {NUM_DIGITS} digits, got {passkey!r}")
        if first_sentence is None:
            first_sentence = rng.randrange(len(self.sentence_ids))
        if distractors < 0:
            raise ValueError(f"distractors must be >= 0, got {distractors}")
        distractor_lines = []
        for _ in range(distractors):
            number = passkey
            while number == passkey:
                number = self.random_passkey(rng)
            distractor_lines.append(self.distractor_ids(number, rng.randrange(len(self.distractor_parts))))
        budget = length - self.min_length - sum(map(len, distractor_lines))
        if budget < 0:
            raise ValueError(f"{distractors} distractors do not fit in a {length}-token prompt; use fewer or a longer "
                             "prompt.")
        filler, boundaries = self.filler(budget, first_sentence)
        split = min(boundaries, key=lambda b: (abs(b - depth * budget), b))
        key_line = self.key_line_ids(passkey)
        # (filler offset, is a distractor, tokens): at one offset the key line comes first
        inserts = [(rng.choice(boundaries), True, line) for line in distractor_lines] + [(split, False, key_line)]
        body, cursor, key_start = self.bos_ids + self.intro_ids, 0, None
        for offset, is_distractor, tokens in sorted(inserts, key=lambda insert: insert[:2]):
            body.extend(filler[cursor:offset])
            cursor = offset
            if not is_distractor:
                key_start = len(body)
            body.extend(tokens)
        input_ids = body + filler[cursor:] + self.question_ids
        assert len(input_ids) == length, (len(input_ids), length)
        return PasskeyPrompt(
            input_ids=input_ids,
            answer_ids=[self.digit_ids[int(d)] for d in passkey],
            passkey=passkey,
            key_start=key_start,
            key_end=key_start + len(key_line),
            depth=split / budget if budget else depth,
            requested_depth=depth,
        )

    def training_example(self, length: int, rng: random.Random, label_key_echo: bool = True,
                         edge_depth_fraction: float = 0.0, distractors: int = 0) -> dict[str, list[int]]:
        """`input_ids` = a prompt of `length - NUM_DIGITS` tokens + the answer digits; `labels` are -100 except on the
        answer digits (and, with `label_key_echo`, on the key's second occurrence inside the key line, a short-range
        copy that teaches the copying circuit early).

        The depth is uniform in [0, 1], except that a fraction `edge_depth_fraction` of the examples put the key at
        exactly 0.0 or 1.0 (half each): the two special cases (key right after the introduction; key right before the
        question, partly inside a small sliding window) that a uniform depth almost never produces. With `distractors`,
        each example hides 0..`distractors` other numbers in its filler (uniform, as many as fit)."""
        if rng.random() < edge_depth_fraction:
            depth = float(rng.random() < 0.5)
        else:
            depth = rng.random()
        count = 0
        if distractors:
            longest = max(len(prefix) + NUM_DIGITS + len(end) for prefix, end in self.distractor_parts)
            room = max(0, (length - NUM_DIGITS - self.min_length) // longest)
            count = rng.randint(0, min(distractors, room))
        prompt = self.build(length - NUM_DIGITS, depth, rng=rng, distractors=count)
        input_ids = prompt.input_ids + prompt.answer_ids
        labels = [-100] * len(prompt.input_ids) + prompt.answer_ids
        if label_key_echo:
            prefix, middle, _ = self.key_parts
            echo = prompt.key_start + len(prefix) + NUM_DIGITS + len(middle)
            labels[echo : echo + NUM_DIGITS] = input_ids[echo : echo + NUM_DIGITS]
        return {"input_ids": input_ids, "labels": labels}

    def passkey_from_ids(self, generated_ids) -> str:
        """The digits the model generated: the first `NUM_DIGITS` generated tokens, each mapped to its digit (a
        non-digit token becomes '?'), so only an exact match of all five digits equals the passkey."""
        lookup = {token: digit for digit, token in zip(DIGITS, self.digit_ids)}
        ids = generated_ids.tolist() if isinstance(generated_ids, torch.Tensor) else list(generated_ids)
        return "".join(lookup.get(int(token), "?") for token in ids[:NUM_DIGITS])


def passkey_from_text(text: str) -> str:
    """The digits at the start of a generated text, spaces ignored ("7 1 4 3 2 . Remember" -> "71432")."""
    match = re.match(r"\s*((?:\d\s*)+)", text)
    return re.sub(r"\s", "", match.group(1)) if match else ""


@dataclass(frozen=True)
class PasskeyCurriculum:
    """What the training stream generates: lengths, how they grow, and which tokens carry a loss.

    - `min_length` / `max_length`: the shortest / longest training example in tokens (prompt + answer);
    - `curriculum_fraction`: the longest length allowed grows linearly from `min_length` to `max_length` over this
      fraction of the batches; each batch's length is uniform between `min_length` and that cap, rounded to a
      multiple of `length_multiple`;
    - `tokens_per_batch`: a batch of length L holds max(1, tokens_per_batch // L) examples, so every step costs
      about the same;
    - `label_key_echo`, `edge_depth_fraction`, `distractors`: see `PasskeyTask.training_example`.
    """

    min_length: int = 96
    max_length: int = 256
    curriculum_fraction: float = 0.6
    length_multiple: int = 16
    tokens_per_batch: int = 2048
    label_key_echo: bool = True
    edge_depth_fraction: float = 0.2
    distractors: int = 4

    def __post_init__(self) -> None:
        if self.max_length < self.min_length:
            raise ValueError(f"--max_length ({self.max_length}) must be >= --min_length ({self.min_length}).")
        if not 0 < self.curriculum_fraction <= 1:
            raise ValueError(f"--curriculum_fraction must be in (0, 1], got {self.curriculum_fraction}.")
        if not 0 <= self.edge_depth_fraction <= 1:
            raise ValueError(f"--edge_depth_fraction must be in [0, 1], got {self.edge_depth_fraction}.")
        if self.length_multiple < 1 or self.tokens_per_batch < 1:
            raise ValueError("--length_multiple and --tokens_per_batch must be >= 1.")
        if self.distractors < 0:
            raise ValueError(f"--distractors must be >= 0 (0 = the classic passkey task), got {self.distractors}.")


class CurriculumDataset(torch.utils.data.IterableDataset):
    """Endless stream of whole batches (`input_ids`, `labels` of shape (B, L)), one length L per batch, following
    `curriculum` over `total_batches` batches; B = max(1, tokens_per_batch // L). Nothing is padded.

    Feed it to a DataLoader of batch size 1 with `collate_whole_batch`."""

    def __init__(self, task: PasskeyTask, curriculum: PasskeyCurriculum, total_batches: int, seed: int) -> None:
        shortest = task.min_length + NUM_DIGITS
        if curriculum.min_length < shortest:
            raise ValueError(f"--min_length must be >= {shortest} (introduction + key line + question + answer), got "
                             f"{curriculum.min_length}.")
        self.task, self.curriculum = task, curriculum
        self.total_batches, self.seed = max(1, total_batches), seed

    def length_cap(self, batch_index: int) -> int:
        """The longest length batch `batch_index` may have."""
        c = self.curriculum
        progress = min(1.0, batch_index / (self.total_batches * c.curriculum_fraction))
        return int(c.min_length + (c.max_length - c.min_length) * progress)

    def batch_length(self, batch_index: int, rng: random.Random) -> int:
        c = self.curriculum
        length = rng.randint(c.min_length, self.length_cap(batch_index))
        length = int(round(length / c.length_multiple)) * c.length_multiple
        return max(c.min_length, min(c.max_length, length))

    def __iter__(self):
        c, rng = self.curriculum, random.Random(self.seed)
        batch_index = 0
        while True:
            length = self.batch_length(batch_index, rng)
            examples = [self.task.training_example(length, rng, c.label_key_echo, c.edge_depth_fraction,
                                                   c.distractors)
                        for _ in range(max(1, c.tokens_per_batch // length))]
            yield {key: torch.tensor([example[key] for example in examples]) for key in ("input_ids", "labels")}
            batch_index += 1


def collate_whole_batch(features: list[dict]) -> dict:
    """The data stream yields whole batches; the DataLoader (batch size 1) wraps each in a list of one."""
    if len(features) != 1:
        raise ValueError("--per_device_train_batch_size must be 1: each streamed item is already a whole batch (set "
                         "--tokens_per_batch instead).")
    return features[0]
