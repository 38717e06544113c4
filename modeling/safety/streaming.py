"""Guarding generated output while it streams: stop `generate` at the first token whose partial text violates.

`SafetyStoppingCriteria` works for any batch: after every new token it decodes each row's continuation, checks it
with a SafetyFilter (role "assistant") and stops the row at its first violating token, recording that token's
position (`stopped_at`, 1-based) so that `tokens_shown = stopped_at - 1` tokens were safe to show.

`SafetyStreamer` is a transformers streamer (batch 1) that forwards text to `on_text` only for tokens that passed
the check, so a violating token is never shown; pass it with its criteria:

    guard = SafetyStreamer(safety_filter, tokenizer, on_text=print)
    model.generate(**inputs, streamer=guard, stopping_criteria=[guard.criteria])
    guard.tokens_shown, guard.verdict      # how many generated tokens the user saw; why it stopped (or None)

Both check each partial text once, whichever of the streamer and the criteria transformers calls first.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from .filter import SafetyFilter, SafetyVerdict


class SafetyStoppingCriteria(StoppingCriteria):
    """Stops each row of a generation at its first violating token (see the module docstring)."""

    def __init__(self, safety_filter: SafetyFilter, tokenizer, prompt_length: int | None = None,
                 role: str = "assistant", classifier_every: int = 1):
        """`prompt_length`: tokens of the (padded) prompt in `input_ids`; `classifier_every`: run the classifier on
        every n-th token only (the rules run on every token)."""
        if classifier_every < 1:
            raise ValueError(f"classifier_every={classifier_every}: must be >= 1")
        self.filter, self.tokenizer, self.role = safety_filter, tokenizer, role
        self.prompt_length = prompt_length
        self.classifier_every = classifier_every
        self.stopped_at: dict[int, int] = {}  # row -> 1-based position of its first violating generated token
        self.verdicts: dict[int, SafetyVerdict] = {}
        self._checked: dict[int, int] = {}  # row -> generated length already checked

    def check_row(self, row: int, generated: list[int]) -> SafetyVerdict | None:
        """The violating verdict of `row` (once found, it stays), checking the continuation `generated` once."""
        if row in self.verdicts or self._checked.get(row) == len(generated) or not generated:
            return self.verdicts.get(row)
        self._checked[row] = len(generated)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        verdict = self.filter.check(text, self.role, use_classifier=len(generated) % self.classifier_every == 0)
        if not verdict.allowed:
            self.verdicts[row], self.stopped_at[row] = verdict, len(generated)
        return self.verdicts.get(row)

    def tokens_shown(self, row: int = 0) -> int | None:
        """Generated tokens of `row` before its violating one, or None when the row never violated."""
        return self.stopped_at[row] - 1 if row in self.stopped_at else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None, **kwargs
                 ) -> torch.BoolTensor:
        if self.prompt_length is None:
            raise ValueError("SafetyStoppingCriteria(prompt_length=None): pass the prompt's token count (or use it "
                             "through SafetyStreamer, which learns it)")
        done = [self.check_row(row, ids[self.prompt_length:].tolist()) is not None
                for row, ids in enumerate(input_ids)]  # input_ids: (B, prompt + generated)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class SafetyStreamer(BaseStreamer):
    """A batch-1 streamer showing only checked tokens; `criteria` stops generation at the first violating one."""

    def __init__(self, safety_filter: SafetyFilter, tokenizer, on_text: Callable[[str], None] | None = None,
                 role: str = "assistant", classifier_every: int = 1):
        self.criteria = SafetyStoppingCriteria(safety_filter, tokenizer, None, role, classifier_every)
        self.tokenizer, self.on_text = tokenizer, on_text
        self.generated: list[int] = []
        self.shown_text = ""
        self.tokens_shown = 0

    @property
    def verdict(self) -> SafetyVerdict | None:
        """Why the stream stopped, or None if it never violated."""
        return self.criteria.verdicts.get(0)

    def put(self, value: torch.Tensor) -> None:
        """The prompt first (recorded, not shown), then each new token (shown only if its partial text passes)."""
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError(f"SafetyStreamer streams batch 1, got a batch of {value.shape[0]}; use "
                             "SafetyStoppingCriteria for batches")
        tokens = value.reshape(-1).tolist()
        if self.criteria.prompt_length is None:
            self.criteria.prompt_length = len(tokens)
            return
        if self.verdict is not None:
            return
        self.generated.extend(tokens)
        if self.criteria.check_row(0, self.generated) is not None:
            return
        self.tokens_shown = len(self.generated)
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # hold back an incomplete multi-byte character
            self._emit(text)

    def _emit(self, text: str) -> None:
        delta, self.shown_text = text[len(self.shown_text):], text
        if delta and self.on_text is not None:
            self.on_text(delta)

    def end(self) -> None:
        """Flush text held back for an incomplete character (only of tokens that passed)."""
        if self.tokens_shown:
            self._emit(self.tokenizer.decode(self.generated[:self.tokens_shown], skip_special_tokens=True))
