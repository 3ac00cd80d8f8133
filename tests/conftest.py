"""Shared fixtures: a tiny BERT built from a config, and small labelled files the tests write.

Nothing here reaches a model hub: the tiny model and its tokenizer are written to a temp
folder, and the data are synthetic sentences with a learnable label.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

POSITIVE = ["good", "great", "fine", "nice", "superb", "lovely", "fun", "bright"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "sad", "grim"]
NEUTRAL = ["movie", "film", "plot", "actor", "scene", "story", "the", "a", "was", "is", "very", "quite"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(path)
    return path


def make_sentences(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(rng.integers(0, 2))
        words = list(rng.choice(NEUTRAL, size=4)) + list(rng.choice(POSITIVE if label else NEGATIVE, size=2))
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i % 7}", "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sentences.csv"
    make_sentences(400).to_csv(path, index=False)
    return path


def tiny_tree(model_dir: Path, data: Path, run_root: Path, **sections: dict) -> dict:
    """A config tree for a fast run on the tiny model; sections update the defaults."""
    tree = {
        "task": {"dataset": str(data), "model": str(model_dir), "max_length": 16},
        "adapter": {"rank": 2, "alpha": 4},
        "federation": {"num_clients": 3, "rounds": 2, "local_steps": 2, "min_client_size": 20},
        "privacy": {"epsilon": 3.0, "reproducible_noise": True},  # bit-identical tests; secure noise is tested on its own
        "train": {"batch_size": 16, "lr": 0.1},
        "eval": {"batch_size": 64},
        "output": {"root": str(run_root)},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


@pytest.fixture
def tiny_cfg(tiny_model_dir: Path, tiny_csv: Path, tmp_path: Path):
    from fedlora.config import build_config

    def make(**sections: dict):
        return build_config(tiny_tree(tiny_model_dir, tiny_csv, tmp_path / "runs", **sections))

    return make
