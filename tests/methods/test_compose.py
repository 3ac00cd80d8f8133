"""Methods composed from the config: seams replaced by name, invalid combinations refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.errors import ConfigError
from fedlora.federation.simulation import Simulation, build_method_for
from fedlora.methods import MethodSetup, available_methods
from fedlora.methods.compose import SEAMS, check, compose_method, profile
from fedlora.methods.fedex_lora import FoldResidual
from fedlora.methods.la_lora import AlternateSteps
from fedlora.methods.lowrank import lora_modules
from tests.helpers import NEEDS, tiny_tree

# method -> its seams by name (plan, schedule, upload, aggregate)
PROFILES = {
    "dp-lora": ("all", "joint", "trained", "mean"),
    "ffa-lora": ("freeze-a", "joint", "trained", "mean"),
    "rolora": ("alternate-rounds", "joint", "trained", "mean"),
    "fedsa-lora": ("share-a", "joint", "trained", "mean"),
    "fedsa-rslora": ("share-a", "joint", "trained", "mean"),
    "fedsa-vera": ("share-a", "joint", "trained", "mean"),
    "la-lora": ("all", "alternate-steps", "trained", "mean"),
    "as-lora": ("layerwise", "joint", "scores", "score-ema"),
    "fedex-lora": ("all", "joint", "trained", "fedex"),
    "flora": ("all", "joint", "trained", "flora"),
    "fedsvd": ("b-only", "joint", "trained", "fedsvd"),
    "head-only": ("head-only", "joint", "trained", "mean"),
}


def setup_for(tiny_cfg, name: str, options: dict | None = None) -> MethodSetup:
    cfg = tiny_cfg(**NEEDS.get(name, {}))
    return MethodSetup(options or {}, True, 4, 0, adapter=cfg.adapter)


def test_every_registered_method_is_named_by_its_seams_and_passes_the_check(tiny_cfg):
    assert set(PROFILES) == set(available_methods())
    for name, names in PROFILES.items():
        method = compose_method(name, {}, setup_for(tiny_cfg, name))
        seams = profile(method)
        assert tuple(s.name for s in seams.values()) == names, name
        check(name, seams)  # the registered methods are valid compositions


def test_naming_a_methods_own_seam_changes_nothing(tiny_cfg):
    method = compose_method("fedex-lora", {"aggregate": "fedex", "plan": "all"}, setup_for(tiny_cfg, "fedex-lora"))
    assert method.name == "fedex-lora" and "composed_from" not in method.info


def test_dp_lora_with_alternating_steps_is_la_lora(tiny_cfg):
    fast = {"federation": {"rounds": 1}, "eval": {"diagnostics": False}}
    cfg = tiny_cfg(method={"name": "dp-lora", "schedule": "alternate-steps"}, **fast)
    composed, paper = Simulation(cfg), Simulation(tiny_cfg(method={"name": "la-lora"}, **fast))
    assert composed.method.name == "dp-lora+schedule=alternate-steps" and not composed.method.exact
    # the row names the schedule's options that ran, as la-lora's does
    assert composed.method.variant == "dp-lora+schedule=alternate-steps (phase B, filter on)"
    assert paper.method.variant == "la-lora (phase B, filter on)"
    # and a replaced schedule takes its options with it: la-lora with the joint schedule neither alternates nor filters
    joint = Simulation(tiny_cfg(method={"name": "la-lora", "schedule": "joint"}, **fast)).method
    assert joint.variant == "la-lora+schedule=joint" and not {"phase", "filter"} & set(joint.info)
    a, b = composed.run(), paper.run()
    assert all(torch.equal(a.global_state[k], b.global_state[k]) for k in b.global_state)


def test_alternating_schedule_with_fedex_aggregate_is_exact_on_the_tiny_model(tiny_cfg):
    cfg = tiny_cfg(method={"name": "la-lora", "aggregate": "fedex", "options": {"phase": "A"}}, federation={"rounds": 2},
                   eval={"every": 100, "diagnostics": False})
    sim = Simulation(cfg)
    m = sim.method
    assert m.name == "la-lora+aggregate=fedex" and m.shares_base and m.exact
    assert isinstance(m.schedule, AlternateSteps) and m.schedule.first == "A" and isinstance(m.aggregate, FoldResidual)
    assert m.info["aggregate"] == "fedex" and m.info["composed_from"] == "la-lora"
    seen = {}

    def spy(ctx, plan, glob, uploads, weights):
        seen.update(glob=glob, uploads=uploads, weights=weights)
        return m.aggregate(ctx, plan, glob, uploads, weights)

    sim.method = replace(m, aggregate=spy)
    for rnd in (1, 2):
        sim.run_round(rnd)
        s = m.aggregate.scale
        modules = lora_modules(sim.rt.adapted.factors)
        assert modules
        for a, b, w0 in modules:
            f64 = {k: v.to(torch.float64) for k, v in sim.global_state.items()}
            target = seen["glob"][w0].to(torch.float64) + s * sum(
                w * u[b].to(torch.float64) @ u[a].to(torch.float64) for u, w in zip(seen["uploads"], seen["weights"], strict=True))
            got = f64[w0] + s * f64[b] @ f64[a]
            assert torch.allclose(got, target, rtol=0, atol=1e-6), (rnd, w0)
            fedavg = seen["glob"][w0].to(torch.float64) + s * f64[b] @ f64[a]  # W0 not corrected
            assert not torch.allclose(fedavg, target, rtol=0, atol=1e-6)  # the residual matters


@pytest.mark.parametrize(("name", "seams", "fragments"), [
    ("dp-lora", {"aggregate": "fedexx"}, ["unknown method.aggregate 'fedexx'", "did you mean 'fedex'", "fedsvd"]),
    ("dp-lora", {"plan": "nope"}, ["unknown method.plan 'nope'", "alternate-rounds"]),
    ("ffa-lora", {"schedule": "alternate-steps"}, ["schedule 'alternate-steps' needs", "plan=all"]),
    ("dp-lora", {"plan": "alternate-rounds", "schedule": "alternate-steps"}, ["schedule 'alternate-steps' needs"]),
    ("rolora", {"aggregate": "fedex"}, ["'rolora+aggregate=fedex'", "aggregate 'fedex' needs A trained", "plan=all"]),
    ("ffa-lora", {"aggregate": "flora"}, ["aggregate 'flora' needs A"]),
    ("fedsa-lora", {"aggregate": "fedex"}, ["aggregate 'fedex' needs B held by the server", "plan=all"]),
    ("fedsa-lora", {"aggregate": "fedsvd"}, ["aggregate 'fedsvd' needs"]),
    ("dp-lora", {"aggregate": "fedsvd"}, ["aggregate 'fedsvd' needs A not trained", "plan=b-only"]),
    ("ffa-lora", {"aggregate": "fedsvd"}, ["aggregate 'fedsvd' needs A held by the server", "plan=b-only"]),
    ("as-lora", {"aggregate": "mean"}, ["upload 'scores' needs an aggregate that reads scores", "aggregate=score-ema"]),
    ("as-lora", {"upload": "trained"}, ["aggregate 'score-ema' needs score uploads", "upload=scores"]),
    ("dp-lora", {"upload": "scores"}, ["upload 'scores' needs"]),
])
def test_invalid_combinations_are_refused_in_one_line(tiny_cfg, name, seams, fragments):
    with pytest.raises(ConfigError) as err:
        build_method_for(tiny_cfg(method={"name": name, **seams}))
    msg = str(err.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_every_named_seam_builds_and_fedsa_composition_keeps_b_local(tiny_cfg):
    assert all(SEAMS[k] for k in SEAMS)
    m = build_method_for(tiny_cfg(method={"name": "fedsa-lora", "schedule": "alternate-steps"}))
    assert m.local_roles == ("B", "head") and isinstance(m.schedule, AlternateSteps)
    m = build_method_for(tiny_cfg(method={"name": "dp-lora", "plan": "freeze-a"}))
    assert m.frozen_roles == ("A",) and m.exact and m.name == "dp-lora+plan=freeze-a"
    m = build_method_for(tiny_cfg(method={"name": "fedex-lora", "aggregate": "mean"}))
    assert not m.shares_base and not m.exact
    m = build_method_for(tiny_cfg(method={"name": "dp-lora", "plan": "b-only", "aggregate": "fedsvd"}))
    assert m.exact and m.name == "dp-lora+plan=b-only+aggregate=fedsvd"


def test_seam_options_are_read_and_unknown_options_still_refused(tiny_cfg):
    m = build_method_for(tiny_cfg(method={"name": "dp-lora", "schedule": "alternate-steps", "options": {"filter": False}}))
    assert m.schedule.smooth is False
    with pytest.raises(ConfigError, match="no option 'phaze'"):
        build_method_for(tiny_cfg(method={"name": "dp-lora", "schedule": "alternate-steps", "options": {"phaze": "A"}}))


def test_cli_refuses_an_unknown_aggregate_with_exit_2_and_one_line(tiny_model_dir, tiny_csv, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_tree(tiny_model_dir, tiny_csv, tmp_path / "runs")))
    result = CliRunner().invoke(app, ["run", str(path), "-s", "method.aggregate=fedexx", "-q"])
    assert result.exit_code == 2, result.output
    out = result.output.strip()
    assert len(out.splitlines()) == 1 and out.startswith("error: ") and "Traceback" not in out
    assert "unknown method.aggregate 'fedexx'" in out and "did you mean 'fedex'" in out
