"""Exact aggregation: dense SVD of the averaged product vs QR of the stacked factors + small SVD.

Side by side in one run, for K clients with LoRA factors B_i (d x r), A_i (r x d) and
data-size weights p_i (float64 throughout):

- dense: form M = sum_i p_i B_i A_i (d x d) and take its thin SVD (LAPACK gesdd);
- QR: stack B = [B_1 .. B_K] (d x K r), A = [p_1 A_1; ..; p_K A_K] (K r x d), QR of both thin
  factors and an SVD of the (K r x K r) core (``fedlora.methods.lowrank.product_svd``).

Both give the SVD of M (rank <= K r); the script checks that they agree. It then measures one
round of the demo config (``--round-config``, the engine's own ``seconds``, including its
evaluation and the aggregation-error diagnostic) and reports the QR route's share of it.

    python benchmarks/aggregation.py                      # widths 1024 and 4096, K=16, r=8, + a demo round
    python benchmarks/aggregation.py --widths 1024 --no-round
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedlora.methods.lowrank import product_svd, stack


def clients(d: int, k: int, r: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(d, r, generator=g) * 0.01 for _ in range(k)]
    as_ = [torch.randn(r, d, generator=g) / d**0.5 for _ in range(k)]
    sizes = torch.randint(50, 500, (k,), generator=g).double()
    return bs, as_, (sizes / sizes.sum()).tolist()


def dense_svd(bs, as_, w):
    m = sum(wi * b.double() @ a.double() for wi, b, a in zip(w, bs, as_, strict=True))  # (d, d)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return m, u, s, vh


def qr_svd(bs, as_, w):
    b, a = stack(bs, as_, w)  # (d, K r), (K r, d)
    return product_svd(b, a)


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def compare(d: int, k: int, r: int, dense_repeats: int, qr_repeats: int) -> float:
    bs, as_, w = clients(d, k, r, seed=d)
    t_dense, (m, _, s_dense, _) = timed(lambda: dense_svd(bs, as_, w), dense_repeats)
    t_qr, (u, s, vh) = timed(lambda: qr_svd(bs, as_, w), qr_repeats)
    q = s.numel()
    sv_err = float((s_dense[:q] - s).abs().max() / s_dense[0])
    rec_err = float(torch.linalg.matrix_norm((u * s) @ vh - m) / torch.linalg.matrix_norm(m))
    print(f"d={d:5d} K={k} r={r}: dense {t_dense * 1e3:10.1f} ms   QR {t_qr * 1e3:7.2f} ms   "
          f"ratio {t_dense / t_qr:8.1f}x   singular values max rel diff {sv_err:.1e}, "
          f"QR reconstruction error {rec_err:.1e}")
    return t_qr


def demo_round(config: str) -> tuple[float, float | None, int, int, int, int]:
    from fedlora.config import load_config  # noqa: PLC0415
    from fedlora.federation.simulation import Simulation  # noqa: PLC0415

    cfg = load_config(config, {"federation.rounds": 1, "train.threads": torch.get_num_threads()})
    sim = Simulation(cfg)
    rec = sim.run_round(1)
    modules = sum(1 for f in sim.rt.adapted.factors if f.role == "A")
    a = next(f for f in sim.rt.adapted.factors if f.role == "A")
    width = int(sim.rt.adapted.params[a.name].shape[1])
    return rec["seconds"], rec.get("diagnostics_seconds"), len(rec["clients"]), cfg.adapter.rank, modules, width


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dense-repeats", type=int, default=1)
    ap.add_argument("--qr-repeats", type=int, default=11)
    ap.add_argument("--round-config", default="configs/demo.yaml")
    ap.add_argument("--no-round", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust when the cores are shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float64")
    qr = {d: compare(d, args.clients, args.rank, args.dense_repeats, args.qr_repeats) for d in args.widths}
    if args.no_round:
        return
    seconds, diag, k, r, modules, width = demo_round(args.round_config)
    t_demo = compare(width, k, r, 3, args.qr_repeats) * modules
    print(f"demo round ({args.round_config}, measured here): {seconds:.2f} s, {k} clients, {modules} adapted "
          f"modules of width {width}, r={r}; aggregation-error diagnostic {1e3 * (diag or 0):.1f} ms "
          f"({100 * (diag or 0) / seconds:.2f}% of the round)")
    print(f"QR route for the demo's modules: {t_demo * 1e3:.2f} ms = {100 * t_demo / seconds:.3f}% of the round")
    for d, t in qr.items():
        print(f"QR route, one d={d} module (K={args.clients}, r={args.rank}): {100 * t / seconds:.3f}% of the demo round")


if __name__ == "__main__":
    main()
