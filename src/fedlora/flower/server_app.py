"""The ServerApp: the server's side of fedlora (:class:`~fedlora.federation.server.Server`) with a
runner that reaches the clients by Flower messages.

The ServerApp never opens a client's training data: it builds the model and the test split only
(``build_task(..., train=False)``), learns each client's public facts (its size, sigma, sampling
rate and step budget: declared metadata, docs/privacy.md) from the node itself, and holds no
client tensors. Every train message it sends is charged on its ledger, answered or not.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.errors import ClientsFailed, FedloraError
from fedlora.experiment import summary_line
from fedlora.federation.runtime import Runtime
from fedlora.federation.server import ClientFacts, RoundOutcome, Server
from fedlora.federation.simulation import initial_states, method_and_user_dp, save_global_adapter
from fedlora.flower.messages import config_from_run, from_record, plan_to_config, to_record
from fedlora.methods.base import RoundPlan, State
from fedlora.report.rundir import RunDir
from fedlora.tasks import build_task, majority_rate


class TooFewClients(ClientsFailed):
    """Fewer SuperNodes answered a round than ``min-clients``: the run stops after the last good round."""


class FlowerClients:
    """The Flower runner: one ``train`` message per sampled client, replies collected until all arrive,
    their nodes leave, or the round timeout."""

    def __init__(self, grid: Grid, nodes: dict[int, int], facts: list[ClientFacts], local_steps: int,
                 round_timeout: float) -> None:
        self.grid, self.nodes, self.facts = grid, nodes, facts
        self.local_steps, self.round_timeout = local_steps, round_timeout

    def exchange(self, messages: dict[int, Message]) -> tuple[dict[int, Message], dict[int, str]]:
        """Replies per client, and the reason for each client that gave none."""
        ids = dict(zip(self.grid.push_messages(messages.values()), messages, strict=True))
        replies: dict[int, Message] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + self.round_timeout
        while len(replies) + len(errors) < len(ids) and time.monotonic() < deadline:
            for reply in self.grid.pull_messages([m for m, c in ids.items() if c not in replies and c not in errors]):
                c = ids[reply.metadata.reply_to_message_id]
                if reply.has_error():
                    errors[c] = f"error reply: {reply.error.reason}"[:300]
                else:
                    replies[c] = reply
            alive = set(self.grid.get_node_ids())
            waiting = [c for c in ids.values() if c not in replies and c not in errors]
            if waiting and all(self.nodes[c] not in alive for c in waiting):
                break
            time.sleep(0.05)
        for c in messages:
            if c not in replies and c not in errors:
                errors[c] = "no answer from its SuperNode"
        return replies, errors

    def train(self, plan: RoundPlan, download: State, sampled: list[int]) -> RoundOutcome:
        content = {"download": to_record(download), "plan": plan_to_config(plan)}
        reachable = [c for c in sampled if c in self.nodes]
        replies, errors = self.exchange({c: Message(RecordDict(content), self.nodes[c], "train") for c in reachable})
        # every train message sent is charged: a late or failed client may have run its steps
        charged = {c: self.local_steps if c in reachable and self.facts[c].noise_multiplier is not None else 0
                   for c in sampled}
        answered = [c for c in sampled if c in replies]  # in client order, as the in-process loop
        failures = [{"client": c, "attempt": 0, "steps": charged[c],
                     "reason": errors.get(c, "no SuperNode holds this partition")} for c in sampled if c not in replies]
        uploads, losses = [], []
        for c in answered:
            r = replies[c].content
            uploads.append(from_record(r.array_records["upload"]) if "upload" in r.array_records else {})
            info = r.metric_records.get("result")
            if info is not None and "loss" in info:  # only non-private clients report a loss
                losses.append(float(info["loss"]))
        return RoundOutcome(answered, uploads, charged, failures, 1, losses)

    def personal_accuracy(self, global_state: State) -> float:
        """Each node evaluates global + its own local tensors on its test share; the server averages."""
        msgs = {c: Message(RecordDict({"global": to_record(global_state)}), n, "evaluate") for c, n in self.nodes.items()}
        correct = total = 0.0
        for reply in self.exchange(msgs)[0].values():
            ev = reply.content.metric_records["eval"]
            correct, total = correct + float(ev["accuracy"]) * float(ev["examples"]), total + float(ev["examples"])
        return correct / max(total, 1.0)


def find_nodes(grid: Grid, num_clients: int, wait: float, min_clients: int) -> dict[int, int]:
    """Ask every connected SuperNode for its partition id until all partitions are present."""
    deadline, nodes = time.monotonic() + wait, {}
    while True:
        ids = [n for n in grid.get_node_ids() if n not in nodes.values()]
        if ids:
            msgs = [Message(RecordDict({"ask": ConfigRecord({"what": "partition-id"})}), n, "query") for n in ids]
            for reply in grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())):
                if not reply.has_error():
                    pid = int(reply.content.metric_records["node"]["partition-id"])
                    if 0 <= pid < num_clients:  # a node outside 0..num_clients-1 gets no work
                        nodes.setdefault(pid, reply.metadata.src_node_id)
        if len(nodes) >= num_clients or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if len(nodes) < min(min_clients, num_clients):
        raise FedloraError(f"only {len(nodes)} of {num_clients} SuperNodes connected within {wait:g} s; "
                           "start one SuperNode per partition id (0..num_clients-1) or lower min-clients")
    return nodes


def ask_facts(grid: Grid, nodes: dict[int, int], num_clients: int, wait: float) -> list[ClientFacts]:
    """Each node's public facts (size, sigma, sampling rate, step budget), computed on the node from its own data."""
    msgs = [Message(RecordDict({"ask": ConfigRecord({"what": "facts"})}), n, "query") for n in nodes.values()]
    by_node = {n: c for c, n in nodes.items()}
    facts = [ClientFacts(c, 0, None, 0.0, 0) for c in range(num_clients)]  # partitions without a node get no work
    for reply in grid.send_and_receive(msgs, timeout=wait):
        if reply.has_error():
            raise FedloraError(f"a SuperNode could not describe its data ({reply.error.reason[:200]}); fix its "
                               "data or privacy config")
        f = reply.content.metric_records["facts"]
        c = by_node[reply.metadata.src_node_id]
        sigma = float(f["sigma"])
        facts[c] = ClientFacts(c, int(f["examples"]), None if sigma < 0 else sigma, float(f["sample_rate"]),
                               int(f["step_budget"]))
    return facts


class FlowerServer:
    """The server's side over Flower: a :class:`Server` whose runner is :class:`FlowerClients`."""

    def __init__(self, cfg, grid: Grid, *, run_dir: RunDir | None = None, min_clients: int = 1,
                 round_timeout: float = 600.0, node_wait: float = 120.0) -> None:
        cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"min_clients": min_clients})})
        self.cfg = cfg
        self.method, self.user_dp = method_and_user_dp(cfg)
        self.rt = Runtime(cfg, task=build_task(cfg.task, cfg.train.seed, train=False))  # the test split only
        local_keys, self.init_local, global_state = initial_states(self.rt, self.method)
        self.nodes = find_nodes(grid, cfg.federation.num_clients, node_wait, min_clients)
        facts = ask_facts(grid, self.nodes, cfg.federation.num_clients, node_wait)
        self.runner = FlowerClients(grid, self.nodes, facts, cfg.federation.local_steps, round_timeout)
        self.server = Server(cfg, self.method, self.rt, facts, global_state,
                             local_keys=local_keys, init_local=self.init_local, user_dp=self.user_dp, runner=self.runner)
        self.server.run_dir = run_dir
        self.server.checkpoint = self.checkpoint

    def checkpoint(self, rnd: int) -> None:
        from fedlora.federation.checkpoint import save_server_checkpoint  # noqa: PLC0415

        run_dir = self.server.run_dir
        save_server_checkpoint(self, run_dir.checkpoint_dir(rnd))
        run_dir.prune_checkpoints(self.cfg.output.keep_checkpoints, self.cfg.output.keep_every)

    def guarantees(self, rounds: int) -> str:
        return self.server.guarantees(rounds)

    def save_adapter(self, directory) -> None:
        save_global_adapter(self.rt, self.init_local, self.server.released_state, directory)

    def describe(self) -> dict[str, Any]:
        """What the server knows: public facts only (no label mixes, no rows)."""
        facts = self.server.facts
        return {"method": self.method.name, "clients": [f.examples for f in facts],
                "majority_rate": majority_rate(self.rt.task.test.labels),
                "trainable_parameters": int(sum(p.numel() for p in self.rt.adapted.params.values())),
                "dp": self.cfg.privacy.enabled, "reproducible_noise": self.cfg.privacy.reproducible_noise,
                "sigma": [f.noise_multiplier for f in facts], "user_level": self.server.user_level_ledger(0),
                "engine": "flower", "nodes": self.nodes}


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
    fl = FlowerServer(cfg, grid, run_dir=run_dir, min_clients=int(run_config.get("min-clients", cfg.federation.min_clients)),
                      round_timeout=float(run_config.get("round-timeout", 600.0)),
                      node_wait=float(run_config.get("node-wait", 120.0)))
    run_dir.write_json("setup.json", fl.describe())
    setup = time.perf_counter() - t0
    result = fl.server.run()
    fl.save_adapter(run_dir.path / "adapter")
    summary = {"line": summary_line(result, fl), "run_dir": str(run_dir.path), "method": fl.method.name,
               "engine": "flower", "rounds": result.rounds_done, "stop_reason": result.stop_reason,
               "final": {k: v for k, v in result.final.items() if k != "privacy"}, "privacy": fl.server.ledger(),
               "user_level": fl.server.user_level_ledger(result.rounds_done),
               "reproducible_noise": cfg.privacy.reproducible_noise,
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


__all__ = ["FlowerClients", "FlowerServer", "TooFewClients", "app", "build_server_app", "serve"]
