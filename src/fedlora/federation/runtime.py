"""What a process needs to train and evaluate: the task, the adapted model, the device."""

from __future__ import annotations

import torch

from fedlora.adapters import AdaptedModel, inject_adapters
from fedlora.config import ExperimentConfig
from fedlora.federation.precision import autocast
from fedlora.privacy.compiled import StepKernels
from fedlora.privacy.dpsgd import PerSampleGradients
from fedlora.tasks import Task, build_task


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from fedlora.errors import ConfigError  # noqa: PLC0415

        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


class Runtime:
    """One process's task, PEFT model and per-sample-gradient hooks (shared by its clients)."""

    def __init__(self, cfg: ExperimentConfig, task: Task | None = None) -> None:
        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.train.device)
        self.task = task if task is not None else build_task(cfg.task, cfg.train.seed)
        model = self.task.build_model()
        self.adapted: AdaptedModel = inject_adapters(model, cfg.adapter, cfg.train.seed)
        self.adapted.model.to(self.device)
        start = min((f.layer for f in self.adapted.factors if f.layer is not None), default=0)
        if cfg.task.cache_prefix and start > 0 and hasattr(self.task, "cache_prefix"):
            with self.autocast():
                self.task.cache_prefix(self.adapted.model, start, self.device)
        self.hooks = PerSampleGradients(self.adapted.params, self.adapted.model)
        self._kernels: StepKernels | None = None

    @property
    def kernels(self) -> StepKernels | None:
        """The compiled DP-step math under ``train.compile`` (read at each step: a pooled runtime
        follows the run's config), else None: eager."""
        if not self.cfg.train.compile:
            return None
        if self._kernels is None:
            self._kernels = StepKernels()
        return self._kernels

    def autocast(self):
        """The forward-pass context of ``train.precision`` on this runtime's device."""
        return autocast(self.cfg.train.precision, self.device)

    def evaluate(self, state: dict[str, torch.Tensor], examples=None) -> dict[str, float]:
        self.adapted.load(state)
        with self.autocast():
            return self.task.evaluate(
                self.adapted.model, self.task.test if examples is None else examples, self.cfg.eval.batch_size, self.device
            )
