"""`fedlora flower up`: a SuperLink and N SuperNodes on 127.0.0.1, one run, every process stopped.

Everything Flower writes lives under ``<run dir>/flower`` (FLWR_HOME, certificates, keys, logs,
the app folder). TLS uses certificates made for the run; SuperNode authentication is on and only
the keys made for the run's N SuperNodes are registered. Every process is started in its own
process group and stopped by its PID's group (SIGTERM, then SIGKILL), also when the run fails.

Beside the SuperNodes runs one node worker (``python -m fedlora.flower.node``, see ``node.py``)
shared by all of them, as they share this machine: it builds the task and model once while
the federation starts and answers every node's messages (one at a time; each node's client
state stays in its own ``Context.state``), so the per-message ClientApp processes Flower starts
need not import torch or rebuild the model, and N nodes do not hold N copies of the task.
``node_workers=False`` runs without it (each ClientApp process builds everything). The worker is
watched: if it dies, the run ends at once with its last log lines. The run's Flower folder is
0700 and its private keys 0600 from their creation.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tomli_w

from fedlora.config import ExperimentConfig
from fedlora.errors import FedloraError
from fedlora.files import private_folder
from fedlora.flower.certs import make_node_key, make_tls
from fedlora.flower.node import WORKER_ENV, WORKER_KEY_ENV
from fedlora.flower.simulate import run_config_for
from fedlora.report.rundir import RunDir

APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedlora-flower"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "fedlora.flower.server_app:app"
clientapp = "fedlora.flower.client_app:app"

[tool.flwr.app.config]
config-yaml = ""
run-dir = ""
min-clients = 1
round-timeout = 600.0
node-wait = 120.0
"""


NODE_CONFIG = "node-config.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


class Deployment:
    """The processes of one deployment; use as a context manager so they are always stopped."""

    def __init__(self, work: Path, num_nodes: int) -> None:
        # absolute paths: Flower's processes get them in arguments and configs; every process runs in the
        # caller's working directory, so relative paths in the fedlora config mean what they mean to `fedlora run`
        self.work, self.num_nodes, self.cwd = Path(work).resolve(), num_nodes, Path.cwd()
        self.procs: dict[str, subprocess.Popen] = {}
        private_folder(self.work)  # 0700: keys, certificates, logs and FLWR_HOME are the run's owner's only
        self.home = work / "home"
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.tls = make_tls(work / "certs")
        self.keys = [make_node_key(work / "keys", f"node{k}") for k in range(num_nodes)]
        self.link_port = free_port()
        self.worker: str | None = None  # the node worker's address, shared by this machine's SuperNodes
        self.worker_key = secrets.token_hex(32)

    # ------------------------------------------------------------------ processes
    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115  (closed with the process)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or self.env, cwd=self.cwd,
                                start_new_session=True)  # its own process group: pgid == pid
        log.close()
        self.procs[name] = proc
        return proc

    def stop(self, name: str, grace: float = 10.0) -> None:
        """Stop a started process, its process group and every descendant (Flower detaches some children
        into their own sessions, e.g. the SuperLink's SuperExec), by PID."""
        proc = self.procs.pop(name)
        family = descendants(proc.pid)
        for pid in [proc.pid, *family]:
            _signal(pid, signal.SIGTERM, group=pid == proc.pid)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        for pid in [proc.pid, *family, *descendants(proc.pid)]:
            _signal(pid, signal.SIGKILL, group=pid == proc.pid)
        proc.wait()

    def __enter__(self) -> Deployment:
        self.home.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------------ the federation
    def start_superlink(self) -> None:
        tls = self.tls
        self.start("superlink", [_bin("flower-superlink"), "--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                                 "--ssl-keyfile", str(tls["key"]), "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                                 "--host", "127.0.0.1", "--port", str(self.link_port)])  # Fleet, Control, Runtime APIs
        (self.home / "config.toml").write_text(tomli_w.dumps({"superlink": {
            "default": "fedlora", "fedlora": {"address": f"127.0.0.1:{self.link_port}", "root-certificates": str(tls["ca"])}}}))
        self.wait_for(lambda: self.flwr("ls", check=False).returncode == 0, 120, "the SuperLink did not start")

    def flwr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        res = subprocess.run([_bin("flwr"), *args], env=self.env, cwd=self.cwd, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise FedloraError(f"`flwr {args[0]}` failed: {(res.stderr or res.stdout).strip()[-300:]}")
        return res

    def register(self, public_key: Path) -> None:
        self.flwr("supernode", "register", str(public_key), "fedlora")

    def start_worker(self, config_yaml: Path) -> None:
        """The node worker of every SuperNode started later; it builds the view of ``config_yaml`` right away."""
        port = free_port()
        self.start("worker", [sys.executable, "-m", "fedlora.flower.node", "--port", str(port), "--config", str(config_yaml),
                              "--own-config", str(self.work / NODE_CONFIG)],
                   env={**self.env, WORKER_KEY_ENV: self.worker_key})
        self.worker = f"127.0.0.1:{port}"

    def start_supernode(self, k: int, private_key: Path, name: str | None = None) -> subprocess.Popen:
        env = {**self.env, WORKER_ENV: self.worker, WORKER_KEY_ENV: self.worker_key} if self.worker else None
        return self.start(name or f"supernode{k}", [
            _bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.link_port}", "--root-certificates", str(self.tls["ca"]),
            "--auth-supernode-private-key", str(private_key), "--node-config",
            f'partition-id={k} num-partitions={self.num_nodes} config="{self.work / NODE_CONFIG}"',
            "--port", str(free_port()), "--max-retries", "5"], env=env)

    def check_worker(self, lines: int = 6) -> None:
        """Raise at once when the node worker has died, with the last lines of its log (its error)."""
        proc = self.procs.get("worker")
        if proc is None or proc.poll() is None:
            return
        tail = [line.strip() for line in self.log("worker").splitlines() if line.strip()][-lines:]
        raise FedloraError(f"the node worker died (exit {proc.returncode}): {' | '.join(tail) or 'no output'}; "
                           f"its log is '{self.work / 'worker.log'}'")

    def wait_for(self, ok, seconds: float, message: str) -> None:
        deadline = time.monotonic() + seconds
        while not ok():
            self.check_worker()
            if time.monotonic() > deadline or any(p.poll() is not None for n, p in self.procs.items() if n == "superlink"):
                raise FedloraError(f"{message}; see the logs under '{self.work}'")
            time.sleep(1.0)

    def run_app(self, run_config: dict, timeout: float, watch: Callable[[Deployment], None] | None = None) -> int:
        """Submit the run with `flwr run --stream` and wait for it; ``watch`` is called about once a second."""
        app = self.work / "app"
        app.mkdir(exist_ok=True)
        (app / "pyproject.toml").write_text(APP_TOML)
        (app / "fedlora_app.py").write_text('"""The app lives in the installed fedlora package (fedlora.flower)."""\n')
        (self.work / "run_config.toml").write_text(tomli_w.dumps(run_config))
        proc = self.start("run", [_bin("flwr"), "run", str(app), "fedlora", "--run-config", str(self.work / "run_config.toml"),
                                  "--stream"])
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            self.check_worker()  # its death ends the run now, not after the clients' retries
            if time.monotonic() > deadline:
                raise FedloraError(f"the Flower run took longer than {timeout:g} s; stopped it (logs in '{self.work}')")
            if watch is not None:
                watch(self)
            time.sleep(1.0)
        return proc.returncode


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; empty where there is none)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parents.items() if p in frontier]
        found += kids
        frontier = kids
    return found


def _signal(pid: int, sig: int, *, group: bool = False) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def up(cfg: ExperimentConfig, *, min_clients: int | None = None, round_timeout: float = 600.0,
       timeout: float = 3600.0, watch: Callable[[Deployment], None] | None = None, node_workers: bool = True) -> Path:
    """Start a SuperLink and one SuperNode per client (and their node worker unless ``node_workers`` is
    False), run ``cfg``, stop everything; returns the run directory.
    ``watch(deployment)`` runs about once a second during the run (tests use it to add or kill nodes)."""
    RunDir.check_free(cfg.output.root, cfg.output.name)
    run_dir = RunDir.create(cfg.output.root, cfg.output.name, cfg.method.name)
    run_dir.write_config(cfg.to_yaml())
    n = cfg.federation.num_clients
    run_path = run_dir.path.resolve()  # the ServerApp runs in another process: it gets an absolute path
    with Deployment(run_path / "flower", n) as dep:
        (dep.work / NODE_CONFIG).write_text(cfg.to_yaml())  # each node's own config: the privacy it enforces
        if node_workers:
            dep.start_worker(dep.work / NODE_CONFIG)
        dep.start_superlink()
        for k, (private, public) in enumerate(dep.keys):
            dep.register(public)
            dep.start_supernode(k, private)
        code = dep.run_app(run_config_for(cfg, run_path, min_clients=min_clients, round_timeout=round_timeout),
                           timeout, watch)
    if not (run_dir.path / "summary.json").is_file():
        errors = [line for line in dep.log("run").splitlines() if line.startswith("fedlora.errors.")]
        reason = errors[-1].split(": ", 1)[-1] if errors else f"exit {code}"
        raise FedloraError(f"the Flower run ended without a summary ({reason}); logs in '{run_dir.path / 'flower'}'")
    return run_dir.path
