"""Model cards: templates filled with measured results."""

from __future__ import annotations

import string
from importlib import resources

MODEL_CARD_TEMPLATES = ("adaptive_depth", "multimodal", "passkey", "sparse_moe")


def model_card_template(name: str) -> str:
    """The text of a shipped model-card template (`model_cards/<name>.md`, installed as `lightarch.model_cards`), so
    that a script run from an installed wheel finds it as well as one run from a checkout."""
    if name not in MODEL_CARD_TEMPLATES:
        raise ValueError(f"No model-card template {name!r}; lightarch ships {', '.join(MODEL_CARD_TEMPLATES)}.")
    return resources.files("lightarch.model_cards").joinpath(f"{name}.md").read_text(encoding="utf-8")


def format_seconds(seconds: float) -> str:
    """75.2 -> '1 min 15 s'."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def render_model_card(template: str, values: dict) -> str:
    """Fill a `string.Template` (`${name}` placeholders); a missing value raises KeyError naming it."""
    return string.Template(template).substitute({k: str(v) for k, v in values.items()})


def code_fence(text: str, language: str = "") -> str:
    """`text` in a Markdown code block whose fence is longer than any backtick run inside it."""
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"
