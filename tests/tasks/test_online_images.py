"""Online image path without a network: a tiny random ViT saved locally, PNG images in an
image-folder layout, LoRA on query/value, a short DP run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.config import build_config
from fedlora.errors import DataError
from fedlora.experiment import run_experiment
from fedlora.federation.runtime import Runtime
from fedlora.tasks.image import ImageClassificationTask
from tests.helpers import check_short_run


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=32, num_labels=2)
    ViTForImageClassification(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """train/ and test/ with one subfolder per class: red-ish and blue-ish PNGs of varied sizes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 20)):
        for label, name in enumerate(["blue", "red"]):
            (root / split / name).mkdir(parents=True)
            for i in range(n // 2):
                side = int(rng.integers(12, 24))
                img = rng.integers(0, 80, size=(side, side, 3)).astype(np.uint8)
                img[..., 0 if label else 2] += 170
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def query_value(model: Path) -> list[str]:
    """'query'/'value' in older transformers ViTs, 'q_proj'/'v_proj' in newer ones."""
    from transformers import ViTForImageClassification

    names = {n.split(".")[-1] for n, _ in ViTForImageClassification.from_pretrained(model).named_modules()}
    return ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]


def cfg_for(model: Path, data: Path, tmp_path: Path, **task):
    return build_config({
        "task": {"name": "image-classification", "dataset": str(data), "model": str(model), **task},
        "adapter": {"rank": 2, "alpha": 4, "target_modules": query_value(model)},
        "federation": {"num_clients": 2, "rounds": 2, "local_steps": 3, "min_client_size": 10},
        "privacy": {"epsilon": 8.0},
        "train": {"batch_size": 16, "lr": 0.5},
        "output": {"root": str(tmp_path / "runs")},
    })


def test_image_folder_is_resized_to_the_processor_size(tiny_vit, image_folder, tmp_path):
    task = ImageClassificationTask(cfg_for(tiny_vit, image_folder, tmp_path).task, 0)
    assert task.label_names == ["blue", "red"] and (len(task.train), len(task.test)) == (60, 20)
    assert {x.shape for x in task.train.features["pixels"]} == {(3, 16, 16)}
    batch = task.batch(task.test, np.arange(4), torch.device("cpu"))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)


def test_lora_on_query_value_of_the_vit(tiny_vit, image_folder, tmp_path):
    rt = Runtime(cfg_for(tiny_vit, image_folder, tmp_path))
    modules = {f.module.split(".")[-1] for f in rt.adapted.factors if f.role in ("A", "B")}
    assert modules == set(query_value(tiny_vit))
    assert {f.layer for f in rt.adapted.factors if f.role == "A"} == {0, 1}
    assert set(rt.hooks.linear) == set(rt.adapted.params)  # fused per-sample gradients everywhere


def test_short_dp_run_on_the_tiny_vit(tiny_vit, image_folder, tmp_path):
    cfg = cfg_for(tiny_vit, image_folder, tmp_path)
    summary = run_experiment(cfg, progress=False)
    check_short_run(summary, rounds=2, n_test=20, target_epsilon=cfg.privacy.epsilon)


def test_missing_image_folder_is_a_data_error(tiny_vit, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageClassificationTask(cfg_for(tiny_vit, tmp_path / "no-such-images", tmp_path).task, 0)
