"""federation.server_ema: the server evaluates and saves a moving average of the global state."""

from __future__ import annotations

import torch

from fedlora.federation.checkpoint import latest_checkpoint
from fedlora.federation.server import ema_update
from fedlora.federation.simulation import Simulation
from fedlora.report.rundir import RunDir


def test_ema_starts_at_the_first_state_then_mixes_with_beta():
    s1 = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])}
    s2 = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor([4])}
    ema = ema_update(None, s1, 0.75)
    assert torch.equal(ema["w"], s1["w"]) and ema["w"] is not s1["w"]
    ema = ema_update(ema, s2, 0.75)
    torch.testing.assert_close(ema["w"], 0.75 * s1["w"] + 0.25 * s2["w"])
    assert torch.equal(ema["n"], s2["n"])  # integer tensors are not averaged


def test_the_average_is_evaluated_and_saved_while_training_continues_from_the_aggregate(tiny_cfg, tmp_path):
    sim = Simulation(tiny_cfg(federation={"rounds": 2, "server_ema": 0.6}, eval={"every": 1}))
    sim.run_round(1)
    g1 = {k: v.clone() for k, v in sim.global_state.items()}
    record = sim.run_round(2)
    g2 = sim.global_state
    trained = [k for k in g2 if not torch.equal(g1[k], g2[k])]
    assert trained  # the aggregate moved, and the average sits between the two rounds
    for k in trained:
        torch.testing.assert_close(sim.server.ema[k], 0.6 * g1[k] + 0.4 * g2[k])
    assert record["accuracy"] == sim.rt.evaluate(sim.server.ema)["accuracy"]
    assert sim.server.released_state is sim.server.ema
    sim.save_adapter(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    b = next(k for k in trained if "lora_B" in k)
    assert any(torch.equal(v, sim.server.ema[b].cpu()) for v in saved.values())
    assert not any(torch.equal(v, g2[b].cpu()) for v in saved.values())


def test_off_by_default_the_latest_aggregate_is_released(tiny_cfg):
    sim = Simulation(tiny_cfg(federation={"rounds": 1}))
    sim.run_round(1)
    assert sim.server.ema is None and sim.server.released_state is sim.global_state


def test_the_summary_line_says_the_average_was_released(tiny_cfg):
    from fedlora.experiment import run_experiment

    line = run_experiment(tiny_cfg(federation={"rounds": 1, "server_ema": 0.5}), progress=False)["line"]
    assert "moving average of the global model, beta 0.5" in line


def test_resume_restores_the_average(tiny_cfg, tmp_path):
    fed = {"rounds": 3, "server_ema": 0.5}
    full = Simulation(tiny_cfg(federation=fed))
    full.run()
    first = Simulation(tiny_cfg(federation=fed), RunDir.create(tmp_path, "part", "x"))
    record = first.run_round(1)
    first.round, first.metrics = 1, [record]
    first.checkpoint(1)
    state, _ = latest_checkpoint(first.run_dir.checkpoints)
    resumed = Simulation(tiny_cfg(federation=fed))
    resumed.restore(state, first.metrics)
    out = resumed.run()
    assert all(torch.equal(resumed.server.ema[k], full.server.ema[k]) for k in full.server.ema)
    assert out.final["accuracy"] == full.metrics[-1]["accuracy"]
