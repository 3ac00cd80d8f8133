"""The task interface and its registry.

A task brings its data, its model, its batching and its metric. Nothing outside ``tasks/``
knows about datasets or tokenizers: the federation sees a :class:`Task` with a training set,
a test set, ``build_model()``, ``batch()``, ``loss()`` and ``evaluate()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from fedlora.errors import ConfigError


@dataclass
class ExampleSet:
    """Examples of one split: per-example feature arrays plus integer labels."""

    features: dict[str, list[np.ndarray]]  # name -> one array per example (variable length)
    labels: np.ndarray  # (n,) int64
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> ExampleSet:
        idx = [int(i) for i in indices]
        return ExampleSet(
            {k: [v[i] for i in idx] for k, v in self.features.items()}, self.labels[idx], self.extra
        )


class Task(Protocol):
    """What the federation needs from a task.

    ``evaluate`` returns at least ``accuracy`` and ``loss``. A task whose ``accuracy`` is not a
    classification accuracy names it in an optional ``metric_label`` attribute (causal-lm: "exact
    match"); the summary line and compare tables then say so and show no majority-class baseline."""

    name: str
    train: ExampleSet
    test: ExampleSet
    num_labels: int
    label_names: list[str]

    def build_model(self) -> nn.Module: ...

    def batch(self, examples: ExampleSet, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example losses, shape (batch,)."""
        ...

    def evaluate(self, model: nn.Module, examples: ExampleSet, batch_size: int, device: torch.device) -> dict[str, float]: ...


class PrefixCachedClassification:
    """Shared by classification tasks whose batches may carry hidden states cached at layer
    ``prefix_start`` (the frozen layers below the first adapter run once): model inputs and the
    per-example cross-entropy."""

    prefix_start: int = 0

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
        if "hidden" in inputs:
            inputs["start"] = self.prefix_start
        return inputs

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**self._inputs(batch))
        return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")  # (batch,)


TaskFactory = Callable[..., Task]
OfflineCheck = Callable[[], str | None]  # None: runs offline here; else what is missing
_TASKS: dict[str, tuple[TaskFactory, str]] = {}
_OFFLINE: dict[str, OfflineCheck] = {}


def register_task(name: str, description: str, offline: OfflineCheck | None = None) -> Callable[[TaskFactory], TaskFactory]:
    """``offline``: says what this machine lacks for the task's offline default (None: nothing)."""
    def deco(factory: TaskFactory) -> TaskFactory:
        if name in _TASKS:
            raise ValueError(f"task '{name}' is already registered")
        _TASKS[name] = (factory, description)
        if offline is not None:
            _OFFLINE[name] = offline
        return factory

    return deco


def available_tasks() -> dict[str, str]:
    return {name: desc for name, (_, desc) in sorted(_TASKS.items())}


def offline_status() -> dict[str, str]:
    """Per task: 'offline: yes', 'offline: no (<what is missing>)' or 'online only'."""
    out = {}
    for name in sorted(_TASKS):
        check = _OFFLINE.get(name)
        missing = check() if check is not None else "online only"
        out[name] = "online only" if check is None else ("offline: yes" if missing is None else f"offline: no ({missing})")
    return out


def build_task(cfg: Any, seed: int, *, train: bool = True) -> Task:
    """Build the task named by ``cfg.name`` (a :class:`fedlora.config.TaskConfig`).

    ``train=False`` (the Flower server): the task holds no training examples. A factory that takes a
    ``train`` keyword does not open the training data at all (the text task with a folder of
    ``train.*``/``test.*``: only ``test.*`` is read); any other drops it after loading."""
    if cfg.name not in _TASKS:
        known = ", ".join(sorted(_TASKS))
        raise ConfigError(f"unknown task '{cfg.name}'; known tasks: {known}")
    factory = _TASKS[cfg.name][0]
    if train:
        return factory(cfg, seed)
    if "train" in inspect.signature(factory).parameters:
        task = factory(cfg, seed, train=False)
    else:
        task = factory(cfg, seed)
    task.train = task.train.subset(np.zeros(0, np.int64))
    return task


def majority_rate(labels: np.ndarray) -> float:
    return float(np.bincount(labels).max() / max(len(labels), 1))


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    loss = nn.functional.cross_entropy(logits, labels).item()
    acc = (logits.argmax(-1) == labels).float().mean().item()
    return {"accuracy": acc, "loss": loss}
