"""The shipped vision config stays valid and reduced (the figures in its header depend on it)."""

from __future__ import annotations

from pathlib import Path

from fedlora.config import load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "fashion-mnist.yaml"


def test_fashion_mnist_config_is_the_reduced_offline_image_task():
    cfg = load_config(CONFIG)
    assert (cfg.task.name, cfg.task.dataset, cfg.task.model) == ("image-classification", "fashion-mnist",
                                                                 "efficientnet-lite0")
    assert cfg.task.image_size == 32 and cfg.task.cache_prefix
    assert (cfg.task.max_train_examples, cfg.task.max_test_examples) == (3000, 1000)
    assert cfg.federation.num_clients == 6 and cfg.federation.rounds * cfg.federation.local_steps == 100
    assert min(cfg.adapter.layers) == 15  # blocks 0-14 are cached once; only 15-16 run per step
    assert (cfg.privacy.epsilon, cfg.privacy.delta) == (3.0, 1e-5)
