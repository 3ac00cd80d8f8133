"""K clients one after another vs K clients batched in one pass, side by side in one run.

Both variants run the same round (same plan, download, client states, seeds) for every one of
K clients: ``run_client`` K times (the sequential engine) and ``run_batched`` once
(federation/batched.py, ``federation.batched_clients``). They are interleaved, the median
of the repeats is reported, and the uploads of the two are checked equal. On CUDA the peak
memory of each variant is printed too.

    python benchmarks/multiclient.py                        # demo model, K = 16
    python benchmarks/multiclient.py --set train.batch_size=8 --set train.threads=1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from fedlora.config import load_config, parse_override
from fedlora.federation.batched import run_batched
from fedlora.federation.client import run_client
from fedlora.federation.clients_per_pass import unbatchable
from fedlora.federation.simulation import Simulation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-pass", type=int, action="append", default=None,
                    help="clients per batched pass (repeatable; default: all of them in one pass)")
    args = ap.parse_args()
    overrides = dict(parse_override(s) for s in args.set)
    overrides.setdefault("task.max_train_examples", 4000)
    overrides.setdefault("task.max_test_examples", 64)
    overrides.setdefault("train.batch_size", 32)
    overrides.setdefault("federation.local_steps", 2)
    overrides.setdefault("privacy.accountant", "rdp")  # calibration is not what is timed
    overrides["federation.num_clients"] = args.clients
    cfg = load_config(args.config, overrides)
    sim = Simulation(cfg)
    reason = unbatchable(sim)
    if reason:
        raise SystemExit(f"this config cannot batch: {reason}")
    plan = sim.method.plan(sim.plan_context(1))
    download = {k: sim.global_state[k] for k in plan.download}
    steps, seed, cuda = cfg.federation.local_steps, cfg.train.seed, sim.rt.device.type == "cuda"

    def sequential():
        return [run_client(sim.rt, sim.method, plan, download, spec, copy.deepcopy(st), local_steps=steps, seed=seed)
                for spec, st in zip(sim.specs, sim.clients, strict=True)]

    def batched(k: int):
        def run():
            out = []
            for i in range(0, args.clients, k):
                out += run_batched(sim.rt, sim.method, plan, download, sim.specs[i:i + k],
                                   copy.deepcopy(sim.clients[i:i + k]), local_steps=steps, seed=seed)
            return out
        return run

    variants = {"sequential": sequential, **{f"batched K={k}": batched(k) for k in args.per_pass or [args.clients]}}
    times: dict[str, list[float]] = {k: [] for k in variants}
    peak: dict[str, float] = {}
    outputs = {k: fn() for k, fn in variants.items()}  # warm-up, and the equality check
    worst = max(float((b.upload[k] - s.upload[k]).norm() / (s.upload[k].norm() + 1e-30))
                for name in variants if name != "sequential"
                for s, b in zip(outputs["sequential"], outputs[name], strict=True) for k in s.upload)
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        for k, fn in variants.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
                peak[k] = torch.cuda.max_memory_allocated() / 2**30
            times[k].append(time.perf_counter() - t)
    rows = sum(r.examples for r in outputs["sequential"])
    print(f"model: {cfg.task.model}, layers {cfg.task.num_layers}, adapted {cfg.adapter.layers or 'all'}, rank "
          f"{cfg.adapter.rank}, method {cfg.method.name}, K = {args.clients} clients x {steps} steps, expected batch "
          f"{cfg.train.batch_size} ({rows} rows per round), threads {torch.get_num_threads()}, device {sim.rt.device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    print(f"uploads: largest relative difference batched vs sequential {worst:.2e}")
    for k, v in times.items():
        mem = f"   peak {peak[k]:.2f} GiB" if cuda else ""
        print(f"{k:14s} {statistics.median(v):8.3f} s per round of {args.clients} clients (runs: "
              f"{', '.join(f'{x:.3f}' for x in v)}){mem}")
    for k in variants:
        if k != "sequential":
            print(f"speed-up {k} / sequential: {statistics.median(times['sequential']) / statistics.median(times[k]):.2f}x")


if __name__ == "__main__":
    main()
