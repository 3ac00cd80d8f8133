"""Shared fixtures: a tiny BERT built from a config, and small labelled files the tests write.

Nothing here reaches a model hub: the tiny model and its tokenizer are written to a temp
folder, and the data are synthetic sentences with a learnable label.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import VOCAB, make_sentences, tiny_tree

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def prefix_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One on-disk prefix cache for the whole suite (tasks/prefix_store.py), never the user's own:
    repeated builds of the same task load it; subprocesses inherit the variable."""
    root = tmp_path_factory.mktemp("fedlora-cache")
    os.environ["FEDLORA_CACHE_DIR"] = str(root)
    return root


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


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sentences.csv"
    make_sentences(400).to_csv(path, index=False)
    return path


@pytest.fixture
def tiny_cfg(tiny_model_dir: Path, tiny_csv: Path, tmp_path: Path):
    from fedlora.config import build_config

    def make(**sections: dict):
        return build_config(tiny_tree(tiny_model_dir, tiny_csv, tmp_path / "runs", **sections))

    return make
