"""The node worker `fedlora flower up` runs beside each SuperNode: the ClientApp process stays light,
and the worker answers exactly as the ClientApp computing by itself, refusing callers without the key."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import stat
import subprocess
import sys
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedlora.errors import FedloraError
from fedlora.federation.simulation import Simulation
from fedlora.flower.certs import make_node_key, make_tls
from fedlora.flower.client_app import NodeWorkerError, ask_worker
from fedlora.flower.deploy import Deployment, free_port
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


# ---------------------------------------------------------------- local processes of a deployment
def _start_worker(port: int, key: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedlora.flower.node", "--port", str(port), "--partition", "1", *extra],
                            env={**os.environ, WORKER_KEY_ENV: key}, stdout=subprocess.PIPE, text=True)


def _ask_other_partition(port: int, seconds: float) -> str:
    """A real request (for a partition the worker does not serve), answered in ``seconds`` or a failure."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        future = pool.submit(ask_worker, f"127.0.0.1:{port}", "query", RecordDict(), RecordDict(), {}, {"partition-id": 7})
        with pytest.raises(NodeWorkerError, match="serves partition 1 only"):
            future.result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)  # a stuck request ends when the test kills the worker
    return "answered"


def test_an_idle_local_connection_does_not_hold_up_a_real_request(monkeypatch):
    key, port = os.urandom(32).hex(), free_port()
    monkeypatch.setenv(WORKER_KEY_ENV, key)
    worker = _start_worker(port, key, "--io-timeout", "120")  # the idle caller's deadline is far away
    try:
        _ask_other_partition(port, 60)  # the worker is up
        with socket.create_connection(("127.0.0.1", port)):  # connects, never answers the challenge
            t = time.monotonic()
            assert _ask_other_partition(port, 30) == "answered"
            assert time.monotonic() - t < 30
    finally:
        worker.kill()
        worker.communicate()


def test_an_idle_local_connection_is_dropped_at_the_io_deadline(monkeypatch):
    key, port = os.urandom(32).hex(), free_port()
    monkeypatch.setenv(WORKER_KEY_ENV, key)
    worker = _start_worker(port, key, "--io-timeout", "0.5")
    try:
        _ask_other_partition(port, 60)
        with socket.create_connection(("127.0.0.1", port)) as idle:
            idle.settimeout(20)
            t = time.monotonic()
            while idle.recv(4096):  # the challenge, then the worker hangs up
                pass
            assert time.monotonic() - t < 10
        _ask_other_partition(port, 30)  # and it still serves
    finally:
        worker.kill()
        out = worker.communicate()[0]
    assert "refused a connection: BlockingIOError" in out


def test_private_keys_are_0600_from_creation_in_0700_folders(tmp_path, monkeypatch):
    def no_chmod(*args, **kwargs):
        raise AssertionError("a key file was chmod'ed after its creation")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    old = os.umask(0)  # created 0666 and narrowed later would show here
    try:
        tls = make_tls(tmp_path / "certs")
        private, public = make_node_key(tmp_path / "keys", "node0")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tls["key"]) == mode(private) == 0o600
    assert mode(tmp_path / "certs") == mode(tmp_path / "keys") == 0o700


def test_the_runs_flower_folder_is_0700(tmp_path):
    dep = Deployment(tmp_path / "run" / "flower", 2)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(dep.work) == mode(dep.work / "keys") == mode(dep.work / "certs") == 0o700
    assert {mode(p) for p in dep.work.rglob("*.key")} == {0o600} and len(list(dep.work.rglob("*.key"))) == 3


def test_a_dead_node_worker_ends_the_run_at_once_with_its_last_error(tmp_path, monkeypatch):
    crash = "import sys; print('node worker starting', flush=True); sys.exit('ValueError: the model folder is gone')"
    with Deployment(tmp_path / "flower", 1) as dep:
        dep.start("worker", [sys.executable, "-c", crash])
        dep.procs["worker"].wait(30)
        with pytest.raises(FedloraError, match=r"node worker died \(exit 1\): node worker starting \| ValueError: the model"):
            dep.check_worker()
        start = dep.start  # the run itself: a `flwr run` that would wait for the clients' retries

        def fake_start(name, cmd, env=None):
            return start(name, [sys.executable, "-c", "import time; time.sleep(120)"] if name == "run" else cmd, env)

        monkeypatch.setattr(dep, "start", fake_start)
        t = time.monotonic()
        with pytest.raises(FedloraError, match="node worker died"):
            dep.run_app({}, timeout=120)
        assert time.monotonic() - t < 10
