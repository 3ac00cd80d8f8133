"""The image task on IDX files the tests write, with a tiny random conv net standing in for
EfficientNet-Lite0 (same backbone class, 1x1 convs, frozen BatchNorm); and the real
EfficientNet-Lite0 conversion (plain 1x1 convs) checked for exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedlora.config import build_config
from fedlora.errors import DataError
from fedlora.experiment import run_experiment
from fedlora.federation.runtime import Runtime
from fedlora.tasks import idx as idx_mod
from fedlora.tasks import image as image_mod
from fedlora.tasks.effnet import ConvBackbone, HeadConv
from tests.helpers import make_idx_folder, write_idx


def tiny_backbone(image_size: int) -> ConvBackbone:
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
    block = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6())
    mbconv = nn.Module()
    mbconv._expand_conv = nn.Conv2d(8, 16, 1, bias=False)
    mbconv._project_conv = nn.Conv2d(16, 8, 1, bias=False)
    mbconv.forward = lambda x: mbconv._project_conv(torch.relu(mbconv._expand_conv(x))) + x
    head = HeadConv(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU6())
    backbone = ConvBackbone(stem, [block, mbconv, head], 12)
    for m in backbone.modules():  # non-trivial running statistics; features grow with brightness
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, nn.Conv2d):
            m.weight.data.abs_()
    return backbone


@pytest.fixture
def image_cfg(tmp_path, monkeypatch):
    monkeypatch.setattr(image_mod, "load_efficientnet_lite0", tiny_backbone)
    folder = make_idx_folder(tmp_path / "fmnist")

    def make(**sections):
        tree = {
            "task": {"name": "image-classification", "dataset": str(folder), "model": "efficientnet-lite0",
                     "image_size": 16},
            "adapter": {"rank": 2, "alpha": 4, "target_modules": ["_expand_conv", "_project_conv", "_conv_head"],
                        "layers": [1, 2]},
            "federation": {"num_clients": 3, "rounds": 3, "local_steps": 4, "min_client_size": 20},
            "privacy": {"epsilon": 8.0},
            "train": {"batch_size": 32, "lr": 0.5},
            "output": {"root": str(tmp_path / "runs")},
        }
        for name, values in sections.items():
            tree.setdefault(name, {}).update(values)
        return build_config(tree)

    return make


def test_idx_round_trip(tmp_path):
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.uint8)
    for name in ("a.gz", "b"):
        write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(idx_mod.read_idx(tmp_path / name), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not an IDX file"):
        idx_mod.read_idx(tmp_path / "bad")


def test_missing_fashion_mnist_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_mod, "SEARCH", (str(tmp_path / "nowhere"),))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        idx_mod.fashion_mnist_dir()


def test_task_loads_idx_and_makes_three_channel_batches(image_cfg):
    cfg = image_cfg(task={"max_train_examples": 100, "name": "image-classification"})
    task = image_mod.ImageClassificationTask(cfg.task, 0)
    assert (len(task.train), len(task.test), task.num_labels) == (100, 60, 3)
    batch = task.batch(task.train, np.arange(5), torch.device("cpu"))
    assert batch["pixel_values"].shape == (5, 3, 16, 16)
    x = batch["pixel_values"]
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grayscale replicated
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # (x - 0.5) / 0.5


def test_prefix_cache_is_exact_and_batchnorm_stays_frozen(image_cfg):
    cached = Runtime(image_cfg())
    assert cached.task.prefix_start == 1  # block 0 has no adapter: cached
    assert set(cached.hooks.linear) == set(cached.adapted.params)  # every factor on the fused path
    model = cached.adapted.model
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        for f in cached.adapted.factors:
            if f.role == "B":
                cached.adapted.params[f.name].normal_()
    full = Runtime(image_cfg(task={"cache_prefix": False}))
    assert full.task.prefix_start == 0
    full.adapted.load(cached.adapted.state())
    idx = np.arange(8)
    with torch.no_grad():
        a = model(**cached.task._inputs(cached.task.batch(cached.task.test, idx, cached.device)))
        b = full.adapted.model(**full.task._inputs(full.task.batch(full.task.test, idx, full.device)))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_prefix_cache_reloads_from_disk_bit_for_bit(image_cfg, tmp_path, monkeypatch):
    disk = {"prefix_cache_dir": str(tmp_path / "cache")}
    first = Runtime(image_cfg(task=disk))
    assert len(list((tmp_path / "cache").glob("*.prefix"))) == 2  # train and test
    memory = Runtime(image_cfg(task={"prefix_cache_dir": "off"}))

    def no_compute(*args, **kwargs):
        raise AssertionError("computed, not loaded")

    monkeypatch.setattr(image_mod.ImageClassificationTask, "_run_prefix", no_compute)
    second = Runtime(image_cfg(task=disk))
    for name in ("train", "test"):
        rows = [getattr(rt.task, name).features["hidden"] for rt in (first, memory, second)]
        assert all(len(r) == len(rows[1]) for r in rows)
        for a, b, c in zip(*rows, strict=True):
            assert a.dtype == b.dtype == c.dtype and a.shape == b.shape == c.shape
            assert np.array_equal(a, b) and np.array_equal(c, b)
    idx = np.arange(6)
    assert torch.equal(second.task.batch(second.task.test, idx, second.device)["hidden"],
                       memory.task.batch(memory.task.test, idx, memory.device)["hidden"])


def test_short_dp_run_learns_the_written_images(image_cfg):
    summary = run_experiment(image_cfg(), progress=False)
    assert summary["rounds"] == 3 and 0 < summary["final"]["epsilon"] <= 8.0
    assert summary["final"]["accuracy"] > 0.5  # three balanced classes: majority about 1/3


def test_batches_reach_the_device_through_the_non_blocking_copy(image_cfg, monkeypatch):
    """Every host tensor of a batch goes through devices.to_device (pinned, non-blocking on CUDA)."""
    copied = []
    real = image_mod.to_device
    monkeypatch.setattr(image_mod, "to_device", lambda t, d: copied.append(t.dtype) or real(t, d))
    task = image_mod.ImageClassificationTask(image_cfg(task={"max_train_examples": 20, "name": "image-classification"}).task, 0)
    batch = task.batch(task.train, np.arange(4), torch.device("cpu"))
    assert sorted(map(str, copied)) == ["torch.int64", "torch.uint8"]  # labels; pixels as bytes, floats there
    assert batch["pixel_values"].dtype == torch.float32
