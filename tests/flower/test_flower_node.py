"""The node worker `fedlora flower up` runs beside each SuperNode: the ClientApp process stays light,
and the worker answers exactly as the ClientApp computing by itself, refusing callers without the key."""

from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedlora.federation.simulation import Simulation
from fedlora.flower.client_app import NodeWorkerError, ask_worker
from fedlora.flower.deploy import free_port
from fedlora.flower.messages import STATE_KEY, from_record, plan_to_config, to_record
from fedlora.flower.node import WORKER_KEY_ENV, handle
from fedlora.flower.simulate import run_config_for


def test_the_client_app_process_imports_neither_torch_nor_transformers():
    code = "import sys, fedlora.flower.client_app; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_node_worker_answers_bit_for_bit_like_the_client_app_and_refuses_a_wrong_key(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg(method={"name": "fedsa-lora"}, train={"threads": 1},  # 2 rounds: the budget allows two trains
                   federation={"num_clients": 2, "rounds": 2, "local_steps": 2, "min_client_size": 20})
    (tmp_path / "node.yaml").write_text(cfg.to_yaml())
    key, port = os.urandom(32).hex(), free_port()
    worker = subprocess.Popen([sys.executable, "-m", "fedlora.flower.node", "--port", str(port), "--config",
                               str(tmp_path / "node.yaml"), "--partition", "1", "--build-slots", str(tmp_path)],
                              env={**os.environ, WORKER_KEY_ENV: key}, stdout=subprocess.PIPE, text=True)
    try:
        monkeypatch.setenv(WORKER_KEY_ENV, key)
        sim = Simulation(cfg)
        plan = sim.method.plan(sim.plan_context(1))
        contents = {"train": RecordDict({"download": to_record({k: sim.global_state[k] for k in plan.download}),
                                         "plan": plan_to_config(plan)}),
                    "evaluate": RecordDict({"global": to_record(sim.global_state)})}
        run_config, node = run_config_for(cfg, tmp_path / "run"), {"partition-id": 1}
        address = f"127.0.0.1:{port}"

        with pytest.raises(NodeWorkerError, match="serves partition 1 only"):
            ask_worker(address, "query", RecordDict({"ask": ConfigRecord({"what": "partition-id"})}), RecordDict(),
                       run_config, {"partition-id": 7})
        with pytest.raises(AuthenticationError), Client(("127.0.0.1", port), authkey=b"wrong key"):
            pass

        local_state, worker_state = RecordDict(), RecordDict()
        for kind in ("train", "evaluate", "train"):  # the kept state (FedSA's B and head) carries over
            ours = handle(kind, contents[kind], local_state, run_config, node)
            theirs, worker_state = ask_worker(address, kind, contents[kind], worker_state, run_config, node)
            assert set(theirs) == set(ours)
            for name in ours.array_records:
                a, b = from_record(ours[name]), from_record(theirs[name])
                assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), (kind, name)
            for name in ours.metric_records:
                assert dict(ours[name]) == dict(theirs[name]), (kind, name)
        assert set(worker_state) == set(local_state) == {STATE_KEY, STATE_KEY + ".steps"}
        assert dict(worker_state[STATE_KEY + ".steps"]) == {"dp_steps": 4}
        a, b = from_record(local_state[STATE_KEY]), from_record(worker_state[STATE_KEY])
        assert set(a) == set(sim.local_keys) and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        worker.kill()
        out = worker.communicate()[0]
    # it kept only partition 1's examples, and still answered bit for bit as above
    assert int(out.split("dropped ")[1].split()[0]) >= len(sim.specs[0].indices)
