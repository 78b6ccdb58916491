"""Distillation: teacher outputs, sparse KD losses, training (builds on quasar_model)."""
