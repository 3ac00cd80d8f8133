"""Methods composed from the config: a registered method with some of its seams replaced by name.

``method.name`` picks a registered method; each of ``method.plan``, ``method.schedule``,
``method.upload`` and ``method.aggregate`` that is set replaces that seam (e.g. ``la-lora`` with
``aggregate: fedex``: per-step alternation with exact aggregation; its name in the outputs is
``la-lora+aggregate=fedex``). Every named seam declares what it *provides* and what it *needs*
(plain phrases); a combination is valid when each seam's needs are provided by the others,
and is refused otherwise with one line naming the unmet need and the seams that provide it.
The seams of a registered method are recognised by their types, so the same check covers them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from fedlora.errors import ConfigError
from fedlora.methods.as_lora import SCORE, LayerwiseChoice, MeanAndScoreEMA, SendWithScores
from fedlora.methods.base import Method
from fedlora.methods.dp_lora import local_roles
from fedlora.methods.fedex_lora import FoldResidual
from fedlora.methods.fedsvd import AverageBThenSVD
from fedlora.methods.flora import MergeAndReinit
from fedlora.methods.la_lora import AlternateSteps, alternate_steps
from fedlora.methods.registry import MethodSetup, build_method
from fedlora.methods.seams import AlternateRounds, Joint, MeanOfUploads, SendTrained, TrainRoles

KINDS = ("plan", "schedule", "upload", "aggregate")
# what a plan can provide
TRAINS_A, TRAINS_B = "A trained by every client every round", "B trained by every client every round"
SHARES_A, SHARES_B = "A held by the server and sent down", "B held by the server and sent down"
A_FIXED = "A not trained by the clients"
ONE_FACTOR = "one factor per module per round"
ROLE_GROUPS, LAYER_GROUPS = "per-role groups (A, B)", "per-layer groups"
SENDS, SCORES, READS_SCORES = "trained tensors uploaded", "score uploads", "an aggregate that reads scores"
BOTH = frozenset({TRAINS_A, TRAINS_B, SHARES_A, SHARES_B, SENDS})


@dataclass(frozen=True)
class Seam:
    """A named seam: how to build it, which objects are it, what it provides and needs."""

    kind: str
    name: str
    make: Callable[[MethodSetup], Any]
    matches: Callable[[Method], bool]
    provides: frozenset[str] = frozenset()
    needs: frozenset[str] = frozenset()
    local: tuple[str, ...] = ()  # plans: roles kept on the client (besides an unfederated head)
    frozen: tuple[str, ...] = ()  # plans: roles never trained, kept bitwise
    exact: bool | None = None  # aggregates: True exact, None exact iff the plan trains ONE_FACTOR
    shares_base: bool = False  # aggregates: the global state holds W0


def _roles(m: Method, roles: set[str], skip: tuple[str, ...] = ()) -> bool:
    return isinstance(m.plan, TrainRoles) and set(m.plan.roles) == roles and m.plan.skip_download == skip


def _scale(name: str) -> Callable[[MethodSetup], float]:
    return lambda s: s.lora_scale(f"aggregate={name}")


SEAMS: dict[str, dict[str, Seam]] = {k: {} for k in KINDS}
for seam in [
    Seam("plan", "all", lambda s: TrainRoles(("A", "B", "head")),
         lambda m: _roles(m, {"A", "B", "head"}) and "B" not in m.local_roles, BOTH | {ROLE_GROUPS}),
    Seam("plan", "share-a", lambda s: TrainRoles(("A", "B", "head")),
         lambda m: _roles(m, {"A", "B", "head"}) and "B" in m.local_roles,
         frozenset({TRAINS_A, TRAINS_B, SHARES_A, ROLE_GROUPS}), local=("B", "head")),
    Seam("plan", "freeze-a", lambda s: TrainRoles(("B", "head"), skip_download=("A",)),
         lambda m: _roles(m, {"B", "head"}, ("A",)), frozenset({TRAINS_B, SHARES_B, A_FIXED, ONE_FACTOR}), frozen=("A",)),
    Seam("plan", "b-only", lambda s: TrainRoles(("B", "head")), lambda m: _roles(m, {"B", "head"}),
         frozenset({TRAINS_B, SHARES_A, SHARES_B, A_FIXED, ONE_FACTOR})),
    Seam("plan", "head-only", lambda s: TrainRoles(("head",), skip_download=("A", "B")),
         lambda m: _roles(m, {"head"}, ("A", "B")), frozenset({A_FIXED, ONE_FACTOR}), frozen=("A", "B")),
    Seam("plan", "alternate-rounds", lambda s: AlternateRounds(), lambda m: isinstance(m.plan, AlternateRounds),
         frozenset({SHARES_A, SHARES_B, ONE_FACTOR})),
    Seam("plan", "layerwise", lambda s: LayerwiseChoice(), lambda m: isinstance(m.plan, LayerwiseChoice),
         frozenset({SHARES_A, SHARES_B, ONE_FACTOR, LAYER_GROUPS})),
    Seam("schedule", "joint", lambda s: Joint(), lambda m: isinstance(m.schedule, Joint)),
    Seam("schedule", "alternate-steps", alternate_steps, lambda m: isinstance(m.schedule, AlternateSteps),
         needs=frozenset({ROLE_GROUPS, TRAINS_A, TRAINS_B})),
    Seam("upload", "trained", lambda s: SendTrained(), lambda m: type(m.upload) is SendTrained, frozenset({SENDS})),
    Seam("upload", "scores", lambda s: SendWithScores(s.seed, s.rounds), lambda m: isinstance(m.upload, SendWithScores),
         frozenset({SENDS, SCORES}), frozenset({LAYER_GROUPS, READS_SCORES})),
    Seam("aggregate", "mean", lambda s: MeanOfUploads(), lambda m: isinstance(m.aggregate, MeanOfUploads)),
    Seam("aggregate", "score-ema", lambda s: MeanAndScoreEMA(), lambda m: isinstance(m.aggregate, MeanAndScoreEMA),
         frozenset({READS_SCORES}), frozenset({SCORES})),
    Seam("aggregate", "fedex", lambda s: FoldResidual(_scale("fedex")(s)), lambda m: isinstance(m.aggregate, FoldResidual),
         needs=BOTH, exact=True, shares_base=True),
    Seam("aggregate", "flora", lambda s: MergeAndReinit(_scale("flora")(s), s.seed),
         lambda m: isinstance(m.aggregate, MergeAndReinit), needs=BOTH, exact=True, shares_base=True),
    Seam("aggregate", "fedsvd", lambda s: (_scale("fedsvd")(s), AverageBThenSVD())[1],
         lambda m: isinstance(m.aggregate, AverageBThenSVD),
         needs=frozenset({TRAINS_B, SHARES_B, SHARES_A, A_FIXED, SENDS}), exact=True),
]:
    SEAMS[seam.kind][seam.name] = seam


def known(kind: str, name: str) -> Seam:
    if name not in SEAMS[kind]:
        close = difflib.get_close_matches(name, list(SEAMS[kind]), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown method.{kind} '{name}'{hint}; known: {', '.join(SEAMS[kind])}")
    return SEAMS[kind][name]


def profile(method: Method) -> dict[str, Seam | None]:
    """The named seams a built method is made of (None where a seam has no name)."""
    return {k: next((s for s in SEAMS[k].values() if s.matches(method)), None) for k in KINDS}


def _unmet(seam: Seam, seams: dict[str, Seam | None]) -> frozenset[str]:
    return seam.needs - frozenset().union(*(s.provides for k, s in seams.items() if k != seam.kind and s is not None))


def check(label: str, seams: dict[str, Seam | None]) -> None:
    """Refuse a combination where some seam needs what no other seam provides."""
    for kind, seam in seams.items():
        if seam is None:
            continue
        for need in sorted(_unmet(seam, seams)):
            fixes = [f"{s.kind}={s.name}" for k in KINDS if k != kind for s in SEAMS[k].values()
                     if need in s.provides and not _unmet(seam, {**seams, k: s})]
            fix = f"set {' or '.join(fixes)}, or " if fixes else ""
            raise ConfigError(f"method '{label}': {kind} '{seam.name}' needs {need}, which the other seams do not "
                              f"provide; {fix}choose another {kind}")


def compose_method(name: str, overrides: dict[str, str | None], setup: MethodSetup) -> Method:
    """Build ``name`` with the seams named in ``overrides`` (kind -> seam name, None: keep)."""
    chosen = {k: known(k, v) for k, v in overrides.items() if v is not None}
    built = {k: s.make(setup) for k, s in chosen.items()}  # reads their options before the check
    base = build_method(name, setup)
    if not chosen:
        return base
    own = profile(base)
    changed = {k: s for k, s in chosen.items() if own[k] is None or own[k].name != s.name}
    if not changed:
        return base
    label = base.name + "".join(f"+{k}={changed[k].name}" for k in KINDS if k in changed)
    seams = {**own, **changed}
    check(label, seams)
    # the options a seam records (AlternateSteps.info) go with it: a replaced seam's leave, the new one's come
    replaced = {key for k in changed for key in getattr(getattr(base, k), "info", {})}
    kept = {key: v for key, v in base.info.items() if key not in replaced}
    method = replace(base, name=label, **{k: built[k] for k in changed},
                     info={**kept, "composed_from": base.name, **{k: changed[k].name for k in changed},
                           **{key: v for k in changed for key, v in getattr(built[k], "info", {}).items()}})
    if "plan" in changed:
        plan = changed["plan"]
        method = replace(method, local_roles=plan.local or local_roles(setup), frozen_roles=plan.frozen)
    if "aggregate" in changed:
        agg = changed["aggregate"]
        method = replace(method, shares_base=agg.shares_base)
    method = replace(method, side_uploads=(SCORE,) if isinstance(method.upload, SendWithScores) else ())  # not model tensors
    agg, plan = seams["aggregate"], seams["plan"]
    if agg is not None and plan is not None:
        method = replace(method, exact=bool(agg.exact) if agg.exact is not None else ONE_FACTOR in plan.provides)
    return method
