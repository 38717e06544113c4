"""Model-card templates (Markdown) that the training scripts fill with measured results; shipped in the wheel."""
