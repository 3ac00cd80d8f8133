"""Run one experiment end to end: build, train with progress, save, summarise."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedlora.config import ExperimentConfig
from fedlora.federation.server import not_covered
from fedlora.federation.simulation import RunResult, Simulation
from fedlora.privacy.noise import NOT_PRIVATE_WITH_CONFIG
from fedlora.report.rundir import RunDir


def summary_line(result: RunResult, sim: Simulation) -> str:
    final = result.final
    desc = sim.describe()
    acc = final.get("accuracy", float("nan"))
    eps = final.get("epsilon") if final else None
    if sim.cfg.privacy.enabled:
        eps = eps if eps is not None else 0.0  # no round ran
        privacy = f"sample-level epsilon spent {eps:.2f} <= target {sim.cfg.privacy.epsilon:g} (delta {sim.cfg.privacy.delta:g})"
        if sim.user_dp is not None:
            privacy += f"; guarantees: {sim.guarantees(result.rounds_done).split('; reproducible noise')[0]}"
    elif sim.user_dp is not None:  # user-level only: say which guarantee holds, never "no DP"
        privacy = f"guarantees: {sim.guarantees(result.rounds_done)}"
    else:
        privacy = "no DP"
    why = not_covered(sim.cfg, sim.method)
    if why:
        privacy += f"; NOT covered by the DP guarantee: {why}"
    if sim.cfg.privacy.reproducible_noise and (sim.cfg.privacy.enabled or sim.user_dp is not None):
        privacy += f"; {NOT_PRIVATE_WITH_CONFIG}"
    label = getattr(sim.rt.task, "metric_label", None)  # what the task's 'accuracy' is (causal-lm: exact match)
    classes = label is None
    if classes:
        label, yardstick = "accuracy", f"majority class {desc['majority_rate']:.4f}"
    else:
        yardstick = f"held-out perplexity {final['perplexity']:.4g}" if "perplexity" in final else "no class baseline"
    beta = sim.cfg.federation.server_ema
    released = f" (moving average of the global model, beta {beta:g})" if beta else ""
    line = (f"{sim.method.name}: {label} {acc:.4f} ({yardstick}) after "
            f"{result.rounds_done} rounds{released}, {privacy}, {result.seconds:.0f} s")
    if "personal_accuracy" in final:
        line += (f"; personal {label} {final['personal_accuracy']:.4f} (each client's own model on its own test "
                 f"share" + (f"; clients' own majority labels {desc['client_majority_rate']:.4f})"
                             if classes and "client_majority_rate" in desc else ")"))
    if result.stop_reason:
        line += f" -- {result.stop_reason}"
    return line


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True, runtime: Any = None,
                   resume: str | Path | None = None) -> dict[str, Any]:
    """``runtime``: a loaded :class:`~fedlora.federation.runtime.Runtime` to reuse (``fedlora compare``).
    ``resume``: a run directory to continue from its latest checkpoint; cfg is then the run's own
    config (see fedlora/resume.py)."""
    t0 = time.perf_counter()
    notes: list[str] = []
    if resume is None:
        RunDir.check_free(cfg.output.root, cfg.output.name)  # fail fast, before minutes of loading
        sim = Simulation(cfg, runtime=runtime)  # data and model load before anything is written
        run_dir = RunDir.create(cfg.output.root, cfg.output.name, cfg.method.name)
        sim.run_dir = run_dir
        why = not_covered(cfg, sim.method)
        seeded = f"# {NOT_PRIVATE_WITH_CONFIG}\n"
        run_dir.write_config((f"# NOT covered by the DP guarantee: {why}\n" if why else "")
                             + (seeded if cfg.privacy.reproducible_noise else "") + cfg.to_yaml())
        run_dir.write_json("setup.json", sim.describe())
    else:
        from fedlora.resume import reopen  # noqa: PLC0415

        sim, notes = reopen(cfg, resume, runtime)
        run_dir = sim.run_dir
        assert run_dir is not None
        notes.append(f"resumed after round {sim.round}")
    setup_seconds = time.perf_counter() - t0

    if progress:
        from fedlora.report.progress import progress_bar  # noqa: PLC0415

        with progress_bar() as bar:
            task = bar.add_task(f"{cfg.method.name} rounds", total=cfg.federation.rounds, status="", completed=sim.round)

            short = {"accuracy": "acc"}.get(label := getattr(sim.rt.task, "metric_label", "accuracy"), label)

            def on_round(m: dict[str, Any]) -> None:
                acc = f"{short} {m['accuracy']:.3f} " if "accuracy" in m else ""
                eps = f"eps {m['epsilon']:.2f}" if m.get("epsilon") is not None else ""
                bar.update(task, advance=1, status=acc + eps)

            result = sim.run(on_round)
    else:
        result = sim.run()

    sim.save_adapter(run_dir.path / "adapter")
    line = summary_line(result, sim)
    if notes:
        line += f" ({'; '.join(notes)})"
    summary = {
        "line": line,
        "run_dir": str(run_dir.path),
        "method": sim.method.name,
        "variant": sim.method.variant,  # the options that select what ran, e.g. 'as-lora (curvature secant)'
        "rounds": result.rounds_done,
        "stop_reason": result.stop_reason,
        "final": {k: v for k, v in result.final.items() if k != "privacy"},
        "accuracy_is": getattr(sim.rt.task, "metric_label", "accuracy"),  # causal-lm: exact match of greedy generation
        "privacy": sim.ledger(),
        "user_level": sim.user_level_ledger(result.rounds_done),  # sigma_u, q and the user-level epsilon (None: off)
        "not_covered_by_dp": not_covered(cfg, sim.method) or None,
        "reproducible_noise": cfg.privacy.reproducible_noise,  # True: NOT private against anyone holding the config
        "majority_rate": sim.describe()["majority_rate"],
        "seconds": {"setup": setup_seconds, "train": result.seconds, "total": time.perf_counter() - t0},
    }
    run_dir.write_json("summary.json", summary)
    summary["line"] = f"{line}\nrun directory: {run_dir.path}"
    return summary
