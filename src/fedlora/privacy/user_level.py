"""User-level DP: the unit of privacy is a client. A wrapper around any method's aggregate.

The pattern of Flower's server-side fixed clipping (``dp_fixed_clipping.py``), made to work
with partial uploads: each client's upload is turned into a delta against the global state
it received (only the tensors it uploads, so FedSA's A-only or FFA's B-only uploads work),
the delta is clipped to L2 norm ``S`` (flat over the uploaded tensors), the K deltas are
averaged with equal weights 1/K (data-size weights would let one client weigh more than its
share), and Gaussian noise with std ``sigma_u * S / K`` is added to the mean. The method's own
aggregate then sees one privatised upload, ``global + noisy mean``: whatever it does with it
is post-processing. For averaging aggregates (FedAvg of the uploaded tensors) the result is
exactly Flower's: the mean of the clipped uploads plus noise.

Server learning rate ``eta`` (``privacy.user_level.server_lr``, default 1): the privatised upload
is ``global + eta * noisy mean`` (FedAvg with a server step size, Reddi et al. 2021). The noisy
mean is released by the Gaussian mechanism before ``eta`` touches it, and ``eta`` is public
(from the config), so scaling is post-processing: the guarantee and the accountant are
unchanged. It exists because a small clip norm ``S`` (which keeps the noise ``sigma_u * S / K``
small) also bounds each round's step; ``eta > 1`` restores the step without raising ``S``.

Accounting: one Poisson-subsampled Gaussian step per round with rate ``q = K / N`` and noise
multiplier ``sigma_u``, composed over rounds with the RDP accountant (see docs/privacy.md for
the fixed-size sampling caveat). Adding or removing a client changes the clipped sum by at
most ``S``; K is public and fixed, so the mean moves by at most ``S / K``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fedlora.errors import ConfigError
from fedlora.methods.base import Aggregate, Method, PlanContext, RoundPlan, State
from fedlora.privacy.accounting import calibrate_noise, epsilon
from fedlora.privacy.noise import NoiseSource, noise_stream
from fedlora.schedule import round_scale

ACCOUNTANT = "rdp"  # q = 1 (every client, every round) is routine here, where PRV is fragile


def upload_delta(upload: State, received: State) -> State:
    """The client's change to each tensor it uploads, against the global value it received."""
    missing = sorted(set(upload) - set(received))
    if missing:
        raise ConfigError(
            f"user-level DP clips uploads of global-state tensors, but the method uploads '{missing[0]}', "
            "which the server does not hold; use a method whose uploads are model tensors"
        )
    return {k: upload[k].to(torch.float64) - received[k].to(device=upload[k].device, dtype=torch.float64) for k in upload}


def clip_delta(delta: State, clip_norm: float) -> State:
    """Scale the delta by min(1, S / ||delta||), the norm taken flat over all its tensors."""
    norm = torch.sqrt(sum((d.pow(2).sum() for d in delta.values()), torch.zeros((), dtype=torch.float64)))
    factor = torch.clamp(clip_norm / (norm + 1e-12), max=1.0)
    return {k: d * factor.to(d.device) for k, d in delta.items()}


def noisy_mean(deltas: list[State], *, clip_norm: float, noise_multiplier: float, noise: NoiseSource) -> State:
    """Equal-weight mean of clipped deltas plus N(0, (sigma_u * S / K)^2) per coordinate."""
    k = len(deltas)
    std = noise_multiplier * clip_norm / k
    out: State = {}
    for name in sorted(deltas[0]):
        mean = sum(d[name] for d in deltas) / k
        out[name] = mean + std * noise.normal(mean.shape, dtype=torch.float64, device=mean.device)
    return out


@dataclass(frozen=True)
class UserLevelDP:
    """An :class:`Aggregate` that privatises the uploads, then calls the method's own aggregate."""

    inner: Aggregate
    clip_norm: float  # S
    noise_multiplier: float  # sigma_u
    seed: int
    reproducible_noise: bool = False  # True: server noise seeded from the config (NOT private against its holders)
    server_lr: float = 1.0  # eta: the noisy mean is scaled by it (post-processing)
    lr_schedule: str = "constant"  # train.lr_schedule: eta x its factor in each round (public: post-processing)
    lr_final_fraction: float = 0.1

    def __call__(self, ctx: PlanContext, plan: RoundPlan, global_state: State, uploads: list[State],
                 weights: list[float]) -> State:
        del weights  # equal weights enforced: the noise is calibrated to one client's share, 1/K
        if not uploads:
            return global_state
        keys = set(uploads[0])
        if any(set(u) != keys for u in uploads):
            raise ValueError("user-level DP needs every client of a round to upload the same tensors")
        deltas = [clip_delta(upload_delta(u, global_state), self.clip_norm) for u in uploads]
        noise = noise_stream(self.reproducible_noise, self.seed, "server", "user-dp", ctx.round)
        mean = noisy_mean(deltas, clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier, noise=noise)
        eta = self.server_lr * round_scale(self.lr_schedule, ctx.round, ctx.rounds, self.lr_final_fraction)
        private = {k: (global_state[k].to(torch.float64) + eta * mean[k].to(global_state[k].device)).to(global_state[k].dtype)
                   for k in sorted(keys)}
        return self.inner(ctx, plan, global_state, [private], [1.0])


@dataclass(frozen=True)
class UserLevelPlan:
    """The public parameters of a run's user-level DP and its accountant."""

    clip_norm: float
    noise_multiplier: float
    sample_rate: float  # clients per round / clients
    delta: float
    target_epsilon: float | None  # None when sigma_u was fixed by hand
    server_lr: float = 1.0  # the noisy mean's scale before the method aggregates it (post-processing)

    def wrap(self, method: Method, *, seed: int, reproducible_noise: bool = False, lr_schedule: str = "constant",
             lr_final_fraction: float = 0.1) -> Method:
        if method.side_uploads:  # refused when the run is built, before any data or model loads
            raise ConfigError(
                f"user-level DP cannot wrap '{method.name}': it uploads '{method.side_uploads[0]}*' values that are not "
                "model tensors, so they would escape the clipping and noise; set privacy.user_level.enabled=false "
                "or pick another method"
            )
        aggregate = UserLevelDP(method.aggregate, self.clip_norm, self.noise_multiplier, seed, reproducible_noise,
                                self.server_lr, lr_schedule, lr_final_fraction)
        info = {**method.info, "user_level_dp": dataclasses.asdict(self)}
        return dataclasses.replace(method, aggregate=aggregate, info=info)

    def ledger(self, rounds: int, *, planned_rounds: int | None = None, clients_per_round: int | None = None) -> dict:
        """The public facts of the user-level guarantee after ``rounds`` aggregations (setup.json, summary.json)."""
        out = {"sigma_u": self.noise_multiplier, "sample_rate": self.sample_rate, "clip_norm": self.clip_norm,
               "server_lr": self.server_lr, "delta": self.delta, "accountant": ACCOUNTANT,
               "target_epsilon": self.target_epsilon, "rounds": rounds, "epsilon": self.epsilon(rounds) if rounds else 0.0}
        if clients_per_round is not None:
            out["clients_per_round"] = clients_per_round
            out["noise_std_on_mean"] = self.noise_multiplier * self.clip_norm / clients_per_round
        if planned_rounds is not None:
            out["planned_rounds"] = planned_rounds
            out["planned_epsilon"] = self.epsilon(planned_rounds)
        return out

    def epsilon(self, rounds: int) -> float:
        """User-level epsilon after ``rounds`` aggregations."""
        return epsilon([(self.noise_multiplier, self.sample_rate, rounds)], delta=self.delta, accountant=ACCOUNTANT)


def plan_user_level(*, clip_norm: float, target_epsilon: float, noise_multiplier: float | None, delta: float,
                    clients_per_round: int, num_clients: int, rounds: int, server_lr: float = 1.0) -> UserLevelPlan:
    """Calibrate sigma_u for all rounds (or take the fixed one)."""
    q = clients_per_round / num_clients
    if noise_multiplier is None:
        sigma = calibrate_noise(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q, steps=rounds,
                                accountant=ACCOUNTANT)
        return UserLevelPlan(clip_norm, sigma, q, delta, target_epsilon, server_lr)
    return UserLevelPlan(clip_norm, noise_multiplier, q, delta, None, server_lr)
