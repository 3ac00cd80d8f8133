"""`fedlora flower up` on 127.0.0.1: TLS, SuperNode authentication, a node killed mid-run, clean stop,
and parity with the in-process engine (the same fault replayed in-process gives the same adapter, bit for bit)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from fedlora.federation.checkpoint import load_checkpoint
from fedlora.federation.simulation import Simulation
from fedlora.flower.certs import make_node_key
from fedlora.flower.deploy import Deployment, descendants, up


@pytest.mark.slow
def test_deployment_refuses_unregistered_node_survives_a_killed_node_and_stops_every_process(
        tiny_cfg, tiny_csv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the config, as in a fresh clone (`runs/`, a data file)
    shutil.copy(tiny_csv, tmp_path / "sentences.csv")
    cfg = tiny_cfg(method={"name": "dp-lora"}, train={"threads": 1}, privacy={"noise_multiplier": 3.0}, eval={"every": 2},
                   federation={"num_clients": 3, "rounds": 2, "local_steps": 2, "min_client_size": 20},
                   task={"dataset": "sentences.csv"}, output={"root": "runs", "name": "flower-up"})
    started: dict[str, list[int]] = {"pids": []}

    def watch(dep: Deployment) -> None:
        started["pids"] = sorted({*started["pids"], *(p.pid for p in dep.procs.values()),
                                  *(d for p in dep.procs.values() for d in descendants(p.pid))})
        if "intruder" not in dep.procs:  # a SuperNode whose key was never registered
            private, _ = make_node_key(dep.work / "keys", "intruder")
            dep.start_supernode(0, private, name="intruder")
        metrics = dep.work.parent / "metrics.jsonl"
        if "supernode2" in dep.procs and metrics.is_file() and metrics.read_text().strip():
            dep.stop("supernode2")  # killed after round 1: round 2 must finish with clients 0 and 1

    run = up(cfg, min_clients=2, round_timeout=300, timeout=1200, watch=watch)
    assert run == Path("runs/flower-up") and not (run / "flower" / "runs").exists()

    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["clients"] == [0, 1, 2] and rounds[1]["clients"] == [0, 1] and rounds[1]["failed_clients"] == [2]
    steps = {row["client"]: row["steps"] for row in rounds[-1]["privacy"]}
    assert steps == {0: 4, 1: 4, 2: 4}  # every train message sent is charged: the dropped client may have run its steps
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["stop_reason"] is None

    setup = json.loads((run / "setup.json").read_text())
    assert sorted(int(k) for k in setup["nodes"]) == [0, 1, 2]  # the intruder never got partition 0
    assert "Failed to activate SuperNode" in (run / "flower" / "intruder.log").read_text()
    link = (run / "flower" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in link  # refused by SuperNode authentication
    assert "running on https://127.0.0.1" in link  # TLS on

    # parity: the in-process engine with the same config and seed, client 2 lost in round 2 as above
    reference, states = without_client2_in_round2(cfg), []
    reference.run(on_round=lambda _: states.append({k: v.detach().cpu().clone() for k, v in reference.global_state.items()}))
    for rnd, ref in enumerate(states, start=1):
        flower = load_checkpoint(run / "checkpoints" / f"round_{rnd}")["global_state"]
        assert set(flower) == set(ref)
        for k, v in ref.items():
            assert torch.equal(flower[k], v), (rnd, k)  # bit for bit
    for ours, ref in zip(rounds, reference.metrics, strict=True):
        for key in ("clients", "train_loss", "accuracy", "epsilon", "bytes_up"):
            assert ours.get(key) == ref.get(key), key

    deadline = time.monotonic() + 20  # every process the command started is gone (killed ones may await reaping)
    while [p for p in started["pids"] if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in started["pids"] if alive(p)]


class LoseClient2InRound2:
    """The deployment's fault in the in-process engine: client 2's round-2 message is sent (and charged)
    but never answered."""

    def __init__(self, inner, local_steps: int) -> None:
        self.inner, self.local_steps = inner, local_steps

    def train(self, plan, download, sampled):
        lost = plan.round == 2 and 2 in sampled
        out = self.inner.train(plan, download, [c for c in sampled if not (lost and c == 2)])
        if lost:
            out.charged[2] = self.local_steps
        return out

    def personal_accuracy(self, global_state):
        return self.inner.personal_accuracy(global_state)


def without_client2_in_round2(cfg) -> Simulation:
    sim = Simulation(cfg)
    sim.server.runner = LoseClient2InRound2(sim.server.runner, cfg.federation.local_steps)
    return sim


def alive(pid: int) -> bool:
    """A running (not zombie) process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
