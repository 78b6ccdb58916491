"""Quasar-Long: the student architecture shared by SN24 miners and validators.

Importing the package is cheap: its light modules (files, paths, corpus, configuration helpers of
the roles) must not pay for torch and transformers. The model names below load on first use, and
that first use registers `quasar_long` with AutoConfig / AutoModelForCausalLM, so `from_pretrained`
on a saved checkpoint needs no `trust_remote_code`; code that only goes through the Auto classes
calls `register()` first.
"""
from __future__ import annotations

import importlib
import threading

_HOMES = {
    "PRESETS": "configuration_quasar_long", "QuasarLongConfig": "configuration_quasar_long",
    "QuasarLongCache": "cache",
    "QuasarLongForCausalLM": "modeling_quasar_long", "QuasarLongModel": "modeling_quasar_long",
    "QuasarLongPreTrainedModel": "modeling_quasar_long",
}
__all__ = sorted(_HOMES) + ["register"]
# One thread loads the model at a time (the validator checks submissions in several): transformers'
# lazy imports, entered from two threads at once, can hand one of them a half-initialised module.
_loading = threading.RLock()


def register() -> None:
    """Register `quasar_long` with the transformers Auto classes (idempotent)."""
    with _loading:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        from .configuration_quasar_long import QuasarLongConfig
        from .modeling_quasar_long import QuasarLongForCausalLM, QuasarLongModel

        AutoConfig.register(QuasarLongConfig.model_type, QuasarLongConfig, exist_ok=True)
        AutoModel.register(QuasarLongConfig, QuasarLongModel, exist_ok=True)
        AutoModelForCausalLM.register(QuasarLongConfig, QuasarLongForCausalLM, exist_ok=True)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _loading:
        register()
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
