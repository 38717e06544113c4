"""Factual questions from WordNet that a reader answers from retrieved passages (issue 18's QA benchmark).

Knowledge base: one passage per synset of WordNet (`lightarch.data.tasks.wordnet_synsets`, Debian wordnet-base), e.g.
"The word that means a large breed having a smooth white coat with black or brown spots is dalmatian, coach dog,
carriage dog. A carriage dog is a kind of dog." (`passage_text`). It covers every synset, held-out ones included: a
reader that never saw a gloss in training answers its questions by reading the passage that retrieval brings.

Two question kinds (`QUESTION_KINDS`), each answered after a stem that restates it as the passages state facts
(`PROMPT_TEMPLATE`):

- `definition`: "What word means <gloss>?", stem "The word that means <gloss> is" -> any lemma of the synset (of
  every synset with that exact gloss);
- `hypernym`: "What is a <word>?", stem "A <word> is a kind of" -> any lemma of the synset's hypernym, asked about
  the lemma the passage lists last (the one its second sentence names); only for a noun synset with exactly one
  hypernym, no hyponym (no other passage says "... is a kind of <word>", which BM25 would rank above the word's own
  passage) and a lemma that names no other synset in WordNet (any part of speech), so the question has one answer.

Both kinds: only synsets whose passage has at most `max_passage_chars` characters (the reader's prompt keeps every
passage whole). A generated answer ends at the first separator (`answer_span`).

Split BY SYNSET (`is_heldout`, a hash of the synset's offset and part of speech, so it is the same on every machine):
a held-out synset's gloss never appears in training text, neither in a question nor in a passage of a training
context (training contexts are retrieved from `training_passages`, which lacks the held-out synsets). Synsets that
share a gloss with a held-out synset are held out with it.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .corpus import hash_fraction
from .tasks import WORDNET_DIR, wordnet_synsets

QUESTION_KINDS = ("definition", "hypernym")
# "Q" / "A" are single letters: BM25's tokenizer drops them from the query. The answer starts with a stem that
# restates the question the way the knowledge base's passages state facts ("The word that means <gloss> is", "A
# <word> is a kind of"), so the answer is what follows the same words in the gold passage: a copy a small reader
# trained from scratch learns in a few hundred steps (with a bare "A:" it had learned nothing in 1,955).
PROMPT_TEMPLATE = "Q: {question}\nA: {stem}"
ANSWER_END = re.compile(r"[,;\n]|\.(?:\s|$)")  # a generated answer ends at the passage's next separator
# Words of the question templates and passage format that BM25 must ignore besides English stopwords: in a query they
# would favour passages that happen to contain "what" or "means" over the one that defines the word asked about.
TEMPLATE_STOPWORDS = ("what", "word", "means", "kind")
MAX_PASSAGE_LEMMAS = 3  # lemmas listed in a passage (answers accept every lemma)
_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # adjective position markers of data.adj ("galore(ip)")


@dataclass(frozen=True)
class WordnetQASettings:
    """The split and knowledge-base settings: saved with a trained reader (results.json `qa_settings`) so that a
    fresh process rebuilds the same held-out questions and passages."""

    heldout_fraction: float = 0.05  # of synsets, by hash
    split_salt: str = "wordnet-qa"  # part of the hash: another salt, another split
    max_passage_chars: int = 260  # questions only about synsets whose passage is this short (~60 tokens), all of it
    wordnet_dir: str = WORDNET_DIR

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"--heldout_fraction must be in (0, 1), got {self.heldout_fraction}.")
        if self.max_passage_chars < 1:
            raise ValueError(f"--max_passage_chars must be >= 1, got {self.max_passage_chars}.")
        missing = [part for part in ("noun", "verb", "adj", "adv")
                   if not (Path(self.wordnet_dir) / f"data.{part}").is_file()]
        if missing:
            raise ValueError(f"--wordnet_dir {self.wordnet_dir}: no data.{missing[0]}; install Debian's wordnet-base "
                             "(apt-get install wordnet-base) or point it at a folder with WordNet's data files.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QAExample:
    """One question: its text, every accepted answer (the first is the one its gold passage states), its kind, its
    synset and the indices of its gold passages (the synset's, and for a definition those of every synset with the
    same gloss)."""

    question: str
    answers: tuple[str, ...]
    kind: str
    synset: str
    passages: tuple[int, ...]
    stem: str = ""  # the start of the answer, given in the prompt

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(question=self.question, stem=self.stem).rstrip()


@dataclass
class WordnetQA:
    """The knowledge base (every synset's passage, `synsets[i]` is passage i's synset key), which synsets are held
    out, and the questions of each split ("train", "heldout") by kind."""

    settings: WordnetQASettings
    passages: list[str]
    synsets: list[str]
    heldout: set[str]
    questions: dict[str, list[QAExample]] = field(default_factory=dict)

    def training_passages(self) -> list[str]:
        """The passages a training context may hold: those of synsets not held out."""
        return [p for p, key in zip(self.passages, self.synsets) if key not in self.heldout]


def retrieval_stopwords() -> list[str]:
    """bm25s's English stopwords plus `TEMPLATE_STOPWORDS`: the `stopwords` of the QA knowledge base's
    `BM25Retriever`."""
    from bm25s.stopwords import STOPWORDS_EN

    return sorted(set(STOPWORDS_EN) | set(TEMPLATE_STOPWORDS))


def synset_key(synset: dict) -> str:
    """"<offset>-<pos>", unique in WordNet (an offset is unique within one data file)."""
    return f"{synset['offset']}-{synset['pos']}"


def clean_lemma(lemma: str) -> str:
    """A lemma as text: underscores as spaces, without data.adj's position marker."""
    return _MARKER.sub("", lemma.replace("_", " ")).strip()


def normalize_answer(text: str) -> str:
    """What exact match compares: lower case, underscores as spaces, whitespace collapsed, final period dropped."""
    return " ".join(text.replace("_", " ").lower().split()).rstrip(".").strip()


def answer_span(generated: str) -> str:
    """The answer in a reader's generated text: up to the first separator a passage puts after a name (",", ";", a
    sentence's period, a newline)."""
    return ANSWER_END.split(generated.strip(), maxsplit=1)[0].strip()


def best_reference(prediction: str, answers: Sequence[str]) -> str:
    """The accepted answer equal to `prediction` after `normalize_answer`, else the first: any lemma counts, and the
    `exact_match` metric then compares one prediction with one reference."""
    wanted = normalize_answer(prediction)
    return next((a for a in answers if normalize_answer(a) == wanted), answers[0])


def is_heldout(key: str, settings: WordnetQASettings) -> bool:
    """Whether synset `key` is held out of training (deterministic on every machine)."""
    return hash_fraction(f"{settings.split_salt}:{key}") < settings.heldout_fraction


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _what_is(word: str) -> str:
    """"What is a dalmatian?", "What is an aplasia?", "What is Ascaphidae?" (no article before a name)."""
    return f"What is {word}?" if word[:1].isupper() else f"What is {_article(word)} {word}?"


def _kind_of(word: str) -> str:
    """"A dalmatian is a kind of", "An aplasia is a kind of", "Ascaphidae is a kind of": the hypernym answer's stem,
    and the start of a passage's second sentence."""
    return f"{word} is a kind of" if word[:1].isupper() else f"{_article(word).capitalize()} {word} is a kind of"


def _definition_stem(gloss: str) -> str:
    return f"The word that means {gloss} is"


def passage_text(lemmas: Sequence[str], gloss: str, hypernym: str | None = None) -> str:
    """"The word that means <gloss> is <lemma>, <lemma>. A <last lemma> is a kind of <hypernym>.", at most
    `MAX_PASSAGE_LEMMAS` lemmas. Each answer follows the words of its question's stem (`PROMPT_TEMPLATE`): a causal
    reader finds them in its context and copies what comes next."""
    names = ", ".join(lemmas[:MAX_PASSAGE_LEMMAS])
    text = f"{_definition_stem(gloss)} {names}."
    return f"{text} {_kind_of(lemmas[:MAX_PASSAGE_LEMMAS][-1])} {hypernym}." if hypernym else text


def build_wordnet_qa(settings: WordnetQASettings = WordnetQASettings()) -> WordnetQA:
    """The knowledge base, the split and every question of both splits (deterministic; ~117K passages)."""
    synsets = wordnet_synsets(settings.wordnet_dir)
    keys = [synset_key(s) for s in synsets]
    lemmas = {key: [clean_lemma(lemma) for lemma in s["lemmas"]] for key, s in zip(keys, synsets)}

    def hypernym_of(s: dict) -> str | None:
        pointers = s["hypernyms"]
        return f"{pointers[0][0]}-{pointers[0][1]}" if s["pos"] == "n" and len(pointers) == 1 else None

    passages = [passage_text(lemmas[key], s["gloss"], lemmas[h][0] if (h := hypernym_of(s)) in lemmas else None)
                for key, s in zip(keys, synsets)]

    # Held out by hash; a gloss shared with a held-out synset is held out with it (no held-out gloss in training).
    by_gloss: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(synsets):
        by_gloss[s["gloss"]].append(i)
    heldout = {key for key in keys if is_heldout(key, settings)}
    for members in by_gloss.values():
        if any(keys[i] in heldout for i in members):
            heldout.update(keys[i] for i in members)

    senses = Counter(normalize_answer(lemma) for key in keys for lemma in lemmas[key])
    has_hyponyms = {hypernym_of(s) for s in synsets}
    questions: dict[str, list[QAExample]] = {"train": [], "heldout": []}
    for i, (key, s) in enumerate(zip(keys, synsets)):
        split = "heldout" if key in heldout else "train"
        if len(passages[i]) > settings.max_passage_chars:  # its end would not fit the reader's passage budget
            continue
        if s["gloss"]:
            answers = tuple(dict.fromkeys(lemma for j in by_gloss[s["gloss"]] for lemma in lemmas[keys[j]]))
            if by_gloss[s["gloss"]][0] == i:  # one question per gloss
                questions[split].append(QAExample(f"What word means {s['gloss']}?", answers, "definition", key,
                                                  tuple(by_gloss[s["gloss"]]), _definition_stem(s["gloss"])))
        hypernym = hypernym_of(s)
        if hypernym in lemmas and key not in has_hyponyms:
            word = lemmas[key][:MAX_PASSAGE_LEMMAS][-1]  # the lemma of the passage's "... is a kind of"
            if senses[normalize_answer(word)] == 1:
                questions[split].append(QAExample(_what_is(word), tuple(lemmas[hypernym]),
                                                  "hypernym", key, (i,), _kind_of(word)))
    return WordnetQA(settings, passages, keys, heldout, questions)


__all__ = [
    "ANSWER_END",
    "MAX_PASSAGE_LEMMAS",
    "PROMPT_TEMPLATE",
    "QUESTION_KINDS",
    "TEMPLATE_STOPWORDS",
    "QAExample",
    "answer_span",
    "WordnetQA",
    "WordnetQASettings",
    "best_reference",
    "build_wordnet_qa",
    "clean_lemma",
    "is_heldout",
    "normalize_answer",
    "passage_text",
    "retrieval_stopwords",
    "synset_key",
]
