"""The ClientApp: one fedlora client per SuperNode, its partition id from the node config.

Each message builds (or reuses, within one process) the node's view of the run from the run
config: the task, the adapted model, the partition and its ClientSpec. The client's kept state
is read from and written back to the node-local ``Context.state``; only the upload and three
scalars (loss, examples, steps) go back to the server.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.errors import ConfigError
from fedlora.federation.client import run_client
from fedlora.federation.simulation import Simulation
from fedlora.flower.messages import (
    config_from_run,
    from_record,
    load_client_state,
    plan_from_config,
    save_client_state,
    to_record,
)

_NODES: dict[str, Simulation] = {}  # one per config text and process (no client state in it)


def node_view(context: Context, defaults: dict[str, Any]) -> tuple[Simulation, int]:
    """This node's task, model, method and specs, and its partition id."""
    run_config = {**defaults, **context.run_config}
    text = str(run_config.get("config-yaml", ""))
    if text not in _NODES:
        _NODES.clear()
        _NODES[text] = Simulation(config_from_run(run_config))
    sim = _NODES[text]
    if "partition-id" not in context.node_config:
        raise ConfigError("SuperNode has no partition-id; start it with --node-config 'partition-id=<k>'")
    pid = int(context.node_config["partition-id"])
    if not 0 <= pid < len(sim.specs):
        raise ConfigError(f"partition-id {pid} is outside 0..{len(sim.specs) - 1}; fix the SuperNode's --node-config")
    return sim, pid


def build_client_app(defaults: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``defaults`` fill run-config keys the run does not set (Flower's Python simulation API
    has no run config)."""
    defaults = dict(defaults or {})
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Tell the server which partition this node holds."""
        _, pid = node_view(context, defaults)
        return Message(RecordDict({"node": MetricRecord({"partition-id": pid})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        sim, pid = node_view(context, defaults)
        plan = plan_from_config(msg.content.config_records["plan"])
        download = from_record(msg.content.array_records["download"], sim.rt.device)
        state = load_client_state(context, sim.init_local)
        res = run_client(sim.rt, sim.method, plan, download, sim.specs[pid], state,
                         local_steps=sim.cfg.federation.local_steps, seed=sim.cfg.train.seed)
        save_client_state(context, res.state)
        result = MetricRecord({"loss": res.loss, "examples": res.examples, "steps": res.steps})
        return Message(RecordDict({"upload": to_record(res.upload), "result": result}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Personalised accuracy: the global state plus this node's local tensors on its test share."""
        sim, pid = node_view(context, defaults)
        state = load_client_state(context, sim.init_local)
        share = sim.shares[pid] if sim.shares else []
        acc = 0.0
        if len(share):
            global_state = from_record(msg.content.array_records["global"], sim.rt.device)
            acc = sim.rt.evaluate({**global_state, **state.local}, sim.rt.task.test.subset(share))["accuracy"]
        return Message(RecordDict({"eval": MetricRecord({"accuracy": float(acc), "examples": len(share)})}), reply_to=msg)

    return app


app = build_client_app()
