"""De-obfuscation views of a text, for checking prompts that hide their words (the red-team mutators' obfuscations):
homoglyphs folded to Latin, leetspeak undone, letter spacing collapsed, base64 payloads decoded, split payloads
joined. `DeobfuscatingFilter` wraps a SafetyFilter: a text is blocked when it, or any of its views, is blocked.

These are generic transforms of each attack family, written from the attack definitions, not fitted to any data
set; the red-team suite reports the filter with and without them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import unicodedata

from .filter import SafetyFilter, SafetyVerdict

# Cyrillic / Greek letters that render like Latin ones (Unicode confusables, the common subset)
CONFUSABLES = str.maketrans({
    "а": "a", "с": "c", "е": "e", "і": "i", "ј": "j", "о": "o", "р": "p", "ѕ": "s", "х": "x", "у": "y", "һ": "h",
    "ԁ": "d", "ԛ": "q", "ԝ": "w", "А": "A", "В": "B", "С": "C", "Е": "E", "Н": "H", "І": "I", "Ј": "J", "К": "K",
    "М": "M", "О": "O", "Р": "P", "Ѕ": "S", "Т": "T", "Х": "X", "У": "Y", "α": "a", "ο": "o", "ρ": "p", "ν": "v",
    "τ": "t", "υ": "u", "ι": "i", "κ": "k", "Α": "A", "Β": "B", "Ε": "E", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M",
    "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Χ": "X", "Υ": "Y", "Ζ": "Z"})
UNLEET = str.maketrans({"4": "a", "@": "a", "3": "e", "1": "i", "!": "i", "0": "o", "5": "s", "$": "s", "7": "t",
                        "8": "b", "9": "g"})
LEET_WORD = re.compile(r"(?<!\S)(?=\S*[A-Za-z])(?=\S*[0-9@$])[A-Za-z0-9@$!]+")
SPACED = re.compile(r"(?<!\S)(?:\S ){1,}\S(?!\S)")
LEET_ONLY = re.compile(r"(?<!\S)[0-9@$!]{1,3}(?!\S)")
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
QUOTED_PIECE = re.compile(r"""\b[A-Za-z_]\w*\s*=\s*(['"])(.*?)\1""")


def fold_homoglyphs(text: str) -> str:
    """NFKC (full-width forms) and Cyrillic / Greek look-alikes mapped to Latin letters."""
    return unicodedata.normalize("NFKC", text).translate(CONFUSABLES)


def undo_leetspeak(text: str) -> str:
    """Digits and symbols read as letters in words that mix them with letters ("b0mb", not "10 mg"); when two or
    more such words show the text is leetspeak, short all-digit words too ("1" -> "i", "47" -> "at")."""
    mixed = len(LEET_WORD.findall(text))
    text = LEET_WORD.sub(lambda m: m.group(0).translate(UNLEET), text)
    return LEET_ONLY.sub(lambda m: m.group(0).translate(UNLEET), text) if mixed >= 2 else text


def collapse_spacing(text: str) -> str:
    """Runs of single characters separated by single spaces joined into words ("b o m b" -> "bomb"), then wider
    gaps read as one space (the spacing mutator's word break)."""
    joined = SPACED.sub(lambda m: m.group(0).replace(" ", ""), text)
    return re.sub(r" {2,}", " ", joined) if joined != text else text


def decode_base64_runs(text: str) -> str:
    """The text of each base64 run of 16+ characters that decodes to printable UTF-8, alone (joined by spaces); ''
    when none does. Alone, because the payload is the hidden request: the instruction around it ("decode this and
    answer it") dilutes a classifier's score as any wrapper does (the split payload's view is alone too)."""
    decoded_runs = []
    for run in BASE64_RUN.findall(text):
        try:
            decoded = base64.b64decode(run + "=" * (-len(run) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if decoded.isprintable():
            decoded_runs.append(decoded)
    return " ".join(decoded_runs)


def join_split_payload(text: str) -> str:
    """Quoted pieces assigned to variables (a = 'How do', b = ' I ...') joined in order; '' when there are none."""
    pieces = [m.group(2) for m in QUOTED_PIECE.finditer(text)]
    return "".join(pieces) if len(pieces) >= 2 else ""


VIEWS = {"homoglyphs": fold_homoglyphs, "leetspeak": undo_leetspeak, "spacing": collapse_spacing,
         "base64": decode_base64_runs, "payload_split": join_split_payload}


def deobfuscated_views(text: str) -> list[tuple[str, str]]:
    """(transform name, view) for every transform that changes `text`, plus all of them chained ("all")."""
    views, chained = [], text
    for name, transform in VIEWS.items():
        view = transform(text)
        if view and view != text:
            views.append((name, view))
        if name != "payload_split":
            chained = transform(chained) or chained  # the base64 view is '' when nothing decodes
    if chained != text and all(chained != v for _, v in views):
        views.append(("all", chained))
    return views


class DeobfuscatingFilter(SafetyFilter):
    """A SafetyFilter that also checks the de-obfuscated views of a text (what `serve.py` screens with by default).

    It is a SafetyFilter over the same rules, classifier and thresholds as the one it wraps (shared, not copied), so
    it goes wherever one goes: `SafetyMiddleware` (prompts, buffered answers, the growing text of a streamed
    answer), `SafetyStoppingCriteria` / `SafetyStreamer` (partial answers, `use_classifier` included),
    `evaluate_filter`, `apply` and `safe_response`. `save_pretrained` writes the wrapped filter's folder (the
    views are a way of checking, not saved state); `from_pretrained` / `builtin` load one and wrap it."""

    def __init__(self, safety: SafetyFilter):
        if not isinstance(safety, SafetyFilter):
            raise TypeError(f"DeobfuscatingFilter(safety=...) takes a SafetyFilter, got {type(safety).__name__}")
        safety = safety.safety if isinstance(safety, DeobfuscatingFilter) else safety  # views once, not of views
        vars(self).update(vars(safety))  # engine, classifier, thresholds, policy: the same objects
        self.safety = safety

    def check(self, text: str, role: str = "user", use_classifier: bool = True) -> SafetyVerdict:
        """The verdict on `text`, or on the first view of it that is blocked (its explanation says which view)."""
        verdict = super().check(text, role, use_classifier)
        if not verdict.allowed:
            return verdict
        for name, view in deobfuscated_views(text):
            seen = super().check(view, role, use_classifier)
            if not seen.allowed:
                return dataclasses.replace(seen, explanation=f"{seen.explanation} (after undoing {name})")
        return verdict

    @classmethod
    def from_pretrained(cls, folder, classifier=None, classifier_backend: str = "auto",
                        num_threads: int = 0) -> "DeobfuscatingFilter":
        """`SafetyFilter.from_pretrained(...)` (same arguments), wrapped."""
        return cls(SafetyFilter.from_pretrained(folder, classifier, classifier_backend, num_threads))

    @classmethod
    def builtin(cls, classifier=None, **kwargs) -> "DeobfuscatingFilter":
        """`SafetyFilter.builtin(...)` (the shipped rules), wrapped."""
        return cls(SafetyFilter.builtin(classifier, **kwargs))
