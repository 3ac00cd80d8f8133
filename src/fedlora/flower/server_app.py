"""The ServerApp: fedlora's in-process engine with its client loop replaced by Flower messages.

:class:`FlowerServer` is a :class:`Simulation` (same planning, sampling, budget check,
aggregation, evaluation, metrics, ledger and checkpoints); only :meth:`train_clients` and the
personalised evaluation talk to SuperNodes. The server keeps no client tensors: its
``clients`` hold only the DP step counts it can count itself (steps of answered rounds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.errors import FedloraError
from fedlora.experiment import summary_line
from fedlora.federation.client import ClientResult, ClientState
from fedlora.federation.faults import ClientsFailed
from fedlora.federation.simulation import Simulation
from fedlora.flower.messages import config_from_run, from_record, plan_to_config, to_record
from fedlora.methods.base import RoundPlan, State
from fedlora.report.rundir import RunDir


class TooFewClients(ClientsFailed):
    """Fewer SuperNodes answered a round than ``min-clients``: the run stops after the last good round."""


class FlowerServer(Simulation):
    def __init__(self, cfg, grid: Grid, *, run_dir: RunDir | None = None, min_clients: int = 1,
                 round_timeout: float = 600.0, node_wait: float = 120.0) -> None:
        super().__init__(cfg, run_dir)
        self.grid, self.min_clients, self.round_timeout = grid, min_clients, round_timeout
        self.clients = [ClientState({}, 0) for _ in self.specs]  # step counts only; tensors stay on the nodes
        self.nodes = self.find_nodes(node_wait)  # partition id -> node id

    def find_nodes(self, wait: float) -> dict[int, int]:
        """Ask every connected SuperNode for its partition id until all partitions are present."""
        deadline, nodes = time.monotonic() + wait, {}
        while True:
            ids = [n for n in self.grid.get_node_ids() if n not in nodes.values()]
            if ids:
                msgs = [Message(RecordDict({"ask": ConfigRecord({"what": "partition-id"})}), n, "query") for n in ids]
                for reply in self.grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())):
                    if not reply.has_error():
                        pid = int(reply.content.metric_records["node"]["partition-id"])
                        if 0 <= pid < len(self.specs):  # a node outside 0..num_clients-1 gets no work
                            nodes.setdefault(pid, reply.metadata.src_node_id)
            if len(nodes) >= len(self.specs) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if len(nodes) < min(self.min_clients, len(self.specs)):
            raise FedloraError(f"only {len(nodes)} of {len(self.specs)} SuperNodes connected within {wait:g} s; "
                               "start one SuperNode per partition id (0..num_clients-1) or lower min-clients")
        return nodes

    def exchange(self, messages: dict[int, Message]) -> dict[int, Message]:
        """Send one message per client; collect replies until all arrive, their nodes leave, or the timeout."""
        ids = dict(zip(self.grid.push_messages(messages.values()), messages, strict=True))
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + self.round_timeout
        while len(replies) < len(ids) and time.monotonic() < deadline:
            for reply in self.grid.pull_messages([m for m, c in ids.items() if c not in replies]):
                c = ids[reply.metadata.reply_to_message_id]
                if not reply.has_error():
                    replies[c] = reply
                else:
                    ids = {m: k for m, k in ids.items() if k != c}  # an error reply: the client drops out
            alive = set(self.grid.get_node_ids())
            waiting = [c for c in ids.values() if c not in replies]
            if waiting and all(self.nodes[c] not in alive for c in waiting):
                break
            time.sleep(0.05)
        return replies

    def train_clients(self, plan: RoundPlan, download: State, sampled: list[int]) -> tuple[list[int], list[ClientResult]]:
        content = {"download": to_record(download), "plan": plan_to_config(plan)}
        reachable = [c for c in sampled if c in self.nodes]
        replies = self.exchange({c: Message(RecordDict(content), self.nodes[c], "train") for c in reachable})
        answered = [c for c in sampled if c in replies]
        dropped = [c for c in sampled if c not in replies]  # released nothing: no steps on the ledger
        self.round_faults = {"failed_clients": dropped, "attempts": 1, "client_failures": [
            {"client": c, "attempt": 0, "steps": 0, "reason": "no answer from its SuperNode"} for c in dropped]}
        if len(answered) < min(self.min_clients, len(sampled)):
            raise TooFewClients(f"stopped in round {plan.round}: only {len(answered)} of {len(sampled)} sampled clients "
                                f"answered (min-clients {self.min_clients}; lost {dropped}); restart the missing "
                                "SuperNodes or lower min-clients")
        results = []
        for c in answered:  # in client order, as the in-process loop
            r = replies[c].content
            info = r.metric_records["result"]
            steps = int(info["steps"])
            self.clients[c] = ClientState({}, self.clients[c].dp_steps + (steps if self.specs[c].dp else 0))
            results.append(ClientResult(from_record(r.array_records["upload"], self.rt.device), self.clients[c], steps,
                                        float(info["loss"]), int(info["examples"])))
        return answered, results

    def personal_accuracy(self) -> float:
        """Each node evaluates global + its own local tensors on its test share; the server averages."""
        msgs = {c: Message(RecordDict({"global": to_record(self.global_state)}), n, "evaluate") for c, n in self.nodes.items()}
        correct = total = 0.0
        for reply in self.exchange(msgs).values():
            ev = reply.content.metric_records["eval"]
            correct, total = correct + float(ev["accuracy"]) * float(ev["examples"]), total + float(ev["examples"])
        self.rt.adapted.load(self.init_local)
        return correct / max(total, 1.0)


def open_run_dir(run_config: dict[str, Any], cfg) -> RunDir:
    path = Path(str(run_config.get("run-dir") or Path(cfg.output.root) / (cfg.output.name or "flower-run")))
    if (path / "config.yaml").is_file():
        return RunDir.open(path)
    run_dir = RunDir.create(path.parent, path.name, cfg.method.name)
    run_dir.write_config(cfg.to_yaml())
    return run_dir


def serve(grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    """The whole server side of one run; writes the run directory like `fedlora run`."""
    t0 = time.perf_counter()
    cfg = config_from_run(run_config)
    run_dir = open_run_dir(run_config, cfg)
    sim = FlowerServer(cfg, grid, run_dir=run_dir, min_clients=int(run_config.get("min-clients", cfg.federation.min_clients)),
                       round_timeout=float(run_config.get("round-timeout", 600.0)),
                       node_wait=float(run_config.get("node-wait", 120.0)))
    run_dir.write_json("setup.json", {**sim.describe(), "engine": "flower", "nodes": sim.nodes})
    setup = time.perf_counter() - t0
    result = sim.run()
    sim.save_adapter(run_dir.path / "adapter")
    summary = {"line": summary_line(result, sim), "run_dir": str(run_dir.path), "method": sim.method.name,
               "engine": "flower", "rounds": result.rounds_done, "stop_reason": result.stop_reason,
               "final": {k: v for k, v in result.final.items() if k != "privacy"}, "privacy": sim.ledger(),
               "seconds": {"setup": setup, "train": result.seconds, "total": time.perf_counter() - t0}}
    run_dir.write_json("summary.json", json.loads(json.dumps(summary, default=str)))
    return summary


def build_server_app(defaults: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``defaults`` fill run-config keys the run does not set."""
    defaults = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, {**defaults, **context.run_config})

    return app


app = build_server_app()


__all__ = ["ArrayRecord", "FlowerServer", "TooFewClients", "app", "build_server_app", "serve"]
