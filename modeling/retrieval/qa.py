"""Factual QA with retrieved context (issue 18): a reader answers held-out WordNet questions
(`lightarch.data.wordnet_qa`) greedily, with BM25 passages prepended by In-Context RALM (`generate_with_context`) and
without any (the same model, the same prompt after `<bos>`); exact match through the `exact_match` metric module
(any accepted answer counts, `normalize_answer` on both sides), recall@k of the gold passage through
`retrieval_recall` (the ceiling of the with-retrieval exact match), both per question kind.

`QAReaderSettings` is what a saved reader needs to be evaluated again in a fresh process (the split, the knowledge
base and the prompt layout); the training recipe saves it as `qa_settings.json` beside the model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.wordnet_qa import (
    QUESTION_KINDS,
    QAExample,
    WordnetQA,
    WordnetQASettings,
    answer_span,
    best_reference,
    normalize_answer,
    retrieval_stopwords,
)
from ..evaluation.metrics import load_metric
from .context import BM25Retriever, RalmConfig, generate_with_context

SETTINGS_FILE = "qa_settings.json"


@dataclass(frozen=True)
class QAReaderSettings:
    """The knowledge base and split (`data`), the passages per prompt and their truncation: what training used
    and evaluation must use again."""

    data: WordnetQASettings = field(default_factory=WordnetQASettings)
    num_passages: int = 3
    max_passage_tokens: int = 96  # a question's own passage (<= max_passage_chars) fits whole
    max_answer_tokens: int = 16

    def __post_init__(self) -> None:
        for name in ("num_passages", "max_passage_tokens", "max_answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")

    def ralm_config(self) -> RalmConfig:
        """One retrieval per answer (stride = the answer budget) whose query is the whole question."""
        return RalmConfig(num_passages=self.num_passages, stride=self.max_answer_tokens, query_tokens=4096,
                          lookahead=1, max_passage_tokens=self.max_passage_tokens, separator="\n")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> QAReaderSettings:
        values = dict(values)
        return cls(data=WordnetQASettings(**values.pop("data", {})), **values)

    @classmethod
    def from_folder(cls, folder: str | Path) -> QAReaderSettings:
        """The settings a trained reader's folder holds; FileNotFoundError names the file when it has none."""
        path = Path(folder) / SETTINGS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--model_dir {folder}: no {SETTINGS_FILE}; it is not a folder written by "
                                    "scripts/train_retrieval_qa.py.")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def context_input_ids(tokenizer, passages: Sequence[str], prompt: str, max_passage_tokens: int,
                      separator: str = "\n") -> list[int]:
    """`<bos>` + each passage (truncated to `max_passage_tokens`) + separator, then the prompt: the token layout
    `generate_with_context` builds, so that training and evaluation see the same sequences; no passages is the
    no-retrieval prompt."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    for passage in passages:
        ids += tokenizer(passage, add_special_tokens=False)["input_ids"][:max_passage_tokens] + separator_ids
    return ids + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def sample_questions(questions: Sequence[QAExample], per_kind: int | None, seed: int = 0) -> list[QAExample]:
    """Up to `per_kind` questions of each kind (a seeded sample; None: all), kinds in `QUESTION_KINDS` order."""
    chosen = []
    for kind in QUESTION_KINDS:
        of_kind = [q for q in questions if q.kind == kind]
        if per_kind is not None and per_kind < len(of_kind):
            of_kind = random.Random(f"{seed}:{kind}").sample(of_kind, per_kind)
        chosen += of_kind
    return chosen


def qa_retriever(qa: WordnetQA) -> BM25Retriever:
    """BM25 over the whole knowledge base (held-out synsets included), template words ignored."""
    return BM25Retriever(qa.passages, stopwords=retrieval_stopwords())


@torch.no_grad()
def answer_without_context(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy answer to `prompt` after `<bos>` alone (the no-retrieval baseline: no passage at all)."""
    ids = torch.tensor([context_input_ids(tokenizer, [], prompt, 1)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def evaluate_qa(model, tokenizer, qa: WordnetQA, settings: QAReaderSettings, questions: Sequence[QAExample],
                retriever=None, show_progress: bool = True) -> dict:
    """Answer every question with and without retrieval; returns per kind and overall: `em_with_retrieval`,
    `em_without_retrieval`, `recall_at_k` (gold passage among the `num_passages` retrieved), `count`, and the
    `factual_accuracy` (overall with-retrieval exact match) plus a few `examples`."""
    from tqdm.auto import tqdm

    if not questions:
        raise ValueError("questions is empty: the split has no held-out question (raise --heldout_fraction).")
    model.eval()
    retriever = retriever or qa_retriever(qa)
    where: dict[str, set[int]] = {}
    for i, passage in enumerate(qa.passages):
        where.setdefault(passage, set()).add(i)
    em, recall = load_metric("exact_match"), load_metric("retrieval_recall")
    rows = []
    for q in tqdm(questions, desc="QA (with / without retrieval)", disable=not show_progress):
        out = generate_with_context(model, tokenizer, q.prompt, retriever, settings.max_answer_tokens,
                                    settings.ralm_config(), overlap=False)
        with_context = answer_span(out.text)
        without = answer_span(answer_without_context(model, tokenizer, q.prompt, settings.max_answer_tokens))
        ranked = [min(where[p] & set(q.passages) or where[p]) for p in out.passages[0]]
        gold = next((i for i in ranked if i in q.passages), q.passages[0])
        rows.append({"kind": q.kind, "question": q.question, "answers": list(q.answers), "with": with_context,
                     "without": without, "ranked": ranked, "gold": gold})

    def scores(selected: list[dict]) -> dict:
        def exact(key: str) -> float:
            return em.compute(predictions=[normalize_answer(r[key]) for r in selected],
                              references=[normalize_answer(best_reference(r[key], r["answers"])) for r in selected]
                              )["exact_match"]

        rank = recall.compute(predictions=[r["ranked"] for r in selected], references=[r["gold"] for r in selected],
                              k=settings.num_passages)
        return {"count": len(selected), "em_with_retrieval": exact("with"), "em_without_retrieval": exact("without"),
                f"recall_at_{settings.num_passages}": rank[f"recall@{settings.num_passages}"],
                "recall_at_1": recall.compute(predictions=[r["ranked"] for r in selected],
                                              references=[r["gold"] for r in selected], k=1)["recall@1"]}

    kinds = {kind: scores([r for r in rows if r["kind"] == kind]) for kind in QUESTION_KINDS
             if any(r["kind"] == kind for r in rows)}
    overall = scores(rows)
    # Misses with the gold passage retrieved are the reader's; the others retrieval's.
    misses = [r for r in rows if normalize_answer(r["with"]) != normalize_answer(best_reference(r["with"],
                                                                                                r["answers"]))]
    reader_misses = sum(r["gold"] in r["ranked"] for r in misses)
    return {"factual_accuracy": overall["em_with_retrieval"], "overall": overall, "kinds": kinds,
            "misses": {"total": len(misses), "gold_passage_retrieved": reader_misses,
                       "gold_passage_not_retrieved": len(misses) - reader_misses},
            "examples": rows[:3] + [r for r in rows if r["kind"] != rows[0]["kind"]][:3],
            "wrong_examples": misses[:10]}


def qa_markdown(evaluation: dict, num_passages: int) -> str:
    """The results table: exact match with / without retrieval and gold-passage recall, per kind and overall."""
    lines = [("| kind | questions | EM with retrieval | EM without retrieval | recall@1 | "
             f"recall@{num_passages} |"), "|---|---:|---:|---:|---:|---:|"]
    for name, row in [*evaluation["kinds"].items(), ("all", evaluation["overall"])]:
        lines.append(f"| {name} | {row['count']} | {100 * row['em_with_retrieval']:.1f}% | "
                     f"{100 * row['em_without_retrieval']:.1f}% | {100 * row['recall_at_1']:.1f}% | "
                     f"{100 * row[f'recall_at_{num_passages}']:.1f}% |")
    misses = evaluation["misses"]
    lines += ["", (f"Wrong answers with retrieval: {misses['total']}; the gold passage was among the retrieved ones in "
              f"{misses['gold_passage_retrieved']} (reader errors) and missing in "
              f"{misses['gold_passage_not_retrieved']} (retrieval errors).")]
    return "\n".join(lines) + "\n"


def qa_measured_results(results: dict) -> list:
    """The model-index entries of a QA results.json record (`huggingface_hub.EvalResult`): exact match with and
    without retrieval and gold-passage recall, per kind and overall (for `lightarch.evaluation.model_cards`)."""
    from huggingface_hub import EvalResult

    k = results["qa_settings"]["num_passages"]
    task_type, task_name = "question-answering", "Factual QA over held-out WordNet glosses"
    out = []
    for name, row in [*results["qa"]["kinds"].items(), ("all", results["qa"]["overall"])]:
        for metric, key, label in (("exact_match", "em_with_retrieval", "EM with retrieval"),
                                   ("exact_match", "em_without_retrieval", "EM without retrieval"),
                                   ("retrieval_recall", f"recall_at_{k}", f"Gold passage recall@{k}")):
            out.append(EvalResult(task_type=task_type, task_name=task_name, dataset_type="wordnet-generated",
                                  dataset_name="WordNet 3.0 questions (held-out synsets)", dataset_split="heldout",
                                  dataset_config=name, metric_type=metric, metric_value=float(row[key]),
                                  metric_name=f"{label} ({name})"))
    return out


def plot_qa(evaluation: dict, num_passages: int) -> bytes:
    """PNG: exact match with vs without retrieval by question kind, with the gold-passage recall@k drawn."""
    from ..evaluation.plots import figure_to_png, pyplot

    plt = pyplot()
    names = [*evaluation["kinds"], "all"]
    rows = [*evaluation["kinds"].values(), evaluation["overall"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.38
    for offset, key, label in ((-0.5, "em_with_retrieval", "with retrieval"),
                               (0.5, "em_without_retrieval", "without retrieval")):
        xs = [i + offset * width for i in range(len(names))]
        values = [100 * r[key] for r in rows]
        ax.bar(xs, values, width, label=label)
        for x, v in zip(xs, values):
            ax.text(x, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ax.scatter(range(len(names)), [100 * r[f"recall_at_{num_passages}"] for r in rows], marker="_", s=900,
               color="k", label=f"gold passage recall@{num_passages}", zorder=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 110)
    ax.set_ylabel("exact match on held-out questions (%)")
    ax.set_title("WordNet QA: the same reader with and without retrieved passages")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return figure_to_png(fig)


__all__ = [
    "SETTINGS_FILE",
    "QAReaderSettings",
    "answer_without_context",
    "context_input_ids",
    "evaluate_qa",
    "plot_qa",
    "qa_markdown",
    "qa_measured_results",
    "qa_retriever",
    "sample_questions",
]
