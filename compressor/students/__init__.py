"""Student families behind ``--student SPEC``: a registry (timm-style) and one file per family.

Importing a family module registers it; each is imported explicitly here, one line each, so the list of
families is this file and nothing registers itself as a side effect of ``import *``.
"""

from compressor.students.registry import create_student, list_students, register_student, student_catalogue

from compressor.students import cnn  # noqa: F401  registers "cnn"
from compressor.students import from_teacher  # noqa: F401  registers "from-teacher"
from compressor.students import hf  # noqa: F401  registers "hf" (transformers is imported only when one is built)
from compressor.students import mlp  # noqa: F401  registers "mlp"
from compressor.students import timm  # noqa: F401  registers "timm" (timm is imported only when one is built)
from compressor.students import torchvision  # noqa: F401  registers "torchvision" (likewise)
from compressor.students.from_teacher import build_from_architecture, describe_architecture

__all__ = ["build_from_architecture", "create_student", "describe_architecture", "list_students", "register_student",
           "student_catalogue"]
