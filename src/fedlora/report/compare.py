"""``fedlora compare``: a grid of methods x epsilons x seeds in one resumable directory.

Every cell is a normal run directory (``<method>-eps<e>-seed<s>``, or ``-nodp-`` for the
non-private reference) under the compare directory, which also holds ``grid.yaml``,
``results.csv``, ``results.md`` and the PNG figures. Re-running the same command with the same
name skips cells whose ``summary.json`` exists and redoes half-finished ones. The model and
data are loaded once per distinct (task, adapter, seed) and reset between runs
(:class:`RuntimePool`), so a reused runtime gives bitwise the same result as a fresh one.
"""

from __future__ import annotations

import copy
import difflib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedlora.config import ExperimentConfig, build_config, load_config, with_current_defaults
from fedlora.errors import ConfigError, FedloraError
from fedlora.methods.registry import METHOD_DEFAULTS
from fedlora.report.cells import read_summary, run_cell
from fedlora.report.runtime_pool import RuntimePool
from fedlora.report.table import resolve_baseline, write_tables


@dataclass(frozen=True)
class Cell:
    method: str
    epsilon: float | None  # None: the non-private reference
    seed: int

    @property
    def name(self) -> str:
        eps = "nodp" if self.epsilon is None else f"eps{self.epsilon:g}"
        return f"{self.method}-{eps}-seed{self.seed}"


def parse_methods(text: str | None) -> list[str]:
    """Registered method names, or composed ones written as the outputs name them:
    ``NAME+KIND=SEAM[+KIND=SEAM...]`` (e.g. ``la-lora+aggregate=fedex``; methods/compose.py)."""
    from fedlora.methods import available_methods  # noqa: PLC0415

    known = list(available_methods())
    names = known if text is None else [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ConfigError("--methods is empty; pass names such as dp-lora,ffa-lora (see `fedlora methods`)")
    for m in names:
        base = method_overrides(m)["method.name"]
        if base not in known:
            close = difflib.get_close_matches(base, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown method '{base}' in --methods{hint}; see `fedlora methods`")
    return list(dict.fromkeys(names))


def method_overrides(label: str) -> dict[str, str]:
    """The config overrides a --methods entry stands for: ``method.name`` and each ``+KIND=SEAM``."""
    from fedlora.methods.compose import KINDS  # noqa: PLC0415

    base, *parts = label.split("+")
    out = {"method.name": base}
    for part in parts:
        kind, eq, seam = part.partition("=")
        if not eq or kind not in KINDS or not seam:
            raise ConfigError(f"'{label}' in --methods: '+{part}' must be +KIND=SEAM with KIND one of {', '.join(KINDS)}")
        out[f"method.{kind}"] = seam
    return out


def parse_epsilons(text: str) -> list[float]:
    try:
        eps = [float(e) for e in text.split(",") if e.strip()]
    except ValueError:
        raise ConfigError(f"--epsilons '{text}' must be numbers separated by commas, e.g. 1,3,6") from None
    if not eps or any(not e > 0 or e == float("inf") for e in eps):
        raise ConfigError(f"--epsilons '{text}' must be finite numbers > 0, e.g. 1,3,6 (use the no-DP reference for no privacy)")
    return list(dict.fromkeys(eps))


@dataclass
class Grid:
    root: Path
    spec: dict[str, Any]  # what grid.yaml holds
    cells: list[tuple[Cell, ExperimentConfig]]


def plan_grid(config: str | Path | None, *, methods: str | None, epsilons: str, seeds: int,
              overrides: dict[str, Any] | None = None, out: str | None = None, name: str | None = None,
              no_dp_reference: bool = False, first_seed: int = 0) -> Grid:
    """Validate everything and build every cell's config; nothing is written."""
    from fedlora.federation.simulation import build_method_for  # noqa: PLC0415

    names, eps = parse_methods(methods), parse_epsilons(epsilons)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1 (got {seeds}); seeds 0..n-1 are run")
    if first_seed < 0:
        raise ConfigError(f"--first-seed must be >= 0 (got {first_seed})")
    overrides = dict(overrides or {})
    base = load_config(config, overrides)
    tree = base.model_dump(mode="json")
    root = Path(out or base.output.root) / (name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    levels: list[float | None] = [*eps, *([None] if not no_dp_reference else [])]
    cells = []
    for seed in range(first_seed, first_seed + seeds):
        for method in names:
            for e in levels:
                cell = Cell(method, e, seed)
                privacy = {"privacy.enabled": False} if e is None else {"privacy.epsilon": e}
                seams = method_overrides(method)
                cfg = build_config(copy.deepcopy(tree), {**METHOD_DEFAULTS.get(seams["method.name"], {}), **overrides, **seams,
                                          "train.seed": seed, **privacy, "output.root": str(root),
                                          "output.name": cell.name})
                build_method_for(cfg)  # method-specific refusals, before anything is written
                cells.append((cell, cfg))
    spec = {"methods": names, "epsilons": eps, "seeds": seeds, **({"first_seed": first_seed} if first_seed else {}),
            "dp_reference_runs": not no_dp_reference,
            "overrides": overrides, "method_defaults": {m: METHOD_DEFAULTS[b] for m in names
                                if (b := method_overrides(m)["method.name"]) in METHOD_DEFAULTS},
            "base": tree}
    return Grid(root, spec, cells)


def prepare_dir(grid: Grid) -> None:
    """Create the compare directory, or check that an existing one holds the same grid."""
    path = grid.root / "grid.yaml"
    if path.is_file():
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(old, dict) and "base" in old:  # written by an older fedlora: new fields at their defaults
            old["base"] = with_current_defaults(old["base"])
        if json.dumps(old, sort_keys=True) != json.dumps(json.loads(json.dumps(grid.spec)), sort_keys=True):
            raise FedloraError(f"'{grid.root}' holds a different grid; rerun the same command or choose another --name")
        return
    if grid.root.exists() and any(grid.root.iterdir()):
        raise FedloraError(f"'{grid.root}' exists and is not a compare directory; choose another --name")
    grid.root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(grid.spec)), sort_keys=False), encoding="utf-8")


def run_compare(grid: Grid, *, progress: bool = True, workers: int = 1, baseline: str | None = None) -> dict[str, Any]:
    """Run (or resume) the grid, in ``workers`` processes when > 1 (report/workers.py), then write
    tables and figures, with paired differences against ``baseline`` (default dp-lora when the grid
    runs it; report/table.py); return {'markdown', 'rows', ...}."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
    resolve_baseline(grid, baseline)  # refuse a baseline outside the grid before any run
    prepare_dir(grid)
    pool = RuntimePool()
    t0 = time.perf_counter()
    # Seed-major, then by epsilon (a stopped grid has every method at the first levels), then by
    # runtime; the data are shared across adapters, so switching runtimes costs only a model build.
    ordered = sorted(grid.cells, key=lambda c: (c[0].seed, c[0].epsilon or float("inf"), pool.key(c[1])))
    pending = [cfg for cell, cfg in ordered if read_summary(grid.root / cell.name) is None]
    bar, task = None, None
    if progress:
        from fedlora.report.progress import progress_bar  # noqa: PLC0415

        bar = progress_bar("runs")
        bar.start()
        task = bar.add_task("compare", total=len(ordered), completed=len(ordered) - len(pending), status="")
    try:
        if workers > 1 and len(pending) > 1:
            from fedlora.report.workers import run_in_workers  # noqa: PLC0415

            base = len(ordered) - len(pending)
            run_in_workers(pending, workers, on_tick=None if bar is None else
                           lambda n: bar.update(task, completed=base + n, status=f"{workers} workers"))
        else:
            for cfg in pending:
                if bar is not None:
                    bar.update(task, status=str(cfg.output.name))
                s = run_cell(cfg, pool)
                if bar is not None:
                    bar.update(task, advance=1, status=f"{cfg.output.name}: acc {s['final'].get('accuracy', float('nan')):.3f}")
    finally:
        if bar is not None:
            bar.stop()
        pool.close()
    result = write_tables(grid, baseline)
    result["seconds"] = time.perf_counter() - t0
    return result
