"""The method registry: methods by name; unknown or duplicate names fail loudly."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from fedlora.errors import ConfigError
from fedlora.methods.base import Method

MethodFactory = Callable[["MethodSetup"], Method]
_METHODS: dict[str, tuple[MethodFactory, str]] = {}


class MethodSetup:
    """What a method factory may read: its options, the head choice, the adapter config."""

    def __init__(self, options: dict[str, Any], federate_head: bool, rounds: int, seed: int, adapter: Any = None) -> None:
        self.options = dict(options)
        self.adapter = adapter  # an AdapterConfig (rank, alpha, rslora, type), when known
        self.federate_head = federate_head
        self.rounds = rounds
        self.seed = seed
        self._used: set[str] = set()

    def option(self, key: str, default: Any) -> Any:
        self._used.add(key)
        return self.options.get(key, default)

    def lora_scale(self, method: str) -> float:
        """The LoRA scale s (alpha/r, or alpha/sqrt(r) with rsLoRA); LoRA adapters only."""
        if self.adapter is None or self.adapter.type != "lora":
            raise ConfigError(f"method '{method}' needs LoRA adapters; set adapter.type=lora")
        a = self.adapter
        return float(a.alpha / (a.rank**0.5 if a.rslora else a.rank))

    def check_all_used(self, method: str) -> None:
        unknown = sorted(set(self.options) - self._used)
        if unknown:
            raise ConfigError(f"method '{method}' has no option '{unknown[0]}'; known: {', '.join(sorted(self._used)) or 'none'}")


# What a method needs from the adapter. `fedlora run --method NAME` and `fedlora compare` apply
# these before the user's -s overrides; a config file that names the method must set them itself.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "fedsa-vera": {"adapter.type": "vera"},
    "fedsa-rslora": {"adapter.rslora": True},
}


def register_method(name: str, description: str) -> Callable[[MethodFactory], MethodFactory]:
    if not name or name != name.lower() or " " in name:
        raise ValueError(f"method names are lower-case without spaces, got {name!r}")

    def deco(factory: MethodFactory) -> MethodFactory:
        if name in _METHODS:
            raise ValueError(f"method '{name}' is already registered")
        _METHODS[name] = (factory, description)
        return factory

    return deco


def available_methods() -> dict[str, str]:
    return {n: d for n, (_, d) in sorted(_METHODS.items())}


def method_module(name: str) -> str:
    """The module that registered ``name`` (its docstring cites the paper)."""
    return _METHODS[name][0].__module__


def build_method(name: str, setup: MethodSetup) -> Method:
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown method '{name}'{hint}; known methods: {', '.join(sorted(_METHODS))}")
    method = _METHODS[name][0](setup)
    setup.check_all_used(name)
    return method
