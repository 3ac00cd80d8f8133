"""AS-LoRA's finite-difference curvature: refused without the flag; with it, it changes the
scores and the run is marked as NOT covered by the DP guarantee everywhere it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fedlora.errors import ConfigError
from fedlora.experiment import run_experiment
from fedlora.federation.simulation import Simulation
from fedlora.methods import MethodSetup, build_method
from fedlora.methods.as_lora import SendWithScores
from fedlora.methods.as_lora_curvature import finite_difference_score
from fedlora.methods.base import ClientTrace

FD = {"curvature": "finite-difference", "allow_non_private_curvature": True}
FAST = {"every": 100, "diagnostics": False}


def test_finite_difference_is_refused_without_the_explicit_flag():
    with pytest.raises(ConfigError, match="allow_non_private_curvature=true") as err:
        build_method("as-lora", MethodSetup({"curvature": "finite-difference"}, True, 10, 0))
    assert "\n" not in str(err.value) and "NOT covered" in str(err.value)
    with pytest.raises(ConfigError, match="true or false"):
        build_method("as-lora", MethodSetup({**FD, "allow_non_private_curvature": "yes"}, True, 10, 0))
    # the flag alone changes nothing: the other curvatures stay privacy-exact and unmarked
    for curvature in ("off", "secant"):
        m = build_method("as-lora", MethodSetup({"curvature": curvature, "allow_non_private_curvature": True}, True, 10, 0))
        assert m.reads_private_data == ""
    assert "finite-difference" in build_method("as-lora", MethodSetup(FD, True, 10, 0)).reads_private_data


def test_finite_difference_score_is_the_codes_second_difference_on_a_quadratic():
    # L(theta) = 0.5 * c * ||theta||^2 around theta = 0: kappa = c along any unit direction
    c, lr, e = 3.0, 0.1, 2.0
    trace = ClientTrace({}, 0.0, 1, lr, probe=lambda off: 0.5 * c * sum(float(v.double().pow(2).sum()) for v in off.values()))
    proj = torch.tensor([[3.0, 4.0]])
    score = finite_difference_score(e, proj, "l0.A", trace, 1e-2, trace.probe({}))
    assert score == pytest.approx(e - 0.5 * lr * c * e, rel=1e-4)
    assert finite_difference_score(e, torch.zeros(1, 2), "l0.A", trace, 1e-2, 0.0) == 0.0  # zero gradient: skipped


def test_finite_difference_changes_the_scores_compared_to_off(tiny_cfg):
    def scores(options):
        sim = Simulation(tiny_cfg(method={"name": "as-lora", "options": options}, eval=FAST,
                                  federation={"rounds": 2, "local_steps": 2}, train={"threads": 1}))
        before = {k: v.clone() for k, v in sim.rt.adapted.state().items()}
        sim.run_round(1)
        after = sim.rt.adapted.state()
        assert all(torch.equal(before[k], after[k]) for k in before if k not in sim.global_state)  # probe restores
        return sim.memory["ema"], sim.global_state

    (off, state_off), (fd, state_fd) = scores({}), scores(FD)
    assert set(off) == set(fd) and off  # same layers and factors scored (round 1: all B)
    assert any(off[k] != pytest.approx(fd[k], rel=1e-6) for k in off)  # the curvature moved the scores
    assert all(torch.equal(state_off[k], state_fd[k]) for k in state_off)  # same training: only scores differ


def test_curvature_rounds_limit_the_finite_difference_to_the_last_rounds():
    m = build_method("as-lora", MethodSetup({**FD, "curvature_rounds": 1}, True, 10, 0))
    assert isinstance(m.upload, SendWithScores) and m.upload.fd_eps == 1e-3
    with pytest.raises(ConfigError, match="fd_eps"):
        build_method("as-lora", MethodSetup({**FD, "fd_eps": 0}, True, 10, 0))


@pytest.mark.slow
def test_a_finite_difference_run_is_marked_not_covered_everywhere(tiny_cfg):
    cfg = tiny_cfg(method={"name": "as-lora", "options": FD}, eval=FAST, train={"threads": 1},
                   federation={"rounds": 2, "local_steps": 2}, output={"name": "fd"})
    summary = run_experiment(cfg, progress=False)
    run = Path(summary["run_dir"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all("NOT covered by the DP guarantee" in m["guarantees"] for m in metrics)
    assert all(m["guarantees"].startswith("sample-level") for m in metrics)  # what does hold is still said
    assert "NOT covered by the DP guarantee" in summary["line"].splitlines()[0]
    saved = json.loads((run / "summary.json").read_text())
    assert "finite-difference" in saved["not_covered_by_dp"] and "NOT covered" in saved["line"]
    text = (run / "config.yaml").read_text()
    assert text.startswith("# NOT covered by the DP guarantee")
    assert yaml.safe_load(text)["method"]["options"] == FD  # still a valid config, flag included


def test_an_off_run_is_not_marked(tiny_cfg):
    sim = Simulation(tiny_cfg(method={"name": "as-lora"}, eval=FAST))
    assert "NOT covered" not in sim.guarantees(1)


def test_the_probe_reads_the_given_rows_at_the_given_point_and_restores_the_model(tiny_cfg):
    from fedlora.federation.private_probe import loss_probe

    sim = Simulation(tiny_cfg(method={"name": "as-lora"}, eval=FAST, train={"threads": 1}))
    rt, rows = sim.rt, sim.parts[0][:8]
    key = sorted(k for k in rt.adapted.params if k.endswith("lora_B.default.weight") or ".lora_B." in k)[0]
    point = {key: torch.full_like(rt.adapted.params[key], 0.05)}
    current = rt.adapted.state()
    probe = loss_probe(rt, rows, point)
    got = probe({}), probe({key: torch.full_like(point[key], 0.01)})
    assert all(torch.equal(current[k], v) for k, v in rt.adapted.state().items()) and rt.adapted.model.training
    rt.adapted.load({key: point[key]})
    rt.adapted.model.eval()
    with torch.no_grad():
        want = float(rt.task.loss(rt.adapted.model, rt.task.batch(rt.task.train, rows, rt.device)).mean())
    assert got[0] == pytest.approx(want, rel=1e-6) and got[1] != got[0]
