"""Multi-task distillation (a teacher into a smaller lightarch student) on Trainer: issue 14. Nothing here yet."""
