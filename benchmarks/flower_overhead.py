"""Per-round time of a Flower deployment (`fedlora flower up`) against the in-process engine, same config.

The config is the tiny BERT of the tests (hidden size 16, 2 layers, synthetic sentences, built in a
temporary folder; nothing is downloaded), ``fedsa-lora``, 2 clients, 2 local DP steps, 1 thread.
The deployment runs with node workers (the default) and, with ``--without-workers``, also the way
Flower runs a ClientApp by itself (a fresh process per message that builds everything).

    python benchmarks/flower_overhead.py                      # in-process vs deployment
    python benchmarks/flower_overhead.py --without-workers    # also the deployment without node workers
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedlora.config import build_config
from fedlora.federation.simulation import Simulation

WORDS = {1: ["good", "great", "fine", "nice"], 0: ["bad", "awful", "poor", "dull"]}
FILLER = ["movie", "film", "plot", "actor", "scene", "story", "the", "a", "was", "is"]


def tiny_setup(folder: Path) -> tuple[Path, Path]:
    from transformers import BertConfig, BertModel, BertTokenizerFast  # noqa: PLC0415

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS[1], *WORDS[0], *FILLER]
    model = folder / "tiny-bert"
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(model)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(model)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        label = int(rng.integers(0, 2))
        words = [*rng.choice(FILLER, size=4), *rng.choice(WORDS[label], size=2)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i % 7}", "label": label})
    data = folder / "sentences.csv"
    pd.DataFrame(rows).to_csv(data, index=False)
    return model, data


def config(folder: Path, model: Path, data: Path, rounds: int, name: str):
    return build_config({
        "task": {"dataset": str(data), "model": str(model), "max_length": 16},
        "adapter": {"rank": 2, "alpha": 4}, "method": {"name": "fedsa-lora"},
        "federation": {"num_clients": 2, "rounds": rounds, "local_steps": 2, "min_client_size": 20},
        "privacy": {"epsilon": 3.0}, "train": {"batch_size": 16, "lr": 0.1, "threads": 1},
        "eval": {"batch_size": 64}, "output": {"root": str(folder / "runs"), "name": name},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--without-workers", action="store_true", help="also time the deployment without node workers")
    args = ap.parse_args()
    from fedlora.console import quiet_libraries  # noqa: PLC0415
    from fedlora.flower.deploy import up  # noqa: PLC0415

    quiet_libraries()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, data = tiny_setup(folder)
        rows: dict[str, tuple[float, list[float]]] = {}
        t = time.perf_counter()
        sim = Simulation(config(folder, model, data, args.rounds, "in-process"))
        setup = time.perf_counter() - t
        rows["in-process"] = (setup, [r["seconds"] for r in sim.run().metrics])
        variants = [("deployment, node workers", True)] + ([("deployment, no workers", False)] if args.without_workers else [])
        for label, workers in variants:
            t = time.perf_counter()
            run = up(config(folder, model, data, args.rounds, label.replace(", ", "-").replace(" ", "-")),
                     node_workers=workers, round_timeout=900)
            wall = time.perf_counter() - t
            seconds = [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            rows[label] = (wall - sum(seconds), seconds)
    base = statistics.median(rows["in-process"][1])
    print(f"{'engine':<28} {'start-up+stop s':>15} {'per round s':>30} {'median / in-process':>20}")
    for label, (setup, seconds) in rows.items():
        per_round = ", ".join(f"{s:.2f}" for s in seconds)
        print(f"{label:<28} {setup:>15.1f} {per_round:>30} {statistics.median(seconds) / base:>19.1f}x")


if __name__ == "__main__":
    main()
