"""DP step time / non-private step time, measured side by side in one run.

Both steps use the same model, batch, active tensors and Poisson batch; the DP step adds the
fused per-sample gradients (hooks + einsum), flat clipping and Gaussian noise. The DP step runs
twice: with the default secure noise (``os.urandom``, privacy/noise.py) and with the seeded
stream of ``privacy.reproducible_noise``; their ratio is the price of secure noise. It also runs
under ``train.compile`` (the per-example einsums and the clip + sum through ``torch.compile``,
privacy/compiled.py): the compile warm-up (first call) is timed apart and excluded from the medians,
and eager / compiled is printed as a ratio.

    python benchmarks/dp_overhead.py                       # the demo model (configs/demo.yaml)
    python benchmarks/dp_overhead.py --set task.num_layers=6 --set adapter.layers=null
    python benchmarks/dp_overhead.py --set adapter.type=vera   # adds the one-example loop VeRA used before
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fedlora.config import load_config, parse_override
from fedlora.federation.client import ClientSpec, local_gradients
from fedlora.federation.runtime import Runtime
from fedlora.privacy.compiled import StepKernels
from fedlora.privacy.dpsgd import DPParams, clipped_sums
from fedlora.privacy.noise import SecureNoise, SeededNoise


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def noise_draws(shapes: list[tuple[int, ...]], device: torch.device, repeats: int = 21) -> dict[str, float]:
    """Median seconds to draw one DP step's noise for these tensor shapes, per source."""
    secure, seeded = SecureNoise(), SeededNoise(torch.Generator().manual_seed(0))
    variants = {
        "secure, one draw per step": lambda: secure.normals(shapes, dtype=torch.float32, device=device),
        "secure, one draw per tensor": lambda: [secure.normal(sh, dtype=torch.float32, device=device) for sh in shapes],
        "seeded (CPU generator)": lambda: seeded.normals(shapes, dtype=torch.float32, device=device),
    }
    out = {}
    for k, fn in variants.items():
        fn()
        out[k] = statistics.median(timed(fn, repeats))
    # As in training: the step computes (here: 35 ms of waiting, like a GPU step) while the entropy
    # pool reads ahead on its thread, then the noise is drawn.
    ahead = []
    for _ in range(repeats):
        time.sleep(0.035)
        ahead += timed(variants["secure, one draw per step"], 1)
    out["secure, one draw per step, after a 35 ms step"] = statistics.median(ahead)
    return out


def clip_sum_alone(per_sample: dict[str, torch.Tensor], dp: DPParams, repeats: int = 21) -> tuple[float, float, float]:
    """Median seconds of the clip + weighted sum, eager and compiled (privacy/compiled.py), and the
    compile warm-up, on these per-example gradients."""
    kernels = StepKernels()
    t = time.perf_counter()
    kernels.clipped_sums(per_sample, dp)
    warmup = time.perf_counter() - t
    eager, compiled = [], []
    for _ in range(repeats):
        eager += timed(lambda: clipped_sums(per_sample, dp), 1)
        compiled += timed(lambda: kernels.clipped_sums(per_sample, dp), 1)
    return statistics.median(eager), statistics.median(compiled), warmup


# RoBERTa-base, LoRA r 8 on query/value of its 12 layers (A: 8 x 768, B: 768 x 8) + a 2-class head
ROBERTA_BASE_R8 = [(8, 768), (768, 8)] * 24 + [(2, 768), (2,)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    overrides = dict(parse_override(s) for s in args.set)
    overrides.setdefault("task.max_train_examples", 2000)
    overrides.setdefault("task.max_test_examples", 64)
    cfg = load_config(args.config, overrides)
    rt = Runtime(cfg)
    n = len(rt.task.train)
    rows = np.random.default_rng(0).choice(n, size=args.batch, replace=False)
    active = sorted(rt.adapted.params)
    rt.adapted.set_active(set(active))
    secure, seeded = SecureNoise(), SeededNoise(torch.Generator().manual_seed(0))
    plain = ClientSpec(0, np.arange(n), args.batch / n, None, 1)
    private = ClientSpec(0, np.arange(n), args.batch / n, DPParams(1.0, 2.0, args.batch), 1)

    def step(spec, noise=secure):
        return lambda: local_gradients(rt, spec, rows, active, noise)

    compiled_cfg = load_config(args.config, {**overrides, "train.compile": True})

    def compiled():  # the same DP step under train.compile (rt.kernels follows rt.cfg)
        rt.cfg = compiled_cfg
        try:
            return local_gradients(rt, private, rows, active, secure)
        finally:
            rt.cfg = cfg

    t = time.perf_counter()
    compiled()  # compile warm-up, excluded from the medians
    warmup = time.perf_counter() - t
    variants = {"non-private": step(plain), "dp (fused)": step(private), "dp (fused, seeded)": step(private, seeded),
                "dp (fused, compiled)": compiled}
    if rt.hooks.vera:  # VeRA: also time the exact one-example loop its vectors used before the fused hooks

        def looped():
            fused, rt.hooks.fused = rt.hooks.fused, set(rt.hooks.linear)
            try:
                return local_gradients(rt, private, rows, active, secure)
            finally:
                rt.hooks.fused = fused

        variants["dp (VeRA loop)"] = looped
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        for k, fn in variants.items():
            times[k] += timed(fn, 1)
    base = statistics.median(times["non-private"])
    print(f"model: {cfg.task.model}, layers {cfg.task.num_layers}, adapted {cfg.adapter.layers or 'all'}, "
          f"rank {cfg.adapter.rank}, batch {args.batch}, threads {torch.get_num_threads()}, device {rt.device}")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:20s} {1000 * med:8.1f} ms/step   ratio to non-private {med / base:5.3f}")
    secure_s, seeded_s = statistics.median(times["dp (fused)"]), statistics.median(times["dp (fused, seeded)"])
    compiled_s = statistics.median(times["dp (fused, compiled)"])
    rt.cfg = compiled_cfg
    fell_back = rt.kernels.failed if rt.kernels is not None else {}
    rt.cfg = cfg
    print(f"eager / compiled DP step (train.compile): time ratio {secure_s / compiled_s:5.3f}; compile warm-up "
          f"{warmup:.1f} s (first compiled step, excluded); fell back to eager: {fell_back or 'none'}")
    n_noise = sum(rt.adapted.params[k].numel() for k in active)
    print(f"secure / seeded noise: DP step time ratio {secure_s / seeded_s:5.3f} ({n_noise:,} noised values per step)")
    gen = torch.Generator().manual_seed(0)
    for label, per_sample in (
        ("this model", {k: torch.randn(args.batch, *rt.adapted.params[k].shape, generator=gen) for k in active}),
        ("RoBERTa-base r8 q/v, batch 32", {str(i): torch.randn(32, *sh, generator=gen) for i, sh in enumerate(ROBERTA_BASE_R8)}),
    ):
        e, c, w = clip_sum_alone(per_sample, private.dp)
        print(f"clip + sum alone, {label}: eager {1000 * e:.2f} ms, compiled {1000 * c:.2f} ms, "
              f"eager / compiled {e / c:5.3f} (compile warm-up {w:.1f} s)")
    for label, shapes in (("this model", [tuple(rt.adapted.params[k].shape) for k in active]),
                          ("RoBERTa-base r8 q/v", ROBERTA_BASE_R8)):
        draws = noise_draws(shapes, rt.device)
        values = sum(int(np.prod(sh)) for sh in shapes)
        print(f"noise alone, {label} ({values:,} values, {len(shapes)} tensors): "
              + ", ".join(f"{k} {1000 * t:.2f} ms" for k, t in draws.items()))


if __name__ == "__main__":
    main()
