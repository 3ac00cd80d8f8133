"""The round loop end to end on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import torch

from fedlora.experiment import run_experiment
from fedlora.federation.simulation import Simulation
from fedlora.privacy.accounting import epsilon


def test_run_writes_a_complete_run_directory(tiny_cfg):
    cfg = tiny_cfg(output={"name": "r1"})
    summary = run_experiment(cfg, progress=False)
    run = cfg.output.root + "/r1"
    import pathlib

    p = pathlib.Path(run)
    assert (p / "config.yaml").is_file() and (p / "summary.json").is_file()
    lines = [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("round", "accuracy", "loss", "epsilon", "bytes_up", "bytes_down", "seconds", "privacy"):
            assert key in m
        assert m["epsilon"] <= cfg.privacy.epsilon
        assert len(m["privacy"]) == cfg.federation.num_clients
    assert (p / "checkpoints" / "round_2" / "adapter" / "adapter_config.json").is_file()
    assert (p / "adapter" / "adapter_model.safetensors").is_file()
    assert "accuracy" in summary["line"] and "epsilon spent" in summary["line"]


def test_epsilon_is_recorded_per_client_and_never_passes_target(tiny_cfg):
    cfg = tiny_cfg(federation={"rounds": 3})
    sim = Simulation(cfg)
    result = sim.run()
    steps = 3 * cfg.federation.local_steps
    for row in result.metrics[-1]["privacy"]:
        assert row["steps"] == steps
        assert row["epsilon"] <= cfg.privacy.epsilon
        assert row["epsilon"] == epsilon([(row["sigma"], row["sample_rate"], steps)], delta=cfg.privacy.delta)
    eps = [m["epsilon"] for m in result.metrics]
    assert eps == sorted(eps) and eps[0] > 0


def test_same_seed_gives_bitwise_identical_adapter(tiny_cfg):
    a = Simulation(tiny_cfg()).run().global_state
    b = Simulation(tiny_cfg()).run().global_state
    c = Simulation(tiny_cfg(train={"seed": 1})).run().global_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_training_changes_both_factors_and_the_head(tiny_cfg):
    sim = Simulation(tiny_cfg())
    before = dict(sim.global_state)
    after = sim.run().global_state
    roles = {f.name: f.role for f in sim.rt.adapted.factors}
    changed = {roles[k] for k in after if not torch.equal(before[k], after[k])}
    assert changed == {"A", "B", "head"}


def test_fixed_noise_stops_before_the_budget_is_passed(tiny_cfg):
    cfg = tiny_cfg(privacy={"noise_multiplier": 4.0, "epsilon": 1.0}, federation={"rounds": 50})
    sim = Simulation(cfg)
    result = sim.run()
    assert result.stop_reason is not None and "would pass" in result.stop_reason
    assert 0 < result.rounds_done < 50
    assert max(r["epsilon"] for r in sim.ledger()) <= 1.0


def test_non_private_run_learns_the_tiny_task(tiny_cfg):
    cfg = tiny_cfg(privacy={"enabled": False}, federation={"rounds": 8, "local_steps": 10, "partition": "iid"},
                   train={"optimizer": "adam", "lr": 0.02})
    result = Simulation(cfg).run()
    assert result.final["accuracy"] > 0.8
    assert result.final["epsilon"] is None


def test_saved_adapter_reloads_in_peft_with_identical_logits(tiny_cfg, tmp_path):
    from peft import PeftModel

    sim = Simulation(tiny_cfg())
    sim.run()
    sim.save_adapter(tmp_path / "adapter")
    batch = sim.rt.task.batch(sim.rt.task.test, np.arange(8), sim.rt.device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    sim.rt.adapted.model.eval()
    with torch.no_grad():
        ours = sim.rt.adapted.model(**inputs)
    base = sim.rt.task.build_model()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = loaded(**inputs)
    assert torch.allclose(ours, theirs, atol=1e-6)


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the partition was checked")


def test_a_partition_that_cannot_work_fails_before_the_model_loads(tiny_cfg, monkeypatch):
    import pytest

    from fedlora.errors import DataError
    from fedlora.federation import simulation

    monkeypatch.setattr(simulation, "Runtime", _no_model)
    for fed in ({"num_clients": 300, "min_client_size": 8},  # 300 x 8 > the training examples
                {"partition": "shards", "num_clients": 200, "shards_per_client": 3}):
        with pytest.raises(DataError) as err:
            Simulation(tiny_cfg(federation=fed))
        message = str(err.value)
        assert "\n" not in message and ("min_client_size" in message or "shards_per_client" in message), message


def test_fail_fast_through_the_cli_is_one_line(tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from fedlora.cli import app
    from fedlora.federation import simulation
    from tests.helpers import tiny_tree

    monkeypatch.setattr(simulation, "Runtime", _no_model)
    tree = tiny_tree(tiny_model_dir, tiny_csv, tmp_path / "runs", federation={"num_clients": 300, "min_client_size": 8})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["run", str(path), "-q"])
    out = result.output.strip()
    assert result.exit_code != 0 and len(out.splitlines()) == 1 and out.startswith("error:"), out
    assert "lower federation.min_client_size or use fewer clients" in out


def test_shards_partition_runs_end_to_end(tiny_cfg):
    sim = Simulation(tiny_cfg(federation={"partition": "shards", "num_clients": 4, "shards_per_client": 1,
                                          "min_client_size": 10, "rounds": 1}))
    assert sum(min(h) == 0 for h in sim.histograms) >= 3  # one label shard each: one label per client but one
    assert "accuracy" in sim.run().metrics[-1]


def test_eval_subset_for_intermediate_rounds_and_the_full_split_at_the_end(tiny_cfg):
    cfg = tiny_cfg(federation={"rounds": 3}, eval={"subset": 7, "every": 1}, privacy={"enabled": False})
    sim = Simulation(cfg)
    metrics = sim.run().metrics
    assert [m.get("eval_examples") for m in metrics] == [7, 7, None]  # the final round: the full test split
    assert metrics[-1]["accuracy"] == sim.evaluate()["accuracy"]
    subset = sim.server.eval_subset()
    assert subset is sim.server.eval_subset() and len(subset) == 7  # drawn once
    other = Simulation(cfg).server.eval_subset()
    assert np.array_equal(subset.labels, other.labels)  # from the seed
    assert Simulation(tiny_cfg(eval={"subset": 10**6})).server.eval_subset() is None  # not smaller than the split


def test_user_level_run_writes_sigma_u_rate_and_ledger(tiny_cfg):
    cfg = tiny_cfg(output={"name": "ul"}, privacy={"enabled": False, "user_level": {"enabled": True, "epsilon": 5.0,
                                                                                  "server_lr": 2.0}},
                   federation={"num_clients": 6, "clients_per_round": 0.5, "min_client_size": 10})
    summary = run_experiment(cfg, progress=False)
    import pathlib

    run = pathlib.Path(cfg.output.root) / "ul"
    setup = json.loads((run / "setup.json").read_text())["user_level"]
    assert setup["sample_rate"] == 0.5 and setup["clients_per_round"] == 3 and setup["server_lr"] == 2.0
    assert setup["sigma_u"] > 0 and setup["planned_epsilon"] <= 5.0 and setup["epsilon"] == 0.0
    saved = json.loads((run / "summary.json").read_text())
    ledger = saved["user_level"]
    assert ledger["rounds"] == 2 and ledger["sigma_u"] == setup["sigma_u"]
    assert ledger["epsilon"] == saved["final"]["user_epsilon"] <= 5.0
    assert "user-level" in summary["line"] and "sample-level" not in summary["line"]
