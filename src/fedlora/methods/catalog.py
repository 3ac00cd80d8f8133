"""What ``fedlora methods`` lists: each registered method's four seams and its paper.

The seam names are those the compose config accepts (``method.plan``, ``method.schedule``,
``method.upload``, ``method.aggregate``; ``compose.SEAMS``), found by building the method with
its default options. The paper is the citation in the method module's docstring: its second
paragraph up to the first arXiv link.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from fedlora.config import AdapterConfig
from fedlora.errors import ConfigError
from fedlora.methods.base import Method
from fedlora.methods.compose import KINDS, SEAMS, profile
from fedlora.methods.registry import MethodSetup, available_methods, build_method, method_module

URL = re.compile(r"https://arxiv\.org/abs/[0-9]+\.[0-9]+")
# adapters to build a method with: the first one it accepts (fedsa-rslora and fedsa-vera refuse the default)
ADAPTERS = (AdapterConfig(), AdapterConfig(rslora=True), AdapterConfig(type="vera"))


@dataclass(frozen=True)
class MethodEntry:
    name: str
    description: str
    seams: dict[str, str]  # kind -> seam name as the compose config takes it ("-" when it has none)
    paper: str


def paper_of(module: str) -> str:
    doc = importlib.import_module(module).__doc__ or ""
    paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]
    text = next((p for p in paragraphs[1:] if URL.search(p)), next((p for p in paragraphs if URL.search(p)), ""))
    match = URL.search(text)
    if match is None:
        return "-"
    cite = text[: match.end()]
    return cite + ")" if cite.count("(") > cite.count(")") else cite


def _build(name: str) -> Method:
    for adapter in ADAPTERS:
        try:
            return build_method(name, MethodSetup({}, True, 10, 0, adapter=adapter))
        except ConfigError:
            continue
    raise ConfigError(f"method '{name}' does not build with default options; check its registration")


def catalog() -> list[MethodEntry]:
    entries = []
    for name, description in available_methods().items():
        seams = profile(_build(name))
        entries.append(MethodEntry(name, description, {k: s.name if s else "-" for k, s in seams.items()},
                                   paper_of(method_module(name))))
    return entries


def seam_names() -> dict[str, list[str]]:
    """Every seam name the compose config accepts, per kind."""
    return {k: list(SEAMS[k]) for k in KINDS}
