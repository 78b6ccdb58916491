"""Which teacher families map onto a Quasar-Long student, by their config's model_type."""
from __future__ import annotations

from .common import TeacherFamily
from .glm4 import Glm4, Glm4Moe
from .llama import Llama, Qwen3
from .qwen3_5 import Qwen35, Qwen35Moe

FAMILIES: dict[str, TeacherFamily] = {t: family for family in (Qwen3(), Llama(), Qwen35(), Qwen35Moe(), Glm4(), Glm4Moe())
                                      for t in family.model_types}
SUPPORTED_FAMILIES = tuple(FAMILIES)
VL_WRAPPERS = {"qwen3_5": "Qwen3_5ForCausalLM, model_type 'qwen3_5_text'",
               "qwen3_5_moe": "Qwen3_5MoeForCausalLM, model_type 'qwen3_5_moe_text'"}


def family_of(tc) -> TeacherFamily:
    """The teacher config's family, refused with a message naming what to load instead."""
    family = getattr(tc, "model_type", None)
    if family in VL_WRAPPERS:
        raise ValueError(f"teacher model_type {family!r} is the vision-language wrapper: load its text model "
                         f"({VL_WRAPPERS[family]}) as the teacher")
    if family not in FAMILIES:
        raise ValueError(f"teacher model_type {family!r}: structural init maps {SUPPORTED_FAMILIES} decoders "
                         "(q/k/v/o attention + SwiGLU MLP); distill other teachers from a teacher cache instead")
    return FAMILIES[family]


def check_teacher(tc) -> TeacherFamily:
    """Raise ValueError naming the first property of the teacher config that does not map exactly;
    return its family."""
    family = family_of(tc)
    family.check(tc)
    return family
