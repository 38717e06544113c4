"""Rules engine: safety rules are data (JSON, or YAML when pyyaml is installed), validated on load and compiled once.

A rule file is ``{"lexicons": {name: [words]}, "rules": [rule, ...]}``; a rule is

    id              unique string, e.g. "en.violence.harm_person"
    category        one of CATEGORIES
    severity        "high" (blocks alone) or "low" (blocks only with the classifier's agreement; see SafetyFilter)
    language        "en" (keywords match on word boundaries) or "zh" (no word boundaries: substrings)
    explanation     one line, shown to the user when the rule decides
    keywords        phrases; a trailing "*" matches any word ending ("stab*"); spaces match any whitespace
    regexes         Python regular expressions (case-insensitive; no named groups)
    lexicons        names of file-level lexicons, each a list of keywords
    allow_contexts  keywords that, in the same sentence as the match, make it benign ("kill" + "process")
    negation        true: a negation cue just before the match ("never", "don't", 不, 避免) drops it
    roles           ["user", "assistant"] (default both): whose text the rule checks

Matching cost: one combined regular expression per (language, category), so a clean text costs a few regex scans
whatever the number of rules; only a suppressed match (allow-context / negation) tries the category's other patterns
at that position, so overlapping rules are still found.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

CATEGORIES = ("violence", "self_harm", "illegal_drugs", "sexual_minors", "hate", "privacy", "cybercrime", "medical",
              "sexual", "toxicity", "misinformation", "other")  # the last four: what the training data also labels
SEVERITIES = ("high", "low")
LANGUAGES = ("en", "zh")
ROLES = ("user", "assistant")
RULE_FIELDS = {"id", "category", "severity", "language", "explanation", "keywords", "regexes", "lexicons",
               "allow_contexts", "negation", "roles"}
NEGATION_CUES = {
    "en": re.compile(r"\b(?:not|never|no|don't|dont|doesn't|didn't|won't|wouldn't|shouldn't|can't|cannot|without|"
                     r"avoid|avoiding|prevent|preventing|against)\b(?:\W+\w+){0,2}\W*$", re.IGNORECASE),
    "zh": re.compile(r"(?:不|没有|没|别|不要|不会|防止|避免|预防|禁止|反对).{0,3}$"),
}
SENTENCE_END = re.compile(r"[.!?;\n。！？；]")
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


class RuleFileError(ValueError):
    """A rule file that cannot be used; the message names the file, the rule and the field (one line)."""


@dataclass(frozen=True)
class Rule:
    """One validated rule (see the module docstring for the fields)."""

    id: str
    category: str
    severity: str
    language: str
    explanation: str
    keywords: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    lexicons: tuple[str, ...] = ()
    allow_contexts: tuple[str, ...] = ()
    negation: bool = False
    roles: tuple[str, ...] = ROLES
    source: str = ""  # the file it came from


@dataclass(frozen=True)
class RuleMatch:
    """A rule that fired: which rule, where (character span into the checked text) and what it matched."""

    rule_id: str
    category: str
    severity: str
    span: tuple[int, int]
    text: str
    explanation: str


def keyword_regex(keyword: str, language: str) -> str:
    """A keyword as a regex: word-bounded in English, a plain substring in Chinese; "*" = any word ending."""
    star = keyword.endswith("*")
    words = keyword.rstrip("*").split()
    body = r"\s+".join(re.escape(w) for w in words) + (r"\w*" if star else "")
    if language == "zh":
        return body
    return rf"(?<!\w){body}(?!\w)"


def _fail(path: str, rule_id: str, field_name: str, problem: str) -> RuleFileError:
    return RuleFileError(f"{path}: rule {rule_id!r}: field {field_name!r}: {problem}")


def _string_list(value, path: str, rule_id: str, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _fail(path, rule_id, name, f"must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def read_rule_file(path: str | Path) -> dict:
    """Parse one rule file (.json, or .yaml / .yml when pyyaml is installed) into its raw dict."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as error:
                raise RuleFileError(f"{path}: YAML rule files need pyyaml (pip install pyyaml), or use .json") from error
            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise RuleFileError(f"{path}: unknown rule-file type {path.suffix!r}; use .json, .yaml or .yml")
    except (json.JSONDecodeError, ValueError) as error:
        if isinstance(error, RuleFileError):
            raise
        raise RuleFileError(f"{path}: rule 'n/a': field 'n/a': not valid {path.suffix[1:]}: "
                            f"{str(error).splitlines()[0]}") from None
    except Exception as error:  # yaml.YAMLError
        raise RuleFileError(f"{path}: rule 'n/a': field 'n/a': not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise RuleFileError(f"{path}: rule 'n/a': field 'rules': the file must be an object with a 'rules' list")
    return data


def parse_rules(data: dict, path: str = "<rules>") -> tuple[list[Rule], dict[str, tuple[str, ...]]]:
    """Validate a rule file's dict: returns its rules and lexicons, or raises RuleFileError naming the field."""
    lexicons = data.get("lexicons", {})
    if not isinstance(lexicons, dict):
        raise RuleFileError(f"{path}: rule 'n/a': field 'lexicons': must be an object name -> list of words")
    lexicons = {name: _string_list(words, path, f"lexicon:{name}", "lexicons") for name, words in lexicons.items()}
    rules = []
    for index, raw in enumerate(data["rules"]):
        rule_id = raw.get("id") if isinstance(raw, dict) else None
        if not isinstance(rule_id, str) or not rule_id.strip():
            raise _fail(path, f"#{index}", "id", "every rule needs a non-empty string id")
        unknown = set(raw) - RULE_FIELDS
        if unknown:
            raise _fail(path, rule_id, sorted(unknown)[0], f"unknown field; the fields are {sorted(RULE_FIELDS)}")
        for name, allowed in (("category", CATEGORIES), ("severity", SEVERITIES), ("language", LANGUAGES)):
            if raw.get(name) not in allowed:
                raise _fail(path, rule_id, name, f"{raw.get(name)!r} is not one of {', '.join(allowed)}")
        explanation = raw.get("explanation")
        if not isinstance(explanation, str) or not explanation.strip() or "\n" in explanation:
            raise _fail(path, rule_id, "explanation", "must be a non-empty one-line string")
        lists = {name: _string_list(raw.get(name, []), path, rule_id, name)
                 for name in ("keywords", "regexes", "lexicons", "allow_contexts")}
        if not (lists["keywords"] or lists["regexes"] or lists["lexicons"]):
            raise _fail(path, rule_id, "keywords", "a rule needs at least one of keywords, regexes, lexicons")
        for regex in lists["regexes"]:
            try:
                compiled = re.compile(regex)
            except re.error as error:
                raise _fail(path, rule_id, "regexes", f"{regex!r} does not compile: {error}") from None
            if compiled.groupindex:
                raise _fail(path, rule_id, "regexes", f"{regex!r} has named groups; use (?:...) instead")
        for name in lists["lexicons"]:
            if name not in lexicons:
                raise _fail(path, rule_id, "lexicons", f"no lexicon {name!r} in this file; it has {sorted(lexicons)}")
        negation = raw.get("negation", False)
        if not isinstance(negation, bool):
            raise _fail(path, rule_id, "negation", f"must be true or false, got {negation!r}")
        roles = _string_list(raw.get("roles", list(ROLES)), path, rule_id, "roles")
        if not roles or set(roles) - set(ROLES):
            raise _fail(path, rule_id, "roles", f"{list(roles)!r} must be a non-empty subset of {list(ROLES)}")
        rules.append(Rule(id=rule_id, category=raw["category"], severity=raw["severity"], language=raw["language"],
                          explanation=explanation.strip(), negation=negation, roles=roles, source=str(path), **lists))
    return rules, lexicons


def builtin_rule_files() -> list[Path]:
    """The rule files shipped with lightarch (`lightarch/safety/rules/*.json|yaml`), sorted by name."""
    folder = resources.files("lightarch.safety").joinpath("rules")
    return sorted(Path(str(p)) for p in folder.iterdir() if Path(str(p)).suffix in (".json", ".yaml", ".yml"))


class RuleEngine:
    """Rules from files, compiled once; `match(text, role)` returns every rule that fires, in text order."""

    def __init__(self, rules: Sequence[Rule], lexicons: dict[str, dict[str, tuple[str, ...]]] | None = None):
        """`lexicons`: per source file, name -> words (rules reference lexicons of their own file)."""
        seen: dict[str, Rule] = {}
        for rule in rules:
            if rule.id in seen:
                raise _fail(rule.source, rule.id, "id", f"duplicate id (also in {seen[rule.id].source})")
            seen[rule.id] = rule
        self.rules = list(rules)
        self._lexicons = lexicons or {}
        # (language, category) -> (combined regex, [(rule, compiled single pattern)] indexed by group number)
        self._groups: dict[tuple[str, str], tuple[re.Pattern, list[tuple[Rule, re.Pattern]]]] = {}
        self._allow: dict[str, re.Pattern | None] = {}
        buckets: dict[tuple[str, str], list[tuple[Rule, str]]] = {}
        for rule in self.rules:
            for regex in self._rule_patterns(rule):
                buckets.setdefault((rule.language, rule.category), []).append((rule, regex))
            self._allow[rule.id] = (re.compile("|".join(keyword_regex(k, rule.language) for k in rule.allow_contexts),
                                               re.IGNORECASE) if rule.allow_contexts else None)
        for key, entries in buckets.items():
            combined = "|".join(f"(?P<p{i}>{regex})" for i, (_, regex) in enumerate(entries))
            singles = [(rule, re.compile(regex, re.IGNORECASE)) for rule, regex in entries]
            self._groups[key] = (re.compile(combined, re.IGNORECASE), singles)

    def _rule_patterns(self, rule: Rule) -> list[str]:
        words = list(rule.keywords)
        for name in rule.lexicons:
            words.extend(self._lexicons.get(rule.source, {}).get(name, ()))
        patterns = list(rule.regexes)
        if words:  # one alternation for all keywords of the rule, longest first
            patterns.append("|".join(keyword_regex(w, rule.language) for w in sorted(set(words), key=len, reverse=True)))
        return [f"(?:{p})" for p in patterns]

    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> "RuleEngine":
        """Load, validate and compile rule files (a bad file raises RuleFileError naming file, rule and field)."""
        rules, lexicons = [], {}
        for path in paths:
            file_rules, file_lexicons = parse_rules(read_rule_file(path), str(path))
            rules.extend(file_rules)
            lexicons[str(path)] = file_lexicons
        return cls(rules, lexicons)

    @classmethod
    def builtin(cls) -> "RuleEngine":
        """The shipped English and Chinese rules."""
        return cls.from_files(builtin_rule_files())

    def to_file_data(self) -> dict[str, dict]:
        """The rules back as rule-file dicts, one per source file (what `save_pretrained` writes)."""
        files: dict[str, dict] = {}
        for rule in self.rules:
            data = files.setdefault(rule.source, {"lexicons": {k: list(v) for k, v in
                                                               self._lexicons.get(rule.source, {}).items()},
                                                  "rules": []})
            raw = {"id": rule.id, "category": rule.category, "severity": rule.severity, "language": rule.language,
                   "explanation": rule.explanation, "negation": rule.negation, "roles": list(rule.roles)}
            for name in ("keywords", "regexes", "lexicons", "allow_contexts"):
                if getattr(rule, name):
                    raw[name] = list(getattr(rule, name))
            data["rules"].append(raw)
        return files

    def _suppressed(self, rule: Rule, text: str, start: int, end: int) -> bool:
        """True when an allow-context shares the match's sentence, or (negation rules) a cue just precedes it."""
        allow = self._allow[rule.id]
        if allow is not None:
            left = max((m.end() for m in SENTENCE_END.finditer(text, 0, start)), default=0)
            right_match = SENTENCE_END.search(text, end)
            sentence = text[left: right_match.start() if right_match else len(text)]
            if allow.search(sentence):
                return True
        if rule.negation:
            before = text[max(0, start - 40): start]
            before = before[max((m.end() for m in SENTENCE_END.finditer(before)), default=0):]
            if NEGATION_CUES[rule.language].search(before):
                return True
        return False

    def match(self, text: str, role: str = "user") -> list[RuleMatch]:
        """Every rule firing on `text` for `role` (at most one match per rule: the first unsuppressed one)."""
        if role not in ROLES:
            raise ValueError(f"role={role!r}: use one of {', '.join(ROLES)}")
        languages = ("en", "zh") if CJK.search(text) else ("en",)
        found: dict[str, RuleMatch] = {}
        for (language, _category), (combined, singles) in self._groups.items():
            if language not in languages:
                continue
            for m in combined.finditer(text):
                candidates = [singles[int(m.lastgroup[1:])]]
                first = candidates[0][0]
                if role not in first.roles or first.id in found or self._suppressed(first, text, *m.span()):
                    # the combined regex reports one alternative per position: try the category's others here
                    candidates = singles
                for rule, single in candidates:
                    if role not in rule.roles or rule.id in found:
                        continue
                    hit = single.match(text, m.start())
                    if hit is None or hit.end() == hit.start() or self._suppressed(rule, text, *hit.span()):
                        continue
                    found[rule.id] = RuleMatch(rule.id, rule.category, rule.severity, hit.span(), hit.group(0),
                                               rule.explanation)
        return sorted(found.values(), key=lambda r: (r.span, r.rule_id))


def text_language(text: str) -> str:
    """"zh" when Chinese characters are at least as many as Latin words, else "en" (for the safe response)."""
    cjk = len(CJK.findall(text))
    latin = len(re.findall(r"[A-Za-z]+", text))
    return "zh" if cjk and cjk >= latin else "en"
