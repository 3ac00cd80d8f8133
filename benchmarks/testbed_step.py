"""The testbed's DP step with and without the one-pixel fast paths, side by side in one run.

``configs/testbed.yaml`` adapts EfficientNet-Lite0's blocks 12-16, which at 32 x 32 images see
maps of a single pixel. Two exact rewrites make those blocks cheap on a CPU (tasks/effnet.py,
pointwise.py): the 5x5 depthwise convolution of a padded pixel is its centre tap times the pixel,
and a 1x1 convolution of a pixel is a matrix product. This script times one client's DP step
(forward, per-example gradients, clipping, noise) with both on (the library's default) and with
both off (the padded depthwise convolution and the mkldnn 1x1 convolution, as before), alternating
the two so that machine load hits both alike, checks that both compute the same logits, and
prints the ratio.

    python benchmarks/testbed_step.py              # one thread, as in `fedlora compare -s train.threads=1`
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

from fedlora.config import load_config
from fedlora.federation.client import ClientSpec, local_gradients
from fedlora.federation.runtime import Runtime
from fedlora.pointwise import PointwiseConv, is_pointwise_conv
from fedlora.privacy.dpsgd import DPParams
from fedlora.privacy.noise import SecureNoise
from fedlora.tasks.effnet import CentreTapDepthwise


def set_fast_paths(model: nn.Module, on: bool, centres: dict[int, tuple[int, int] | None]) -> None:
    """Turn the one-pixel rewrites on (the default) or off (the plain convolutions) in place."""
    for m in model.modules():
        if is_pointwise_conv(m):
            m.__class__ = PointwiseConv if on else nn.Conv2d
        if isinstance(m, CentreTapDepthwise):
            centres.setdefault(id(m), m.centre)
            m.centre = centres[id(m)] if on else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/testbed.yaml")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    cfg = load_config(args.config, {"train.threads": args.threads})
    rt = Runtime(cfg)
    model = rt.adapted.model
    n = len(rt.task.train)
    rows = np.random.default_rng(0).choice(n, size=cfg.train.batch_size, replace=False)
    active = sorted(rt.adapted.params)
    rt.adapted.set_active(set(active))
    spec = ClientSpec(0, np.arange(n), cfg.train.batch_size / n, DPParams(1.0, cfg.privacy.clip_norm, cfg.train.batch_size), 1)
    noise, centres = SecureNoise(), {}

    def logits() -> torch.Tensor:
        batch = rt.task.batch(rt.task.train, rows, rt.device)
        with torch.no_grad():
            return model(**rt.task._inputs(batch)).float()

    times: dict[bool, list[float]] = {True: [], False: []}
    out: dict[bool, torch.Tensor] = {}
    for i in range(args.repeats + 1):
        for on in (True, False):
            set_fast_paths(model, on, centres)
            t = time.perf_counter()
            local_gradients(rt, spec, rows, active, noise)
            if i:  # the first round is warm-up
                times[on].append(time.perf_counter() - t)
            out[on] = logits()
    set_fast_paths(model, True, centres)
    fast, slow = statistics.median(times[True]), statistics.median(times[False])
    diff = (out[True] - out[False]).abs().max().item()
    print(f"testbed DP step (batch {cfg.train.batch_size}, {args.threads} thread(s), median of {args.repeats}):")
    print(f"  plain convolutions      {slow * 1e3:8.1f} ms")
    print(f"  one-pixel fast paths    {fast * 1e3:8.1f} ms")
    print(f"  speed-up (plain / fast) {slow / fast:8.2f}x   max |logit difference| {diff:.2e}")


if __name__ == "__main__":
    main()
