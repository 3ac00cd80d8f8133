"""``fedlora compare --workers N``: a grid's cells in N processes, one per CPU core (or GPU share).

Each worker is a fresh (spawned) process with its own :class:`RuntimePool`; it runs its shard of
the pending cells, in the grid's order, into the same compare directory. A cell is a run directory
of its own and its result depends only on its config (the pool resets a reused runtime bitwise),
so the results equal those of one process (tests/report/test_workers.py). Shards are dealt
round-robin from the ordered pending cells, so each worker gets every seed and epsilon level and
they finish together. Torch threads per worker: ``train.threads`` when set, else cores / N.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

from fedlora.config import ExperimentConfig


def shards(configs: list[ExperimentConfig], workers: int) -> list[list[ExperimentConfig]]:
    """Round-robin deal of the ordered cells into at most ``workers`` non-empty shards."""
    return [s for s in (configs[i::workers] for i in range(workers)) if s]


def exit_with_parent(interval_s: float = 1.0) -> threading.Thread:
    """Stop this process when its parent is gone (killed by a signal that ran no cleanup): a
    daemon thread watches the parent's pid, so no orphaned worker keeps a core busy."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def _init_worker(threads: int) -> None:
    import torch  # noqa: PLC0415

    from fedlora.console import quiet_libraries  # noqa: PLC0415

    exit_with_parent()
    quiet_libraries()  # as in the parent: no library progress bars or warnings
    torch.set_num_threads(threads)  # a run with train.threads set overrides this in Runtime


def _run_shard(dumps: list[dict[str, Any]]) -> int:
    from fedlora.report.cells import run_cell  # noqa: PLC0415
    from fedlora.report.runtime_pool import RuntimePool  # noqa: PLC0415

    pool = RuntimePool()
    for dump in dumps:
        run_cell(ExperimentConfig.model_validate(dump), pool)
    pool.close()
    return len(dumps)


def run_in_workers(configs: list[ExperimentConfig], workers: int, on_tick: Any = None) -> None:
    """Run the cells of ``configs`` in ``workers`` processes; ``on_tick(finished_count)`` is called
    about once a second (the count of cells whose summary.json exists). The first error of any
    worker stops every worker and is raised here (a stopped cell is redone on resume)."""
    parts = shards(configs, workers)
    done_files = [Path(c.output.root) / str(c.output.name) / "summary.json" for c in configs]
    threads = max(1, (os.cpu_count() or 1) // len(parts))
    ctx = multiprocessing.get_context("spawn")  # torch state must not be forked
    pool = ctx.Pool(len(parts), initializer=_init_worker, initargs=(threads,))
    try:
        results = [pool.apply_async(_run_shard, ([c.model_dump(mode="json") for c in part],)) for part in parts]
        while True:
            if on_tick is not None:
                on_tick(sum(f.is_file() for f in done_files))
            for r in results:
                if r.ready() and not r.successful():
                    r.get()  # raises the worker's error
            if all(r.ready() for r in results):
                break
            time.sleep(1.0)
        pool.close()
    finally:
        pool.terminate()  # no-op after a clean close; stops the other workers on an error or Ctrl-C
        pool.join()
