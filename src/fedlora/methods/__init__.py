"""Methods: one file per paper, each a composition of the four seams. Importing registers them."""

from fedlora.methods import (  # noqa: F401
    as_lora,
    dp_lora,
    fedex_lora,
    fedsa_lora,
    fedsvd,
    ffa_lora,
    flora,
    head_only,
    la_lora,
    rolora,
)
from fedlora.methods.base import ClientTrace, Method, PlanContext, RoundPlan
from fedlora.methods.registry import MethodSetup, available_methods, build_method, register_method

__all__ = [
    "ClientTrace",
    "Method",
    "MethodSetup",
    "PlanContext",
    "RoundPlan",
    "available_methods",
    "build_method",
    "register_method",
]
