"""One run directory per experiment: config, metrics.jsonl, checkpoints, final adapter, summary.

Every write is fsynced, the file and its folder: config and JSON files are written to a temporary
file and renamed into place, metrics.jsonl lines are appended and fsynced one by one."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fedlora.errors import FedloraError
from fedlora.files import fsync_dir


def _atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file, fsync it, rename it over ``path``, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class RunDir:
    """A fresh directory; an existing one is never overwritten."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metrics_path = path / "metrics.jsonl"
        self.checkpoints = path / "checkpoints"

    @staticmethod
    def check_free(root: str | Path, name: str | None) -> None:
        if name is not None and (Path(root) / name).exists():
            raise FedloraError(f"run directory '{Path(root) / name}' already exists; choose another output.name or remove it")

    @classmethod
    def create(cls, root: str | Path, name: str | None, default_stem: str) -> RunDir:
        root = Path(root)
        if name is not None:
            cls.check_free(root, name)
            path = root / name
        else:
            stem = f"{default_stem}-{time.strftime('%Y%m%d-%H%M%S')}"
            path, i = root / stem, 1
            while path.exists():
                i += 1
                path = root / f"{stem}-{i}"
        try:
            path.mkdir(parents=True)
            fsync_dir(path.parent)
        except FileExistsError:
            raise FedloraError(f"run directory '{path}' already exists; choose another output.name") from None
        except OSError as err:
            raise FedloraError(f"cannot create run directory '{path}' ({err.strerror}); check output.root") from None
        return cls(path)

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """An existing run directory, reopened to resume it."""
        if not (path / "config.yaml").is_file():
            raise FedloraError(f"'{path}' is not a run directory (no config.yaml); pass a folder that `fedlora run` wrote")
        return cls(path)

    def rewrite_metrics(self, records: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl by these records (atomically: resume truncates to its checkpoint)."""
        _atomic_write(self.metrics_path, "".join(json.dumps(r, default=float) + "\n" for r in records))

    def write_config(self, yaml_text: str) -> None:
        _atomic_write(self.path / "config.yaml", yaml_text)

    def write_json(self, name: str, data: Any) -> None:
        _atomic_write(self.path / name, json.dumps(data, indent=2, default=float) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        new = not self.metrics_path.exists()
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.path)

    def checkpoint_dir(self, round: int) -> Path:
        return self.checkpoints / f"round_{round}"

    def prune_checkpoints(self, keep: int, every: int | None = None) -> None:
        """Keep the last ``keep`` round checkpoints, and every ``every``-th round's."""
        if not self.checkpoints.exists():
            return
        rounds = sorted(int(p.name.split("_")[1]) for p in self.checkpoints.glob("round_*") if p.name.split("_")[1].isdigit())
        for r in rounds[:-keep]:
            if every is None or r % every:
                shutil.rmtree(self.checkpoint_dir(r), ignore_errors=True)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
