"""scripts/eval_distill.py's measurements: every model of a distill.py run scored per task on the test splits,
against the majority class; JSON, a markdown table, a PNG and the student's model card."""

from __future__ import annotations

import json
from pathlib import Path

from ...data.tasks import TaskData
from ...evaluation.metrics import load_metric
from .multitask import (
    RESULTS_FILE,
    TASKS_FILE,
    MultiTaskCollator,
    load_tasks_record,
    score_tasks,
)

EVAL_FILES = ("eval.json", "eval.md", "eval.png")


def run_models(output_dir: str | Path) -> dict[str, Path]:
    """name -> folder of each model a distill.py run left: teacher, student, student_<weighting>, baseline."""
    output = Path(output_dir)
    record = json.loads((output / RESULTS_FILE).read_text(encoding="utf-8"))
    teacher = Path(record["options"].get("teacher_dir") or output / "teacher")
    models = {"teacher": teacher}
    for name in ["student", *sorted(k for k in record if k.startswith("student_") and isinstance(record[k], dict)
                                    and "steps" in record[k]), "baseline"]:
        if (output / name / "config.json").is_file():
            models[name] = output / name
    return models


def retention_figures(student: dict[str, float], teacher: dict[str, float]) -> dict:
    """The student's retention of the teacher's score per task, its mean and worst task, computed by the
    `distillation_retention` evaluate metric (`lightarch.evaluation.metrics`), so that eval.json and the Hub card
    report the figure that metric defines."""
    if set(student) != set(teacher):
        raise ValueError(f"student and teacher were scored on different tasks: {sorted(student)} vs {sorted(teacher)}")
    return load_metric("distillation_retention").compute(
        predictions=[student[name] for name in teacher], references=list(teacher.values()), tasks=list(teacher))


def evaluate_run(output_dir: str | Path, split: str = "test") -> dict:
    """Per task: each model's score and the majority baseline; per model: mean; the student's retention
    (`retention_figures`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    output = Path(output_dir)
    for name in (TASKS_FILE, RESULTS_FILE):
        if not (output / name).is_file():
            raise FileNotFoundError(f"--output_dir {output} has no {name}: run scripts/distill.py into it first.")
    tasks_record = json.loads((output / TASKS_FILE).read_text(encoding="utf-8"))
    train_record = json.loads((output / RESULTS_FILE).read_text(encoding="utf-8"))
    tasks: list[TaskData] = load_tasks_record(tasks_record)
    scores: dict[str, dict[str, float]] = {}
    for name, folder in run_models(output).items():
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        scores[name] = score_tasks(model, MultiTaskCollator(tokenizer, tasks_record["max_length"]), tasks, split)
    scores["majority"] = {task.name: task.majority_baseline(split) for task in tasks}
    means = {name: sum(values.values()) / len(values) for name, values in scores.items()}
    kept = retention_figures(scores["student"], scores["teacher"])
    return {
        "split": split,
        "tasks": [{"name": t.name, "metric": t.metric, "num_labels": t.num_labels,
                   "test_examples": len(t.splits[split])} for t in tasks],
        "scores": scores,
        "means": means,
        "retention": kept["retention"],
        "retention_mean": kept["retention_mean"],
        "retention_worst": kept["retention_worst"],
        "retention_worst_task": kept["worst_task"],
        "distillation_gain_points": 100 * (means["student"] - means.get("baseline", float("nan"))),
        "training": train_record,
        "tasks_record": tasks_record,
    }


def results_table(results: dict) -> str:
    """Markdown: a row per task (metric, majority, each model), then the mean."""
    names = [n for n in results["scores"] if n != "majority"]
    header = ["task", "metric", "majority", *names, "student / teacher"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for task in results["tasks"]:
        row = [task["name"], task["metric"], f"{100 * results['scores']['majority'][task['name']]:.1f}"]
        row += [f"{100 * results['scores'][n][task['name']]:.1f}" for n in names]
        row.append(f"{100 * results['retention'][task['name']]:.0f}%")
        lines.append("| " + " | ".join(row) + " |")
    row = ["**mean**", "", f"{100 * results['means']['majority']:.1f}"]
    row += [f"**{100 * results['means'][n]:.1f}**" for n in names] + [f"{100 * results['retention_mean']:.0f}%"]
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def results_plot(results: dict) -> bytes:
    """A grouped bar chart of per-task scores (PNG bytes)."""
    from ...evaluation.plots import figure_to_png, pyplot

    plt = pyplot()
    names = list(results["scores"])
    tasks = [t["name"] for t in results["tasks"]]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(tasks)), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([x + i * width for x in range(len(tasks))], [100 * results["scores"][name][t] for t in tasks], width,
               label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks, rotation=35, ha="right")
    ax.set_ylabel("test score (%)")
    ax.set_title("Distillation into a sparse-MoE student, per task")
    ax.legend(fontsize=8)
    return figure_to_png(fig)


def student_model_card(results: dict, student_config) -> str:
    """The student's README.md from `model_cards/distilled.md`, with the measured table."""
    from ...evaluation.model_cards import model_card_template, render_model_card

    template = model_card_template("distilled")
    training = results["training"]
    student = training["student"]
    rows = training.get("training_rows", {})  # runs before the transfer set have no count
    means = results["means"]
    return render_model_card(template, {
        "num_tasks": len(results["tasks"]), "vocab_size": student_config.vocab_size,
        "num_layers": student_config.num_hidden_layers, "hidden_size": student_config.hidden_size,
        "num_experts": student_config.num_experts, "num_parameters": f"{student['parameters']['total']:,}",
        "active_parameters": f"{student['parameters']['active_max']:,}",
        "fraction": f"1/{1 / training['student_fraction_of_teacher']:.1f}",
        "teacher_parameters": f"{training['teacher_parameters']:,}", "steps": student["steps"],
        "alpha": student["alpha"], "beta": student["beta"], "temperature": student["temperature"],
        "task_weighting": student["task_weighting"], "feature_weight": student["feature_weight"],
        "table": results_table(results), "teacher_mean": f"{100 * means['teacher']:.1f}",
        "student_mean": f"{100 * means['student']:.1f}", "retention_mean": f"{100 * results['retention_mean']:.0f}",
        "retention_worst": f"{100 * results['retention_worst']:.0f}",
        "baseline_mean": f"{100 * means.get('baseline', float('nan')):.1f}",
        "gain": f"{results['distillation_gain_points']:+.1f}",
        "max_examples": results["tasks_record"]["max_examples"],
        "labelled_rows": f"{rows.get('labelled', 0):,}", "transfer_rows": f"{rows.get('transfer', 0):,}",
    })


def write_report(output_dir: str | Path, results: dict) -> None:
    """eval.json, eval.md, eval.png beside the run, and the student's README.md."""
    from transformers import AutoConfig

    from ...evaluation.model_cards import hub_card
    from ..checkpoints import write_atomically, writing_beside_saved_model

    output = Path(output_dir)
    write_atomically(output / "eval.json", json.dumps(results, indent=2) + "\n")
    write_atomically(output / "eval.md", results_table(results) + "\n")
    write_atomically(output / "eval.png", results_plot(results))
    with writing_beside_saved_model(output / "student", "the model card"):
        config = AutoConfig.from_pretrained(output / "student")
        card = hub_card(student_model_card(results, config), results, model_name="student", model="student")
        write_atomically(output / "student" / "README.md", card)
