"""PNG figures over rounds from run directories (``fedlora plot``; also used by ``fedlora compare``).

Several runs are overlaid, each labelled with its method and epsilon. Keys a run's
``metrics.jsonl`` lacks (aggregation error, sharpness, factor choices, signal against noise
norms from ``eval.signal_diagnostics``) are skipped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from fedlora.errors import FedloraError
from fedlora.report.rundir import read_metrics

LETTERS = {"A": 0, "B": 1, "J": 2, "-": 3}  # trained factor: A only, B only, both (joint), none


def _pyplot() -> Any:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def run_label(run_dir: Path) -> str:
    """'method eps=3' (or 'method no DP') from the run's saved config; the folder name otherwise."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return run_dir.name
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    method = cfg.get("method", {}).get("name", run_dir.name)
    privacy = cfg.get("privacy", {})
    return f"{method} eps={privacy.get('epsilon', 0):g}" if privacy.get("enabled", True) else f"{method} no DP"


def load_runs(run_dirs: list[str | Path]) -> list[tuple[str, list[dict[str, Any]]]]:
    runs = []
    for d in map(Path, run_dirs):
        if not (d / "metrics.jsonl").is_file():
            raise FedloraError(f"'{d}' has no metrics.jsonl; pass run directories written by `fedlora run`")
        runs.append((run_label(d), read_metrics(d)))
    return runs


def layer_ticks(run_dir: Path, n: int) -> list[str]:
    """Transformer-layer indices of the ``n`` heatmap rows: the run's ``adapter.layers`` when it
    lists ``n`` layers (``plan_modes`` has one letter per adapted layer, in order), else 0..n-1."""
    path = Path(run_dir) / "config.yaml"
    cfg = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}
    layers = (cfg.get("adapter") or {}).get("layers")
    return [str(i) for i in sorted(layers)] if isinstance(layers, list) and len(layers) == n else [str(i) for i in range(n)]


def _series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(m["round"], float(m[key])) for m in metrics if isinstance(m.get(key), int | float) and not isinstance(m.get(key), bool)]
    pts = [(r, v) for r, v in pts if not math.isnan(v)]
    return [r for r, _ in pts], [v for _, v in pts]


def single_points(runs: list[tuple[str, list[dict[str, Any]]]], key: str) -> list[tuple[str, int, float]] | None:
    """(label, round, value) per run when no run logs ``key`` in more than one round (e.g. the
    sharpness measured once at the end), else None: such figures read better as bars than as dots."""
    series = [(label, *_series(metrics, key)) for label, metrics in runs]
    if any(len(x) > 1 for _, x, _ in series):
        return None
    return [(label, x[0], y[0]) for label, x, y in series if x]


def bar_plot(points: list[tuple[str, int, float]], ylabel: str, path: Path) -> Path:
    """One labelled bar per run (its single measured value, with the round it was taken in)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(points) + 2), 4.2))
    bars = ax.bar(range(len(points)), [v for _, _, v in points], color=[f"C{i % 10}" for i in range(len(points))])
    ax.bar_label(bars, labels=[f"{v:.3g}" for _, _, v in points], fontsize=7)
    ax.set_xticks(range(len(points)), [f"{label}\nround {r}" for label, r, _ in points], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def line_plot(runs: list[tuple[str, list[dict[str, Any]]]], keys: list[tuple[str, str]], ylabel: str, path: Path,
              *, log: bool = False) -> Path | None:
    """One line per run and key (``keys``: (metric, line style)); None when no run has any key.
    A single key that every run logs at most once is drawn as bars instead (``bar_plot``)."""
    if len(keys) == 1 and (points := single_points(runs, keys[0][0])):
        return bar_plot(points, ylabel, path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for i, (label, metrics) in enumerate(runs):
        color = f"C{i % 10}"
        for key, style in keys:
            x, y = _series(metrics, key)
            if x:
                suffix = "" if key == keys[0][0] else f" ({key})"
                ax.plot(x, y, style, color=color, marker="o", markersize=3, label=label + suffix)
                drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    if log and all(v > 0 for _, m in runs for k, _ in keys for v in _series(m, k)[1]):
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if drawn > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def choice_matrix(metrics: list[dict[str, Any]]) -> tuple[list[int], list[list[int]]] | None:
    """(rounds, layer x round codes) from ``plan_modes`` (per layer) or ``plan_factor`` (all layers)."""
    rows = [(m["round"], str(m.get("plan_modes") or m.get("plan_factor"))) for m in metrics
            if m.get("plan_modes") or m.get("plan_factor")]
    if not rows:
        return None
    layers = max(len(s) for _, s in rows)
    grid = [[LETTERS.get(s[j] if len(s) > 1 else s, 3) for _, s in rows] for j in range(layers)]
    return [r for r, _ in rows], grid


def heatmap(runs: list[tuple[str, list[dict[str, Any]]]], path: Path, run_dirs: list[Path] | None = None) -> Path | None:
    """Factor trained per layer and round, one panel per run that logs a choice (rows labelled
    with the adapted layers' indices when ``run_dirs`` are given)."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    dirs: list[Path | None] = list(run_dirs) if run_dirs is not None else [None] * len(runs)
    found = [(label, m, d) for (label, metrics), d in zip(runs, dirs, strict=True) if (m := choice_matrix(metrics)) is not None]
    if not found:
        return None
    colors = ["#4c72b0", "#dd8452", "#55a868", "#dddddd"]
    fig, axes = plt.subplots(len(found), 1, figsize=(7, 1.2 + 1.1 * len(found)), squeeze=False)
    for ax, (label, (rounds, grid), d) in zip(axes[:, 0], found, strict=True):
        ax.imshow(grid, aspect="auto", cmap=ListedColormap(colors), vmin=-0.5, vmax=3.5, interpolation="nearest",
                  extent=(rounds[0] - 0.5, rounds[-1] + 0.5, len(grid) - 0.5, -0.5))
        ax.set_title(label, fontsize=8)
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(grid)), layer_ticks(d, len(grid)) if d is not None else [str(i) for i in range(len(grid))])
        ax.set_xticks(rounds if len(rounds) <= 20 else rounds[:: math.ceil(len(rounds) / 20)])
    axes[-1, 0].set_xlabel("round")
    fig.legend(handles=[Patch(color=c, label=t) for c, t in zip(colors, ["A", "B", "A+B", "none"], strict=True)],
               loc="upper right", fontsize=7, ncol=4)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SIGNAL_GROUPS = ("A", "B", "head")


def signal_plot(runs: list[tuple[str, list[dict[str, Any]]]], path: Path) -> Path | None:
    """Per trained group (A, B, head), one panel: each run's signal norm (solid) and noise norm
    (dotted) per round, from ``eval.signal_diagnostics``; None when no run logs them."""
    groups = [g for g in SIGNAL_GROUPS if any(_series(m, f"signal/{g}")[0] for _, m in runs)]
    if not groups:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups) + 0.6, 3.8), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
        for i, (label, metrics) in enumerate(runs):
            for key, style, suffix in ((f"signal/{g}", "-", "signal"), (f"noise/{g}", ":", "noise")):
                x, y = _series(metrics, key)
                if x and any(v > 0 for v in y):
                    ax.plot(x, y, style, color=f"C{i % 10}", marker="o", markersize=3, label=f"{label} {suffix}")
        ax.set_title(f"{g}: signal vs noise norm", fontsize=9)
        ax.set_xlabel("round")
        if all(v > 0 for line in ax.get_lines() for v in line.get_ydata()) and ax.get_lines():
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("norm per step (gradient units)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> list[Path]:
    """Write the figures for ``run_dirs`` into ``out``; return the files written."""
    runs = load_runs(run_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = [
        line_plot(runs, [("accuracy", "-"), ("personal_accuracy", "--")], "test accuracy", out / "accuracy.png"),
        line_plot(runs, [("epsilon", "-")], "epsilon spent (max over clients)", out / "epsilon.png"),
        line_plot(runs, [("aggregation_error", "-")], "relative aggregation error", out / "aggregation_error.png", log=True),
        line_plot(runs, [("sharpness", "-")], "top Hessian eigenvalue", out / "sharpness.png"),
        heatmap(runs, out / "factor_choices.png", [Path(d) for d in run_dirs]),
        signal_plot(runs, out / "signal_noise.png"),
    ]
    return [p for p in made if p is not None]
