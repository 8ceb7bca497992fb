"""Run directories and what is read back from them: checkpoints, status, training health, reports."""
