"""Language-model distillation (scripts/distill.py --task lm): a causal-LM teacher trained by the main job
(scripts/train.py, a SparseMoe on the standard library) distilled token by token into a student at least 10x smaller
with the teacher's tokenizer, against the same student trained without distillation for the same steps.

- the data: the main job's corpus (`lightarch.data.corpus.load_corpus`: the standard library split by file, the same
  split the teacher was trained on, so its held-out files are unseen by teacher and students alike), tokenized with
  the teacher's tokenizer into blocks;
- the distilled student: `DistillationTrainer` with the live teacher, or with its top-k logits stored once as
  safetensors (`--teacher_topk K`, `lightarch.training.distillation.topk`) and no teacher in the loop;
- the plain student: the same initial weights, data order and steps, `alpha=0` (cross-entropy only) and no teacher;
- held-out perplexity of all three through `lightarch.evaluation.perplexity` (the `perplexity` metric module),
  written as results.json / results.md / results.png beside student/ and baseline/.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ...data.corpus import BlockDataset, load_corpus, token_blocks, tokenize_documents
from ..callbacks import TimeBudgetCallback
from .config import DistillationConfig
from .trainer import DistillationTrainer

logger = logging.getLogger(__name__)

SCRIPT = "distill.py"
RESULTS_FILE = "results.json"
TOPK_DIR = "teacher_topk"
MIN_SIZE_RATIO = 10.0  # the "teacher of at least 10x the student"
LM_STUDENT_PRESET = "distill-lm-student"  # the student when --preset is not given: 1/11 of the main job's model


@dataclass
class LmDistillOptions:
    """What `--task lm` adds to DistillationConfig."""

    teacher_dir: str
    block_size: int = 256
    max_train_files: int = 300
    max_eval_files: int = 12
    max_train_blocks: int = 0  # 0: every training block
    teacher_topk: int = 0  # 0: the live teacher; K: its top-K logits stored under teacher_topk/ and no teacher
    time_budget_minutes: float = 12.0


def lm_student_config(preset: str, config_overrides: str):
    """The student's SparseMoeConfig: `preset` (default `LM_STUDENT_PRESET`) + `config_overrides`. Vocabulary and
    special tokens follow the teacher's tokenizer later."""
    from ...configuration_sparse_moe import SparseMoeConfig
    from ..cli import config_from_preset

    return config_from_preset(SparseMoeConfig, preset or LM_STUDENT_PRESET, config_overrides)


def load_lm_teacher(teacher_dir: str | os.PathLike):
    """(teacher in eval mode, its tokenizer) from a scripts/train.py folder; ValueError naming --teacher_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(teacher_dir)
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        raise ValueError(f"--teacher_dir {teacher_dir}: no saved causal LM with its tokenizer there (config.json, "
                         "tokenizer.json); train one with scripts/train.py.")
    teacher = AutoModelForCausalLM.from_pretrained(folder).eval()
    return teacher, AutoTokenizer.from_pretrained(folder)


def build_lm_student(config, tokenizer, vocab_size: int | None = None):
    """A `SparseMoeForCausalLM` over the teacher's tokenizer: its special-token ids, and `vocab_size` outputs (the
    teacher's, which may exceed the tokenizer's length when its embeddings were padded; default len(tokenizer)), so
    that teacher and student logits cover one vocabulary."""
    from ...modeling_sparse_moe import SparseMoeForCausalLM

    values = {**config.to_dict(), "vocab_size": vocab_size or len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return SparseMoeForCausalLM(config.__class__.from_dict(values))


def lm_blocks(tokenizer, options: LmDistillOptions, with_train: bool = True
              ) -> tuple[BlockDataset | None, torch.Tensor, list[str]]:
    """(training blocks, held-out blocks [N, block_size], held-out file names): the main job's corpus split, tokenized
    with the teacher's tokenizer (`with_train=False`: the held-out split only, training blocks None); ValueError naming
    --block_size when a split is shorter than one block."""
    corpus = load_corpus(max_train_files=options.max_train_files, max_eval_files=options.max_eval_files)
    heldout = token_blocks(tokenize_documents(tokenizer, corpus.eval_texts, desc="Tokenizing held-out"),
                           options.block_size)
    if not with_train:
        if len(heldout) == 0:
            raise ValueError(f"--block_size {options.block_size}: the held-out split is shorter than one block.")
        return None, heldout, corpus.eval_files
    train = token_blocks(tokenize_documents(tokenizer, corpus.train_texts, desc="Tokenizing train"),
                         options.block_size)
    if options.max_train_blocks:
        train = train[: options.max_train_blocks]
    if len(train) == 0 or len(heldout) == 0:
        raise ValueError(f"--block_size {options.block_size}: a split has fewer tokens than one block; lower it.")
    return BlockDataset(train), heldout, corpus.eval_files


def train_lm_student(student, teacher, train_data: BlockDataset, args: DistillationConfig, teacher_topk=None,
                     deadline: float | None = None) -> DistillationTrainer:
    """One student run: distilled (`teacher` or `teacher_topk`), or plain when args.alpha == 0 (no teacher)."""
    trainer = DistillationTrainer(model=student, teacher_model=teacher if args.alpha > 0 else None, args=args,
                                  teacher_topk=teacher_topk if args.alpha > 0 else None, train_dataset=train_data,
                                  callbacks=[TimeBudgetCallback(deadline)])
    trainer.train()
    return trainer


def lm_results_table(record: dict) -> str:
    """Markdown: held-out perplexity and parameters of teacher, distilled student, plain student (and unigram)."""
    rows = [("teacher", record["teacher"]), ("distilled student", record["student"]),
            ("student without distillation", record["baseline"])]
    lines = ["| model | parameters | steps | held-out perplexity |", "|---|---:|---:|---:|"]
    for name, entry in rows:
        steps = entry.get("steps", "")
        lines.append(f"| {name} | {entry['parameters']['total']:,} | {steps} | {entry['heldout_perplexity']:.2f} |")
    lines.append(f"| unigram (add-one) | | | {record['unigram_perplexity']:.2f} |")
    lines.append("")
    lines.append(f"Distilled vs plain student: perplexity {100 * record['perplexity_reduction']:.1f}% lower "
                 f"(target >= 10%: {'met' if record['target_met'] else 'not met'}); teacher / student parameters "
                 f"{record['teacher_to_student_ratio']:.1f}x.")
    return "\n".join(lines) + "\n"


def lm_results_plot(record: dict) -> bytes:
    """PNG: held-out perplexity of each model (bars)."""
    from ...evaluation.plots import figure_to_png, pyplot

    plt = pyplot()
    names = ["teacher", "distilled\nstudent", "plain\nstudent"]
    values = [record[k]["heldout_perplexity"] for k in ("teacher", "student", "baseline")]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    bars = ax.bar(names, values, color=["#4c72b0", "#55a868", "#c44e52"])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title(f"LM distillation, {record['student']['steps']} steps each")
    return figure_to_png(fig)


def lm_model_card(record: dict, name: str, config) -> str:
    """README.md of the run's `name` folder ("student" or "baseline") from `model_cards/distilled_lm.md`, with the
    run's measured table and Hub metadata (`hub_card`)."""
    from ...evaluation.model_cards import hub_card, model_card_template, render_model_card

    run, data = record[name], record["data"]
    distilled = run["alpha"] > 0
    if distilled:
        title = "Distilled sparse-MoE code model"
        ratio = record["teacher_to_student_ratio"]
        summary = (f"A small SparseMoe causal LM distilled token by token from a {ratio:.1f}x "
                   "larger SparseMoe teacher trained by the main job (`scripts/train.py`), with `scripts/distill.py "
                   "--task lm`.")
        loss = (f"(1 - alpha) x cross-entropy + alpha x divergence (alpha {run['alpha']}, beta {run['beta']}: 0 "
                f"forward KL, 1 reverse KL; temperature {run['temperature']}, x T^2), plus the router's auxiliary loss")
        source = (f"Teacher logits: its top-{run['teacher_topk']} stored once as safetensors (the rest of the "
                  "vocabulary as one bucket)" if run.get("teacher_topk") else "Teacher logits: the live teacher, "
                  "frozen, under no_grad") + "."
    else:
        title = "Sparse-MoE code model without distillation (baseline)"
        summary = ("The baseline of a `scripts/distill.py --task lm` run: the distilled student's architecture, "
                   "initial weights, data order and steps, trained on cross-entropy alone (no teacher).")
        loss = "cross-entropy plus the router's auxiliary loss"
        source = "No teacher: this is what distillation is measured against."
    counts, teacher = run["parameters"], record["teacher"]["parameters"]
    card = render_model_card(model_card_template("distilled_lm"), {
        "title": title, "summary": summary, "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "num_experts": config.num_experts, "num_parameters": f"{counts['total']:,}",
        "active_parameters": f"{counts['active_max']:,}", "teacher_dir": record["teacher_dir"],
        "teacher_parameters": f"{teacher['total']:,}", "ratio": f"{teacher['total'] / counts['total']:.1f}",
        "vocab_size": data["vocab_size"], "steps": run["steps"], "train_blocks": data["train_blocks"],
        "block_size": data["block_size"], "loss": loss, "teacher_source": source,
        "heldout_blocks": data["heldout_blocks"], "table": lm_results_table(record),
        "reduction": f"{100 * record['perplexity_reduction']:.1f}%",
    })
    return hub_card(card, record, model_name=f"lightarch-distill-lm-{name}", model=name)


def write_lm_model_cards(output: Path, record: dict) -> None:
    """The model card of student/ and baseline/ (each a trained folder)."""
    from transformers import AutoConfig

    from ..checkpoints import write_atomically, writing_beside_saved_model

    for name in ("student", "baseline"):
        with writing_beside_saved_model(output / name, "the model card"):
            card = lm_model_card(record, name, AutoConfig.from_pretrained(output / name))
            write_atomically(output / name / "README.md", card)


def run_lm_distillation(student_config, args: DistillationConfig, options: LmDistillOptions) -> dict:
    """The whole LM recipe into `args.output_dir` (already prepared): student/, baseline/, optionally teacher_topk/,
    and results.json / results.md / results.png. Returns the results record."""
    from ...evaluation.parameters import parameter_counts
    from ...evaluation.perplexity import perplexity, unigram_perplexity
    from ..checkpoints import atomic_save_pretrained, write_result_files
    from .topk import TeacherTopK, compute_teacher_topk

    start = time.perf_counter()
    budget = options.time_budget_minutes * 60 if options.time_budget_minutes > 0 else None
    output = Path(args.output_dir)
    teacher, tokenizer = load_lm_teacher(options.teacher_dir)
    train_data, heldout, heldout_files = lm_blocks(tokenizer, options)
    torch.manual_seed(args.seed)
    vocab_size = teacher.config.get_text_config().vocab_size
    if options.teacher_topk > vocab_size:
        raise ValueError(f"--teacher_topk {options.teacher_topk} exceeds the teacher's vocabulary ({vocab_size} "
                         f"tokens): use at most {vocab_size} (all of it: the exact loss).")
    probe = build_lm_student(student_config, tokenizer, vocab_size)
    teacher_counts, student_counts = parameter_counts(teacher), parameter_counts(probe)
    ratio = teacher_counts["total"] / student_counts["total"]
    if ratio < MIN_SIZE_RATIO:
        logger.warning("The teacher has only %.1fx the student's parameters (the recipe wants >= %.0fx): pick a "
                       "smaller --preset / --config_overrides.", ratio, MIN_SIZE_RATIO)
    record: dict = {"task": "lm", "teacher_dir": str(options.teacher_dir), "phases": {},
                    "data": {"train_blocks": len(train_data), "heldout_blocks": int(heldout.shape[0]),
                             "block_size": options.block_size, "heldout_files": heldout_files,
                             "vocab_size": vocab_size, "tokenizer_size": len(tokenizer)},
                    "teacher_to_student_ratio": ratio}

    topk = None
    if options.teacher_topk:
        phase = time.perf_counter()
        topk = compute_teacher_topk(teacher, train_data, options.teacher_topk, args.temperature,
                                    batch_size=args.per_device_train_batch_size, teacher_name=str(options.teacher_dir),
                                    pad_id=tokenizer.pad_token_id or 0)
        topk.save(output / TOPK_DIR)
        topk = TeacherTopK.load(output / TOPK_DIR)  # train from what is on disk
        record["phases"]["teacher_topk_seconds"] = time.perf_counter() - phase

    runs = [("student", args), ("baseline", replace(args, alpha=0.0, feature_weight=0.0))]
    steps_done = None
    for index, (name, run_args) in enumerate(runs):
        phase = time.perf_counter()
        if steps_done is not None:
            run_args = replace(run_args, max_steps=steps_done)  # the same steps as the distilled student
        run_args = replace(run_args, output_dir=str(output / f"{name}_run"))
        remaining = budget - (time.perf_counter() - start) if budget else None
        deadline = time.perf_counter() + remaining / (len(runs) - index) if remaining else None
        torch.manual_seed(args.seed)  # the same initial weights for both students
        student = build_lm_student(student_config, tokenizer, vocab_size)
        trainer = train_lm_student(student, teacher, train_data, run_args, topk, deadline)
        if name == "student":
            steps_done = trainer.state.global_step
        with contextlib.suppress(OSError):  # the Trainer's run folder, when it holds no checkpoint
            os.rmdir(run_args.output_dir)
        student.eval()
        atomic_save_pretrained(output / name, student, tokenizer, script=SCRIPT,
                               extra_files={"training_log.json": json.dumps(trainer.state.log_history, indent=1)})
        record[name] = {"steps": trainer.state.global_step, "seconds": time.perf_counter() - phase,
                        "alpha": run_args.alpha, "beta": run_args.beta, "temperature": run_args.temperature,
                        "teacher_topk": options.teacher_topk if run_args.alpha > 0 else None,
                        "parameters": parameter_counts(student),
                        "heldout_perplexity": perplexity(student, heldout, args.per_device_eval_batch_size),
                        "final_log": trainer.state.log_history[-2:]}
    record["teacher"] = {"parameters": teacher_counts,
                         "heldout_perplexity": perplexity(teacher, heldout, args.per_device_eval_batch_size)}
    record["unigram_perplexity"] = unigram_perplexity(train_data.blocks, heldout, vocab_size)
    record["perplexity_reduction"] = 1 - record["student"]["heldout_perplexity"] / record["baseline"]["heldout_perplexity"]
    record["target_met"] = record["perplexity_reduction"] >= 0.10
    record["options"] = asdict(options)
    record["total_seconds"] = time.perf_counter() - start
    write_result_files(output, record, lm_results_table(record), {"results.png": lm_results_plot(record)})
    write_lm_model_cards(output, record)
    return record


def prepare_lm_run(args, training_args: DistillationConfig) -> LmDistillOptions:
    """scripts/distill.py --task lm's checks; prepares the output folder. Bad input is a ValueError naming the
    option."""
    from ..checkpoints import prepare_output_dir

    for option, value, low in (("--block_size", args.block_size, 2), ("--max_train_files", args.max_train_files, 1),
                               ("--max_eval_files", args.max_eval_files, 1),
                               ("--max_train_blocks", args.max_train_blocks, 0),
                               ("--teacher_topk", args.teacher_topk, 0)):
        if value < low:
            raise ValueError(f"{option} must be >= {low}, got {value}.")
    if args.num_threads < 0:
        raise ValueError(f"--num_threads must be >= 0, got {args.num_threads}.")
    if not args.teacher_dir:
        raise ValueError("--task lm needs --teacher_dir: a causal LM folder written by scripts/train.py.")
    if not (Path(args.teacher_dir) / "config.json").is_file():
        raise ValueError(f"--teacher_dir {args.teacher_dir} holds no saved model (config.json); train one with "
                         "scripts/train.py.")
    if training_args.feature_weight > 0:
        raise ValueError("--task lm distils logits only: set --feature_weight 0.")
    prepare_output_dir(training_args.output_dir, SCRIPT, {"--teacher_dir": args.teacher_dir})
    return LmDistillOptions(args.teacher_dir, args.block_size, args.max_train_files, args.max_eval_files,
                            args.max_train_blocks, args.teacher_topk, args.time_budget_minutes)


def is_lm_run(output_dir: str | os.PathLike) -> bool:
    """Whether `output_dir` holds a `--task lm` run (its results.json says so)."""
    path = Path(output_dir) / RESULTS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("task") == "lm"
    except (OSError, ValueError, AttributeError):
        return False


def evaluate_lm_run(output_dir: str | os.PathLike) -> dict:
    """scripts/eval_distill.py for a `--task lm` run: the saved teacher, student/ and baseline/ scored again on the
    run's held-out blocks; writes eval.json, eval.md (the results table) and eval.png beside the run."""
    from transformers import AutoModelForCausalLM

    from ...evaluation.perplexity import perplexity
    from ..checkpoints import write_atomically

    output = Path(output_dir)
    record = json.loads((output / RESULTS_FILE).read_text(encoding="utf-8"))
    options = LmDistillOptions(**record["options"])
    teacher, tokenizer = load_lm_teacher(options.teacher_dir)
    _, heldout, _ = lm_blocks(tokenizer, options, with_train=False)
    scores = {"teacher": perplexity(teacher, heldout)}
    for name in ("student", "baseline"):
        scores[name] = perplexity(AutoModelForCausalLM.from_pretrained(output / name).eval(), heldout)
    fresh = {**record, **{name: {**record[name], "heldout_perplexity": value} for name, value in scores.items()}}
    fresh["perplexity_reduction"] = 1 - scores["student"] / scores["baseline"]
    fresh["target_met"] = fresh["perplexity_reduction"] >= 0.10
    results = {"task": "lm", "perplexity": scores, "perplexity_reduction": fresh["perplexity_reduction"],
               "target_met": fresh["target_met"], "heldout_blocks": int(heldout.shape[0]), "training": record}
    write_atomically(output / "eval.json", json.dumps(results, indent=2) + "\n")
    write_atomically(output / "eval.md", lm_results_table(fresh))
    write_atomically(output / "eval.png", lm_results_plot(fresh))
    write_lm_model_cards(output, fresh)
    results["table"] = lm_results_table(fresh)
    return results
