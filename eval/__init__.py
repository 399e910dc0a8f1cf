"""Evaluation harness: metrics, significance tests, click models and reports (later issues)."""
