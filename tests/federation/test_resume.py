"""Checkpoint and resume: a resumed run ends bitwise identical to an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from fedlora.errors import FedloraError
from fedlora.federation.checkpoint import latest_checkpoint, load_checkpoint
from fedlora.federation.simulation import Simulation
from fedlora.report.rundir import RunDir


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _checkpointed(cfg, tmp_path, name="part"):
    sim = Simulation(cfg, RunDir.create(tmp_path, name, "x"))
    return sim


def test_run_three_rounds_equals_one_round_then_resume(tiny_cfg, tmp_path):
    full = Simulation(tiny_cfg(federation={"rounds": 3})).run()
    first = _checkpointed(tiny_cfg(federation={"rounds": 3}), tmp_path)
    # stop after round 1: one round of the 3-round loop, as a crash after round 1 would leave it
    record = first.run_round(1)
    first.round, first.metrics = 1, [record]
    first.checkpoint(1)
    state, notes = latest_checkpoint(first.run_dir.checkpoints)
    assert state is not None and state["round"] == 1 and not notes
    resumed = Simulation(tiny_cfg(federation={"rounds": 3}))
    resumed.restore(state, first.metrics)
    out = resumed.run()
    assert out.rounds_done == 3 and _equal(full.global_state, out.global_state)
    assert [m["accuracy"] for m in out.metrics] == [m["accuracy"] for m in full.metrics]
    assert [m["epsilon"] for m in out.metrics] == [m["epsilon"] for m in full.metrics]
    assert [c.dp_steps for c in resumed.clients] == [row["steps"] for row in full.metrics[-1]["privacy"]]


def test_checkpoint_from_another_config_is_refused(tiny_cfg, tmp_path):
    sim = _checkpointed(tiny_cfg(), tmp_path)
    sim.run()
    state = load_checkpoint(sim.run_dir.checkpoint_dir(2))
    other = Simulation(tiny_cfg(train={"lr": 0.05}))
    with pytest.raises(FedloraError, match="train.lr"):
        other.restore(state)


def test_a_checkpoint_from_before_a_new_config_field_resumes(tiny_cfg, tmp_path):
    """A field the schema gained since the checkpoint (absent from its config) takes its default."""
    sim = _checkpointed(tiny_cfg(federation={"rounds": 3}), tmp_path)
    record = sim.run_round(1)
    sim.round, sim.metrics = 1, [record]
    sim.checkpoint(1)
    state = load_checkpoint(sim.run_dir.checkpoint_dir(1))
    for key in ("lr_schedule", "lr_final_fraction", "compile"):
        del state["config"]["train"][key]  # as written by a fedlora without these fields
    Simulation(tiny_cfg(federation={"rounds": 3})).restore(state, sim.metrics)
    with pytest.raises(FedloraError, match="train.lr_schedule"):  # set differently: still refused
        Simulation(tiny_cfg(federation={"rounds": 3}, train={"lr_schedule": "cosine"})).restore(state, sim.metrics)


def test_interrupted_checkpoint_write_falls_back_to_the_previous_round(tiny_cfg, tmp_path):
    sim = _checkpointed(tiny_cfg(federation={"rounds": 3}), tmp_path)
    sim.run()
    ckpts = sim.run_dir.checkpoints
    (ckpts / ".round_4.tmp").mkdir()  # a crash while writing round 4
    (ckpts / ".round_4.tmp" / "federation.pt").write_bytes(b"partial")
    data = (ckpts / "round_3" / "federation.pt").read_bytes()
    (ckpts / "round_3" / "federation.pt").write_bytes(data[: len(data) // 2])  # truncated on disk
    state, notes = latest_checkpoint(ckpts)
    assert state is not None and state["round"] == 2
    assert len(notes) == 1 and "round_3" in notes[0] and "truncated" in notes[0]
    (ckpts / "round_2" / "federation.pt").write_bytes(b"")
    with pytest.raises(FedloraError, match="no readable checkpoint"):
        latest_checkpoint(ckpts)


def _adapter_tensors(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_cli_resume_after_a_lost_round_gives_the_same_adapter(tiny_model_dir, tiny_csv, tmp_path):
    import shutil

    import yaml
    from typer.testing import CliRunner

    from fedlora.cli import app
    from fedlora.report.rundir import read_metrics
    from tests.helpers import tiny_tree

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_tree(tiny_model_dir, tiny_csv, tmp_path / "runs", federation={"rounds": 3},
                                            train={"device": "cpu"})))
    runner = CliRunner()
    for name in ("full", "crashed"):
        assert runner.invoke(app, ["run", str(cfg), "--name", name, "-q"]).exit_code == 0
    crashed = tmp_path / "runs" / "crashed"
    # as if killed during round 3: no round-3 checkpoint, a half-written metrics line, no final adapter
    shutil.rmtree(crashed / "checkpoints" / "round_3")
    shutil.rmtree(crashed / "adapter")
    (crashed / "summary.json").unlink()
    with (crashed / "metrics.jsonl").open("a") as f:
        f.write('{"round": 4, "clie')
    bad = runner.invoke(app, ["run", "--resume", str(crashed), "--rounds", "5", "-q"])
    assert bad.exit_code == 2 and "federation.rounds" in bad.output and len(bad.output.strip().splitlines()) == 1
    out = runner.invoke(app, ["run", "--resume", str(crashed), "-q"])
    assert out.exit_code == 0, out.output
    assert "resumed after round 2" in out.output
    assert [m["round"] for m in read_metrics(crashed)] == [1, 2, 3]
    a, b = _adapter_tensors(tmp_path / "runs" / "full"), _adapter_tensors(crashed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_identical_with_adapter_dropout(tiny_cfg, tmp_path):
    """Dropout masks come from (seed, client, round, attempt, step): not from the global RNG, so a resumed
    run draws what the uninterrupted one drew, whatever else used torch's RNG in between."""
    cfg = tiny_cfg(adapter={"dropout": 0.3}, federation={"rounds": 3})
    full = Simulation(cfg).run()
    first = _checkpointed(cfg, tmp_path)
    first.round, first.metrics = 1, [first.run_round(1)]
    first.checkpoint(1)
    torch.rand(1000)  # another user of the global RNG (a restarted process starts from another state)
    resumed = Simulation(cfg)
    resumed.restore(latest_checkpoint(first.run_dir.checkpoints)[0], first.metrics)
    out = resumed.run()
    assert _equal(full.global_state, out.global_state)
    other = Simulation(tiny_cfg(adapter={"dropout": 0.3}, federation={"rounds": 3}, train={"seed": 1})).run()
    assert not _equal(full.global_state, other.global_state)  # the masks do depend on the seed


def test_resume_refuses_local_state_that_does_not_match_the_method(tiny_cfg, tmp_path):
    fedsa = _checkpointed(tiny_cfg(method={"name": "fedsa-lora"}), tmp_path)
    fedsa.run()
    state = load_checkpoint(fedsa.run_dir.checkpoint_dir(2))
    again = Simulation(tiny_cfg(method={"name": "fedsa-lora"}))
    flower_like = {**state, "engine": "flower", "clients": [{"local": {}, "dp_steps": c["dp_steps"]} for c in state["clients"]]}
    with pytest.raises(FedloraError, match="Flower engine"):
        again.restore(flower_like)
    missing = {**state, "clients": [{"local": {}, "dp_steps": c["dp_steps"]} for c in state["clients"]]}
    with pytest.raises(FedloraError, match="local state of client 0 does not match"):
        again.restore(missing)
    again.restore(state)  # the real one restores
    assert all(_equal(a.local, b.local) for a, b in zip(again.clients, fedsa.clients, strict=True))
