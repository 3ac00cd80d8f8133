"""Wall time of a `fedlora compare` grid with --workers 1 and --workers N, side by side in one run.

The same small grid (the reduced text config, cut to a few rounds) runs twice into two fresh
compare directories; the script prints both wall times and their ratio, and checks that the two
grids' results agree. Run it on an otherwise idle machine.

    python benchmarks/compare_workers.py                      # 2 workers, 4 cells
    python benchmarks/compare_workers.py --workers 4 --methods dp-lora,ffa-lora,rolora,la-lora
"""

from __future__ import annotations

import argparse
import tempfile
import time

from fedlora.config import parse_override
from fedlora.report.compare import plan_grid, run_compare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/compare-reduced.yaml")
    ap.add_argument("--methods", default="dp-lora,ffa-lora")
    ap.add_argument("--epsilons", default="1,6")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", action="append", default=["federation.rounds=2"], help="config override key=value")
    args = ap.parse_args()
    overrides = dict(parse_override(s) for s in args.set)
    out = tempfile.mkdtemp(prefix="fedlora-workers-")
    seconds, rows = {}, {}
    for workers in (1, args.workers):
        grid = plan_grid(args.config, methods=args.methods, epsilons=args.epsilons, seeds=1, overrides=overrides,
                         out=out, name=f"workers{workers}", no_dp_reference=True)
        t = time.perf_counter()
        result = run_compare(grid, progress=False, workers=workers)
        seconds[workers] = time.perf_counter() - t
        rows[workers] = [{k: v for k, v in r.items() if k != "seconds"} for r in result["rows"]]
        print(f"--workers {workers}: {len(grid.cells)} cells in {seconds[workers]:.1f} s")
    print(f"wall time, 1 worker / {args.workers} workers: {seconds[1] / seconds[args.workers]:.2f}x")
    print("results equal:", rows[1] == rows[args.workers])


if __name__ == "__main__":
    main()
