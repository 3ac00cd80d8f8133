"""The mutation table: the white-box audit against deliberately broken DP mechanisms.

Every switch that breaks the mechanism lives here, as a wrapper around the production DP step's
inputs and outputs (``fedlora.privacy.dpsgd``'s ``privatize`` and its pieces) or as a mutated
``DPParams`` handed to the mechanism, while the claim is always the production accountant's
epsilon for the honest parameters. The DP step itself has no test switch.

Rows (each on the same real per-sample gradients, canaries and scoring, see ``audit/whitebox.py``):

- ``honest``: the production ``privatize`` with secure noise (the default);
- ``noise-off``: sigma = 0 in the mechanism;
- ``noise-x0.5``: sigma / 2 in the mechanism;
- ``per-batch-clipping``: the batch's gradient clipped as a whole instead of each example:
  the summed gradient is clipped to C x the expected batch size (the batch *mean* clipped to C,
  what ``torch.nn.utils.clip_grad_norm_`` on the mean gradient does), then the honest noise;
- ``steps-undercounted-2x``: the honest mechanism for T steps, the accountant charged T / 2;
- ``clipping-ignored``: no clipping, noise still sigma x C;
- ``reproducible-noise-known-seed``: the honest step with the run's seeded noise stream
  (``privacy.reproducible_noise``), and the auditor, holding the config, regenerates it with
  ``noise_stream(True, ...)`` and subtracts it.

A row is a VIOLATION when the audit's lower bound exceeds its claimed epsilon.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.audit.whitebox import Collected, collect, dp_at, jsonable, replay
from fedlora.config import ExperimentConfig
from fedlora.privacy.dpsgd import DPParams, Grads, add_noise, clip_factors, clipped_sum, privatize
from fedlora.privacy.noise import NoiseSource


def per_batch_clipping(per_sample: Grads, dp: DPParams, noise: NoiseSource) -> Grads:
    """Broken: clip the batch's summed gradient to C x B (its mean to C), not each example to C."""
    summed = {k: g.sum(0, keepdim=True) for k, g in per_sample.items()}  # the batch as one row
    clipped = clipped_sum(summed, clip_factors(summed, dp.clip_norm * dp.expected_batch_size))
    noisy = add_noise(clipped, std=dp.noise_multiplier * dp.clip_norm, noise=noise)
    return {k: v / dp.expected_batch_size for k, v in noisy.items()}


def clipping_ignored(per_sample: Grads, dp: DPParams, noise: NoiseSource) -> Grads:
    """Broken: sum the per-example gradients unclipped; the noise is still sigma x C."""
    summed = clipped_sum(per_sample, torch.ones(next(iter(per_sample.values())).shape[0]))
    noisy = add_noise(summed, std=dp.noise_multiplier * dp.clip_norm, noise=noise)
    return {k: v / dp.expected_batch_size for k, v in noisy.items()}


@dataclass(frozen=True)
class Mutation:
    name: str
    description: str
    mechanism: Callable[[Grads, DPParams, NoiseSource], Grads] = privatize
    mechanism_dp: Callable[[DPParams], DPParams] = lambda dp: dp  # noqa: E731
    claim_steps: Callable[[int], int] = lambda t: t  # noqa: E731
    reproducible_noise: bool = False
    broken: bool = True


MUTATIONS: tuple[Mutation, ...] = (
    Mutation("honest", "production privatize, secure noise (the default)", broken=False),
    Mutation("noise-off", "sigma = 0 in the mechanism", mechanism_dp=lambda dp: dataclasses.replace(dp, noise_multiplier=0.0)),
    Mutation("noise-x0.5", "sigma / 2 in the mechanism",
             mechanism_dp=lambda dp: dataclasses.replace(dp, noise_multiplier=dp.noise_multiplier / 2)),
    Mutation("per-batch-clipping", "the batch gradient clipped as a whole (mean to C), not each example",
             mechanism=per_batch_clipping),
    Mutation("steps-undercounted-2x", "T steps run, the accountant charged T/2", claim_steps=lambda t: t // 2),
    Mutation("clipping-ignored", "no clipping, noise still sigma x C", mechanism=clipping_ignored),
    Mutation("reproducible-noise-known-seed", "seeded noise; the auditor regenerates it from the config and subtracts it",
             reproducible_noise=True),
)


def mutation_rows(col: Collected, epsilons: list[float], *, confidence: float = 0.95, repeats: int | None = None,
                  canaries: int | None = None, mutations: tuple[Mutation, ...] | list[Mutation] = MUTATIONS,
                  reproducible_noise: bool = False) -> list[dict[str, Any]]:
    """One row per (epsilon, mutation): claimed epsilon, measured lower bound, verdict, and whether it is right.
    ``reproducible_noise``: every mechanism draws the run's seeded stream (a deterministic table, for tests;
    the auditor still knows the seed only in the known-seed mutation)."""
    rows = []
    extra = {} if repeats is None else {"repeats": repeats}
    for eps in epsilons:
        dp = dp_at(col, eps)
        for mut in mutations:
            r = replay(col, dp, mechanism=mut.mechanism, mechanism_dp=mut.mechanism_dp(dp),
                       reproducible_noise=mut.reproducible_noise or reproducible_noise,
                       auditor_knows_seed=mut.reproducible_noise,
                       claim_steps=mut.claim_steps(len(col.steps)), canaries=canaries, confidence=confidence, **extra)
            rows.append({"target_epsilon": eps, "mutation": mut.name, "description": mut.description,
                         "broken": mut.broken, "flagged_correctly": (r["verdict"] == "VIOLATION") == mut.broken, **r})
    return rows


def _fmt(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.2f}"


def mutation_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: target epsilon, mutation, claimed epsilon, lower bound, bound/claim, verdict."""
    lines = ["| target eps | mechanism | claimed eps | lower bound | bound / claim | verdict |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mark = "" if r["flagged_correctly"] else " (WRONG)"
        lines.append(f"| {r['target_epsilon']:g} | {r['mutation']} | {r['claimed_epsilon']:.2f} | "
                     f"{_fmt(r['epsilon_lower_bound'])} | {_fmt(r['ratio'])} | {r['verdict']}{mark} |")
    return "\n".join(lines)


def run_mutations(cfg: ExperimentConfig, *, epsilons: list[float] | None = None, client: int | None = None,
                  confidence: float = 0.95, repeats: int | None = None, canaries: int | None = None,
                  write: bool = True) -> dict[str, Any]:
    """Collect the real gradients once, run every mutation at every epsilon (default: the config's);
    write mutations.json, mutations.md and config.yaml to a fresh run directory unless ``write`` is False."""
    from fedlora.report.rundir import RunDir  # noqa: PLC0415

    if write:
        RunDir.check_free(cfg.output.root, cfg.output.name)
    start = time.perf_counter()
    col = collect(cfg, client=client)
    eps_list = list(epsilons) if epsilons else [cfg.privacy.epsilon]
    rows = mutation_rows(col, eps_list, confidence=confidence, repeats=repeats, canaries=canaries)
    result = {"config_epsilon": cfg.privacy.epsilon, "epsilons": eps_list, "client": col.client,
              "sample_rate": col.sample_rate, "steps": len(col.steps), "canary_tensors": col.names,
              "collect_seconds": col.seconds, "seconds": time.perf_counter() - start,
              "all_flagged_correctly": all(r["flagged_correctly"] for r in rows), "rows": rows}
    result["table"] = mutation_table(rows)
    if write:
        run_dir = RunDir.create(cfg.output.root, cfg.output.name, "audit-mutations")
        run_dir.write_config(cfg.to_yaml())
        run_dir.write_json("mutations.json", jsonable({k: v for k, v in result.items() if k != "table"}))
        (run_dir.path / "mutations.md").write_text(result["table"] + "\n", encoding="utf-8")
        result["run_dir"] = str(run_dir.path)
    return result


__all__ = ["MUTATIONS", "Mutation", "clipping_ignored", "mutation_rows", "mutation_table", "per_batch_clipping",
           "run_mutations"]
