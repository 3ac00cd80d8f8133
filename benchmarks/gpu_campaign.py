"""The GPU campaign (issue 19): correctness on cuda vs cpu, the speed targets side by side, the protocol grid.

One command, at most ~8 minutes on one H100/H200, no network, no cached weights:

    python benchmarks/gpu_assets.py --out gpu-assets                 # here, once (~48 MiB, git-ignored)
    python benchmarks/gpu_campaign.py --assets gpu-assets --out DIR  # on the GPU machine
    python benchmarks/gpu_campaign.py --smoke                        # CPU, tiny sizes, < 1 minute

Sections (each writes into DIR/campaign.json and one table of DIR/campaign.md):
  correctness  every registered method, 2 rounds, from the same seed with reproducible noise, on
               cpu (sequential engine) vs the run device (sequential, and batched where it batches):
               ||final - final_cpu|| / ||final_cpu - start|| over all global tensors <= TOLERANCE
  dp_step      DP step / non-private step on a RoBERTa-base-sized encoder (random init from a
               BertConfig: hidden 768, 12 layers, 12 heads, batch 32 x 128 tokens, LoRA r 8 on
               query/value of every layer, + head), fp32 and bf16, fedlora's fused DP step with
               secure and with seeded noise, the same step under train.compile (its compile
               warm-up timed apart, excluded from the medians), and Opacus's hook-based step when
               opacus imports
  batched      K = 16 clients in one batched pass vs one after another (clients/s, speed-up,
               uploads equal), and the model-FLOP utilisation of the batched DP pass (FLOPs counted
               by torch.utils.flop_counter over the same pass, against the device's dense bf16 peak)
  grid         the protocol (MiniLM, all 6 layers, mean pooling, LoRA r 8 on q/v of every layer,
               Rotten Tomatoes, 6 clients, Dirichlet 0.5, 40 rounds x 10 local steps, batch 64,
               C = 2, delta 1e-5, PRV, epsilon 3/1/6, the methods below, seeds 0..2), cells in
               that order until the time budget is spent
``--smoke`` runs the same code on the CPU with tiny models built from configs and tiny data in a
temporary folder (tests/test_gpu_campaign.py runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

TOLERANCE = 1e-3  # correctness: relative distance of the final global state, cuda vs cpu (fp32, no TF32)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s (SXM), what MFU is stated against
PROTOCOL_METHODS = ["dp-lora", "ffa-lora", "rolora", "la-lora", "as-lora", "fedsvd", "fedsa-lora"]
HEAD_ONLY = ("head-only", "head")  # the head-only reference, if registered under one of these names
NEEDS = {"fedsa-rslora": {"adapter.rslora": True}, "fedsa-vera": {"adapter.type": "vera"}}
POSITIVE = ["good", "great", "fine", "nice", "superb", "lovely", "fun", "bright"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "sad", "grim"]
NEUTRAL = ["movie", "film", "plot", "actor", "scene", "story", "the", "a", "was", "is", "very", "quite"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL]


# ----------------------------------------------------------------------------- environment
def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                            "threads": torch.get_num_threads()}
    try:
        import transformers  # noqa: PLC0415

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info["name"] = name
        info["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        info["fp32_matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32  # the fp32 speed rows run as set here
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        info["bf16_peak_flops"] = peak
        info["bf16_peak_note"] = (f"{peak / 1e12:.0f} TFLOP/s dense bf16 (H100 SXM; H200 the same)" if peak
                                  else "no bf16 peak known for this device: MFU not stated")
    else:
        info["name"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        info["bf16_peak_flops"] = None
        info["bf16_peak_note"] = "CPU: no bf16 peak stated, MFU not computed"
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(variants: dict[str, Any], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each variant, the variants interleaved (drift hits all alike)."""
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def no_tf32():
    """fp32 means fp32 for the correctness check (TF32 matmuls would differ from the CPU by ~1e-3)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ----------------------------------------------------------------------------- models and data
def word_tokenizer(path: Path) -> Path:
    from transformers import BertTokenizerFast  # noqa: PLC0415

    path.mkdir(parents=True, exist_ok=True)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True).save_pretrained(path)
    return path


def bert_dir(path: Path, *, hidden: int, layers: int, heads: int, intermediate: int, positions: int = 512) -> Path:
    """A randomly initialised BERT (from a config; no weights from anywhere) with the word tokenizer."""
    from transformers import BertConfig, BertModel  # noqa: PLC0415

    word_tokenizer(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=positions)
    BertModel(cfg).save_pretrained(path)
    return path


def sentences_csv(path: Path, n: int, words: int, seed: int = 0) -> Path:
    """Synthetic sentences whose label is learnable from its polar words."""
    import pandas as pd  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        polar = max(2, words // 3)
        w = list(rng.choice(NEUTRAL, size=words - polar)) + list(rng.choice(POSITIVE if label else NEGATIVE, size=polar))
        rng.shuffle(w)
        rows.append({"text": " ".join(w), "label": label})
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def minilm_fp32(assets: Path, work: Path) -> Path:
    """The carried fp16 MiniLM, restored to fp32 on local disk (fedlora trains fp32 factors on it)."""
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

    out = work / "minilm-fp32"
    AutoModel.from_pretrained(assets / "minilm", dtype=torch.float32).float().save_pretrained(out)
    AutoTokenizer.from_pretrained(assets / "minilm").save_pretrained(out)
    return out


def config(model: Path, data: Path, root: Path, overrides: dict[str, Any]):
    from fedlora.config import build_config  # noqa: PLC0415

    tree = {"task": {"dataset": str(data), "model": str(model)}, "output": {"root": str(root)}}
    return build_config(tree, overrides)


# ----------------------------------------------------------------------------- correctness
def flat(state: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].detach().double().cpu().flatten() for k in keys])


def function_space(state: dict[str, torch.Tensor], pairs: list[tuple[str, str]]) -> torch.Tensor:
    """What the model computes from the state: B A per LoRA module (blind to the sign and basis
    freedom of an SVD re-factorisation, which LAPACK and cuSOLVER may resolve differently) and
    every other tensor as it is."""
    both = [(a, b) for a, b in pairs if a in state and b in state]  # FedSA's global state has no B: A as it is
    paired = {k for pair in both for k in pair}
    parts = [(state[b].double().reshape(state[b].shape[0], -1) @ state[a].double().reshape(state[a].shape[0], -1)).flatten()
             for a, b in both]
    parts += [state[k].double().flatten() for k in sorted(state) if k not in paired]
    return torch.cat(parts)


def correctness(ctx: argparse.Namespace) -> dict[str, Any]:
    from fedlora.federation.simulation import Simulation  # noqa: PLC0415
    from fedlora.methods.lowrank import lora_modules  # noqa: PLC0415
    from fedlora.methods.registry import available_methods  # noqa: PLC0415
    from fedlora.report.runtime_pool import RuntimePool  # noqa: PLC0415

    base = {"task.max_length": 32, "task.max_train_examples": 600 if not ctx.smoke else 160,
            "task.max_test_examples": 128 if not ctx.smoke else 48, "task.cache_prefix": False,
            "adapter.rank": 4, "adapter.alpha": 8, "adapter.layers": [],
            "federation.num_clients": 3, "federation.rounds": 2, "federation.local_steps": 2,
            "federation.min_client_size": 20, "train.batch_size": 16, "train.lr": 0.1, "train.precision": "fp32",
            "privacy.reproducible_noise": True, "privacy.accountant": "rdp", "privacy.noise_multiplier": 1.0,
            "privacy.epsilon": 50.0, "eval.every": 1, "output.checkpoint_every": 1000}
    base["task.num_layers"] = None if ctx.smoke else 2  # MiniLM's first 2 layers on the GPU machine
    base["train.threads"] = 1 if ctx.smoke else None
    dev = ctx.device
    # needs-other-adapter methods last: the pools rebuild a model only when the adapter changes
    methods = sorted(available_methods(), key=lambda m: (m in NEEDS, m))
    engines = (("cpu", "cpu", 0), ("device", dev.type, 0), ("device batched", dev.type, "auto"))
    pools = {"cpu": RuntimePool(), "device": RuntimePool()}
    runs: dict[str, dict[str, Any]] = {m: {} for m in methods}
    starts: dict[str, dict[str, torch.Tensor]] = {}
    pairs: dict[str, list[tuple[str, str]]] = {}
    with no_tf32():
        for label, device, batched in engines:
            pool = pools["cpu" if label == "cpu" else "device"]
            for method in methods:
                over = {**base, "method.name": method, **NEEDS.get(method, {}),
                        "train.device": device, "federation.batched_clients": batched}
                try:
                    cfg = config(ctx.corr_model, ctx.corr_data, ctx.work / "corr", over)
                    sim = Simulation(cfg, runtime=pool.get(cfg))
                    starts.setdefault(method, {k: v.detach().cpu().clone() for k, v in sim.global_state.items()})
                    pairs.setdefault(method, [(x, y) for x, y, _ in lora_modules(sim.rt.adapted.factors)])
                    if label == "device batched" and not sim.batched_k:
                        runs[method][label] = "does not batch"
                        continue
                    res = sim.run()
                    runs[method][label] = ({k: v.detach().cpu() for k, v in res.global_state.items()},
                                           res.metrics[-1].get("accuracy"))
                except Exception as err:  # noqa: BLE001 - one method's failure is a result, not the end of the campaign
                    runs[method][label] = f"{type(err).__name__}: {err}"[:300]
                    traceback.print_exc()
    for pool in pools.values():
        pool.close()
    rows = []
    for method in methods:
        row: dict[str, Any] = {"method": method}
        got = runs[method]
        ref = got.get("cpu")
        if not isinstance(ref, tuple):
            row.update(ok=False, error=f"cpu run: {ref}")
            rows.append(row)
            continue
        keys, mp = sorted(starts[method]), pairs[method]
        moved = float((flat(ref[0], keys) - flat(starts[method], keys)).norm())
        f_ref = function_space(ref[0], mp)
        f_moved = float((f_ref - function_space(starts[method], mp)).norm())
        row["moved"], ok = moved, moved > 0
        for label in ("device", "device batched"):
            v = got.get(label)
            if isinstance(v, tuple):
                row[label] = float((flat(v[0], keys) - flat(ref[0], keys)).norm()) / max(moved, 1e-30)
                row[f"{label} (B A)"] = float((function_space(v[0], mp) - f_ref).norm()) / max(f_moved, 1e-30)
                row[f"{label} accuracy diff"] = None if v[1] is None or ref[1] is None else abs(v[1] - ref[1])
                ok = ok and min(row[label], row[f"{label} (B A)"]) <= TOLERANCE
            else:
                row[label] = v
                ok = ok and v == "does not batch"
        row["ok"] = ok
        if not ok and "error" not in row:
            row["error"] = "over tolerance or failed"
        rows.append(row)
        print(f"[correctness] {row}", flush=True)
    note = None if dev.type == "cuda" else "no CUDA device: the run device is the CPU, so 'cpu vs cpu' only checks the code path"
    return {"tolerance": TOLERANCE, "measure": "||final - final_cpu|| / ||final_cpu - start|| over all global tensors "
                                               "(and the same over B A per module + the other tensors: SVD signs may differ)",
            "rows": rows, "all_ok": all(r["ok"] for r in rows), "note": note}


# ----------------------------------------------------------------------------- DP step vs non-private step
def opacus_step(rt, rows: np.ndarray, active: list[str], dp) -> Any:
    """Opacus's hook-based per-sample gradients (GradSampleModule) + flat clip + noise, on the same model."""
    from opacus import GradSampleModule  # noqa: PLC0415

    task, model = rt.task, rt.adapted.model
    params = [rt.adapted.params[k] for k in active]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    batch = task.batch(task.train, rows, rt.device)

    def step() -> None:
        for p in params:
            p.grad, p.grad_sample = None, None
        with rt.autocast():
            losses = task.loss(gsm, batch)
        losses.sum().backward()
        per = [p.grad_sample.to(p.dtype) for p in params]
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per]).sum(0).sqrt()
        factors = (dp.clip_norm / (norms + 1e-6)).clamp(max=1.0)
        for p, g in zip(params, per, strict=True):
            s = torch.einsum("b,b...->...", factors, g)
            p.grad = (s + dp.noise_multiplier * dp.clip_norm * torch.randn_like(s)) / dp.expected_batch_size

    return gsm, step


def dp_step(ctx: argparse.Namespace) -> dict[str, Any]:
    from fedlora.federation.client import ClientSpec, local_gradients  # noqa: PLC0415
    from fedlora.federation.runtime import Runtime  # noqa: PLC0415
    from fedlora.privacy.dpsgd import DPParams  # noqa: PLC0415
    from fedlora.privacy.noise import SecureNoise, SeededNoise  # noqa: PLC0415

    size = ctx.encoder
    over = {"task.max_length": size["tokens"], "task.max_train_examples": None, "task.max_test_examples": 8,
            "task.cache_prefix": False, "adapter.rank": 8, "adapter.alpha": 16, "adapter.layers": [],
            "adapter.target_modules": ["query", "value"], "train.device": ctx.device.type,
            "train.threads": 1 if ctx.smoke else None}
    cfgs = {p: config(ctx.encoder_dir, ctx.encoder_data, ctx.work / "dp", {**over, "train.precision": p})
            for p in ctx.precisions}
    compiled_cfgs = {p: config(ctx.encoder_dir, ctx.encoder_data, ctx.work / "dp",
                               {**over, "train.precision": p, "train.compile": True}) for p in ctx.precisions}
    rt = Runtime(cfgs[ctx.precisions[0]])
    n, batch = len(rt.task.train), size["batch"]
    rows = np.random.default_rng(0).choice(n, size=batch, replace=False)
    widths = {len(rt.task.train.features["input_ids"][int(i)]) for i in rows}
    active = sorted(rt.adapted.params)
    rt.adapted.set_active(set(active))
    rt.adapted.model.train()
    dp = DPParams(1.0, 2.0, float(batch))
    plain = ClientSpec(0, np.arange(n), batch / n, None, 1)
    private = ClientSpec(0, np.arange(n), batch / n, dp, 1)
    secure, seeded = SecureNoise(), SeededNoise(torch.Generator().manual_seed(0))
    out: dict[str, Any] = {"model": f"BERT-style encoder, random init: hidden {size['hidden']}, {size['layers']} layers, "
                                    f"{size['heads']} heads; LoRA r 8 on query/value of every layer + head",
                           "batch": batch, "tokens": sorted(widths),
                           "trainable_values": sum(p.numel() for p in rt.adapted.params.values()), "rows": [],
                           "compile": {"what": "train.compile: the per-example gradient einsums and the clip + weighted "
                                               "sum (privacy/compiled.py); forward, backward and noise stay eager",
                                       "warmup_s": {}, "fell_back": {}}}
    for precision in ctx.precisions:
        rt.cfg = cfgs[precision]  # the autocast context follows train.precision

        def compiled(precision=precision):  # the same step under train.compile (rt.kernels follows rt.cfg)
            rt.cfg = compiled_cfgs[precision]
            try:
                return local_gradients(rt, private, rows, active, secure)
            finally:
                rt.cfg = cfgs[precision]

        sync(ctx.device)
        t = time.perf_counter()
        compiled()  # the compile warm-up: timed here, excluded from the interleaved medians
        sync(ctx.device)
        out["compile"]["warmup_s"][precision] = time.perf_counter() - t
        variants = {
            "non-private": lambda: local_gradients(rt, plain, rows, active, secure),
            "dp fused, secure noise": lambda: local_gradients(rt, private, rows, active, secure),
            "dp fused, seeded noise": lambda: local_gradients(rt, private, rows, active, seeded),
            "dp fused, compiled, secure noise": compiled,
        }
        gsm = None
        try:
            gsm, step = opacus_step(rt, rows, active, dp)
            variants["opacus hooks (GradSampleModule)"] = step
            opacus_note = None
        except ImportError:
            opacus_note = "opacus is not importable here: carry its wheel (benchmarks/gpu_assets.py)"
        except Exception as err:  # noqa: BLE001
            opacus_note = f"opacus failed: {type(err).__name__}: {err}"[:200]
        try:
            times = interleaved(variants, ctx.repeats, ctx.device)
        except Exception as err:  # noqa: BLE001
            if gsm is None:
                raise
            opacus_note = f"opacus step failed: {type(err).__name__}: {err}"[:200]
            variants.pop("opacus hooks (GradSampleModule)")
            times = interleaved(variants, ctx.repeats, ctx.device)
        finally:
            if gsm is not None:
                gsm._close()
                for p in rt.adapted.params.values():
                    p.grad = None
                    if hasattr(p, "grad_sample"):
                        del p.grad_sample
        base = times["non-private"]
        for k, t in times.items():
            out["rows"].append({"precision": precision, "variant": k, "ms": 1000 * t, "ratio": t / base})
        out["compile"]["speedup"] = {**out["compile"].get("speedup", {}),
                                     precision: times["dp fused, secure noise"] / times["dp fused, compiled, secure noise"]}
        rt.cfg = compiled_cfgs[precision]
        out["compile"]["fell_back"].update(rt.kernels.failed if rt.kernels is not None else {})
        rt.cfg = cfgs[precision]
        if opacus_note:
            out["rows"].append({"precision": precision, "variant": "opacus hooks", "note": opacus_note})
        print(f"[dp_step] {precision}: " + ", ".join(f"{k} {1000 * t:.1f} ms" for k, t in times.items()), flush=True)
    out["target"] = "dp fused / non-private <= 1.15"
    return out


# ----------------------------------------------------------------------------- batched vs sequential
def batched(ctx: argparse.Namespace) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    from fedlora.federation.batched import run_batched  # noqa: PLC0415
    from fedlora.federation.client import run_client  # noqa: PLC0415
    from fedlora.federation.simulation import Simulation  # noqa: PLC0415

    k = ctx.clients
    out: dict[str, Any] = {"clients": k, "rows": []}
    for precision in ctx.precisions:
        over = {**ctx.protocol_model, "task.max_train_examples": k * ctx.rows_per_client, "task.max_test_examples": 8,
                "method.name": "dp-lora", "federation.num_clients": k, "federation.partition": "iid",
                "federation.local_steps": ctx.batched_steps, "federation.batched_clients": k,
                "train.batch_size": ctx.batch, "train.precision": precision, "train.device": ctx.device.type,
                "privacy.accountant": "rdp", "privacy.noise_multiplier": 1.0, "privacy.epsilon": 1000.0,
                "privacy.reproducible_noise": True}
        sim = Simulation(config(ctx.protocol_dir, ctx.protocol_data, ctx.work / "batched", over))
        plan = sim.method.plan(sim.plan_context(1))
        download = {name: sim.global_state[name] for name in plan.download}
        steps, seed = sim.cfg.federation.local_steps, sim.cfg.train.seed

        def sequential(sim=sim, plan=plan, download=download, steps=steps, seed=seed):
            return [run_client(sim.rt, sim.method, plan, download, spec, copy.deepcopy(st), local_steps=steps, seed=seed)
                    for spec, st in zip(sim.specs, sim.clients, strict=True)]

        def one_pass(sim=sim, plan=plan, download=download, steps=steps, seed=seed):
            return run_batched(sim.rt, sim.method, plan, download, sim.specs, copy.deepcopy(sim.clients),
                               local_steps=steps, seed=seed)

        seq, bat = sequential(), one_pass()
        worst = max(float((b.upload[n] - s.upload[n]).norm() / (s.upload[n].norm() + 1e-30))
                    for s, b in zip(seq, bat, strict=True) for n in s.upload)
        times = interleaved({"sequential": sequential, f"batched K={k}": one_pass}, ctx.repeats_batched, ctx.device)
        with FlopCounterMode(display=False) as counter:
            one_pass()
        flops = counter.get_total_flops()
        t_seq, t_bat = times["sequential"], times[f"batched K={k}"]
        peak = ctx.info.get("bf16_peak_flops")
        rows = sum(r.examples for r in seq)
        row = {"precision": precision, "steps": steps, "expected_batch": ctx.batch, "rows_per_round": rows,
               "sequential_s": t_seq, "batched_s": t_bat, "sequential_clients_per_s": k / t_seq,
               "batched_clients_per_s": k / t_bat, "speedup": t_seq / t_bat, "uploads_max_rel_diff": worst,
               "batched_flops": flops, "batched_tflops_per_s": flops / t_bat / 1e12,
               "mfu_vs_bf16_peak": (flops / t_bat / peak) if peak else None}
        out["rows"].append(row)
        print(f"[batched] {row}", flush=True)
    out["targets"] = "batched K=16 >= 10x sequential; MFU of the batched DP pass >= 35% of the bf16 peak"
    return out


# ----------------------------------------------------------------------------- the protocol grid
def grid(ctx: argparse.Namespace, deadline: float) -> dict[str, Any]:
    import yaml  # noqa: PLC0415

    from fedlora.methods.registry import available_methods  # noqa: PLC0415
    from fedlora.report.cells import run_cell  # noqa: PLC0415
    from fedlora.report.compare import plan_grid  # noqa: PLC0415
    from fedlora.report.runtime_pool import RuntimePool  # noqa: PLC0415

    known = available_methods()
    head_only = [m for m in HEAD_ONLY if m in known] or sorted(m for m in known if "head" in m)
    methods = [m for m in ctx.grid_methods if m in known] + head_only[:1]
    tree = {"task": {"name": "text-classification", "dataset": str(ctx.protocol_data), "model": str(ctx.protocol_dir)}}
    path = ctx.work / "protocol.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    over = {**ctx.protocol_model, **ctx.grid_overrides, "train.device": ctx.device.type}
    g = plan_grid(path, methods=",".join(methods), epsilons=",".join(str(e) for e in ctx.epsilons), seeds=ctx.seeds,
                  overrides=over, out=str(ctx.work / "grid"), name="protocol", no_dp_reference=True)
    g.root.mkdir(parents=True, exist_ok=True)
    order = {e: i for i, e in enumerate(ctx.epsilons)}
    cells = sorted(g.cells, key=lambda c: (c[0].seed, order.get(c[0].epsilon, 99), methods.index(c[0].method)))
    pool, rows, last = RuntimePool(), [], 0.0
    skipped = 0
    for cell, cfg in cells:
        if time.perf_counter() + 1.2 * last > deadline:
            skipped += 1
            continue
        t = time.perf_counter()
        try:
            s = run_cell(cfg, pool)
            row = {"method": cell.method, "epsilon": cell.epsilon, "seed": cell.seed,
                   "accuracy": s["final"].get("accuracy"), "epsilon_spent": max((r.get("epsilon") or 0.0) for r in s["privacy"]),
                   "majority": s.get("majority_rate"), "train_s": s["seconds"]["train"], "total_s": s["seconds"]["total"]}
        except Exception as err:  # noqa: BLE001
            row = {"method": cell.method, "epsilon": cell.epsilon, "seed": cell.seed, "error": f"{type(err).__name__}: {err}"[:300]}
            traceback.print_exc()
        last = time.perf_counter() - t
        rows.append(row)
        print(f"[grid] {row}", flush=True)
    pool.close()
    return {"protocol": over, "methods": methods, "epsilons": ctx.epsilons, "seeds": ctx.seeds,
            "cells_run": len(rows), "cells_skipped_for_time": skipped, "rows": rows,
            "target": "<= 10 s per run (40 rounds x 10 local steps x 6 clients)"}


# ----------------------------------------------------------------------------- report
def markdown(result: dict[str, Any]) -> str:
    info = result["environment"]
    lines = [f"# GPU campaign: {info['name']} ({info['device']})", "",
             f"torch {info['torch']}, transformers {info.get('transformers')}, python {info['python']}; "
             f"{info['bf16_peak_note']}; wall {result['wall_s']:.0f} s" + (" (--smoke: tiny sizes on the CPU)" if result["smoke"] else ""), ""]
    c = result.get("correctness")
    if c:
        lines += ["## Correctness: run device vs cpu, same seed, reproducible noise, 2 rounds", "",
                  f"measure: {c['measure']}; tolerance {c['tolerance']:g}" + (f"; {c['note']}" if c.get("note") else ""), "",
                  "| method | device vs cpu | (B A) | device batched vs cpu | (B A) | ok |", "|---|---|---|---|---|---|"]

        def cell(v: Any) -> str:
            return f"{v:.2e}" if isinstance(v, float) else str(v if v is not None else "-")

        for r in c["rows"]:
            lines.append(f"| {r['method']} | {cell(r.get('device'))} | {cell(r.get('device (B A)'))} | "
                         f"{cell(r.get('device batched'))} | {cell(r.get('device batched (B A)'))} | "
                         f"{'yes' if r['ok'] else 'NO ' + r.get('error', '')} |")
        lines.append("")
    d = result.get("dp_step")
    if d:
        lines += [f"## DP step vs non-private step ({d['model']}; batch {d['batch']} x {d['tokens']} tokens; "
                  f"{d['trainable_values']:,} trainable values); target {d['target']}", "",
                  "| precision | variant | ms / step | ratio to non-private |", "|---|---|---|---|"]
        for r in d["rows"]:
            if "note" in r:
                lines.append(f"| {r['precision']} | {r['variant']} | {r['note']} | |")
            else:
                lines.append(f"| {r['precision']} | {r['variant']} | {r['ms']:.1f} | {r['ratio']:.3f} |")
        comp = d.get("compile")
        if comp:
            fell = "; ".join(f"{k}: {v}" for k, v in comp["fell_back"].items()) or "none"
            lines += ["", f"{comp['what']}. Eager / compiled DP step: "
                      + ", ".join(f"{p} {x:.3f}x" for p, x in comp.get("speedup", {}).items())
                      + "; compile warm-up (first compiled step, excluded from the medians): "
                      + ", ".join(f"{p} {x:.1f} s" for p, x in comp["warmup_s"].items())
                      + f"; fell back to eager: {fell}"]
        lines.append("")
    b = result.get("batched")
    if b:
        lines += [f"## Batched vs sequential, {b['clients']} clients, DP; targets: {b['targets']}", "",
                  "| precision | steps | sequential clients/s | batched clients/s | speed-up | TFLOP/s batched | MFU (bf16 peak) | uploads rel. diff |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            mfu = f"{100 * r['mfu_vs_bf16_peak']:.1f}%" if r["mfu_vs_bf16_peak"] is not None else "-"
            lines.append(f"| {r['precision']} | {r['steps']} | {r['sequential_clients_per_s']:.2f} | {r['batched_clients_per_s']:.2f} | "
                         f"{r['speedup']:.2f}x | {r['batched_tflops_per_s']:.2f} | {mfu} | {r['uploads_max_rel_diff']:.1e} |")
        lines.append("")
    gr = result.get("grid")
    if gr:
        lines += [f"## Protocol grid: {gr['cells_run']} cells run, {gr['cells_skipped_for_time']} left for time; target {gr['target']}", "",
                  "| method | epsilon | seed | accuracy | epsilon spent | majority | train s | total s |", "|---|---|---|---|---|---|---|---|"]
        for r in gr["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['epsilon']:g} | {r['seed']} | {r['error']} | | | | |")
            else:
                lines.append(f"| {r['method']} | {r['epsilon']:g} | {r['seed']} | {r['accuracy']:.3f} | {r['epsilon_spent']:.2f} | "
                             f"{r['majority']:.3f} | {r['train_s']:.1f} | {r['total_s']:.1f} |")
        lines.append("")
    for name, err in result.get("errors", {}).items():
        lines.append(f"**{name} failed:** {err}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def setup(args: argparse.Namespace, work: Path) -> argparse.Namespace:
    from fedlora.federation.runtime import pick_device  # noqa: PLC0415

    ctx = argparse.Namespace(smoke=args.smoke, work=work)
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: threads only spin against each other on a shared CPU
    ctx.device = torch.device("cpu") if args.smoke else pick_device(args.device)
    ctx.info = device_info(ctx.device)
    ctx.precisions = ["fp32", "bf16"]
    # protocol: MiniLM, all 6 layers, mean pooling, LoRA r8 on q/v of every layer (adapter.layers [] = all)
    ctx.protocol_model = {"task.num_layers": 6, "task.pooling": "mean", "task.max_length": 48, "task.cache_prefix": False,
                          "adapter.rank": 8, "adapter.alpha": 16, "adapter.target_modules": ["query", "value"],
                          "adapter.layers": [], "train.threads": None}
    ctx.grid_overrides = {"federation.num_clients": 6, "federation.clients_per_round": 1.0, "federation.partition": "dirichlet",
                          "federation.dirichlet_alpha": 0.5, "federation.rounds": 40, "federation.local_steps": 10,
                          "federation.batched_clients": "auto", "train.batch_size": 64, "train.optimizer": "sgd",
                          "train.lr": 0.15, "train.momentum": 0.0, "train.precision": args.grid_precision,
                          "privacy.clip_norm": 2.0, "privacy.delta": 1e-5, "privacy.accountant": "prv",
                          "task.max_test_examples": 1000, "eval.every": 40, "output.checkpoint_every": 1000}
    ctx.epsilons, ctx.seeds, ctx.grid_methods = [3.0, 1.0, 6.0], 3, list(PROTOCOL_METHODS)
    ctx.clients, ctx.batch, ctx.batched_steps, ctx.rows_per_client = 16, 64, 3, 640
    ctx.repeats, ctx.repeats_batched = 10, 3
    ctx.encoder = {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072, "tokens": 128, "batch": 32}
    if args.assets is None and not args.smoke:
        raise SystemExit("--assets DIR is needed (prepare it with benchmarks/gpu_assets.py); or run --smoke")
    if args.assets is not None:  # MiniLM and Rotten Tomatoes from the carried folder (--smoke too: checks it)
        assets = Path(args.assets)
        ctx.protocol_dir, ctx.protocol_data = minilm_fp32(assets, work), assets / "rotten_tomatoes.csv"
        ctx.corr_model, ctx.corr_data = ctx.protocol_dir, ctx.protocol_data
    if args.smoke:  # the same code at tiny sizes, on the CPU, from files written here
        tiny = bert_dir(work / "tiny-bert", hidden=16, layers=2, heads=2, intermediate=32, positions=64)
        ctx.corr_model, ctx.corr_data = tiny, sentences_csv(work / "corr.csv", 240, 6)
        ctx.encoder = {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "tokens": 24, "batch": 8}
        if args.assets is None:
            ctx.protocol_dir, ctx.protocol_data = tiny, sentences_csv(work / "protocol.csv", 480, 6, seed=1)
        ctx.protocol_model = {**ctx.protocol_model, "task.num_layers": 2, "task.max_length": 16, "train.threads": 1}
        ctx.grid_overrides.update({"federation.rounds": 2, "federation.local_steps": 2, "train.batch_size": 16,
                                   "privacy.accountant": "rdp", "task.max_train_examples": 480,
                                   "task.max_test_examples": 64, "eval.every": 2})
        ctx.epsilons, ctx.seeds, ctx.grid_methods = [3.0], 1, ["dp-lora", "fedsa-lora"]
        ctx.clients, ctx.batch, ctx.batched_steps, ctx.rows_per_client = 4, 8, 2, 24
        ctx.repeats, ctx.repeats_batched = 2, 1
    e = ctx.encoder
    ctx.encoder_dir = bert_dir(work / "encoder", hidden=e["hidden"], layers=e["layers"], heads=e["heads"],
                               intermediate=e["intermediate"], positions=max(64, e["tokens"] + 8))
    ctx.encoder_data = sentences_csv(work / "long.csv", 4 * e["batch"], e["tokens"] + 8, seed=2)  # every row fills max_length
    return ctx


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for campaign.json and campaign.md (default: a temporary folder with --smoke)")
    ap.add_argument("--assets", help="the folder benchmarks/gpu_assets.py wrote (MiniLM fp16, Rotten Tomatoes, wheels)")
    ap.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny sizes (< 1 minute)")
    ap.add_argument("--device", default="auto", help="train.device of the runs (auto: cuda when available)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget; the grid stops taking cells at it")
    ap.add_argument("--grid-precision", default="bf16", choices=["fp32", "bf16"], help="train.precision of the protocol grid")
    ap.add_argument("--only", default="correctness,dp_step,batched,grid", help="comma-separated sections to run")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="gpu-campaign-") as tmp:
        work = Path(tmp)
        out = Path(args.out) if args.out else work / "out"
        out.mkdir(parents=True, exist_ok=True)
        ctx = setup(args, work)
        print(f"[campaign] {ctx.info}", flush=True)
        result: dict[str, Any] = {"environment": ctx.info, "smoke": args.smoke, "errors": {}, "seconds": {}}
        for name, fn in (("correctness", correctness), ("dp_step", dp_step), ("batched", batched),
                         ("grid", lambda c: grid(c, deadline))):
            if name not in sections:
                continue
            t = time.perf_counter()
            try:
                result[name] = fn(ctx)
            except Exception as err:  # noqa: BLE001 - keep the other sections' figures
                result["errors"][name] = f"{type(err).__name__}: {err}"[:500]
                traceback.print_exc()
            result["seconds"][name] = time.perf_counter() - t
            result["wall_s"] = time.perf_counter() - t0
            (out / "campaign.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
        result["wall_s"] = time.perf_counter() - t0
        (out / "campaign.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
        md = markdown(result)
        (out / "campaign.md").write_text(md, encoding="utf-8")
        print(md, flush=True)
        print(f"[campaign] {result['wall_s']:.1f} s; written to {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
