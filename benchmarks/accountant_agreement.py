"""Worst disagreement between fedlora's accountants and Google's dp-accounting on a grid.

PRV (fedlora, Opacus) against PLD (dp_accounting.pld, discretisation 1e-4); RDP (fedlora,
Opacus) against dp_accounting.rdp on fedlora's order set RDP_ORDERS, and on its integer
orders only. Run: ``python benchmarks/accountant_agreement.py`` (about 7 minutes on 2 cores).
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings

import dp_accounting
from opacus.accountants.analysis import rdp as opacus_rdp

from fedlora.privacy.accounting import RDP_ORDERS, epsilon

DELTA = 1e-5
SIGMAS = (0.6, 0.8, 1.0, 1.5, 3.0)
RATES = (0.005, 0.02, 0.1, 0.25, 0.5, 1.0)
STEPS = (10, 100, 1000)
INTEGER_ORDERS = [o for o in RDP_ORDERS if float(o).is_integer()]


def event(sigma: float, q: float, steps: int):
    step = dp_accounting.GaussianDpEvent(sigma)
    if q < 1:
        step = dp_accounting.PoissonSampledDpEvent(q, step)
    return dp_accounting.SelfComposedDpEvent(step, steps)


def google(kind: str, sigma: float, q: float, steps: int, orders=RDP_ORDERS) -> float:
    if kind == "pld":
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    else:
        acc = dp_accounting.rdp.RdpAccountant(orders=list(orders))
    return float(acc.compose(event(sigma, q, steps)).get_epsilon(DELTA))


def main() -> None:
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    worst = {"prv_vs_pld": (0.0, None), "rdp_vs_rdp_integer_orders": (0.0, None), "rdp_vs_rdp_all_orders": (0.0, None)}
    t0, cases = time.perf_counter(), 0
    for sigma, q, steps in itertools.product(SIGMAS, RATES, STEPS):
        pld = google("pld", sigma, q, steps)
        if not 0.5 <= pld <= 30:  # the range anyone would run; outside, PRV's absolute error dominates
            continue
        cases += 1
        rel = abs(epsilon([(sigma, q, steps)], delta=DELTA) - pld) / pld
        curve = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=INTEGER_ORDERS)
        ours_int = opacus_rdp.get_privacy_spent(orders=INTEGER_ORDERS, rdp=curve, delta=DELTA)[0]
        rel_int = abs(ours_int - google("rdp", sigma, q, steps, INTEGER_ORDERS)) / ours_int
        theirs = google("rdp", sigma, q, steps)
        rel_all = abs(epsilon([(sigma, q, steps)], delta=DELTA, accountant="rdp") - theirs) / theirs
        for key, value in zip(worst, (rel, rel_int, rel_all), strict=True):
            if value > worst[key][0]:
                worst[key] = (value, (sigma, q, steps))
    print(f"{cases} settings with PLD epsilon in [0.5, 30], delta {DELTA:g}, {time.perf_counter() - t0:.0f} s")
    for key, (value, at) in worst.items():
        print(f"worst {key}: {100 * value:.4f}% at (sigma, q, steps) = {at}")


if __name__ == "__main__":
    main()
