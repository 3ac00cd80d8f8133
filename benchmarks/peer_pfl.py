"""The same user-level DP FedAvg job in fedlora and in Apple's pfl (PyPI ``pfl``), one after the other.

The job is configs/user-level.yaml: MiniLM cut to 2 layers, LoRA rank 4 on query/value of layer
1 plus a linear head, ffa-lora (A frozen at its seeded init; B and the head train), Rotten
Tomatoes, a label-Dirichlet(0.5) partition, K = clients_per_round x N clients a round, 2 local
SGD steps (lr 0.5, momentum 0.5, expected batch 16), each client's delta clipped to S = 0.5, the
sum noised with std sigma_u x S, the mean applied with a server step of 4.

What the two sides share, and what each does itself:

- shared (built once, in fedlora's setup): the tokenised data, the partition and the layer-0
  hidden states (fedlora's frozen-prefix cache: layer 0 carries no adapter, so both sides start
  their forward at layer 1 and do the same compute);
- the same network: pfl trains a fresh copy of fedlora's own PEFT model (the task's
  ``build_model`` and ``inject_adapters`` with the run's seed) behind the ``loss``/``metrics``
  methods pfl's ``PyTorchModel`` calls; every parameter is checked equal to fedlora's before
  training (trainable ones against fedlora's initial global state);
- the same clients and batches: pfl's user sampler replays fedlora's cohorts round by round,
  and a user's dataset yields the client's own Poisson batches of that round (fedlora's
  generator stream, rate min(batch / n_i, max_sample_rate)), so both sides train every client on
  the same rows. pfl's own slicing into fixed batches would give a client smaller than 32
  examples fewer steps than fedlora's 2, and most of the 1,000 clients hold 8-20 examples;
- pfl's own: its simulated backend and FedAvg loop, local SGD (its ``do_sgd`` with a fresh
  ``torch.optim.SGD`` per user), model differences, ``CentrallyAppliedPrivacyMechanism`` over
  ``GaussianMechanism`` (clip to S, noise on the sum, seeded from numpy where fedlora's server
  noise comes from the operating system), the mean, and the server step as pfl's central
  optimizer (``torch.optim.SGD`` with lr = server_lr; pfl applies the mean delta as a gradient);
- sigma: pfl's ``RDPPrivacyAccountant`` calibrates its own sigma for (epsilon, delta, q = K / N,
  rounds) and pfl's mechanism uses it. Both sides use RDP; pfl's order grid (dp_accounting's
  default, steps of 0.1 up to order 11) is finer than fedlora's (steps of 0.25-0.5), so its sigma
  can come out lower: 0.1-0.2% at 3-7 rounds, 1.2% at the config's 20 (0.6038 against 0.6109,
  the optimum order 2.6 falling between fedlora's 2.5 and 3). The script also runs pfl's
  accountant on fedlora's orders and checks that sigma within 1% of fedlora's sigma_u (the same
  method), and prints both.

Timing, the same way on both sides: setup is timed apart (fedlora: data, partition, calibration,
model and prefix cache; pfl: its model copy, the weight check, its calibration and its user
tensors, on top of fedlora's shared data); seconds per round = mean over rounds 2 to R - 1 on
both sides (round 1 warms up, and pfl evaluates every user before and after training in its
first central iteration; round R is fedlora's evaluation round: the script sets eval.every =
rounds so fedlora evaluates once, at the end; pfl's final model is evaluated after its loop);
seconds per client update = seconds per round / K. Accuracy: the final global model on the same
test split. One torch thread on each side (train.threads = 1). Constant rates on both sides
(train.lr_schedule = constant: pfl's optimizers keep one rate; the shipped config decays them).

    python benchmarks/peer_pfl.py --only fedlora -s federation.rounds=3
    python benchmarks/peer_pfl.py --clients 10:10 --clients 1000 -s federation.rounds=5 --repeats 2

``--clients N[:K]``: N clients, K a round (default: the config's fraction, 0.05; at N = 10 that
samples none, so 10:10 runs all ten every round). ``--repeats R`` runs R fedlora-then-pfl pairs,
interleaved, and pools their timed rounds (the shared machine's load drifts).

pfl is installed on first use with ``pip install --target <folder> --no-deps pfl==0.6.0`` plus
the pure-Python packages it imports that the fedlora venv lacks (multiprocess, dill,
prv-accountant), into ``$TMPDIR/fedlora-pfl-env`` (or ``--env``), and is appended to
``sys.path`` in this process only: never a dependency of fedlora. pfl pins dp-accounting < 0.6;
the venv's 0.6.0 is used (the RDP and PLD calls pfl makes are unchanged there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlora.adapters import inject_adapters
from fedlora.config import load_config, parse_override
from fedlora.federation.client import poisson_batch
from fedlora.federation.server import sample_clients
from fedlora.federation.simulation import Simulation
from fedlora.privacy.accounting import RDP_ORDERS
from fedlora.seeds import generator

PFL = "pfl==0.6.0"
# What pfl imports beyond numpy, scipy and packaging (which the fedlora venv has): (requirement,
# module), each installed only where the venv lacks the module (it has dp-accounting 0.6.0).
# multiprocess needs dill.
PFL_DEPS = [("multiprocess>=0.70.15,<0.71", "multiprocess"), ("dill>=0.3.8", "dill"),
            ("prv-accountant>=0.2.0,<0.3.0", "prv_accountant"), ("dp-accounting>=0.4,<0.6", "dp_accounting")]
SIGMA_RTOL = 0.01  # pfl's accountant on fedlora's RDP orders against fedlora's sigma_u
UPDATE_RTOL = 1e-4  # one client's update, pfl against fedlora (float32 sums in another order)


def ensure_pfl(env: Path) -> str:
    """pfl in its own folder, appended to sys.path for this process only (the venv wins every name
    it has, so nothing of fedlora's is shadowed). Returns pfl's version after importing its
    PyTorch backend."""
    if not (env / "pfl").is_dir():
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(env), "--no-deps"]
        subprocess.run([*pip, PFL], check=True)
        missing = [req for req, module in PFL_DEPS if importlib.util.find_spec(module) is None]
        if missing:
            subprocess.run([*pip, *missing], check=True)
    if str(env) not in sys.path:
        sys.path.append(str(env))
    import pfl  # noqa: PLC0415
    import pfl.model.pytorch  # noqa: F401, PLC0415  (the PyTorch backend: fails here if a dependency is missing)

    return pfl.__version__


# ----------------------------------------------------------------------------- the shared job
@dataclass
class Job:
    """What the pfl side takes from fedlora's run: the data, partition, schedule and start."""

    sim: Simulation  # its task holds the tokenised data and the layer-0 hidden-state cache
    initial: dict[str, torch.Tensor]  # every adapter tensor (A, B, head) before round 1
    trainable: list[str]  # the tensors the method trains (ffa-lora: B and the head)
    cohorts: list[list[int]]  # the clients of rounds 1..R
    sigma_u: float


@dataclass
class Run:
    """One side's run of the job."""

    setup_s: float
    seconds: list[float]  # every round, in order
    accuracy: float  # the final global model on the test split
    sigma: float  # the noise multiplier the side's mechanism used
    extra: dict[str, Any]

    @property
    def timed(self) -> list[float]:
        """Rounds 2 to R - 1 on both sides: round 1 warms up (and pfl evaluates every user before and
        after training in it), round R is fedlora's evaluation round."""
        return self.seconds[1:-1]


@dataclass
class Side:
    """One side's figures over its repeats (timed rounds pooled; accuracy averaged)."""

    name: str
    clients: int
    per_round: int  # K
    setup_s: float  # the first repeat's (later ones reuse fedlora's data and model)
    round1_s: float
    s_per_round: float  # mean of the timed rounds
    s_per_round_median: float
    s_per_client_update: float  # s_per_round / K
    timed_rounds: int
    accuracy: float
    sigma: float
    runs: list[dict[str, Any]]


def summarize(name: str, cfg, k: int, runs: list[Run]) -> Side:
    kept = [t for r in runs for t in r.timed]
    if not kept:
        raise SystemExit("no round to time: run at least 3 rounds (-s federation.rounds=3)")
    per_round = statistics.fmean(kept)
    return Side(name, cfg.federation.num_clients, k, setup_s=runs[0].setup_s,
                round1_s=statistics.fmean(r.seconds[0] for r in runs), s_per_round=per_round,
                s_per_round_median=statistics.median(kept), s_per_client_update=per_round / k,
                timed_rounds=len(kept), accuracy=statistics.fmean(r.accuracy for r in runs), sigma=runs[0].sigma,
                runs=[{**asdict(r), "s_per_round": statistics.fmean(r.timed)} for r in runs])


def check_job(cfg) -> None:
    """The pfl side reproduces this job only: plain SGD, no sample-level DP, user-level DP on."""
    ul, train = cfg.privacy.user_level, cfg.train
    problems = [why for bad, why in [
        (not ul.enabled, "privacy.user_level.enabled must be true"),
        (cfg.privacy.enabled, "privacy.enabled (sample-level DP-SGD) must be false"),
        (train.optimizer != "sgd" or train.head_lr is not None, "train.optimizer must be sgd without head_lr"),
        (cfg.adapter.dropout > 0, "adapter.dropout must be 0"),
        (cfg.federation.batched_clients not in (0, 1), "federation.batched_clients must be 0"),
        (cfg.federation.faults.fraction > 0, "federation.faults must be off"),
    ] if bad]
    if problems:
        raise SystemExit("peer_pfl.py: " + "; ".join(problems))


def run_fedlora(cfg, runtime=None) -> tuple[Run, Job]:
    """``runtime``: a previous repeat's (its data, model and prefix cache), reset to the initial
    adapter by the caller, so a repeat's setup skips the data and the model."""
    t0 = time.perf_counter()
    sim = Simulation(cfg, runtime=runtime)
    setup = time.perf_counter() - t0
    initial = {k: v.clone() for k, v in {**sim.init_local, **sim.global_state}.items()}
    trainable = sorted(sim.method.plan(sim.plan_context(1)).trainable)
    fed = cfg.federation
    cohorts = [sample_clients(fed.num_clients, fed.clients_per_round, seed=cfg.train.seed, round=r)
               for r in range(1, fed.rounds + 1)]
    result = sim.run()
    if result.rounds_done != fed.rounds:
        raise SystemExit(f"fedlora stopped after {result.rounds_done} rounds: {result.stop_reason}")
    assert [m["clients"] for m in result.metrics] == cohorts
    assert ["accuracy" in m for m in result.metrics] == [False] * (fed.rounds - 1) + [True]  # eval.every = rounds
    sigma = sim.user_dp.noise_multiplier
    run = Run(setup, [m["seconds"] for m in result.metrics], result.final["accuracy"], sigma,
              {"diagnostics_s": statistics.fmean(m.get("diagnostics_seconds", 0.0) for m in result.metrics)})
    return run, Job(sim, initial, trainable, cohorts, sigma)


def round_rows(spec, seed: int, rnd: int, steps: int, rate: float) -> list[np.ndarray]:
    """The rows (into the client's own examples) of each local step of one round, drawn exactly as
    fedlora's client draws them (its generator stream, Poisson at ``rate``)."""
    gen = generator(*spec.stream(seed, rnd))
    return [poisson_batch(len(spec.indices), rate, gen) for _ in range(steps)]


# ----------------------------------------------------------------------------- the pfl side
class PflNet(nn.Module):
    """fedlora's PEFT model behind the ``loss`` and ``metrics`` methods pfl's PyTorchModel calls; a
    batch is (hidden states at the input of layer ``start``, attention mask, labels)."""

    def __init__(self, peft_model: nn.Module, start: int) -> None:
        super().__init__()
        self.net, self.start = peft_model, start

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(hidden=hidden, attention_mask=mask, start=self.start)  # (batch, labels)

    def loss(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.training:  # a mode switch walks every submodule: only when it changes
            self.train()
        return F.cross_entropy(self(hidden, mask), labels)  # the batch mean, as fedlora's step

    @torch.no_grad()
    def metrics(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> dict:
        from pfl.metrics import Weighted  # noqa: PLC0415

        if self.training:
            self.eval()
        logits = self(hidden, mask)
        n = len(labels)
        return {"accuracy": Weighted(float((logits.argmax(-1) == labels).sum()), n),
                "loss": Weighted(float(F.cross_entropy(logits, labels, reduction="sum")), n)}


def pfl_classes(cfg) -> tuple[type, type, type]:
    """pfl subclasses (defined once pfl is importable): a client's round dataset, the accountant
    on fedlora's RDP orders, and a round clock."""
    from dp_accounting import dp_event  # noqa: PLC0415
    from dp_accounting.rdp import rdp_privacy_accountant  # noqa: PLC0415
    from pfl.callback.base import TrainingProcessCallback  # noqa: PLC0415
    from pfl.data.dataset import Dataset  # noqa: PLC0415
    from pfl.metrics import Metrics  # noqa: PLC0415
    from pfl.privacy import RDPPrivacyAccountant  # noqa: PLC0415

    class ClientRound(Dataset):
        """One client's padded tensors in one round. Iterated at the training batch size it yields
        the round's local batches: fedlora's own Poisson draws (rate min(batch / n, max_sample_rate),
        ``local_steps`` of them), each cut to its longest example; at any other size (pfl's local
        evaluation in its first central iteration) pfl's own consecutive batches."""

        def __init__(self, raw, spec, rnd: int) -> None:
            super().__init__(raw, user_id=f"{spec.cid}@{rnd}")
            self.spec, self.rnd = spec, rnd

        def iter(self, batch_size):  # noqa: A003
            if batch_size != cfg.train.batch_size:
                yield from super().iter(batch_size)
                return
            hidden, mask, labels = self.raw_data
            rate = self.spec.sample_rate  # min(batch / n, max_sample_rate), checked in run_pfl
            for rows in round_rows(self.spec, cfg.train.seed, self.rnd, cfg.federation.local_steps, rate):
                if len(rows) == 0:  # P = (1 - q)^n, about e^-16 here; fedlora steps on a zero gradient
                    continue
                idx = torch.from_numpy(rows)
                width = int(mask[idx].sum(1).max())
                yield [hidden[idx, :width], mask[idx, :width], labels[idx]]

    class OnFedloraOrders(RDPPrivacyAccountant):
        """pfl's RDP accountant (its binary search) on fedlora's RDP orders: the same method."""

        @staticmethod
        def get_composed_accountant(mechanism, noise_parameter, sampling_probability, num_compositions):
            step = dp_event.PoissonSampledDpEvent(sampling_probability, dp_event.GaussianDpEvent(noise_parameter))
            return rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS)).compose(step, int(num_compositions))

    class RoundClock(TrainingProcessCallback):
        def on_train_begin(self, *, model):
            self.marks = [time.perf_counter()]
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            self.marks.append(time.perf_counter())
            return False, Metrics()

    return ClientRound, OnFedloraOrders, RoundClock


def check_same_weights(model: nn.Module, job: Job) -> int:
    """Every parameter of pfl's copy equals fedlora's: adapter tensors its initial global state,
    the frozen backbone fedlora's model (which training never changes). Returns the count checked."""
    ours = dict(job.sim.rt.adapted.model.named_parameters())
    theirs = dict(model.named_parameters())
    assert sorted(ours) == sorted(theirs), "the two models have different parameters"
    for name, p in theirs.items():
        want = job.initial.get(name, ours[name])
        assert torch.equal(p.detach(), want.detach()), f"pfl's '{name}' differs from fedlora's initial value"
    return len(theirs)


def pfl_model(cfg, job: Job):
    """pfl's PyTorchModel around a fresh copy of fedlora's network, checked equal to fedlora's start;
    only the method's tensors train. Returns (model, parameters checked)."""
    from pfl.model.pytorch import PyTorchModel  # noqa: PLC0415

    train, task = cfg.train, job.sim.rt.task
    adapted = inject_adapters(task.build_model(), cfg.adapter, train.seed)
    checked = check_same_weights(adapted.model, job)
    for name, p in adapted.model.named_parameters():
        p.requires_grad_(name in job.trainable)
    net = PflNet(adapted.model, task.prefix_start)
    model = PyTorchModel(
        net,
        local_optimizer_create=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=train.momentum,
                                                                  weight_decay=train.weight_decay),
        central_optimizer=torch.optim.SGD([p for p in net.parameters() if p.requires_grad],
                                          lr=cfg.privacy.user_level.server_lr),
    )
    assert sorted(k.removeprefix("net.") for k in model.variable_map) == job.trainable
    return model, checked


def pfl_sigma(cfg, job: Job, accountant_cls: type, on_fedlora_orders: type) -> tuple[Any, float]:
    """pfl's accountant calibrated for (epsilon, delta, q = K / N, rounds) on its default RDP orders,
    and its sigma on fedlora's orders, checked within SIGMA_RTOL of fedlora's sigma_u."""
    fed, ul = cfg.federation, cfg.privacy.user_level
    privacy = {"num_compositions": fed.rounds, "sampling_probability": len(job.cohorts[0]) / fed.num_clients,
               "mechanism": "gaussian", "epsilon": ul.epsilon, "delta": cfg.privacy.delta}
    absl = logging.getLogger("absl")  # dp_accounting warns for every fractional order it drops
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = accountant_cls(**privacy)
        same = on_fedlora_orders(**privacy).noise_parameter
    finally:
        absl.setLevel(level)
    assert abs(same / job.sigma_u - 1) <= SIGMA_RTOL, (
        f"pfl's RDP accountant on fedlora's orders gives sigma {same:.4f}, fedlora {job.sigma_u:.4f}")
    return accountant, same


def check_same_update(cfg, job: Job, algorithm, model, user, context) -> float:
    """Round 1 of the first sampled client, from the same weights, by fedlora's client function and by
    pfl's local training: the relative difference ||pfl - fedlora|| / ||fedlora|| of the two updates."""
    from fedlora.federation.client import ClientState, run_client  # noqa: PLC0415

    sim, cid = job.sim, job.cohorts[0][0]
    sim.rt.adapted.load(job.initial)
    plan = sim.method.plan(sim.plan_context(1))
    res = run_client(sim.rt, sim.method, plan, {k: job.initial[k] for k in plan.download}, sim.specs[cid],
                     ClientState({k: v.clone() for k, v in sim.init_local.items()}),
                     local_steps=cfg.federation.local_steps, seed=cfg.train.seed)
    sim.rt.adapted.load(job.initial)
    ours = {k: res.upload[k] - job.initial[k] for k in job.trainable}
    theirs, _ = algorithm.simulate_one_user(model, user, context)
    diff = sum(float((theirs[f"net.{k}"] - v).pow(2).sum()) for k, v in ours.items())
    norm = sum(float(v.pow(2).sum()) for v in ours.values())
    return (diff / norm) ** 0.5


def run_pfl(cfg, job: Job, repeat: int = 0) -> Run:
    """The pfl side of the job (see the module docstring for what is shared and what is pfl's own);
    each repeat draws other noise (fedlora's comes from the operating system every time)."""
    t0 = time.perf_counter()
    from pfl.aggregate.simulate import SimulatedBackend  # noqa: PLC0415
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: PLC0415
    from pfl.common_types import Population  # noqa: PLC0415
    from pfl.context import CentralContext  # noqa: PLC0415
    from pfl.data.dataset import Dataset  # noqa: PLC0415
    from pfl.data.federated_dataset import FederatedDataset  # noqa: PLC0415
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: PLC0415
    from pfl.metrics import StringMetricName  # noqa: PLC0415
    from pfl.privacy import (  # noqa: PLC0415
        CentrallyAppliedPrivacyMechanism,
        GaussianMechanism,
        RDPPrivacyAccountant,
    )

    ClientRound, OnFedloraOrders, RoundClock = pfl_classes(cfg)
    fed, train, task, k = cfg.federation, cfg.train, job.sim.rt.task, len(job.cohorts[0])
    np.random.seed([train.seed, repeat])  # pfl draws its seeds (noise, user seeds) from numpy's global state
    model, checked = pfl_model(cfg, job)
    accountant, same_orders = pfl_sigma(cfg, job, RDPPrivacyAccountant, OnFedloraOrders)
    mechanism = CentrallyAppliedPrivacyMechanism(
        GaussianMechanism.from_privacy_accountant(accountant, cfg.privacy.user_level.clip_norm))
    # the data: each client's rows as padded tensors, once; pfl's sampler replays fedlora's cohorts
    specs = job.sim.specs
    for s in specs:
        assert s.sample_rate == min(train.batch_size / len(s.indices), cfg.privacy.max_sample_rate)

    def tensors(examples, rows) -> tuple[torch.Tensor, ...]:
        b = task.batch(examples, rows, torch.device("cpu"))
        return b["hidden"], b["attention_mask"], b["labels"]

    users = {s.cid: tensors(task.train, s.indices) for s in specs}
    schedule = iter([(r, c) for r, cohort in enumerate(job.cohorts, 1) for c in cohort])
    train_data = FederatedDataset(lambda rc: ClientRound(users[rc[1]], specs[rc[1]], rc[0]), lambda: next(schedule))
    order = np.argsort([len(x) for x in task.test.features["input_ids"]], kind="stable")  # as fedlora evaluates
    test = Dataset(tensors(task.test, order))
    backend = SimulatedBackend(training_data=train_data, val_data=None, postprocessors=[mechanism])
    algorithm = FederatedAveraging()
    params = NNAlgorithmParams(central_num_iterations=fed.rounds, evaluation_frequency=fed.rounds,
                               train_cohort_size=k, val_cohort_size=None)
    train_params = NNTrainHyperParams(local_num_epochs=None, local_learning_rate=train.lr,
                                      local_batch_size=train.batch_size, local_num_steps=fed.local_steps)
    eval_params = NNEvalHyperParams(local_batch_size=cfg.eval.batch_size)
    setup = time.perf_counter() - t0
    # the same compute, checked (outside the timing): one client's update on both sides
    context = CentralContext(current_central_iteration=1, do_evaluation=False, cohort_size=k,
                             population=Population.TRAIN, algorithm_params=params,
                             model_train_params=train_params, model_eval_params=eval_params, seed=0)
    cid = job.cohorts[0][0]
    update_gap = check_same_update(cfg, job, algorithm, model, ClientRound(users[cid], specs[cid], 1), context)
    assert update_gap < UPDATE_RTOL, f"one client's update differs by {update_gap:.2e} between the two sides"
    clock = RoundClock()
    algorithm.run(algorithm_params=params, backend=backend, model=model, model_train_params=train_params,
                  model_eval_params=eval_params, callbacks=[clock], send_metrics_to_platform=False)
    seconds = [float(t) for t in np.diff(clock.marks)]
    metrics = model.evaluate(test, eval_params=eval_params)
    accuracy = metrics[StringMetricName("accuracy")].overall_value
    return Run(setup, seconds, accuracy, accountant.noise_parameter,
               {"sigma_on_fedlora_orders": same_orders, "sigma_gap": accountant.noise_parameter / job.sigma_u - 1,
                "parameters_checked": checked, "update_gap": update_gap})


# ----------------------------------------------------------------------------- report
def table(ours: Side, theirs: Side | None) -> str:
    head = (f"N = {ours.clients}, K = {ours.per_round} per round, {len(ours.runs)} repeat(s), "
            f"{ours.timed_rounds} timed rounds a side\n"
            "| side | setup s | round 1 s | s/round | median | s/client update | accuracy | sigma |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = [f"| {s.name} | {s.setup_s:.1f} | {s.round1_s:.2f} | {s.s_per_round:.3f} | {s.s_per_round_median:.3f} | "
            f"{s.s_per_client_update:.4f} | {s.accuracy:.4f} | {s.sigma:.4f} |" for s in (ours, theirs) if s is not None]
    if theirs is not None:
        rows.append(f"| pfl / fedlora | (shares fedlora's data) | {theirs.round1_s / ours.round1_s:.2f} | "
                    f"{theirs.s_per_round / ours.s_per_round:.2f} | "
                    f"{theirs.s_per_round_median / ours.s_per_round_median:.2f} | "
                    f"{theirs.s_per_client_update / ours.s_per_client_update:.2f} | "
                    f"{theirs.accuracy - ours.accuracy:+.4f} (difference) | {theirs.sigma / ours.sigma:.4f} |")
        x = theirs.runs[0]["extra"]
        rows.append(f"checks: {x['parameters_checked']} parameters equal at the start; one client's round-1 update "
                    f"differs by {x['update_gap']:.1e} (relative); pfl's sigma {theirs.sigma:.4f} on its RDP orders "
                    f"({x['sigma_gap']:+.2%} against fedlora's {ours.sigma:.4f}), {x['sigma_on_fedlora_orders']:.4f} "
                    f"on fedlora's ({x['sigma_on_fedlora_orders'] / ours.sigma - 1:+.2%})")
    return "\n".join([head, *rows])


def compare(cfg, repeats: int, with_pfl: bool) -> tuple[Side, Side | None]:
    """fedlora then pfl, ``repeats`` times, interleaved (the shared machine's load drifts)."""
    ours, theirs, runtime = [], [], None
    for i in range(repeats):
        run, job = run_fedlora(cfg, runtime)
        ours.append(run)
        if with_pfl:
            theirs.append(run_pfl(cfg, job, i))
        runtime = job.sim.rt
        runtime.adapted.load(job.initial)  # the next repeat starts from the same weights
    k = len(job.cohorts[0])
    return summarize("fedlora", cfg, k, ours), summarize("pfl", cfg, k, theirs) if with_pfl else None


def size_arg(text: str) -> tuple[int, int | None]:
    """'1000' -> (1000, None); '10:10' -> (10, 10)."""
    n, _, k = text.partition(":")
    return int(n), int(k) if k else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/user-level.yaml")
    ap.add_argument("-s", "--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--clients", type=size_arg, action="append", default=None, metavar="N[:K]",
                    help="num_clients, and K clients per round (default: the config's fraction); repeatable")
    ap.add_argument("--repeats", type=int, default=1, help="fedlora-then-pfl pairs per client count")
    ap.add_argument("--only", choices=["fedlora", "both"], default="both")
    ap.add_argument("--env", type=Path, default=Path(tempfile.gettempdir()) / "fedlora-pfl-env")
    ap.add_argument("--out", type=Path, default=None, help="write every side's figures to this JSON file")
    args = ap.parse_args()
    # constant rates: pfl's central optimizer and local SGD keep one rate (the config decays both on a cosine)
    overrides = {"train.threads": 1, "train.lr_schedule": "constant", **dict(parse_override(s) for s in args.set)}
    version = ensure_pfl(args.env) if args.only == "both" else None
    results = []
    for n, k in args.clients or [(None, None)]:
        size = {**({"federation.num_clients": n} if n else {}), **({"federation.clients_per_round": k / n} if k else {})}
        rounds = load_config(args.config, {**overrides, **size}).federation.rounds
        cfg = load_config(args.config, {**overrides, **size, "eval.every": rounds})  # evaluate once, at the end
        check_job(cfg)
        ours, theirs = compare(cfg, args.repeats, version is not None)
        print(table(ours, theirs), flush=True)
        results += [asdict(s) for s in (ours, theirs) if s is not None]
    if args.out is not None:
        args.out.write_text(json.dumps({"pfl": version, "torch": torch.__version__, "overrides": overrides,
                                        "repeats": args.repeats, "sides": results}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
