"""Quasar-Long: the student architecture shared by SN24 miners and validators.

Importing the package registers `quasar_long` with AutoConfig / AutoModelForCausalLM, so
`from_pretrained` on a saved checkpoint needs no `trust_remote_code`.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import QuasarLongCache
from .configuration_quasar_long import PRESETS, QuasarLongConfig
from .modeling_quasar_long import QuasarLongForCausalLM, QuasarLongModel, QuasarLongPreTrainedModel

AutoConfig.register(QuasarLongConfig.model_type, QuasarLongConfig, exist_ok=True)
AutoModel.register(QuasarLongConfig, QuasarLongModel, exist_ok=True)
AutoModelForCausalLM.register(QuasarLongConfig, QuasarLongForCausalLM, exist_ok=True)

__all__ = [
    "PRESETS", "QuasarLongCache", "QuasarLongConfig", "QuasarLongForCausalLM", "QuasarLongModel",
    "QuasarLongPreTrainedModel",
]
