"""SafetyFilter: the rules engine and an optional classifier deciding jointly, with explained verdicts.

Policy (thresholds are per category and saved in the folder's `safety_config.json`):

1. A high-severity rule match blocks on its own.
2. A low-severity rule match blocks only when the classifier agrees: its score for the rule's category is at least
   `agree_thresholds[category]` (by default `agree_ratio` x the category's threshold). Without a classifier, a
   low-severity match is recorded in `flags` and the text is allowed (`low_severity_alone="flag"`), or blocks
   (`low_severity_alone="block"`), as configured.
3. The classifier alone blocks when a category's score is at least `thresholds[category]`.

A block of the medical category is a "refer" decision: the safe response points to a professional with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from .engine import CATEGORIES, CJK, ROLES, RuleEngine, RuleMatch, builtin_rule_files, text_language
from .responses import safe_response

CONFIG_NAME = "safety_config.json"
CLASSIFIER_DIR = "classifier"
# which safe response wins when several categories block (support for self-harm before a plain decline)
RESPONSE_PRIORITY = ("sexual_minors", "self_harm", "violence", "cybercrime", "illegal_drugs", "hate", "privacy",
                     "medical", "sexual", "toxicity", "misinformation", "other")
CATEGORY_NAMES_ZH = {"violence": "暴力与武器", "self_harm": "自伤", "illegal_drugs": "毒品", "sexual_minors": "涉及未成年人的色情",
                     "hate": "仇恨", "privacy": "隐私", "cybercrime": "网络犯罪", "medical": "医疗规范",
                     "sexual": "色情", "toxicity": "辱骂", "misinformation": "虚假信息", "other": "其他风险"}
DEFAULT_THRESHOLD = 0.5
# Chinese characters and CJK / full-width punctuation: what the Latin-script view of a mixed text leaves out
CJK_AND_PUNCTUATION = re.compile(r"[\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef]+")
MIN_LATIN_WORDS = 3  # a mixed text gets its Latin-script view scored too when it has at least this many Latin words


def classifier_views(text: str) -> list[str]:
    """The texts the classifier scores for `text` (its scores are the maximum over them): `text`, and when it mixes
    Chinese with at least `MIN_LATIN_WORDS` Latin-script words, its Latin-script part alone. The classifier is an
    English model: an English request inside Chinese text is otherwise scored diluted by characters it never
    learned, and gets through (measured on the validation split: 98% of harmful requests in a Chinese wrapper)."""
    if not CJK.search(text) or len(re.findall(r"[A-Za-z]+", text)) < MIN_LATIN_WORDS:
        return [text]
    return [text, re.sub(r"\s+", " ", CJK_AND_PUNCTUATION.sub(" ", text)).strip()]
CLASSIFIER_BACKENDS = ("auto", "torch", "onnx", "onnx_fp32", "onnx_int8")


class SafetyClassifierLike(Protocol):
    """What SafetyFilter needs of a classifier: per-category probabilities, and saving into a folder."""

    def predict(self, texts: Sequence[str]) -> list[dict[str, float]]: ...

    def save_pretrained(self, folder: str | Path) -> None: ...


@dataclass(frozen=True)
class Violation:
    """Why a text is (or could be) blocked: a rule (id + matched span) or the classifier (category + score)."""

    source: str  # "rule" or "classifier"
    category: str
    explanation: str
    rule_id: str | None = None
    span: tuple[int, int] | None = None
    text: str | None = None
    score: float | None = None
    severity: str | None = None

    def describe(self) -> str:
        """One line: 'rule en.x matched "kill my"' or 'classifier violence=0.93'."""
        if self.source == "rule":
            return f'rule {self.rule_id} matched "{self.text}" ({self.explanation})'
        return f"classifier {self.category}={self.score:.2f} ({self.explanation})"


@dataclass(frozen=True)
class SafetyVerdict:
    """The filter's decision on one text: `allowed`, `decision` ("allow" / "block" / "refer"), the deciding
    `violations`, unconfirmed low-severity `flags`, and a one-line `explanation`."""

    allowed: bool
    decision: str
    violations: tuple[Violation, ...]
    explanation: str
    category: str | None = None
    language: str = "en"
    flags: tuple[Violation, ...] = ()
    scores: dict[str, float] | None = None


def _rule_violation(match: RuleMatch) -> Violation:
    return Violation("rule", match.category, match.explanation, rule_id=match.rule_id, span=match.span,
                     text=match.text, severity=match.severity)


class SafetyFilter:
    """Rules + optional classifier; `check` explains, `apply` returns the text or a safe response."""

    def __init__(self, engine: RuleEngine | None = None, classifier: SafetyClassifierLike | None = None,
                 thresholds: dict[str, float] | None = None, agree_thresholds: dict[str, float] | None = None,
                 agree_ratio: float = 0.5, low_severity_alone: str = "flag"):
        """`thresholds`: classifier block threshold per category (missing ones: 0.5); `agree_thresholds`: the
        score at which the classifier confirms a low-severity rule (missing ones: agree_ratio x threshold)."""
        if low_severity_alone not in ("flag", "block"):
            raise ValueError(f"low_severity_alone={low_severity_alone!r}: use 'flag' or 'block'")
        for name, table in (("thresholds", thresholds or {}), ("agree_thresholds", agree_thresholds or {})):
            for category, value in table.items():
                if category not in CATEGORIES or not 0.0 <= float(value) <= 1.0:
                    raise ValueError(f"{name}[{category!r}]={value!r}: categories are {', '.join(CATEGORIES)}, "
                                     "values in [0, 1]")
        self.engine = engine if engine is not None else RuleEngine.builtin()
        self.classifier = classifier
        self.thresholds = {c: float((thresholds or {}).get(c, DEFAULT_THRESHOLD)) for c in CATEGORIES}
        self.agree_thresholds = {c: float((agree_thresholds or {}).get(c, agree_ratio * self.thresholds[c]))
                                 for c in CATEGORIES}
        self.low_severity_alone = low_severity_alone

    def _classifier_reason(self, category: str, score: float, language: str) -> str:
        if language == "zh":
            return f"分类器判定为{CATEGORY_NAMES_ZH.get(category, category)}（{score:.2f}）"
        return f"the classifier rates it {category.replace('_', ' ')} ({score:.2f})"

    def check(self, text: str, role: str = "user", use_classifier: bool = True) -> SafetyVerdict:
        """Decide on a prompt (`role="user"`) or an answer (`role="assistant"`) by the policy in the module doc."""
        if role not in ROLES:
            raise ValueError(f"role={role!r}: use one of {', '.join(ROLES)}")
        scores = None
        if use_classifier and self.classifier is not None:
            rows = self.classifier.predict(classifier_views(text))
            scores = {label: max(row[label] for row in rows) for label in rows[0]}
        return self.decide(text, scores, role)

    def decide(self, text: str, scores: dict[str, float] | None, role: str = "user") -> SafetyVerdict:
        """`check` with the classifier's {label: probability} for `text` given (None: rules only), so that the
        decisions of two classifiers (torch and ONNX) on the same texts can be compared without re-scoring."""
        if role not in ROLES:
            raise ValueError(f"role={role!r}: use one of {', '.join(ROLES)}")
        language = text_language(text)
        matches = self.engine.match(text, role)
        if scores is not None:
            scores = {c: float(s) for c, s in scores.items() if c in CATEGORIES}
        deciding, flags = [], []
        for match in matches:
            violation = _rule_violation(match)
            if match.severity == "high":
                deciding.append(violation)
            elif scores is not None:
                score = scores.get(match.category, 0.0)
                (deciding if score >= self.agree_thresholds[match.category] else flags).append(violation)
            else:
                (deciding if self.low_severity_alone == "block" else flags).append(violation)
        if scores is not None:
            ruled = {v.category for v in deciding}
            for category, score in sorted(scores.items(), key=lambda kv: -kv[1]):
                if score >= self.thresholds[category] and category not in ruled:
                    deciding.append(Violation("classifier", category, self._classifier_reason(category, score,
                                                                                              language), score=score))
        if not deciding:
            return SafetyVerdict(True, "allow", (), "allowed: no rule or classifier violation", None, language,
                                 tuple(flags), scores)
        category = min((v.category for v in deciding), key=RESPONSE_PRIORITY.index)
        lead = next(v for v in deciding if v.category == category)
        decision = "refer" if category == "medical" else "block"
        return SafetyVerdict(False, decision, tuple(deciding), f"{decision} ({category}): {lead.describe()}",
                             category, language, tuple(flags), scores)

    def safe_response(self, verdict: SafetyVerdict) -> str:
        """The category's safe text in the verdict's language, with the deciding reason inside."""
        lead = next(v for v in verdict.violations if v.category == verdict.category)
        return safe_response(verdict.category, lead.explanation, verdict.language)

    def apply(self, text: str, role: str = "user") -> str:
        """`text` itself when allowed, else the category's safe response in the language of `text`."""
        verdict = self.check(text, role)
        return text if verdict.allowed else self.safe_response(verdict)

    # ------------------------------------------------------------------ one folder: rules + thresholds + classifier
    def save_pretrained(self, folder: str | Path) -> None:
        """Write rules/*.json, safety_config.json (thresholds, policy) and classifier/ (when present)."""
        folder = Path(folder)
        (folder / "rules").mkdir(parents=True, exist_ok=True)
        names = []
        for index, (source, data) in enumerate(self.engine.to_file_data().items()):
            name = f"rules/{index:02d}_{Path(source).stem}.json"
            (folder / name).write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            names.append(name)
        config = {"format": "lightarch-safety-filter", "version": 1, "rule_files": names,
                  "thresholds": self.thresholds, "agree_thresholds": self.agree_thresholds,
                  "low_severity_alone": self.low_severity_alone, "policy": __doc__.split("Policy")[1].strip()}
        if self.classifier is not None:
            self.classifier.save_pretrained(folder / CLASSIFIER_DIR)
            config["classifier"] = CLASSIFIER_DIR
        (folder / CONFIG_NAME).write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, folder: str | Path, classifier: SafetyClassifierLike | None = None,
                        classifier_backend: str = "auto", num_threads: int = 0) -> "SafetyFilter":
        """Load a folder written by `save_pretrained` (the classifier too, unless one is passed).

        `classifier_backend`: "auto" runs the classifier in ONNX Runtime when its folder holds an ONNX export
        (`lightarch.safety.onnx_classifier`; the variant the export chose on the validation split) and in torch
        otherwise; "torch" forces torch; "onnx" / "onnx_fp32" / "onnx_int8" require the export (that variant).
        The thresholds are the folder's whichever runs. `num_threads`: ONNX Runtime intra-op threads (0: its
        default)."""
        if classifier_backend not in CLASSIFIER_BACKENDS:
            raise ValueError(f"classifier_backend={classifier_backend!r}: use one of {', '.join(CLASSIFIER_BACKENDS)}")
        folder = Path(folder)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing: folder={str(folder)!r} is not a saved SafetyFilter "
                                    "(SafetyFilter.save_pretrained writes it)")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        engine = RuleEngine.from_files([folder / name for name in config["rule_files"]])
        if classifier is None and config.get("classifier"):
            classifier = load_classifier(folder / config["classifier"], classifier_backend, num_threads)
        return cls(engine, classifier, config["thresholds"], config["agree_thresholds"],
                   low_severity_alone=config["low_severity_alone"])

    @classmethod
    def builtin(cls, classifier: SafetyClassifierLike | None = None, **kwargs) -> "SafetyFilter":
        """The shipped rules (`builtin_rule_files`), optionally with a classifier."""
        return cls(RuleEngine.from_files(builtin_rule_files()), classifier, **kwargs)


def load_classifier(folder: str | Path, backend: str = "auto", num_threads: int = 0) -> SafetyClassifierLike:
    """The classifier saved in `folder` (a filter's classifier/), run by `backend` (see `SafetyFilter.from_pretrained`)."""
    import logging

    from . import onnx_classifier
    from .onnx_classifier import OnnxSafetyClassifier, has_onnx_export

    folder = Path(folder)
    runtime = onnx_classifier.onnxruntime_available()
    exported = has_onnx_export(folder)
    if backend == "auto" and exported and not runtime:
        logging.getLogger(__name__).warning("%s has an ONNX export but onnxruntime is not installed (pip install "
                                            "'lightarch[deploy]'): the classifier runs in torch", folder)
    if backend == "torch" or (backend == "auto" and not (exported and runtime)):
        from .classifier import SafetyClassifier

        return SafetyClassifier.from_pretrained(folder)
    if not runtime:
        raise ImportError(f"classifier_backend={backend!r} needs onnxruntime: pip install 'lightarch[deploy]'")
    variant = backend.partition("_")[2] or None  # "onnx_int8" -> "int8"; "onnx" / "auto": the export's choice
    return OnnxSafetyClassifier.from_pretrained(folder, variant, num_threads)
