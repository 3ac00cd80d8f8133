"""A node's fedlora work, and the long-running node worker that keeps it warm between messages.

:func:`handle` answers one message (``query``, ``train``, ``evaluate``) from the message content,
the node's ``Context.state`` (updated in place), the run config and the node config. It builds
the node's view of the run (task, adapted model, partition, ClientSpec) once per process and
config.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message; importing torch and
transformers and rebuilding the view there took most of a deployment round. ``fedlora flower up``
therefore starts one worker per SuperNode (``python -m fedlora.flower.node``): it builds the view
at start-up, before the run, and then answers the ClientApp processes of its node over an
authenticated local connection (address and key in the SuperNode's environment, see
:data:`WORKER_ENV`). The client state still lives in the node's ``Context.state``: the ClientApp
lends it to the worker for one message and stores what comes back; nothing of it enters a
Flower message.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from multiprocessing.connection import Listener
from typing import Any

from flwr.app import MetricRecord, RecordDict

WORKER_ENV = "FEDLORA_NODE_WORKER"  # "127.0.0.1:<port>" of this node's worker
WORKER_KEY_ENV = "FEDLORA_NODE_WORKER_KEY"  # hex authentication key for that connection

_NODES: dict[str, Any] = {}  # config text -> Simulation (one per process; no client state in it)


def view(run_config: dict[str, Any]):
    """This process's Simulation for the run's config (built on first use)."""
    from fedlora.federation.simulation import Simulation  # noqa: PLC0415
    from fedlora.flower.messages import config_from_run  # noqa: PLC0415

    text = str(run_config.get("config-yaml", ""))
    if text not in _NODES:
        _NODES.clear()
        _NODES[text] = Simulation(config_from_run(run_config))
    return _NODES[text]


def partition_id(sim, node_config: dict[str, Any]) -> int:
    from fedlora.errors import ConfigError  # noqa: PLC0415

    if "partition-id" not in node_config:
        raise ConfigError("SuperNode has no partition-id; start it with --node-config 'partition-id=<k>'")
    pid = int(node_config["partition-id"])
    if not 0 <= pid < len(sim.specs):
        raise ConfigError(f"partition-id {pid} is outside 0..{len(sim.specs) - 1}; fix the SuperNode's --node-config")
    return pid


def handle(kind: str, content: RecordDict, state: RecordDict, run_config: dict[str, Any],
           node_config: dict[str, Any]) -> RecordDict:
    """The reply's content for one message; the node's kept client state in ``state`` is updated in place."""
    from fedlora.federation.client import run_client  # noqa: PLC0415
    from fedlora.flower.messages import (  # noqa: PLC0415
        from_record,
        load_client_state,
        plan_from_config,
        save_client_state,
        to_record,
    )

    sim = view(run_config)
    pid = partition_id(sim, node_config)
    if kind == "query":  # which partition this node holds
        return RecordDict({"node": MetricRecord({"partition-id": pid})})
    client = load_client_state(state, sim.init_local)
    if kind == "train":
        plan = plan_from_config(content.config_records["plan"])
        download = from_record(content.array_records["download"], sim.rt.device)
        res = run_client(sim.rt, sim.method, plan, download, sim.specs[pid], client,
                         local_steps=sim.cfg.federation.local_steps, seed=sim.cfg.train.seed)
        save_client_state(state, res.state)
        result = MetricRecord({"loss": res.loss, "examples": res.examples, "steps": res.steps})
        return RecordDict({"upload": to_record(res.upload), "result": result})
    if kind == "evaluate":  # personalised accuracy: the global state plus this node's local tensors
        share = sim.shares[pid] if sim.shares else []
        acc = 0.0
        if len(share):
            global_state = from_record(content.array_records["global"], sim.rt.device)
            acc = sim.rt.evaluate({**global_state, **client.local}, sim.rt.task.test.subset(share))["accuracy"]
        return RecordDict({"eval": MetricRecord({"accuracy": float(acc), "examples": len(share)})})
    raise ValueError(f"unknown message type {kind!r}")


# ---------------------------------------------------------------------- the worker
def serve_worker(port: int, key: bytes, config_yaml: str | None = None) -> None:
    """Answer requests ``(kind, content, state, run_config, node_config)`` with ``("ok", reply, state)`` or
    ``("error", message)``, one at a time, until killed. ``config_yaml`` builds the view before the first one."""
    with Listener(("127.0.0.1", port), authkey=key) as listener:  # listening before the (slow) build
        if config_yaml is not None:
            t = time.perf_counter()
            view({"config-yaml": config_yaml})
            print(f"node worker ready in {time.perf_counter() - t:.1f} s", flush=True)
        while True:
            try:
                conn = listener.accept()
            except Exception as err:  # noqa: BLE001  (a caller without the key)
                print(f"refused a connection: {type(err).__name__}", flush=True)
                continue
            with conn:
                try:
                    kind, content, state, run_config, node_config = conn.recv()
                    t = time.perf_counter()
                    reply = ("ok", handle(kind, content, state, run_config, node_config), state)
                    print(f"{kind} in {time.perf_counter() - t:.2f} s", flush=True)
                except Exception as err:  # noqa: BLE001  (the ClientApp raises it; Flower sends an error reply)
                    reply = ("error", f"{type(err).__name__}: {err}")
                try:
                    conn.send(reply)
                except OSError:
                    pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="fedlora node worker (started by `fedlora flower up`)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--config", help="a fedlora config (YAML) to build before the first message")
    args = ap.parse_args(argv)
    from fedlora.cli import quiet_libraries  # noqa: PLC0415

    quiet_libraries()
    key = bytes.fromhex(os.environ[WORKER_KEY_ENV])
    text = open(args.config).read() if args.config else None  # noqa: PTH123, SIM115
    serve_worker(args.port, key, text)


if __name__ == "__main__":
    sys.exit(main())
