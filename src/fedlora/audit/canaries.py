"""The training side of the one-run audit (Steinke, Nasr, Jagielski 2023): canaries in one client.

Construction (text tasks): canary i is a sentence of ``CANARY_WORDS`` words drawn uniformly
(seeded) from the tokenizer's whole-word vocabulary, so it is unlike the training text and
unlike the other canaries, with a label drawn uniformly at random: about half of them carry a
label that the sentence's content does not predict, so the only way to fit it is to memorise
that example. All M canaries are appended to the task's training set (so the frozen-prefix
cache covers them); each is given to ONE client (``client``) with probability 1/2 (seeded) and
otherwise held out from every client. The canary client's data then holds real examples and
its "in" canaries: the same Poisson sampling, clipping and noise apply to both.

Score: the drop of a canary's loss (on its canary label) from the initial to the final global
model; in-canaries should drop more. The auditor guesses "in" for the k+ highest and "out"
for the k- lowest scores; (k+, k-) is the best of ``GUESS_SPLITS``, each tested at confidence
``1 - (1 - confidence) / len(GUESS_SPLITS)`` (Bonferroni), so the reported bound holds at the
stated confidence. ``privacy.audit.epsilon_lower_bound`` turns the count into the bound.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from fedlora.config import ExperimentConfig
from fedlora.errors import ConfigError, DataError
from fedlora.federation.runtime import Runtime
from fedlora.privacy.audit import epsilon_lower_bound
from fedlora.seeds import derive_seed
from fedlora.tasks import build_task
from fedlora.tasks.base import ExampleSet

CANARY_WORDS = 10
# (k+ / M, k- / M): guess splits tried, each at a Bonferroni-corrected confidence. One-sided splits
# matter: with random binary labels, an "out" canary is predicted right half the time, so its
# score can look "in", while a low score (a confident wrong prediction) is a reliable "out".
GUESS_SPLITS = ((0.05, 0.05), (0.125, 0.125), (0.25, 0.25), (0.5, 0.5), (0.0, 0.1), (0.0, 0.25), (0.0, 0.5),
                (0.1, 0.0), (0.25, 0.0))


def make_canaries(task: Any, m: int, seed: int) -> ExampleSet:
    """M canary sentences of random whole words, each with a uniformly random label."""
    tok = getattr(task, "tokenizer", None)
    if tok is None:
        raise DataError(f"the audit's canaries are sentences; task '{task.name}' has no tokenizer: use a text task")
    words = sorted(w for w in tok.get_vocab() if w.isalpha() and w.isascii())
    if len(words) < 2:
        raise DataError("the tokenizer has fewer than 2 whole-word tokens; the audit cannot build canary sentences")
    rng = np.random.default_rng(derive_seed(seed, "audit", "canaries"))
    sentences = [" ".join(rng.choice(words, size=CANARY_WORDS)) for _ in range(m)]
    labels = rng.integers(0, task.num_labels, size=m).astype(np.int64)
    enc = tok(sentences, truncation=True, max_length=task.cfg.max_length)
    features = {"input_ids": [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]}
    if "token_type_ids" in task.train.features:
        features["token_type_ids"] = [np.zeros_like(x) for x in features["input_ids"]]
    return ExampleSet(features, labels, {"sentences": sentences})


def concat_examples(a: ExampleSet, b: ExampleSet) -> ExampleSet:
    """Rows of ``a`` then rows of ``b`` (features both hold)."""
    missing = sorted(set(a.features) ^ set(b.features))
    if missing:
        raise DataError(f"cannot join example sets: feature '{missing[0]}' is on one side only")
    return ExampleSet({k: [*a.features[k], *b.features[k]] for k in a.features},
                      np.concatenate([a.labels, b.labels]), a.extra)


@torch.no_grad()
def example_losses(sim: Any, state: dict[str, torch.Tensor], rows: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Per-example loss of training-set ``rows`` under the global ``state`` (local tensors at init)."""
    rt = sim.rt
    rt.adapted.load(sim.init_local)
    rt.adapted.load(state)
    model = rt.adapted.model
    was_training = model.training
    model.eval()
    out = [rt.task.loss(model, rt.task.batch(rt.task.train, rows[s : s + batch_size], rt.device)).float().cpu()
           for s in range(0, len(rows), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy()


def best_guess_bound(scores: np.ndarray, included: np.ndarray, confidence: float) -> dict[str, Any]:
    """For each (k+, k-) of ``GUESS_SPLITS``: guess the k+ highest scores "in" and the k- lowest "out";
    return the best bound, each split tested at ``1 - (1 - confidence) / len(GUESS_SPLITS)`` (Bonferroni)."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")  # highest score first
    each = 1 - (1 - confidence) / len(GUESS_SPLITS)
    best: dict[str, Any] = {}
    for f_plus, f_minus in GUESS_SPLITS:
        k_plus, k_minus = int(round(f_plus * m)), int(round(f_minus * m))
        if k_plus + k_minus == 0 or k_plus + k_minus > m:
            continue
        top, bottom = order[:k_plus], order[m - k_minus :]
        correct = int(included[top].sum() + (~included[bottom]).sum())
        bound = epsilon_lower_bound(guesses=k_plus + k_minus, correct=correct, confidence=each)
        if not best or bound > best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": bound, "guesses": k_plus + k_minus, "k_plus": k_plus, "k_minus": k_minus,
                    "correct": correct, "per_test_confidence": each}
    return best


def run_audit(cfg: ExperimentConfig, *, canaries: int, confidence: float = 0.95, client: int = 0,
              write: bool = True, _disable_noise_for_tests: bool = False) -> dict[str, Any]:
    """Train once with M canaries in client ``client``; return (and write audit.json) the lower bound.

    ``_disable_noise_for_tests`` (tests only, no config key or CLI flag reaches it): every client's
    DP-SGD adds no noise while the ledger still claims the calibrated epsilon.
    """
    from fedlora.federation.simulation import Simulation  # noqa: PLC0415
    from fedlora.report.rundir import RunDir  # noqa: PLC0415

    if canaries < 2:
        raise ConfigError(f"--canaries must be at least 2 (got {canaries}); hundreds are needed for a useful bound")
    if not 0 <= client < cfg.federation.num_clients:
        raise ConfigError(f"--client {client} is not a client of this run (0..{cfg.federation.num_clients - 1})")
    refuse_unreleased(cfg)
    if write:
        RunDir.check_free(cfg.output.root, cfg.output.name)
    task = build_task(cfg.task, cfg.train.seed)
    n0 = len(task.train)
    task.train = concat_examples(task.train, make_canaries(task, canaries, cfg.train.seed))
    rows = np.arange(n0, n0 + canaries)
    included = np.random.default_rng(derive_seed(cfg.train.seed, "audit", "include")).random(canaries) < 0.5
    rt = Runtime(cfg, task=task)  # caches the frozen prefix of the canaries too
    sim = Simulation(cfg, runtime=rt, extra_rows={client: rows[included]}, held_out_rows=rows[~included])
    claimed_specs = sim.specs
    if _disable_noise_for_tests:  # the mechanism adds no noise; the claim below stays the calibrated one
        sim.specs = [dataclasses.replace(s, dp=dataclasses.replace(s.dp, noise_multiplier=0.0))
                     if s.dp else s for s in sim.specs]
    run_dir = RunDir.create(cfg.output.root, cfg.output.name, "audit") if write else None
    sim.run_dir = run_dir
    if run_dir is not None:
        run_dir.write_config(cfg.to_yaml())
    initial = {k: v.clone() for k, v in sim.global_state.items()}
    result = sim.run()
    scores = example_losses(sim, initial, rows) - example_losses(sim, sim.global_state, rows)
    sim.specs = claimed_specs
    claimed, unit = claimed_epsilon(sim, client, result.rounds_done)
    audit = {"canaries": canaries, "included": int(included.sum()), "client": client, "confidence": confidence,
             **best_guess_bound(scores, included, confidence), "claimed_epsilon": claimed, "claimed_unit": unit,
             "delta": cfg.privacy.delta, "rounds": result.rounds_done, "noise_disabled_for_tests": _disable_noise_for_tests,
             "score": "loss drop of the canary label, initial to final global model",
             "mean_score_in": float(scores[included].mean()) if included.any() else None,
             "mean_score_out": float(scores[~included].mean()) if (~included).any() else None}
    audit["line"] = audit_line(audit)
    if run_dir is not None:
        run_dir.write_json("audit.json", audit)
        audit["run_dir"] = str(run_dir.path)
    return audit


def refuse_unreleased(cfg: ExperimentConfig) -> None:
    """The black-box audit scores the global model. Refuse a method that keeps the B side (LoRA's B,
    VeRA's lambda_b) on the clients: B starts at zero and stays at zero globally, so the global model's
    output does not depend on the released A at all and the audit could only ever say "consistent"."""
    from fedlora.federation.simulation import build_method_for  # noqa: PLC0415

    method = build_method_for(cfg)
    if "B" in method.local_roles:
        raise ConfigError(
            f"the black-box audit scores the global model, which for method '{method.name}' does not depend on "
            "what clients release (B stays on the clients and is 0 globally): use `fedlora audit --white-box`, "
            "which scores the released gradients")


def claimed_epsilon(sim: Any, client: int, rounds: int) -> tuple[float | None, str]:
    """The epsilon the run claims for the adjacency the audit tests: one canary in or out of the canary client.

    Sample-level DP: one example of that client (add/remove), the ledger's epsilon. User-level DP
    alone: adding or removing one canary *changes* one user's data, which is a remove plus an add of
    that user under the add/remove adjacency the accountant uses: 2 x epsilon_user (group privacy)."""
    if sim.cfg.privacy.enabled:
        return sim.ledger()[client]["epsilon"], "sample-level"
    if sim.user_dp is not None:
        return 2 * sim.user_dp.epsilon(rounds), "user-level (one user's data changed: 2 x epsilon_user)"
    return None, "none"


def audit_line(a: dict[str, Any]) -> str:
    claimed = "no DP claimed" if a["claimed_epsilon"] is None else f"claimed {a['claimed_unit']} epsilon {a['claimed_epsilon']:.3g}"
    verdict = "" if a["claimed_epsilon"] is None else (
        " -- VIOLATION: the bound exceeds the claim" if a["epsilon_lower_bound"] > a["claimed_epsilon"] + 1e-9 else " -- consistent")
    return (f"audit: empirical epsilon >= {a['epsilon_lower_bound']:.3f} at {a['confidence']:.0%} confidence "
            f"({a['correct']}/{a['guesses']} right guesses, {a['canaries']} canaries, {a['included']} in client "
            f"{a['client']}); {claimed} (delta {a['delta']:g}){verdict}")


__all__ = ["best_guess_bound", "claimed_epsilon", "concat_examples", "make_canaries", "refuse_unreleased", "run_audit"]
