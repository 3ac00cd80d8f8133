"""The text task's prefix cache held on the device (tasks/text.py keep_cache_on): the same batches."""

from __future__ import annotations

import numpy as np
import torch

from fedlora.federation.runtime import Runtime


def test_cache_on_the_device_gives_the_same_batches_and_losses(tiny_cfg) -> None:
    cfg = tiny_cfg(adapter={"layers": [1]}, task={"cache_prefix": True}, train={"device": "cpu"})
    rt = Runtime(cfg)
    task = rt.task
    assert task.prefix_start == 1 and task._device_cache == {}  # on cpu the host cache alone
    n = min(len(task.train), len(task.test))
    rows = np.array([5, 0, 17, 3, 3, n - 1])
    host = {name: task.batch(getattr(task, name), rows, rt.device) for name in ("train", "test")}
    share_rows = task.batch(task.test, np.array([1, 2]), rt.device)
    task.keep_cache_on(torch.device("cpu"))  # the device path, exercised on the cpu
    assert set(task._device_cache) == {"train", "test"}
    for name in ("train", "test"):
        held = task.batch(getattr(task, name), rows, rt.device)
        assert held.keys() == host[name].keys()
        for k, v in host[name].items():
            assert held[k].dtype == v.dtype and torch.equal(held[k], v), (name, k)
    with torch.no_grad():
        rt.adapted.model.eval()
        a = task.loss(rt.adapted.model, host["train"])
        b = task.loss(rt.adapted.model, task.batch(task.train, rows, rt.device))
    assert torch.equal(a, b)
    # a subset (a client's test share) is not the split: it keeps the host path, same values
    share = task.test.subset(np.array([1, 2]))
    got = task.batch(share, np.array([0, 1]), rt.device)
    assert all(torch.equal(got[k], share_rows[k]) for k in share_rows)
