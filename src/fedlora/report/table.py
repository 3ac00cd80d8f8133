"""The compare grid's outputs: results.csv, results.md and the summary figures.

Besides each method's mean ± std over seeds, every row carries its **paired** difference against
a baseline method (``fedlora compare --baseline``, default dp-lora) at the same epsilon: per seed
the method's final headline accuracy minus the baseline's (within a seed both share the
partition, the test split and the client sampling; the DP noise only when
``privacy.reproducible_noise: true``, it is drawn from secure randomness otherwise), their mean,
the 95% t-interval of the mean over the seeds both finished (``mean ± t(0.975, n-1) sd / sqrt(n)``),
and a verdict: better / worse when the interval excludes 0, no difference otherwise."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.privacy.noise import NOT_PRIVATE_WITH_CONFIG
from fedlora.report.rundir import read_metrics

COLUMNS = ["method", "epsilon", "seeds", "accuracy_mean", "accuracy_std", "personal_accuracy_mean",
           "personal_accuracy_std", "epsilon_spent", "aggregation_error", "rounds", "seconds", "reproducible_noise",
           "variant", "baseline", "paired_seeds", "paired_diff_mean", "paired_ci_low", "paired_ci_high", "verdict"]
DEFAULT_BASELINE = "dp-lora"


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one seed)."""
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def mean_aggregation_error(run_dir: Path) -> float | None:
    """Mean over rounds of the run's logged ``aggregation_error`` (None when it logs none)."""
    if not (Path(run_dir) / "metrics.jsonl").is_file():  # a run stopped before its first round
        return None
    vals = [float(m["aggregation_error"]) for m in read_metrics(run_dir)
            if isinstance(m.get("aggregation_error"), float | int)]
    return float(np.mean(vals)) if vals else None


def _level(e: float | None) -> str:
    return "no DP" if e is None else f"{e:g}"


SEEDED_MARK = " (†)"  # rows whose runs drew reproducible (seeded) DP noise
Baselines = dict[str, dict[int, float]]  # 'majority' / 'client_majority' -> seed -> rate


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the per-seed differences and its t-interval (nan bounds for fewer than 2 seeds)."""
    if not diffs:
        return math.nan, math.nan, math.nan
    arr = np.asarray(diffs, dtype=np.float64)
    mean = float(arr.mean())
    if len(arr) < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t  # noqa: PLC0415

    half = float(t.ppf(0.5 + level / 2, len(arr) - 1)) * float(arr.std(ddof=1)) / math.sqrt(len(arr))
    return mean, mean - half, mean + half


def verdict(low: float, high: float, n: int) -> str:
    if n < 2 or math.isnan(low):
        return "n/a (fewer than 2 paired seeds)"
    return "better" if low > 0 else "worse" if high < 0 else "no difference"


def headline(summary: dict[str, Any]) -> float | None:
    """A run's final headline accuracy: personal accuracy where logged (FedSA), else accuracy."""
    final = summary.get("final", {})
    value = final.get("personal_accuracy", final.get("accuracy"))
    return float(value) if isinstance(value, int | float) else None


def add_paired(rows: list[dict[str, Any]], per_seed: dict[tuple[str, str], dict[int, float]], baseline: str | None) -> None:
    """Each row's paired difference against ``baseline`` at its epsilon (in place)."""
    for r in rows:
        r.update({"baseline": baseline or "", "paired_seeds": 0, "paired_diff_mean": math.nan,
                  "paired_ci_low": math.nan, "paired_ci_high": math.nan, "verdict": "-"})
        if baseline is None:
            continue
        if r["method"] == baseline:
            r["verdict"] = "baseline"
            continue
        mine, base = per_seed.get((r["method"], r["epsilon"]), {}), per_seed.get((baseline, r["epsilon"]), {})
        diffs = [mine[s] - base[s] for s in sorted(set(mine) & set(base))]
        mean, low, high = paired_interval(diffs)
        r.update({"paired_seeds": len(diffs), "paired_diff_mean": mean, "paired_ci_low": low, "paired_ci_high": high,
                  "verdict": verdict(low, high, len(diffs)) if diffs else "-"})


def collect(grid: Any, baseline: str | None = None) -> tuple[list[dict[str, Any]], dict[tuple[str, float | None], list[Path]], Baselines]:
    """Rows per method x epsilon over the finished seeds; the finished run dirs; the baselines per
    seed (the test split is drawn per seed, so its majority-class rate differs between seeds):
    'majority' (the test set's majority class) and 'client_majority' (each client predicting its own
    test share's majority label, logged by runs that evaluate personalised models)."""
    from fedlora.report.cells import read_summary  # noqa: PLC0415

    groups: dict[tuple[str, float | None], list[tuple[Path, dict[str, Any]]]] = {}
    baselines: Baselines = {"majority": {}, "client_majority": {}}
    per_seed: dict[tuple[str, str], dict[int, float]] = {}
    for cell, _ in grid.cells:
        path = grid.root / cell.name
        s = read_summary(path)
        groups.setdefault((cell.method, cell.epsilon), [])
        if s is not None:
            groups[(cell.method, cell.epsilon)].append((path, s))
            if (h := headline(s)) is not None:
                per_seed.setdefault((cell.method, _level(cell.epsilon)), {})[cell.seed] = h
            if s.get("majority_rate") is not None:
                baselines["majority"].setdefault(cell.seed, float(s["majority_rate"]))
            setup = path / "setup.json"
            if cell.seed not in baselines["client_majority"] and setup.is_file():
                rate = json.loads(setup.read_text(encoding="utf-8")).get("client_majority_rate")
                if rate is not None:
                    baselines["client_majority"][cell.seed] = float(rate)
    rows = []
    for (method, eps), runs in groups.items():
        finals = [s["final"] for _, s in runs]
        acc, pacc = _stats([f["accuracy"] for f in finals if "accuracy" in f]), \
            _stats([f["personal_accuracy"] for f in finals if f.get("personal_accuracy") is not None])
        spent = [f["epsilon"] for f in finals if f.get("epsilon") is not None]
        agg = [v for p, _ in runs if (v := mean_aggregation_error(p)) is not None]
        rows.append({"method": method, "epsilon": _level(eps), "seeds": len(runs), "accuracy_mean": acc[0],
                     "accuracy_std": acc[1], "personal_accuracy_mean": pacc[0], "personal_accuracy_std": pacc[1],
                     "epsilon_spent": float(np.mean(spent)) if spent else math.nan,
                     "aggregation_error": float(np.mean(agg)) if agg else math.nan,
                     "rounds": float(np.mean([s["rounds"] for _, s in runs])) if runs else math.nan,
                     "seconds": float(np.mean([s["seconds"]["total"] for _, s in runs])) if runs else math.nan,
                     "reproducible_noise": any(bool(s.get("reproducible_noise")) for _, s in runs),
                     "variant": next((s["variant"] for _, s in runs if s.get("variant")), method)})
    add_paired(rows, per_seed, baseline)
    return rows, {k: [p for p, _ in v] for k, v in groups.items()}, baselines


def _pm(mean: float, std: float, seeds: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if seeds > 1 else f"{mean:.4f}"


def baseline_line(label: str, per_seed: dict[int, float]) -> str:
    """'label: 0.5960.' for one seed (or equal rates), else each seed's rate and their mean."""
    if not per_seed:
        return ""
    seeds = sorted(per_seed)
    rates = [per_seed[k] for k in seeds]
    if len(set(rates)) == 1:
        return f"{label}: {rates[0]:.4f}.\n"
    listed = ", ".join(f"{per_seed[k]:.4f} (seed {k})" for k in seeds)
    return f"{label}: {listed}; mean {float(np.mean(rates)):.4f}.\n"


def _paired_cell(r: dict[str, Any]) -> str:
    if r.get("verdict") in (None, "-", "baseline"):
        return r.get("verdict") or "-"
    mean, low, high = r["paired_diff_mean"], r["paired_ci_low"], r["paired_ci_high"]
    ci = "" if math.isnan(low) else f" [{100 * low:+.1f}, {100 * high:+.1f}]"
    return f"{100 * mean:+.1f}{ci} ({r['paired_seeds']} seeds)"


def markdown(rows: list[dict[str, Any]], baselines: Baselines, seeds: int, metric: str = "accuracy") -> str:
    """``metric``: what the runs' 'accuracy' is (the causal-lm task: 'exact match'); no class baselines then."""
    acc = "accuracy" if metric == "accuracy" else f"accuracy ({metric})"
    base = next((r["baseline"] for r in rows if r.get("baseline")), "")
    paired = f" | vs {base}: points (95% CI) | verdict" if base else ""
    head = (f"| method | epsilon | {acc} | personal {acc} | epsilon spent | aggregation error | rounds | "
            f"seconds/run | seeds{paired} |\n|---|---|---|---|---|---|---|---|---|{'---|---|' if base else ''}")
    lines = [head]
    for r in rows:
        spent = "-" if math.isnan(r["epsilon_spent"]) else f"{r['epsilon_spent']:.2f}"
        rounds = "-" if math.isnan(r["rounds"]) else f"{r['rounds']:g}"
        secs = "-" if math.isnan(r["seconds"]) else f"{r['seconds']:.0f}"
        agg = "-" if math.isnan(r["aggregation_error"]) else f"{r['aggregation_error']:.2e}"
        seeded = SEEDED_MARK if r.get("reproducible_noise") else ""
        extra = f" {_paired_cell(r)} | {r['verdict'] if r['verdict'] != '-' else '-'} |" if base else ""
        lines.append(f"| {r.get('variant') or r['method']}{seeded} | {r['epsilon']} | {_pm(r['accuracy_mean'], r['accuracy_std'], r['seeds'])} | "
                     f"{_pm(r['personal_accuracy_mean'], r['personal_accuracy_std'], r['seeds'])} | {spent} | {agg} | {rounds} | {secs} | "
                     f"{r['seeds']}/{seeds} |{extra}")
    maj = "" if metric != "accuracy" else baseline_line("Majority-class rate of the test set", baselines["majority"])
    maj += "" if metric != "accuracy" else baseline_line("Each client predicting its own test share's majority label (the yardstick for personal "
                         "accuracy)", baselines["client_majority"])
    if any(r.get("reproducible_noise") for r in rows):
        maj += f"{SEEDED_MARK.strip()} {NOT_PRIVATE_WITH_CONFIG}.\n"
    if base:
        shared = ("the DP noise too (reproducible noise)" if all(r.get("reproducible_noise") for r in rows) else
                  "not the DP noise, which is drawn from secure randomness unless privacy.reproducible_noise: true")
        maj += (f"Paired differences against {base} at the same epsilon, in accuracy points: the mean over seeds of "
                f"(method - {base}) per seed, with its 95% t-interval; within a seed both runs share the partition, the "
                f"test split and the client sampling, {shared}. Verdict: better / worse when the interval excludes 0, "
                "else no difference. FedSA rows pair their personal accuracy.\n")
    return ("\n".join(lines) + "\n" + ("\n" + maj if maj else "") + "Accuracy: mean ± standard deviation (ddof 1) over the finished seeds. Aggregation "
            "error: relative Frobenius error of the kept product, mean over rounds and seeds.\n")


def headline_key(run_dirs: list[Path]) -> str:
    """'personal_accuracy' when the runs log it (FedSA: B and the head stay on the clients, so the
    global model's accuracy is that of the initial head, not the method's result), else 'accuracy'."""
    return "personal_accuracy" if any(isinstance(m.get("personal_accuracy"), float | int)
                                      for d in run_dirs for m in read_metrics(d)) else "accuracy"


def mean_curves(run_dirs: list[Path], key: str = "accuracy") -> tuple[list[int], list[float]]:
    """Mean of ``key`` per round over the runs that evaluated that round."""
    per: dict[int, list[float]] = {}
    for d in run_dirs:
        for m in read_metrics(d):
            if isinstance(m.get(key), float | int):
                per.setdefault(m["round"], []).append(float(m[key]))
    rounds = sorted(per)
    return rounds, [float(np.mean(per[r])) for r in rounds]


def figures(grid: Any, rows: list[dict[str, Any]], dirs: dict[tuple[str, float | None], list[Path]]) -> list[Path]:
    """Mean accuracy per round (one panel per epsilon) and final accuracy against epsilon, one line
    per method; methods that report a personal accuracy are drawn with it, dashed, '(personal)'."""
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    from fedlora.report.plots import _pyplot  # noqa: PLC0415

    plt = _pyplot()
    methods, levels = grid.spec["methods"], list(dict.fromkeys(e for _, e in dirs))
    personal = {m for m in methods if headline_key([d for (mm, _), ds in dirs.items() if mm == m for d in ds]) != "accuracy"}
    style = {m: ("--" if m in personal else "-") for m in methods}
    label = {m: f"{m} (personal)" if m in personal else m for m in methods}
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors
    color = {m: palette[i % len(palette)] for i, m in enumerate(methods)}  # one colour per method
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels) + 1.8, 3.8), squeeze=False, sharey=True)
    for ax, e in zip(axes[0], levels, strict=True):
        for m in methods:
            x, y = mean_curves(dirs.get((m, e), []), "personal_accuracy" if m in personal else "accuracy")
            if x:
                ax.plot(x, y, marker="o", markersize=3, color=color[m], linestyle=style[m], label=label[m])
        ax.set_title(f"epsilon = {_level(e)}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("mean test accuracy")
    fullest = max(axes[0], key=lambda ax: len(ax.get_lines()))
    if fullest.get_lines():
        fig.legend(*fullest.get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / (4.2 * len(levels) + 1.8), 1))
    fig.savefig(grid.root / "accuracy_per_round.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for m in methods:
        mean_key, std_key = ("personal_accuracy_mean", "personal_accuracy_std") if m in personal else ("accuracy_mean", "accuracy_std")
        pts = [(float(r["epsilon"]), r[mean_key], r[std_key]) for r in rows
               if r["method"] == m and r["epsilon"] != "no DP" and not math.isnan(r[mean_key])]
        if pts:
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        color=color[m], linestyle=style[m], label=label[m])
    ax.set_xlabel("epsilon (per client)")
    ax.set_ylabel("final test accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(grid.root / "accuracy_vs_epsilon.png", dpi=110)
    plt.close(fig)
    return [grid.root / "accuracy_per_round.png", grid.root / "accuracy_vs_epsilon.png"]


def paired_figure(grid: Any, rows: list[dict[str, Any]]) -> Path | None:
    """paired_differences.png: per epsilon, each method's mean paired difference against the
    baseline with its 95% interval (None without a baseline or paired seeds)."""
    pts = [r for r in rows if r.get("paired_seeds") and r["verdict"] not in ("-", "baseline")]
    if not pts:
        return None
    from fedlora.report.plots import _pyplot  # noqa: PLC0415

    plt = _pyplot()
    levels = list(dict.fromkeys(r["epsilon"] for r in pts))
    methods = list(dict.fromkeys(r.get("variant") or r["method"] for r in pts))
    fig, axes = plt.subplots(1, len(levels), figsize=(4.4 * len(levels) + 2.4, 0.45 * len(methods) + 1.8),
                             squeeze=False, sharey=True)
    for ax, e in zip(axes[0], levels, strict=True):
        for r in (r for r in pts if r["epsilon"] == e):
            y = methods.index(r.get("variant") or r["method"])
            mean, low, high = 100 * r["paired_diff_mean"], 100 * r["paired_ci_low"], 100 * r["paired_ci_high"]
            color = {"better": "C2", "worse": "C3"}.get(r["verdict"], "C0")
            xerr = None if math.isnan(low) else [[mean - low], [high - mean]]
            ax.errorbar([mean], [y], xerr=xerr, fmt="o", color=color, capsize=3)
        ax.axvline(0.0, color="k", linewidth=0.8)
        ax.set_title(f"epsilon = {e}", fontsize=9)
        ax.set_xlabel(f"accuracy points vs {pts[0]['baseline']} (95% CI)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_yticks(range(len(methods)), methods, fontsize=7)
    fig.tight_layout()
    path = grid.root / "paired_differences.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def resolve_baseline(grid: Any, baseline: str | None) -> str | None:
    """The baseline of the paired columns: the one asked for (it must be in the grid), else dp-lora
    when the grid runs it, else none."""
    methods = list(grid.spec.get("methods", []))
    if baseline is not None:
        if baseline not in methods:
            from fedlora.errors import ConfigError  # noqa: PLC0415

            raise ConfigError(f"--baseline '{baseline}' is not among the grid's methods ({', '.join(methods)}); add it to --methods")
        return baseline
    return DEFAULT_BASELINE if DEFAULT_BASELINE in methods else None


def write_tables(grid: Any, baseline: str | None = None) -> dict[str, Any]:
    """results.csv, results.md, the summary figures, and per-epsilon `fedlora plot` figures of seed 0."""
    from fedlora.report.plots import plot_runs  # noqa: PLC0415

    rows, dirs, baselines = collect(grid, resolve_baseline(grid, baseline))
    with (grid.root / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    summaries = [json.loads(p.read_text(encoding="utf-8")) for c, _ in grid.cells
                 if (p := grid.root / c.name / "summary.json").is_file()]
    metric = next((s["accuracy_is"] for s in summaries if s.get("accuracy_is")), "accuracy")
    md = markdown(rows, baselines, grid.spec["seeds"], metric)
    (grid.root / "results.md").write_text(md, encoding="utf-8")
    made = figures(grid, rows, dirs)
    if (paired := paired_figure(grid, rows)) is not None:
        made.append(paired)
    for e in dict.fromkeys(e for _, e in dirs):
        seed0 = [d for (_, level), ds in dirs.items() if level == e for d in ds if d.name.endswith("-seed0")]
        if seed0:
            made += plot_runs(seed0, grid.root / "figures" / ("nodp" if e is None else f"eps{e:g}"))
    return {"markdown": md, "rows": rows, "baselines": baselines, "figures": made}
