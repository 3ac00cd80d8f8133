"""The ClientApp: one fedlora client per SuperNode, its partition id from the node config.

Each message is answered by :func:`fedlora.flower.node.handle` from the message content, the
node-local ``Context.state`` (the client's kept state, updated in place), the run config and
the node config; only the upload and three scalars (loss, examples, steps) go back to the server.

Where the SuperNode was started with a node worker (``fedlora flower up`` does this; the
environment variable :data:`~fedlora.flower.node.WORKER_ENV` names it), the ClientApp process
hands the message to that long-running worker, which has torch imported and the model built
already; this module imports neither. Without a worker (Flower simulation, SuperNodes started
by hand) the ClientApp computes in its own process.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Client
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.errors import ConfigError
from fedlora.flower.node import WORKER_ENV, WORKER_KEY_ENV


class NodeWorkerError(RuntimeError):
    """The node worker raised while answering (Flower turns it into an error reply)."""


def ask_worker(address: str, kind: str, content: RecordDict, state: RecordDict, run_config: dict[str, Any],
               node_config: dict[str, Any]) -> tuple[RecordDict, RecordDict]:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + 60  # a worker just started may not listen yet
    while True:
        try:
            conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ[WORKER_KEY_ENV]))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    with conn:
        conn.send((kind, content, state, run_config, node_config))
        reply = conn.recv()
    if reply[0] != "ok":
        raise NodeWorkerError(reply[1])
    return reply[1], reply[2]


def answer(kind: str, msg: Message, context: Context, defaults: dict[str, Any],
           node_settings: dict[int, dict[str, Any]] | None = None) -> Message:
    run_config = {**defaults, **context.run_config}
    node_config = dict(context.node_config)
    if node_settings and "partition-id" in node_config:  # per-partition node settings (a simulation's own data files)
        node_config.update(node_settings.get(int(node_config["partition-id"]), {}))
    address = os.environ.get(WORKER_ENV)
    ask = msg.content.config_records.get("ask")
    if kind == "query" and (ask is None or ask.get("what") == "partition-id"):  # needs no model: answered at once
        if "partition-id" not in node_config:
            raise ConfigError("SuperNode has no partition-id; start it with --node-config 'partition-id=<k>'")
        content = RecordDict({"node": MetricRecord({"partition-id": int(node_config["partition-id"])})})
    elif address:
        content, state = ask_worker(address, kind, msg.content, context.state, run_config, node_config)
        for key in list(context.state):
            if key not in state:
                del context.state[key]
        for key, record in state.items():
            context.state[key] = record
    else:
        from fedlora.flower.node import handle  # noqa: PLC0415

        content = handle(kind, msg.content, context.state, run_config, node_config)
    return Message(content, reply_to=msg)


def build_client_app(defaults: dict[str, Any] | None = None,
                     node_settings: dict[int, dict[str, Any]] | None = None) -> ClientApp:
    """A ClientApp; ``defaults`` fill run-config keys the run does not set (Flower's Python simulation API
    has no run config); ``node_settings``: extra node-config keys per partition id (e.g. ``data``: that
    node's own training file, ``config``: its own privacy config), as a real SuperNode's --node-config gives."""
    defaults = dict(defaults or {})
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Tell the server which partition this node holds."""
        return answer("query", msg, context, defaults, node_settings)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return answer("train", msg, context, defaults, node_settings)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Personalised accuracy: the global state plus this node's local tensors on its test share."""
        return answer("evaluate", msg, context, defaults, node_settings)

    return app


app = build_client_app()
