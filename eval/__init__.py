"""Evaluation: held-out KL, long-context recall, scoring (builds on quasar_model)."""
