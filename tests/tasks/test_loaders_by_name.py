"""The by-name (online) loaders without a network: a stand-in ``datasets`` module whose
``load_dataset(name, config)`` reads JSON-lines files and PNGs the tests write, shaped like
the hub's GLUE (QNLI), SQuAD and CIFAR-style image datasets (test labels -1, ClassLabel names,
decoded PIL images)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from fedlora.config import build_config
from fedlora.errors import DataError
from fedlora.tasks import build_task
from fedlora.tasks.images import load_images
from tests.helpers import NEGATIVE, NEUTRAL, POSITIVE, tiny_tree


class FakeSplit:
    """What the loaders use of a ``datasets.Dataset``: columns, column lists, features, pandas."""

    def __init__(self, rows: list[dict], features: dict, image_root: Path) -> None:
        self.rows, self.features, self.image_root = rows, features, image_root

    @property
    def column_names(self) -> list[str]:
        return list(self.rows[0])

    def __getitem__(self, column: str) -> list:
        values = [r[column] for r in self.rows]
        if column in self.features.get("_images", ()):  # Image feature: decoded on access
            from PIL import Image

            return [Image.open(self.image_root / v) for v in values]
        return values

    def to_pandas(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """Install the stand-in; ``hub / name / [config /] split.jsonl`` (+ features.json) are its data."""
    root = tmp_path / "hub"

    def load_dataset(name: str, config: str | None = None) -> dict[str, FakeSplit]:
        folder = root / name / (config or "")
        if not folder.is_dir():
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        meta = json.loads((folder / "features.json").read_text()) if (folder / "features.json").exists() else {}
        features = {k: SimpleNamespace(names=v) for k, v in meta.get("names", {}).items()}
        features["_images"] = meta.get("images", [])
        return {p.stem: FakeSplit([json.loads(line) for line in p.read_text().splitlines()], features, folder)
                for p in sorted(folder.glob("*.jsonl"))}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return root


def write_split(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_glue_pairs_by_name_use_validation_when_test_labels_are_hidden(hub, tiny_model_dir, tmp_path):
    rng = np.random.default_rng(0)

    def rows(n: int, hidden: bool = False) -> list[dict]:
        out = []
        for i in range(n):
            key, label = str(rng.choice(POSITIVE + NEGATIVE)), int(rng.integers(0, 2))
            other = str(rng.choice([w for w in POSITIVE + NEGATIVE if w != key]))
            out.append({"question": f"{rng.choice(NEUTRAL)} {key} {i}", "sentence": f"{key if label else other} {i}",
                        "label": -1 if hidden else label, "idx": i})
        return out

    folder = hub / "glue" / "qnli"
    write_split(folder, "train", rows(120))
    write_split(folder, "validation", rows(30))
    write_split(folder, "test", rows(25, hidden=True))
    tree = tiny_tree(tiny_model_dir, Path("glue"), tmp_path / "runs",
                     task={"dataset": "glue", "dataset_config": "qnli", "text_column": "question",
                           "text_pair_column": "sentence"})
    task = build_task(build_config(tree).task, 0)
    assert (len(task.train), len(task.test)) == (120, 30)  # the -1 test split is skipped
    assert task.label_names == ["0", "1"]
    assert "token_type_ids" in task.batch(task.train, np.arange(4), torch.device("cpu"))


def test_squad_by_name_takes_the_validation_split(hub, tiny_model_dir, tmp_path):
    def rows(n: int) -> list[dict]:
        out = []
        for i in range(n):
            context = f"the movie was {POSITIVE[i % len(POSITIVE)]} and the plot was dull"
            answer = POSITIVE[i % len(POSITIVE)]
            out.append({"id": str(i), "title": "t", "question": "the movie was", "context": context,
                        "answers": {"text": [answer], "answer_start": [context.index(answer)]}})
        return out

    write_split(hub / "squad", "train", rows(20))
    write_split(hub / "squad", "validation", rows(6))
    cfg = build_config({"task": {"name": "question-answering", "dataset": "squad", "model": str(tiny_model_dir),
                                 "max_length": 16, "doc_stride": 4}})
    task = build_task(cfg.task, 0)
    assert len(task.test.extra["contexts"]) == 6 and len(task.train.extra["contexts"]) == 20
    assert task.test.extra["answers"][0] == [POSITIVE[0]]
    assert (task.train.labels == 1).any()  # some window holds its answer span


@pytest.fixture
def cifar_like(hub) -> Path:
    """'img' PNGs of two sizes, 'fine_label' with ClassLabel names, a labelled test split."""
    from PIL import Image

    folder = hub / "cifar-like"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 12), ("test", 6)):
        rows = []
        for i in range(n):
            label, side = i % 3, 8 if i % 2 else 12
            Image.fromarray(rng.integers(0, 255, size=(side, side, 3)).astype(np.uint8)).save(folder / f"{split}{i}.png")
            rows.append({"img": f"{split}{i}.png", "fine_label": label})
        splits[split] = rows
        write_split(folder, split, rows)
    (folder / "features.json").write_text(json.dumps({"names": {"fine_label": ["apple", "bee", "cat"]},
                                                      "images": ["img"]}))
    return folder


def image_cfg(**task) -> SimpleNamespace:
    fields = {"dataset": "cifar-like", "dataset_config": None, "image_column": "img", "label_column": "fine_label"}
    return SimpleNamespace(**{**fields, **task})


def test_image_dataset_by_name_is_resized_with_classlabel_names(cifar_like):
    splits, names = load_images(image_cfg(), 10)
    assert names == ["apple", "bee", "cat"]
    images, labels = splits["train"]
    assert {x.shape for x in images} == {(3, 10, 10)} and {x.dtype for x in images} == {np.dtype(np.uint8)}
    assert labels.tolist() == [i % 3 for i in range(12)] and len(splits["test"][1]) == 6


def test_image_dataset_with_hidden_test_labels_falls_back_to_validation(cifar_like):
    rows = [json.loads(line) for line in (cifar_like / "test.jsonl").read_text().splitlines()]
    write_split(cifar_like, "validation", rows[:4])
    write_split(cifar_like, "test", [{**r, "fine_label": -1} for r in rows])
    splits, _ = load_images(image_cfg(), 10)
    assert splits["test"][1].tolist() == [r["fine_label"] for r in rows[:4]]


def test_image_dataset_errors_name_the_fix(cifar_like, monkeypatch):
    with pytest.raises(DataError, match="no column 'image'.*task.image_column"):
        load_images(image_cfg(image_column="image"), 10)
    with pytest.raises(DataError, match="could not load image dataset 'no-such'"):
        load_images(image_cfg(dataset="no-such"), 10)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match=r"fedlora\[online\]"):
        load_images(image_cfg(), 10)
