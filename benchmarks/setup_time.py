"""Setup time of a run with an empty and with a warm on-disk prefix cache (issue 21).

Each config is built twice, each time in a fresh process (``Simulation(cfg)``: data, partition,
client specs and sigma calibration, model load, frozen-prefix cache), against one empty temporary
cache folder (``FEDLORA_CACHE_DIR``): the first build computes the prefix and stores it, the second
loads it. Prints, per config, the cold and warm setup seconds, the time spent in ``cache_prefix``
itself, their ratios, and whether the two builds' hidden states are equal bit for bit.

    python benchmarks/setup_time.py                                   # configs/demo.yaml
    python benchmarks/setup_time.py configs/demo.yaml configs/user-level.yaml
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time


def child(config: str) -> None:
    """One build in this fresh process; prints a JSON line."""
    from fedlora.config import load_config
    from fedlora.console import quiet_libraries
    from fedlora.federation.simulation import Simulation
    from fedlora.tasks.text import TextClassificationTask

    quiet_libraries()
    spent = {"prefix_s": 0.0}
    inner = TextClassificationTask.cache_prefix

    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        inner(self, *args, **kwargs)
        spent["prefix_s"] += time.perf_counter() - t

    TextClassificationTask.cache_prefix = timed  # this benchmark's own timer
    cfg = load_config(config)
    t = time.perf_counter()
    sim = Simulation(cfg)
    setup = time.perf_counter() - t
    digest = hashlib.sha256()
    for name in ("train", "test"):
        for row in getattr(sim.rt.task, name).features.get("hidden", []):
            digest.update(row.tobytes())
    print(json.dumps({"setup_s": setup, **spent, "hidden_sha256": digest.hexdigest()}))


def build(config: str, cache: str) -> dict:
    env = {**os.environ, "FEDLORA_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", config], env=env, check=True, capture_output=True,
                         text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", default=["configs/demo.yaml"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    for config in args.configs:
        with tempfile.TemporaryDirectory(prefix="fedlora-setup-") as cache:
            cold, warm = build(config, cache), build(config, cache)
            size = sum(os.path.getsize(os.path.join(cache, "prefix", f)) for f in os.listdir(os.path.join(cache, "prefix"))
                       if f.endswith(".prefix"))
        print(f"{config}: setup cold {cold['setup_s']:.1f} s, warm {warm['setup_s']:.1f} s "
              f"({cold['setup_s'] / warm['setup_s']:.1f}x); cache_prefix cold {cold['prefix_s']:.1f} s, "
              f"warm {warm['prefix_s']:.2f} s ({cold['prefix_s'] / max(warm['prefix_s'], 1e-9):.0f}x); "
              f"whole process cold {cold['process_s']:.1f} s, warm {warm['process_s']:.1f} s; "
              f"entries {size / 1e6:.0f} MB; hidden states equal: {cold['hidden_sha256'] == warm['hidden_sha256']}")


if __name__ == "__main__":
    main()
