"""Llama, Mistral and Qwen3: the plain layout (common.TeacherFamily) as it is; Qwen3 has q/k norms."""
from __future__ import annotations

from .common import TeacherFamily


class Llama(TeacherFamily):
    model_types = ("llama", "mistral")


class Qwen3(TeacherFamily):
    model_types = ("qwen3",)

    def config_fields(self, tc, **kw) -> dict:
        return super().config_fields(tc, **kw) | dict(use_qk_norm=True)
