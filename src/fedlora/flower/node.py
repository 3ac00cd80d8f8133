"""A node's fedlora work, and the long-running node worker that keeps it warm between messages.

:func:`handle` answers one message (``query``, ``train``, ``evaluate``) from the message content,
the node's ``Context.state`` (updated in place), the run config and the node config. It builds
the node's view of the run (task, adapted model, partition, ClientSpec) once per process and
config.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message; importing torch and
transformers and rebuilding the view there took most of a deployment round. A node worker
(``python -m fedlora.flower.node``) builds the view at start-up, before the run, and then
answers the ClientApp processes over an authenticated local connection (address and key in the
SuperNode's environment, see :data:`WORKER_ENV`), one message at a time. ``fedlora flower up``
starts one worker shared by all its SuperNodes (they share the machine); on a real network each
machine runs one beside its SuperNode, with ``--partition`` to keep only that partition's
examples once built (the others' cached features are dropped) and ``--build-slots`` to let at
most that many workers of a machine build at once (file locks). The client state still lives in
the node's ``Context.state``: the ClientApp lends it to the worker for one message and stores
what comes back; nothing of it enters a Flower message.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import gc
import os
import queue
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

from flwr.app import MetricRecord, RecordDict

WORKER_ENV = "FEDLORA_NODE_WORKER"  # "127.0.0.1:<port>" of this node's worker
WORKER_KEY_ENV = "FEDLORA_NODE_WORKER_KEY"  # hex authentication key for that connection

_NODES: dict[str, Any] = {}  # (config text, node config) -> this node's view (one per process)


def node_run_config(run_config: dict[str, Any], node_config: dict[str, Any]):
    """The config this node runs: the server's, with the node's own privacy settings and data.

    ``node_config["config"]``: the node's own fedlora YAML; its ``privacy`` section is what the node
    enforces, and a server config asking for weaker privacy is refused; its ``task.prefix_cache_dir``
    and ``task.prefix_cache_max_gb`` say where the node keeps its prefix cache on disk (or 'off').
    ``node_config["data"]``: a local file or folder with this node's own training examples (then all
    of it is this client's partition); without it the node takes its partition of the shared
    ``task.dataset`` itself."""
    from fedlora.config import load_config  # noqa: PLC0415
    from fedlora.errors import Refused  # noqa: PLC0415
    from fedlora.federation.client import weaker_privacy  # noqa: PLC0415
    from fedlora.flower.messages import config_from_run  # noqa: PLC0415

    asked = config_from_run(run_config)
    cfg = asked
    if node_config.get("config"):
        own = load_config(str(node_config["config"]))
        why = weaker_privacy(own.privacy, asked.privacy)
        if why is not None:
            raise Refused(f"this node refuses the server's config: {why} is weaker than its own privacy config")
        # where (and whether) the node keeps hidden states of its own data on its disk is its own choice
        disk = {k: getattr(own.task, k) for k in ("prefix_cache_dir", "prefix_cache_max_gb")}
        cfg = asked.model_copy(update={"privacy": own.privacy, "task": asked.task.model_copy(update=disk)})
    if node_config.get("data"):
        task = cfg.task.model_copy(update={"dataset": str(node_config["data"])})
        fed = cfg.federation.model_copy(update={"num_clients": 1, "partition": "iid", "clients_per_round": 1.0})
        cfg = cfg.model_copy(update={"task": task, "federation": fed})
    return cfg


def view(run_config: dict[str, Any], node_config: dict[str, Any] | None = None):
    """This process's Simulation for the node's config (built on first use): the client side of its
    partition (the node's own data, or its share of the shared source)."""
    from fedlora.federation.simulation import Simulation  # noqa: PLC0415

    node_config = dict(node_config or {})
    key = repr((str(run_config.get("config-yaml", "")), node_config.get("config"), node_config.get("data")))
    if key not in _NODES:
        _NODES.clear()
        _NODES[key] = Simulation(node_run_config(run_config, node_config))
    return _NODES[key]


def partition_id(sim, node_config: dict[str, Any], num_clients: int | None = None) -> int:
    from fedlora.errors import ConfigError  # noqa: PLC0415

    if "partition-id" not in node_config:
        raise ConfigError("SuperNode has no partition-id; start it with --node-config 'partition-id=<k>'")
    pid = int(node_config["partition-id"])
    total = len(sim.specs) if num_clients is None else num_clients
    if not 0 <= pid < total:
        raise ConfigError(f"partition-id {pid} is outside 0..{total - 1}; fix the SuperNode's --node-config")
    return pid


def client_of(sim, node_config: dict[str, Any], run_config: dict[str, Any]):
    """(partition id, this node's ClientNode, its personal test share)."""
    import dataclasses  # noqa: PLC0415

    from fedlora.flower.messages import config_from_run  # noqa: PLC0415

    num_clients = config_from_run(run_config).federation.num_clients
    pid = partition_id(sim, node_config, num_clients)
    if node_config.get("data"):  # the node's own file: its one client, under its partition id
        node = sim.nodes[0]
        if node.spec.cid != pid:
            node.spec = dataclasses.replace(node.spec, cid=pid)
        return pid, node, sim.shares[0] if sim.shares else []
    return pid, sim.nodes[pid], sim.shares[pid] if sim.shares else []


def handle(kind: str, content: RecordDict, state: RecordDict, run_config: dict[str, Any],
           node_config: dict[str, Any]) -> RecordDict:
    """The reply's content for one message; the node's kept client state in ``state`` is updated in place.

    Under DP a train reply carries the upload and the number of DP steps only (public: fixed by the
    schedule); the training loss and batch sizes never leave the node."""
    from fedlora.flower.messages import (  # noqa: PLC0415
        from_record,
        load_client_state,
        plan_from_config,
        save_client_state,
        to_record,
    )

    sim = view(run_config, node_config)
    pid, node, share = client_of(sim, node_config, run_config)
    if kind == "query":
        spec = node.spec
        facts = {"examples": len(spec.indices), "sigma": spec.dp.noise_multiplier if spec.dp else -1.0,
                 "sample_rate": spec.sample_rate, "step_budget": spec.step_budget}
        return RecordDict({"node": MetricRecord({"partition-id": pid}), "facts": MetricRecord(facts)})
    node.state = load_client_state(state, sim.init_local)
    if kind == "train":
        plan = plan_from_config(content.config_records["plan"])
        download = from_record(content.array_records["download"], sim.rt.device)
        res = node.train(plan, download)
        save_client_state(state, node.state)
        result = {"steps": res.steps} if node.spec.dp else {"steps": res.steps, "loss": res.loss, "examples": res.examples}
        return RecordDict({"upload": to_record(res.upload), "result": MetricRecord(result)})
    if kind == "evaluate":  # personalised accuracy: the global state plus this node's local tensors
        global_state = from_record(content.array_records["global"], sim.rt.device)
        acc, n = node.personal_accuracy(global_state, share)
        return RecordDict({"eval": MetricRecord({"accuracy": float(acc), "examples": n})})
    raise ValueError(f"unknown message type {kind!r}")


# ---------------------------------------------------------------------- the worker
def keep_only(sim, pid: int) -> int:
    """Drop the per-example features of every example partition ``pid`` never reads (other clients'
    training rows, other clients' test shares); returns how many were dropped. A later read of a
    dropped example fails loudly (None), it never computes with other data."""
    keep = {"train": {int(i) for i in sim.specs[pid].indices},
            "test": {int(i) for i in sim.shares[pid]} if sim.shares else set()}
    dropped = 0
    for name, rows in keep.items():
        for values in getattr(getattr(sim.rt.task, name, None), "features", {}).values():
            if isinstance(values, list):
                for i in range(len(values)):
                    if i not in rows and values[i] is not None:
                        values[i], dropped = None, dropped + 1
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the freed pages back (glibc)
    return dropped


@contextlib.contextmanager
def build_slot(folder: Path | None, slots: int) -> Iterator[None]:
    """Hold one of ``slots`` file locks in ``folder`` (none: no limit) while building."""
    if folder is None:
        yield
        return
    while True:
        for i in range(slots):
            with open(folder / f"build-slot-{i}.lock", "w") as lock:  # noqa: PTH123
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
                return
        time.sleep(0.5)


IO_TIMEOUT_S = 30.0  # the longest a worker waits on one read or write of a local connection


def _receive(sock: socket.socket, key: bytes, io_timeout: float, requests: queue.Queue) -> None:
    """Authenticate one connection and read its request, each read and write under ``io_timeout``
    (the socket's SO_RCVTIMEO/SO_SNDTIMEO); queue ``(connection, request)`` for the serving loop."""
    deadline = struct.pack("ll", int(io_timeout), int((io_timeout % 1) * 1e6))  # struct timeval
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, deadline)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, deadline)
    conn = Connection(sock.detach())
    try:
        deliver_challenge(conn, key)  # what Listener.accept does, with deadlines
        answer_challenge(conn, key)
        request = conn.recv()
    except Exception as err:  # noqa: BLE001  (a caller without the key, an idle or broken connection)
        print(f"refused a connection: {type(err).__name__}", flush=True)
        conn.close()
        return
    requests.put((conn, request))


def _accept(server: socket.socket, key: bytes, io_timeout: float, requests: queue.Queue) -> None:
    """Accept connections for ever; each is authenticated and read in its own thread, so one that
    sends nothing delays no other."""
    while True:
        try:
            sock, _ = server.accept()
        except OSError:  # the server socket was closed
            return
        threading.Thread(target=_receive, args=(sock, key, io_timeout, requests), daemon=True).start()


def serve_worker(port: int, key: bytes, config_yaml: str | None = None, partition: int | None = None,
                 slots: tuple[Path, int] | None = None, io_timeout: float = IO_TIMEOUT_S,
                 node_settings: dict[str, Any] | None = None) -> None:
    """Answer requests ``(kind, content, state, run_config, node_config)`` with ``("ok", reply, state)`` or
    ``("error", message)``, one at a time, until killed. ``config_yaml`` builds the view before the first
    one (in a build slot) for the SuperNodes' ``node_settings`` (their ``config``/``data`` node-config keys),
    and with ``partition`` keeps only that partition's examples. Connections are
    accepted, authenticated and read by threads (every read and write has an ``io_timeout`` deadline);
    requests are answered one at a time, in the order they were read, by this thread."""
    requests: queue.Queue = queue.Queue()
    with socket.create_server(("127.0.0.1", port), backlog=64) as server:  # listening before the (slow) build
        threading.Thread(target=_accept, args=(server, key, io_timeout, requests), daemon=True).start()
        if config_yaml is not None:
            t = time.perf_counter()
            with build_slot(*(slots or (None, 0))):
                waited = time.perf_counter() - t
                settings = {**(node_settings or {}), **({"partition-id": partition} if partition is not None else {})}
                sim = view({"config-yaml": config_yaml}, settings)
                dropped = keep_only(sim, partition) if partition is not None else 0
            print(f"node worker ready in {time.perf_counter() - t:.1f} s ({waited:.1f} s waiting for a build slot; "
                  f"dropped {dropped} examples of other partitions)", flush=True)
        while True:
            conn, request = requests.get()
            with conn:
                try:
                    kind, content, state, run_config, node_config = request
                    if partition is not None and int(node_config.get("partition-id", -1)) != partition:
                        raise ValueError(f"this node worker serves partition {partition} only")
                    t = time.perf_counter()
                    reply = ("ok", handle(kind, content, state, run_config, node_config), state)
                    print(f"{kind} in {time.perf_counter() - t:.2f} s", flush=True)
                except Exception as err:  # noqa: BLE001  (the ClientApp raises it; Flower sends an error reply)
                    reply = ("error", f"{type(err).__name__}: {err}")
                try:
                    conn.send(reply)
                except OSError:  # the caller left, or stopped reading past the deadline
                    pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="fedlora node worker (started by `fedlora flower up`)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--config", help="a fedlora config (YAML) to build before the first message")
    ap.add_argument("--partition", type=int, help="the partition id of this node (keep only its examples)")
    ap.add_argument("--build-slots", type=Path, help="a folder for the build locks shared by a machine's workers")
    ap.add_argument("--slots", type=int, default=2, help="how many workers may build at once")
    ap.add_argument("--own-config", help="the node's own privacy config, as its SuperNode's node config names it (config=...)")
    ap.add_argument("--data", help="the node's own training data, as its SuperNode's node config names it (data=...)")
    ap.add_argument("--io-timeout", type=float, default=IO_TIMEOUT_S,
                    help="seconds a read or write of a local connection may wait (an idle caller is dropped)")
    args = ap.parse_args(argv)
    from fedlora.console import quiet_libraries  # noqa: PLC0415

    quiet_libraries()
    key = bytes.fromhex(os.environ[WORKER_KEY_ENV])
    text = open(args.config).read() if args.config else None  # noqa: PTH123, SIM115
    settings = {k: v for k, v in (("config", args.own_config), ("data", args.data)) if v}
    serve_worker(args.port, key, text, args.partition, (args.build_slots, args.slots) if args.build_slots else None,
                 args.io_timeout, settings)


if __name__ == "__main__":
    sys.exit(main())
