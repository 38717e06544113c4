"""A reader for retrieved context, trained from scratch: a small SparseMoe causal LM learns to answer WordNet
questions (`lightarch.data.wordnet_qa`) from the BM25 passages prepended to them (In-Context RALM's layout,
`lightarch.retrieval.qa.context_input_ids`), loss on the answer tokens and, by default, the question's (never on
the passages; `ReaderDataset`).

- Training questions and their contexts come from synsets that are not held out: contexts are retrieved (when an
  example is drawn) from the training passages only, so no held-out gloss is ever in training text; distractors are
  what BM25 returns.
- A share of the examples (`no_context_fraction`) has no passage at all, so the same model without retrieval is an
  in-distribution baseline, not a model asked an unfamiliar layout.
- The tokenizer is a byte-level BPE trained on the training passages and questions.

`train_retrieval_qa` saves the model, tokenizer, results.json and qa_settings.json (what a fresh process needs to
re-evaluate, `lightarch.retrieval.qa.QAReaderSettings`) atomically, then results.md, qa.png and the model card.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

from ..data.tokenizers import SPECIAL_TOKENS, train_bpe_tokenizer
from ..data.wordnet_qa import (
    QUESTION_KINDS,
    QAExample,
    WordnetQA,
    build_wordnet_qa,
    retrieval_stopwords,
)
from ..evaluation.model_cards import format_seconds, hub_card, model_card_template, render_model_card
from ..evaluation.parameters import parameter_counts
from ..modeling_sparse_moe import SparseMoeForCausalLM
from ..retrieval.context import BM25Retriever
from ..retrieval.qa import (
    SETTINGS_FILE,
    QAReaderSettings,
    context_input_ids,
    evaluate_qa,
    plot_qa,
    qa_markdown,
    qa_retriever,
    sample_questions,
)
from .callbacks import MoeStatsCallback, TimeBudgetCallback
from .checkpoints import (
    atomic_save_pretrained,
    check_output_dir,
    prepare_output_dir,
    write_atomically,
    writing_beside_saved_model,
)
from .router_bias import RouterBiasUpdateCallback

logger = logging.getLogger(__name__)

SCRIPT = "train_retrieval_qa.py"  # the writer named in the output folder's marker (`check_output_dir`)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


@dataclass(frozen=True)
class ReaderTraining:
    """What the reader trains on and how it is evaluated at the end.

    - `no_context_fraction`: examples without passages (the no-retrieval baseline's layout);
    - `question_loss`: the loss covers the question's tokens as well as the answer's (`ReaderDataset`);
    - `max_train_questions`: a seeded sample of the training questions (None: as many as the run's steps draw,
      max_steps x batch size, so each is seen once and only those are retrieved for);
    - `eval_per_kind`: held-out questions evaluated per kind (None: all);
    - `time_budget_minutes` (0: none): training stops early to leave `reserve_minutes` for evaluation and saving.
    """

    no_context_fraction: float = 0.2
    question_loss: bool = True
    max_train_questions: int | None = None
    eval_per_kind: int | None = 500
    time_budget_minutes: float = 0.0
    reserve_minutes: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.no_context_fraction < 1.0:
            raise ValueError(f"--no_context_fraction must be in [0, 1), got {self.no_context_fraction}.")
        if self.max_train_questions is not None and self.max_train_questions < 1:
            raise ValueError(f"--max_train_questions must be >= 1, got {self.max_train_questions}.")
        if self.eval_per_kind is not None and self.eval_per_kind < 1:
            raise ValueError(f"--eval_per_kind must be >= 1, got {self.eval_per_kind}.")
        if self.time_budget_minutes < 0:
            raise ValueError(f"--time_budget_minutes must be >= 0 (0 disables it), got {self.time_budget_minutes}.")
        if self.time_budget_minutes and not 0 <= self.reserve_minutes < self.time_budget_minutes:
            raise ValueError(f"--reserve_minutes must be >= 0 and below --time_budget_minutes "
                             f"({self.time_budget_minutes}), got {self.reserve_minutes}.")


class ReaderDataset(torch.utils.data.Dataset):
    """(question, with passages or not) -> `input_ids` and `labels`: -100 except the answer and `<eos>`, and with
    `question_loss` the question's tokens too.

    Why the question: with its passages before it, a definition question repeats its gold passage's gloss word for
    word, so predicting it is a copy task on every token instead of on the ~4 answer tokens alone; that dense copy
    signal is what lets a reader trained from scratch learn to copy from its context within minutes (answer tokens
    alone: the loss was still at 4.7 nats after 1,300 steps).

    The passages are retrieved when an example is drawn, by the same `retriever.retrieve(prompt, k)` call that
    `generate_with_context` makes at evaluation: only the examples a run reaches cost a retrieval, and training and
    evaluation contexts come from the same code."""

    def __init__(self, tokenizer, examples: list[tuple[bool, QAExample]], retriever, num_passages: int,
                 max_passage_tokens: int, question_loss: bool = True) -> None:
        self.tokenizer, self.examples, self.retriever = tokenizer, examples, retriever
        self.num_passages, self.max_passage_tokens = num_passages, max_passage_tokens
        self.question_loss = question_loss

    def __len__(self) -> int:
        return len(self.examples)

    def passages(self, i: int) -> list[str]:
        """The passages example `i` is shown (none for a no-retrieval example)."""
        with_context, q = self.examples[i]
        return self.retriever.retrieve(q.prompt, self.num_passages) if with_context else []

    def __getitem__(self, i: int) -> dict:
        q = self.examples[i][1]
        prompt = context_input_ids(self.tokenizer, self.passages(i), q.prompt, self.max_passage_tokens)
        answer = self.tokenizer(" " + q.answers[0], add_special_tokens=False)["input_ids"]
        answer = answer + [self.tokenizer.eos_token_id]
        labels = [-100] * len(prompt) + answer
        if self.question_loss:  # the prompt's tokens after the passages, but not its first (nothing predicts it)
            question = len(self.tokenizer(q.prompt, add_special_tokens=False)["input_ids"])
            labels[len(prompt) - question + 1 : len(prompt)] = prompt[len(prompt) - question + 1 :]
        return {"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)), "labels": labels}


def training_examples(qa: WordnetQA, options: ReaderTraining, seed: int, limit: int | None = None
                      ) -> list[tuple[bool, QAExample]]:
    """Every training question (or a seeded sample of `options.max_train_questions`, else of `limit`), shuffled,
    each marked with passages or not (a `no_context_fraction` share without)."""
    questions = list(qa.questions["train"])
    rng = random.Random(seed)
    wanted = options.max_train_questions or limit
    if wanted is not None and wanted < len(questions):
        questions = rng.sample(questions, wanted)
    rng.shuffle(questions)
    return [(rng.random() >= options.no_context_fraction, q) for q in questions]


def training_retriever(qa: WordnetQA) -> BM25Retriever:
    """BM25 over the TRAINING passages only (no held-out synset): where training contexts come from."""
    return BM25Retriever(qa.training_passages(), stopwords=retrieval_stopwords())


def check_reader_run(config, training_args: TrainingArguments) -> None:
    """ValueError naming the option and the fix, before any data is built."""
    if config.vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"--config_overrides vocab_size={config.vocab_size}: the byte-level BPE needs at least "
                         f"{MIN_VOCAB_SIZE} tokens.")
    if training_args.max_steps <= 0:
        raise ValueError("--max_steps must be positive (the reader trains by steps).")
    check_output_dir(training_args.output_dir, SCRIPT)


def train_retrieval_qa(config, training_args: TrainingArguments, settings: QAReaderSettings = QAReaderSettings(),
                       options: ReaderTraining = ReaderTraining()) -> dict:
    """Train a reader `config` (a SparseMoeConfig) on the training questions, evaluate it on held-out ones with and
    without retrieval, save everything into `training_args.output_dir`; returns the results (results.json)."""
    started = time.perf_counter()
    check_reader_run(config, training_args)
    prepare_output_dir(training_args.output_dir, SCRIPT)
    set_seed(training_args.seed)
    show = not training_args.disable_tqdm

    qa = build_wordnet_qa(settings.data)
    draws = (training_args.max_steps * training_args.per_device_train_batch_size
             * training_args.gradient_accumulation_steps)
    examples = training_examples(qa, options, training_args.seed, limit=draws)
    logger.info("Knowledge base: %d passages, %d synsets held out; %d training examples (%d without passages)",
                len(qa.passages), len(qa.heldout), len(examples), sum(not w for w, _ in examples))
    tokenizer_texts = qa.training_passages() + [q.prompt for q in qa.questions["train"]]
    tokenizer = train_bpe_tokenizer(tokenizer_texts, config.vocab_size, show_progress=show)
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = SparseMoeForCausalLM(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = (tokenizer.pad_token_id,
                                                                                 tokenizer.eos_token_id)
    counts = parameter_counts(model)
    logger.info("Reader: %s parameters", f"{counts['total']:,}")

    budget = TimeBudgetCallback(started + 60 * options.time_budget_minutes if options.time_budget_minutes else None,
                                reserve_seconds=60 * options.reserve_minutes)
    stats = MoeStatsCallback(model)
    trainer = Trainer(model=model, args=training_args,
                      train_dataset=ReaderDataset(tokenizer, examples, training_retriever(qa), settings.num_passages,
                                                  settings.max_passage_tokens, options.question_loss),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[budget, stats, RouterBiasUpdateCallback()])
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    if budget.stopped_at_step is not None:
        logger.warning("Time budget reached: training stopped at step %d of %d.", budget.stopped_at_step,
                       training_args.max_steps)

    eval_start = time.perf_counter()
    questions = sample_questions(qa.questions["heldout"], options.eval_per_kind, training_args.seed)
    evaluation = evaluate_qa(model, tokenizer, qa, settings, questions, qa_retriever(qa), show_progress=show)
    results = qa_results(evaluation, settings, Path(training_args.output_dir).as_posix(), qa)
    results.update({
        "num_parameters": counts["total"], "parameter_counts": counts,
        "training": {**asdict(options), "steps": trainer.state.global_step, "max_steps": training_args.max_steps,
                     "stopped_by_time_budget": budget.stopped_at_step is not None,
                     "batch_size": training_args.per_device_train_batch_size,
                     "learning_rate": training_args.learning_rate, "seed": training_args.seed,
                     "examples": len(examples), "examples_without_passages": sum(not w for w, _ in examples),
                     "train_seconds": train_seconds},
        "eval_seconds": time.perf_counter() - eval_start,
        "history": [{"step": e["step"], "loss": e["loss"]} for e in stats.train_history if "loss" in e],
    })
    results["run_wall_time_seconds"] = time.perf_counter() - started
    logger.info("Held-out EM with retrieval %.1f%%, without %.1f%% (recall@%d %.1f%%)",
                100 * evaluation["overall"]["em_with_retrieval"], 100 * evaluation["overall"]["em_without_retrieval"],
                settings.num_passages, 100 * evaluation["overall"][f"recall_at_{settings.num_passages}"])
    folder = atomic_save_pretrained(training_args.output_dir, model, tokenizer, extra_files={
        "results.json": json.dumps(results, indent=2) + "\n",
        SETTINGS_FILE: json.dumps(settings.to_dict(), indent=2) + "\n"}, script=SCRIPT)
    logger.info("Saved to %s (run took %s)", folder, format_seconds(time.perf_counter() - started))
    write_qa_report(folder, results)
    return results


def qa_results(evaluation: dict, settings: QAReaderSettings, model_dir: str, qa: WordnetQA) -> dict:
    """The results.json record of a QA evaluation: `factual_accuracy` (held-out exact match with retrieval, what
    `lightarch.evaluation.selection` reads), `model_dir`, the figures per kind, and the settings."""
    return {"factual_accuracy": evaluation["factual_accuracy"], "model_dir": model_dir,
            "qa": {k: v for k, v in evaluation.items() if k != "factual_accuracy"},
            "qa_settings": settings.to_dict(),
            "knowledge_base": {"passages": len(qa.passages), "heldout_synsets": len(qa.heldout),
                               "heldout_questions": {kind: sum(q.kind == kind for q in qa.questions["heldout"])
                                                     for kind in QUESTION_KINDS},
                               "train_questions": len(qa.questions["train"])}}


def render_qa_card(results: dict, model_path: str) -> str:
    """The model card (README.md): the `retrieval_qa` template filled, with Hub metadata and the model-index
    (`hub_card`, which reads this record's figures through `qa_measured_results`)."""
    k = results["qa_settings"]["num_passages"]
    training = results["training"]
    overall = results["qa"]["overall"]
    card = render_model_card(model_card_template("retrieval_qa"), {
        "model_path": model_path,
        "num_parameters": f"{results['num_parameters']:,}",
        "num_passages": k,
        "no_context_percent": f"{training['no_context_fraction']:.0%}",
        "loss_tokens": ("the question and answer tokens (a definition question repeats its gold passage's gloss: a "
                        "dense copy signal)" if training["question_loss"] else "the answer tokens only"),
        "examples": f"{training['examples']:,}",
        "steps": (f"{training['steps']} of {training['max_steps']} planned (the time budget stopped it)"
                  if training["stopped_by_time_budget"] else training["steps"]),
        "batch_size": training["batch_size"],
        "train_time": format_seconds(training["train_seconds"]),
        "passages": f"{results['knowledge_base']['passages']:,}",
        "heldout_synsets": f"{results['knowledge_base']['heldout_synsets']:,}",
        "heldout_percent": f"{results['qa_settings']['data']['heldout_fraction']:.0%}",
        "em_with": f"{100 * overall['em_with_retrieval']:.1f}%",
        "em_without": f"{100 * overall['em_without_retrieval']:.1f}%",
        "recall": f"{100 * overall[f'recall_at_{k}']:.1f}%",
        "qa_table": qa_markdown(results["qa"], k).strip(),
    })
    return hub_card(card, results, model_name=Path(model_path).name)


def write_qa_report(folder: str | os.PathLike, results: dict, model_path: str | None = None) -> None:
    """results.md, qa.png and README.md (the model card) beside a saved reader; a failure is logged with the folder
    (the model in it is complete) and re-raised."""
    folder = Path(folder)
    k = results["qa_settings"]["num_passages"]
    with writing_beside_saved_model(folder, "the QA report or the model card"):
        write_atomically(folder / "results.md", qa_markdown(results["qa"], k))
        write_atomically(folder / "qa.png", plot_qa(results["qa"], k))
        write_atomically(folder / "README.md", render_qa_card(results, model_path or folder.as_posix()))


__all__ = ["ReaderDataset", "ReaderTraining", "check_reader_run", "qa_results",
           "render_qa_card", "train_retrieval_qa", "training_examples", "training_retriever", "write_qa_report"]


EVAL_SCRIPT = f"{SCRIPT} --eval_only"  # the marker of a re-evaluation's folder


def eval_output_dir(model_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Path:
    """Where `--eval_only` writes (default `<model_dir>/qa_eval`), checked by the output-folder rule (never the
    model folder itself)."""
    folder = Path(output_dir) if output_dir else Path(model_dir) / "qa_eval"
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"--model_dir {model_dir}: no config.json; give a folder written by {SCRIPT}.")
    QAReaderSettings.from_folder(model_dir)
    if folder.absolute() == Path(model_dir).absolute():
        raise ValueError(f"--output_dir {folder} is the input --model_dir: choose another folder.")
    return check_output_dir(folder, EVAL_SCRIPT)


def evaluate_saved_reader(model_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None,
                          eval_per_kind: int | None = 500, seed: int = 42, show_progress: bool = True) -> dict:
    """Re-evaluate a saved reader in this process: its `qa_settings.json` rebuilds the split and the knowledge
    base; results.json (with `factual_accuracy` and `model_dir`), results.md and qa.png go to `output_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = eval_output_dir(model_dir, output_dir)
    settings = QAReaderSettings.from_folder(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    qa = build_wordnet_qa(settings.data)
    started = time.perf_counter()
    questions = sample_questions(qa.questions["heldout"], eval_per_kind, seed)
    evaluation = evaluate_qa(model, tokenizer, qa, settings, questions, qa_retriever(qa), show_progress=show_progress)
    results = qa_results(evaluation, settings, Path(model_dir).as_posix(), qa)
    results.update({"eval_per_kind": eval_per_kind, "seed": seed, "eval_seconds": time.perf_counter() - started})
    k = settings.num_passages
    atomic_save_pretrained(folder, extra_files={"results.json": json.dumps(results, indent=2) + "\n",
                                                "results.md": qa_markdown(evaluation, k),
                                                "qa.png": plot_qa(evaluation, k)}, script=EVAL_SCRIPT)
    return results


__all__ += ["eval_output_dir", "evaluate_saved_reader"]
