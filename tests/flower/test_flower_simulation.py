"""fedlora on Flower's simulation runtime: every message is read, and the result is compared
with the in-process engine's."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, Context  # the `flower` extra (`make install` installs it)
from flwr.serverapp import Grid, ServerApp

from fedlora.federation.checkpoint import load_checkpoint
from fedlora.federation.simulation import Simulation
from fedlora.flower.messages import STATE_KEY, plan_from_config
from fedlora.flower.server_app import serve
from fedlora.flower.simulate import run_config_for, simulate


class RecordingGrid:
    """A Grid that keeps every message it sends and receives."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.messages = grid, []

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        messages = list(messages)
        self.messages += messages
        return self.grid.push_messages(messages)

    def pull_messages(self, ids):
        replies = list(self.grid.pull_messages(ids))
        self.messages += replies
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.messages += messages + replies
        return replies


@pytest.mark.slow
def test_flower_simulation_matches_in_process_and_sends_no_client_state(tiny_cfg, tmp_path):
    cfg = tiny_cfg(method={"name": "fedsa-lora"}, train={"threads": 1},
                   federation={"num_clients": 2, "rounds": 2, "local_steps": 2, "min_client_size": 20})
    reference = Simulation(cfg)
    reference.run()
    local_keys = reference.local_keys
    assert any(".lora_B." in k for k in local_keys) and any("classifier" in k for k in local_keys)

    run_dir = tmp_path / "flower-run"
    seen: dict[str, RecordingGrid] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        seen["grid"] = RecordingGrid(grid)
        serve(seen["grid"], run_config_for(cfg, run_dir))

    simulate(cfg, run_dir, server_app=server)

    # every message, both directions: no local tensor, no client state
    messages = seen["grid"].messages
    kinds = {m.metadata.message_type for m in messages}
    assert {"query", "train", "evaluate"} <= kinds
    arrays = 0
    for msg in messages:
        assert not msg.has_error(), msg.error
        for name, record in msg.content.items():
            assert not name.startswith(STATE_KEY)
            if isinstance(record, ArrayRecord):
                arrays += len(record)
                assert not set(record) & local_keys, f"local tensor in a {msg.metadata.message_type} message"
            else:
                assert "dp_steps" not in record
    assert arrays > 0
    # under DP a train reply holds the declared upload and the step count: no loss, no batch sizes
    plans = {m.metadata.message_id: m for m in messages if m.metadata.message_type == "train" and "plan" in m.content}
    replies = [m for m in messages if m.metadata.message_type == "train" and m.metadata.reply_to_message_id in plans]
    assert replies
    for reply in replies:
        plan = plan_from_config(plans[reply.metadata.reply_to_message_id].content.config_records["plan"])
        assert set(reply.content) == {"upload", "result"}
        assert set(reply.content.array_records["upload"]) == set(plan.trainable) & set(plan.download)
        assert dict(reply.content.metric_records["result"]) == {"steps": 2}

    # parity: the same global adapter, bit for bit, and the same round metrics
    flower = load_checkpoint(run_dir / "checkpoints" / "round_2")
    assert set(flower["global_state"]) == set(reference.global_state)
    for k, v in reference.global_state.items():
        assert torch.equal(flower["global_state"][k], v.cpu()), k
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for ours, ref in zip(rows, reference.metrics, strict=True):
        for key in ("clients", "train_loss", "accuracy", "personal_accuracy", "epsilon", "bytes_up"):
            assert ours[key] == ref[key], key
    assert [row["steps"] for row in rows[-1]["privacy"]] == [4, 4]
    assert (run_dir / "summary.json").is_file() and (run_dir / "adapter").is_dir()


@pytest.mark.slow
def test_the_server_never_opens_training_data_nodes_bring_their_own_and_their_own_privacy(tiny_cfg, tmp_path):
    """The ServerApp's config names a folder holding only test.csv: it could not read a training row if it
    tried. Each node trains on its own file and enforces its own privacy config, and the run completes."""
    import pandas as pd

    from tests.conftest import make_sentences

    server_data = tmp_path / "server-data"
    server_data.mkdir()
    make_sentences(120, seed=9).to_csv(server_data / "test.csv", index=False)
    assert not list(server_data.glob("train.*"))
    cfg = tiny_cfg(train={"threads": 1}, task={"dataset": str(server_data)},
                   federation={"num_clients": 2, "rounds": 2, "local_steps": 2, "min_client_size": 20})
    settings = {}
    for k in range(2):
        own = tmp_path / f"node{k}.csv"
        pd.DataFrame(make_sentences(150, seed=20 + k)).to_csv(own, index=False)
        (tmp_path / f"node{k}.yaml").write_text(cfg.to_yaml())  # the node's own privacy config
        settings[k] = {"data": str(own), "config": str(tmp_path / f"node{k}.yaml")}
    run_dir = tmp_path / "flower-run"
    simulate(cfg, run_dir, node_settings=settings)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["stop_reason"] is None
    setup = json.loads((run_dir / "setup.json").read_text())
    assert "label_histograms" not in setup  # the server knows sizes and sigmas (declared), not label mixes
    assert setup["clients"] == [135, 135]  # each node's own file minus its own test share (10%)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] is None and [r["steps"] for r in rows[-1]["privacy"]] == [4, 4]


@pytest.mark.slow
def test_flower_run_records_the_user_level_ledger_as_the_in_process_run_does(tiny_cfg, tmp_path):
    cfg = tiny_cfg(train={"threads": 1}, federation={"num_clients": 2, "rounds": 1, "local_steps": 1, "min_client_size": 20},
                   privacy={"enabled": False, "user_level": {"enabled": True, "epsilon": 4.0, "clip_norm": 0.5}})
    reference = Simulation(cfg)
    expected_setup = reference.describe()["user_level"]
    reference.run()
    expected_final = reference.user_level_ledger(1)
    assert expected_setup is not None and expected_final["epsilon"] > 0
    run_dir = tmp_path / "flower-run"
    simulate(cfg, run_dir)
    setup = json.loads((run_dir / "setup.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert setup["user_level"] == json.loads(json.dumps(expected_setup))
    assert summary["user_level"] == json.loads(json.dumps(expected_final))
