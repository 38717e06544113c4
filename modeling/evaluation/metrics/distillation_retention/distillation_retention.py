"""Distillation retention: how much of the teacher's score a student keeps, per task and over tasks.

Each task gives the student's score (`predictions`), the teacher's score on the same test split (`references`) and
its name (`tasks`). Retention of a task is student / teacher (0 when the teacher scores 0 or less: nothing to
retain); `retention_mean` is the unweighted mean over tasks, `retention_worst` the smallest with its task. Scores
are whatever the task's metric is (accuracy, macro F1, ...), as long as teacher and student use the same one.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: per task, the student's score (float).
    references: per task, the teacher's score (float).
    tasks: per task, its name (string); each task once.
Returns:
    retention: task -> student / teacher; retention_mean; retention_worst; worst_task; count: tasks scored.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DistillationRetention(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64"),
                                        "tasks": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, tasks):
        if not tasks:
            raise ValueError("distillation_retention: no task scored; pass one student / teacher score per task.")
        repeated = sorted({t for t in tasks if list(tasks).count(t) > 1})
        if repeated:
            raise ValueError(f"distillation_retention: tasks {repeated} are scored more than once; give each task "
                             "one student / teacher score pair.")
        retention = {task: float(student) / float(teacher) if teacher > 0 else 0.0
                     for student, teacher, task in zip(predictions, references, tasks)}
        worst = min(retention, key=retention.get)
        return {"retention": retention, "retention_mean": float(np.mean(list(retention.values()))),
                "retention_worst": retention[worst], "worst_task": worst, "count": len(retention)}
