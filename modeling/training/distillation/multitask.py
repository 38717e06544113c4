"""The multi-task text-classification recipe of scripts/distill.py: a pretrained encoder teacher (all-MiniLM-L6-v2)
fine-tuned with one head per task, distilled into a sparse-MoE student with its own tokenizer, and a same-size
student trained without distillation for the same steps.

Both models have one linear head over the classes of every task (task k owns a slice, `task_rows`): one model,
one forward per batch, saved and loaded as an ordinary `...ForSequenceClassification`. The teacher's logits and
pooled features on the training set are computed once (offline distillation), so student steps never run it.

The distilled students also learn from a transfer set: unlabelled training-split texts of each task
(`TaskData.transfer`) that only the teacher labels (its logits and features; label -100). The baseline, which has no
teacher, can use labels only, so it trains on the labelled rows alone, for the same steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from ...data.pretrained import minilm_path
from ...data.tasks import TaskData
from ..callbacks import TimeBudgetCallback
from .config import DistillationConfig
from .features import layer_map, select_layer
from .losses import masked_mean_pool
from .trainer import DistillationTrainer, task_rows

logger = logging.getLogger(__name__)

SCRIPT = "distill.py"
RESULTS_FILE = "distill_results.json"
TASKS_FILE = "tasks.json"


def task_layout(tasks: Sequence[TaskData]) -> list[tuple[str, int]]:
    """[(name, num_labels), ...]: the shared head's slices, in order."""
    return [(task.name, task.num_labels) for task in tasks]


def multitask_examples(tasks: Sequence[TaskData], split: str) -> list[dict]:
    """Every task's `split` as {"text", "labels", "task_ids"} rows, task by task."""
    return [{"text": text, "labels": label, "task_ids": k}
            for k, task in enumerate(tasks) for text, label in task.splits[split]]


def transfer_examples(tasks: Sequence[TaskData]) -> list[dict]:
    """Every task's transfer set as unlabelled rows (labels -100), leaving out any text that is in some task's
    validation or test split (the tasks split independently, so a text may be training for one, test for another)."""
    held_out = {text for task in tasks for split in ("validation", "test") for text in task.texts(split)}
    return [{"text": text, "labels": -100, "task_ids": k}
            for k, task in enumerate(tasks) for text in task.transfer if text not in held_out]


class MultiTaskCollator:
    """Rows -> a batch for the student (`input_ids`, `attention_mask`) and, when `teacher_tokenizer` is given, the
    teacher's own tokenization (`teacher_input_ids`, ...); precomputed `teacher_logits` / `teacher_features` rows
    are stacked."""

    def __init__(self, tokenizer, max_length: int, teacher_tokenizer=None) -> None:
        self.tokenizer, self.max_length, self.teacher_tokenizer = tokenizer, max_length, teacher_tokenizer

    def _encode(self, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}  # [B, T]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts = [row["text"] for row in rows]
        batch = self._encode(self.tokenizer, texts)
        batch["labels"] = torch.tensor([row["labels"] for row in rows])
        batch["task_ids"] = torch.tensor([row["task_ids"] for row in rows])
        if self.teacher_tokenizer is not None:
            batch.update({f"teacher_{k}": v for k, v in self._encode(self.teacher_tokenizer, texts).items()})
        for key in ("teacher_logits", "teacher_features"):
            if key in rows[0]:
                batch[key] = torch.stack([row[key] for row in rows])
        return batch


def multitask_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor,
                            tasks: Sequence[tuple[str, int]]) -> torch.Tensor:
    """Sum over the tasks in the batch of each task's mean cross-entropy on its own slice of the head."""
    losses = [F.cross_entropy(logits[rows, head].float(), labels[rows]) for _, _, rows, head in task_rows(task_ids,
                                                                                                         tasks)]
    return torch.stack(losses).sum()


class MultiTaskTrainer(Trainer):
    """Trainer for the teacher's fine-tuning: the per-task cross-entropy of a shared head."""

    def __init__(self, *args, tasks: Sequence[tuple[str, int]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tasks = list(tasks)
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, task_ids = inputs.pop("labels"), inputs.pop("task_ids")
        outputs = model(**inputs)
        loss = multitask_cross_entropy(outputs.logits, labels, task_ids, self.tasks)
        return (loss, outputs) if return_outputs else loss


@torch.no_grad()
def encode_split(model, collator: MultiTaskCollator, rows: list[dict], batch_size: int = 128,
                 feature_layers: Sequence[int] = (), desc: str = "Predicting") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [N, sum of classes] of `rows` and, for `feature_layers`, mean-pooled hidden states [N, len, H], in the
    order of `rows` (batches are formed by text length, so little of each is padding)."""
    from tqdm.auto import tqdm

    model.eval()
    logits, features = [], []
    num_layers = model.config.num_hidden_layers
    order = torch.tensor(sorted(range(len(rows)), key=lambda i: len(rows[i]["text"])), dtype=torch.long)
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
        batch = collator([rows[i] for i in order[start : start + batch_size].tolist()])
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        outputs = model(**inputs, output_hidden_states=bool(feature_layers))
        logits.append(outputs.logits.float())
        if feature_layers:
            pooled = [masked_mean_pool(select_layer(outputs.hidden_states, layer, num_layers),
                                       inputs["attention_mask"]) for layer in feature_layers]  # each [b, H]
            features.append(torch.stack(pooled, dim=1))  # [b, layers, H]
    inverse = order.argsort()  # sorted position of each row
    return torch.cat(logits)[inverse], (torch.cat(features)[inverse] if feature_layers else None)


def predict_tasks(model, collator: MultiTaskCollator, tasks: Sequence[TaskData], split: str = "test",
                  batch_size: int = 128) -> dict[str, list[int]]:
    """Per task, the argmax over its own slice of the head, for every example of `split`."""
    rows = multitask_examples(tasks, split)
    logits, _ = encode_split(model, collator, rows, batch_size, desc=f"Predicting {split}")
    layout = task_layout(tasks)
    task_ids = torch.tensor([row["task_ids"] for row in rows])
    predictions = {}
    for k, name, rows_k, head in task_rows(task_ids, layout):
        predictions[name] = logits[rows_k, head].argmax(-1).tolist()
    return predictions


def score_tasks(model, collator: MultiTaskCollator, tasks: Sequence[TaskData], split: str = "test") -> dict[str, float]:
    """Each task's metric on `split`."""
    predictions = predict_tasks(model, collator, tasks, split)
    return {task.name: task.score(predictions.get(task.name, []), split) for task in tasks}


@dataclass
class DistillOptions:
    """What scripts/distill.py adds to DistillationConfig (the student's training)."""

    max_length: int = 64
    teacher_dir: str | None = None
    teacher_epochs: float = 2.0
    teacher_learning_rate: float = 1e-4
    teacher_batch_size: int = 32
    student_vocab_size: int = 2048
    extra_weightings: tuple[str, ...] = ()
    time_budget_minutes: float = 55.0


def train_student_tokenizer(tasks: Sequence[TaskData], vocab_size: int):
    """The student's own byte-level BPE, trained on the suite's training texts only."""
    from ...data.tokenizers import train_bpe_tokenizer

    texts = [text for task in tasks for text in task.texts("train")]
    return train_bpe_tokenizer(texts, vocab_size, show_progress=False)


def finetune_teacher(tasks: Sequence[TaskData], options: DistillOptions, student_args: DistillationConfig,
                     deadline: float | None):
    """all-MiniLM-L6-v2 with a head over every task's classes, fine-tuned on the suite; (model, tokenizer)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    layout = task_layout(tasks)
    path = str(minilm_path("the distillation teacher"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, **label_maps(tasks))
    args = TrainingArguments(
        output_dir=os.path.join(student_args.output_dir, "teacher_run"), use_cpu=True, report_to="none",
        num_train_epochs=options.teacher_epochs, per_device_train_batch_size=options.teacher_batch_size,
        learning_rate=options.teacher_learning_rate, warmup_steps=50, weight_decay=0.01, lr_scheduler_type="linear",
        logging_steps=max(1, student_args.logging_steps), save_strategy="no", eval_strategy="no",
        seed=student_args.seed, dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=student_args.disable_tqdm,
    )
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=multitask_examples(tasks, "train"),
                               data_collator=MultiTaskCollator(tokenizer, options.max_length), tasks=layout,
                               callbacks=[TimeBudgetCallback(deadline)])
    trainer.train()
    with contextlib.suppress(OSError):
        os.rmdir(args.output_dir)
    return model, tokenizer


def build_student(config, tokenizer, tasks: Sequence[TaskData]):
    """A `SparseMoeForSequenceClassification` over every task's classes with the student tokenizer's ids."""
    from ...modeling_sparse_moe import SparseMoeForSequenceClassification

    config = replace_config(config, vocab_size=len(tokenizer), **label_maps(tasks), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    return SparseMoeForSequenceClassification(config)


def label_maps(tasks: Sequence[TaskData]) -> dict:
    """`num_labels`, `id2label` ("task:label") and `label2id` of the shared head."""
    names = [f"{task.name}:{label}" for task in tasks for label in task.labels]
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)}}


def replace_config(config, **values):
    """A copy of `config` with `values` set (the vocabulary and labels follow the data, not the preset)."""
    config = config.__class__.from_dict({**config.to_dict(), **values})
    return config


def train_student(student, tokenizer, teacher, rows: list[dict], tasks: Sequence[TaskData], args: DistillationConfig,
                  deadline: float | None) -> DistillationTrainer:
    """One student run (DistillationTrainer; `rows` carry the precomputed teacher outputs)."""
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, tasks=task_layout(tasks),
                                  train_dataset=rows, data_collator=PreTokenizedCollator(tokenizer.pad_token_id),
                                  callbacks=[TimeBudgetCallback(deadline)])
    trainer.train()
    return trainer


def run_distillation(tasks: Sequence[TaskData], student_config, args: DistillationConfig, options: DistillOptions,
                     tasks_record: dict) -> dict:
    """The whole recipe into `args.output_dir` (already prepared): teacher/ (fine-tuned or loaded), student/ (the
    distilled student), baseline/ (no distillation, same steps), student_<weighting>/ for `extra_weightings`,
    tasks.json and distill_results.json. Returns the results record."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ...evaluation.parameters import parameter_counts
    from ..checkpoints import atomic_save_pretrained, write_atomically

    start = time.perf_counter()
    budget = options.time_budget_minutes * 60 if options.time_budget_minutes > 0 else None
    output = Path(args.output_dir)
    layout = task_layout(tasks)
    write_atomically(output / TASKS_FILE, json.dumps(tasks_record, indent=2) + "\n")
    record: dict = {"tasks": [name for name, _ in layout], "phases": {}}

    # 1. the teacher: a third of the budget
    phase = time.perf_counter()
    if options.teacher_dir:
        teacher = AutoModelForSequenceClassification.from_pretrained(options.teacher_dir)
        teacher_tokenizer = AutoTokenizer.from_pretrained(options.teacher_dir)
        if teacher.config.num_labels != sum(n for _, n in layout):
            raise ValueError(f"--teacher_dir {options.teacher_dir} has {teacher.config.num_labels} outputs, but the "
                             f"tasks need {sum(n for _, n in layout)}: pass the --tasks it was trained on.")
    else:
        teacher, teacher_tokenizer = finetune_teacher(tasks, options, args,
                                                      start + budget / 3 if budget else None)
        atomic_save_pretrained(output / "teacher", teacher, teacher_tokenizer, script=SCRIPT)
    record["phases"]["teacher_seconds"] = time.perf_counter() - phase

    # 2. the teacher's outputs on the training set, once
    phase = time.perf_counter()
    teacher_collator = MultiTaskCollator(teacher_tokenizer, options.max_length)
    labelled_rows = multitask_examples(tasks, "train")
    rows = labelled_rows + transfer_examples(tasks)
    record["training_rows"] = {"labelled": len(labelled_rows), "transfer": len(rows) - len(labelled_rows)}
    pairs = (layer_map(args.feature_layer_map, student_config.num_hidden_layers, teacher.config.num_hidden_layers)
             if args.feature_weight > 0 else [])
    teacher_logits, teacher_features = encode_split(teacher, teacher_collator, rows,
                                                    feature_layers=[t for _, t in pairs], desc="Teacher outputs")
    tokenizer = train_student_tokenizer(tasks, options.student_vocab_size)
    student_collator = MultiTaskCollator(tokenizer, options.max_length)
    encoded = student_collator(rows)  # the student's tokens, once: [N, T]
    student_rows = []
    for index, row in enumerate(rows):
        length = int(encoded["attention_mask"][index].sum())
        student_row = {"input_ids": encoded["input_ids"][index, :length], "labels": row["labels"],
                       "task_ids": row["task_ids"], "teacher_logits": teacher_logits[index]}
        if teacher_features is not None:
            student_row["teacher_features"] = teacher_features[index]
        student_rows.append(student_row)
    record["phases"]["teacher_outputs_seconds"] = time.perf_counter() - phase

    # 3. the students, sharing what is left of the budget; the baseline runs right after the distilled student and
    # is bound by its step count, not by the clock (a deadline could cut it short of the same steps)
    runs = [("student", args), ("baseline", replace(args, alpha=0.0, feature_weight=0.0))]
    runs += [(f"student_{weighting}", replace(args, task_weighting=weighting)) for weighting in options.extra_weightings]
    teacher_params = sum(p.numel() for p in teacher.parameters())
    steps_done = None
    for index, (name, run_args) in enumerate(runs):
        phase = time.perf_counter()
        if name == "baseline":
            run_args = replace(run_args, max_steps=steps_done)  # the same steps as the distilled student
            deadline = None
        else:
            remaining = budget - (time.perf_counter() - start) if budget else None
            deadline = time.perf_counter() + remaining / (len(runs) - index) if remaining else None
        run_args = replace(run_args, output_dir=str(output / f"{name}_run"))
        torch.manual_seed(args.seed)
        student = build_student(student_config, tokenizer, tasks)
        train_rows = student_rows[: len(labelled_rows)] if name == "baseline" else student_rows  # labels only
        trainer = train_student(student, tokenizer, teacher, train_rows, tasks, run_args, deadline)
        if name == "student":
            steps_done = trainer.state.global_step
        with contextlib.suppress(OSError):  # the Trainer's run folder, when it holds no checkpoint
            os.rmdir(run_args.output_dir)
        counts = parameter_counts(student)
        atomic_save_pretrained(output / name, student, tokenizer, script=SCRIPT,
                               extra_files={"training_log.json": json.dumps(trainer.state.log_history, indent=1)})
        record[name] = {"steps": trainer.state.global_step, "seconds": time.perf_counter() - phase,
                        "task_weighting": run_args.task_weighting, "alpha": run_args.alpha, "beta": run_args.beta,
                        "temperature": run_args.temperature, "feature_weight": run_args.feature_weight,
                        "parameters": counts, "final_log": trainer.state.log_history[-2:]}
    record["teacher_parameters"] = teacher_params
    record["student_fraction_of_teacher"] = record["student"]["parameters"]["total"] / teacher_params
    record["total_seconds"] = time.perf_counter() - start
    record["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()}
    write_atomically(output / RESULTS_FILE, json.dumps(record, indent=2) + "\n")
    return record


def pad_pretokenized(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pre-tokenized rows -> right-padded `input_ids` / `attention_mask` [B, T] and stacked extras."""
    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = row["input_ids"]
        attention_mask[i, : len(row["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "labels": torch.tensor([row["labels"] for row in rows]),
             "task_ids": torch.tensor([row["task_ids"] for row in rows])}
    for key in ("teacher_logits", "teacher_features"):
        if key in rows[0]:
            batch[key] = torch.stack([row[key] for row in rows])
    return batch


class PreTokenizedCollator:
    """Collator of rows tokenized once beforehand (the students' training set): `pad_pretokenized`."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return pad_pretokenized(rows, self.pad_id)


def parse_names(text: str, allowed: Sequence[str], option: str) -> list[str]:
    """'a,b' -> ["a", "b"], each one of `allowed`; a ValueError naming `option` otherwise."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"{option}: unknown {', '.join(map(repr, unknown))}; choose from {list(allowed)}.")
    return names


def load_tasks_record(record: dict) -> list[TaskData]:
    """The suite a run trained on, rebuilt from its tasks.json (the same names, seed and sizes give the same
    splits)."""
    from ...data.tasks import load_suite

    return load_suite(record["names"], seed=record["seed"], max_per_class=record["max_per_class"],
                      max_examples=record["max_examples"])  # the labelled splits (the transfer set is not scored)


def prepare_distill_run(args, training_args: DistillationConfig) -> tuple[list[TaskData], DistillOptions, dict]:
    """scripts/distill.py's checks and data: (tasks, options, tasks.json record); prepares the output folder.
    Bad input is a ValueError naming the option."""
    from ...data.tasks import (
        TASK_NAMES,
        available_tasks,
        load_suite,
        missing_requirements,
    )
    from ..checkpoints import prepare_output_dir
    from .weighting import TASK_WEIGHTINGS

    names = parse_names(args.tasks, TASK_NAMES, "--tasks") or available_tasks()
    for name in names:
        if missing_requirements(name):
            raise ValueError(f"--tasks: {name} needs {', '.join(missing_requirements(name))}.")
    if len(names) < 1:
        raise ValueError("--tasks: no task is available on this machine (see lightarch.data.tasks).")
    for option, value in (("--max_examples", args.max_examples), ("--max_length", args.max_length),
                          ("--student_vocab_size", args.student_vocab_size)):
        if value < 8:
            raise ValueError(f"{option} must be >= 8, got {value}.")
    if args.num_threads < 0:
        raise ValueError(f"--num_threads must be >= 0, got {args.num_threads}.")
    extra = tuple(parse_names(args.extra_weightings, TASK_WEIGHTINGS, "--extra_weightings"))
    extra = tuple(w for w in extra if w != training_args.task_weighting and w != "fixed")
    if args.teacher_dir and not Path(args.teacher_dir, "config.json").is_file():
        raise ValueError(f"--teacher_dir {args.teacher_dir} holds no saved model (config.json).")
    if args.transfer_size < 0:
        raise ValueError(f"--transfer_size must be >= 0, got {args.transfer_size}.")
    prepare_output_dir(training_args.output_dir, SCRIPT, {"--teacher_dir": args.teacher_dir})
    tasks = load_suite(names, seed=training_args.seed, max_per_class=args.max_per_class,
                       max_examples=args.max_examples, transfer_size=args.transfer_size)
    options = DistillOptions(args.max_length, args.teacher_dir, args.teacher_epochs, args.teacher_learning_rate,
                             args.teacher_batch_size, args.student_vocab_size, extra, args.time_budget_minutes)
    record = {"names": names, "seed": training_args.seed, "max_per_class": args.max_per_class,
              "max_examples": args.max_examples, "max_length": args.max_length, "transfer_size": args.transfer_size}
    return tasks, options, record
