"""Training, evaluation, schedules, checkpoints and multi-process helpers."""
