"""Evaluation: task metrics, scoring a run's outputs and the paired-bootstrap report."""
