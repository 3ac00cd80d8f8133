"""Peak memory of a DP step against a non-private step on a small random decoder, side by side.

Each (architecture, vocabulary, sequence length, step) is measured in a fresh process: the model
is built (random weights from a transformers config, nothing downloaded), LoRA is injected
through PEFT (``adapter.target_modules=[auto]``: GPT-2's ``c_attn``, Llama's ``q_proj``/``v_proj``),
the peak resident set size is reset (``/proc/self/clear_refs``), and one step runs:
``federation.client.local_gradients``, the engine's own step, with the causal-lm task's loss
(response tokens only: the first quarter of each sequence is the prompt). The figure is the
peak RSS during the step minus the RSS before it. On a CUDA device the same is read from
``torch.cuda.max_memory_allocated``.

    python benchmarks/causal_lm_memory.py                      # GPT-2- and Llama-style, 4 x 64..512 tokens
    python benchmarks/causal_lm_memory.py --lengths 128,1024 --batch 2 --arch llama
    python benchmarks/causal_lm_memory.py --arch llama --vocab 2048 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from types import SimpleNamespace

ARCHS = {  # small decoders of the two layer types (Conv1D projections; nn.Linear projections)
    "gpt2": {"hidden": 384, "layers": 4, "heads": 6, "vocab": 50257},
    "llama": {"hidden": 384, "layers": 4, "heads": 6, "vocab": 32000},
}


def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def build(arch: str, vocab: int, length: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    a = ARCHS[arch]
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=a["hidden"], n_layer=a["layers"], n_head=a["heads"],
                                          n_positions=max(length, 64)))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=a["hidden"], intermediate_size=4 * a["hidden"],
                                        num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
                                        num_key_value_heads=a["heads"], max_position_embeddings=max(length, 64)))


def child(arch: str, vocab: int, length: int, batch: int, mode: str, rank: int, device: str, targets: str) -> dict:
    import numpy as np
    import torch

    from fedlora.adapters import inject_adapters
    from fedlora.config import AdapterConfig
    from fedlora.federation.client import ClientSpec, local_gradients
    from fedlora.privacy.dpsgd import DPParams, PerSampleGradients
    from fedlora.privacy.noise import noise_stream
    from fedlora.tasks.causal_lm import IGNORE, CausalLMTask

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build(arch, vocab, length)
    adapted = inject_adapters(model, AdapterConfig(rank=rank, alpha=2 * rank, target_modules=targets.split(","), train_head=False), 0)
    adapted.model.to(dev)
    ids = torch.randint(0, vocab, (batch, length), device=dev)
    labels = torch.full_like(ids, IGNORE)
    start = length // 4  # the prompt: no loss
    labels[:, start - 1 : -1] = ids[:, start:]
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    task = CausalLMTask.__new__(CausalLMTask)  # the task's loss on a prepared batch (no tokenizer, no files)
    task.batch = lambda examples, indices, device: data
    task.train = None
    rt = SimpleNamespace(adapted=adapted, task=task, device=dev, autocast=contextlib.nullcontext,
                         hooks=PerSampleGradients(adapted.params, adapted.model))
    dp = DPParams(1.0, 1.0, float(batch)) if mode == "dp" else None
    spec = ClientSpec(0, np.arange(batch), 1.0, dp, 1)
    active = sorted(adapted.params)
    rows = np.arange(batch)
    noise = noise_stream(True, 0, "bench", device=dev)
    if dev.type == "cuda":
        local_gradients(rt, spec, rows, active, noise)  # warm-up (kernels, workspace); the peak is then the step's
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        local_gradients(rt, spec, rows, active, noise)
        torch.cuda.synchronize()
        seconds, peak = time.perf_counter() - t, torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _status_kib("VmRSS")
        t = time.perf_counter()
        local_gradients(rt, spec, rows, active, noise)
        seconds, peak = time.perf_counter() - t, (_status_kib("VmHWM") - base) * 1024
    params = sum(p.numel() for p in adapted.model.parameters())
    trainable = sum(p.numel() for p in adapted.params.values())
    return {"arch": arch, "vocab": vocab, "length": length, "batch": batch, "mode": mode, "peak_mib": peak / 2**20,
            "seconds": seconds, "parameters": params, "trainable": trainable}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="gpt2,llama")
    ap.add_argument("--lengths", default="64,128,256,512")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=None, help="override the architecture's vocabulary size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--targets", default="auto", help="adapter.target_modules, comma-separated (auto: PEFT's list)")
    ap.add_argument("--child", nargs=5, metavar=("ARCH", "VOCAB", "LENGTH", "BATCH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        arch, vocab, length, batch, mode = args.child
        print(json.dumps(child(arch, int(vocab), int(length), int(batch), mode, args.rank, args.device, args.targets)))
        return
    print(f"batch {args.batch}, LoRA rank {args.rank} on [{args.targets}], fp32, device {args.device}, one thread; "
          "peak memory of one step above the memory before it")
    print(f"{'arch':6s} {'vocab':>6s} {'tokens':>6s} {'non-private MiB':>16s} {'dp MiB':>9s} {'ratio':>6s} "
          f"{'dp extra KiB/token':>19s} {'np s':>6s} {'dp s':>6s}")
    for arch in args.arch.split(","):
        vocab = args.vocab or ARCHS[arch]["vocab"]
        for length in (int(x) for x in args.lengths.split(",")):
            res = {}
            for mode in ("plain", "dp"):
                cmd = [sys.executable, __file__, "--rank", str(args.rank), "--device", args.device, "--targets", args.targets,
                       "--child", arch, str(vocab), str(length), str(args.batch), mode]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                res[mode] = json.loads(out.strip().splitlines()[-1])
            p, d = res["plain"], res["dp"]
            extra = (d["peak_mib"] - p["peak_mib"]) * 1024 / (args.batch * length)
            print(f"{arch:6s} {vocab:6d} {length:6d} {p['peak_mib']:16.1f} {d['peak_mib']:9.1f} "
                  f"{d['peak_mib'] / p['peak_mib']:6.3f} {extra:19.2f} {p['seconds']:6.2f} {d['seconds']:6.2f}")
        print(f"       ({arch}: {p['parameters'] / 1e6:.1f}M parameters, {p['trainable']} trainable)")


if __name__ == "__main__":
    main()
