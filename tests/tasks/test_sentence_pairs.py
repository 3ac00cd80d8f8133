"""Sentence pairs (GLUE QNLI style): both texts reach the encoder, with segment ids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedlora.config import build_config
from fedlora.errors import DataError
from fedlora.experiment import run_experiment
from fedlora.tasks import build_task
from tests.helpers import NEGATIVE, NEUTRAL, POSITIVE, check_short_run, tiny_tree


def make_pairs(n: int, seed: int = 0) -> pd.DataFrame:
    """QNLI-like: the label says whether the sentence repeats the question's key word."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        key = str(rng.choice(POSITIVE + NEGATIVE))
        label = int(rng.integers(0, 2))
        other = str(rng.choice([w for w in POSITIVE + NEGATIVE if w != key]))
        question = f"{rng.choice(NEUTRAL)} {key} {rng.choice(NEUTRAL)} {rng.choice(NEUTRAL)}"
        sentence = f"{rng.choice(NEUTRAL)} {key if label else other} {rng.choice(NEUTRAL)}"
        rows.append({"question": question, "sentence": sentence,
                     "label": "entailment" if label else "not_entailment"})
    return pd.DataFrame(rows)


@pytest.fixture
def pair_cfg(tiny_model_dir, tmp_path):
    path = tmp_path / "qnli.csv"
    make_pairs(300).to_csv(path, index=False)

    def make(**task):
        tree = tiny_tree(tiny_model_dir, path, tmp_path / "runs",
                         task={"text_column": "question", "text_pair_column": "sentence", **task})
        return build_config(tree)

    return make


def test_pairs_are_encoded_as_two_segments(pair_cfg):
    cfg = pair_cfg()
    task = build_task(cfg.task, 0)
    assert task.label_names == ["entailment", "not_entailment"]
    frame = make_pairs(300)
    ids, types = task.train.features["input_ids"][0], task.train.features["token_type_ids"][0]
    assert list(ids).count(task.tokenizer.sep_token_id) == 2  # [CLS] question [SEP] sentence [SEP]
    first = task.tokenizer.decode([t for t, s in zip(ids, types, strict=True) if s == 0], skip_special_tokens=True)
    second = task.tokenizer.decode([t for t, s in zip(ids, types, strict=True) if s == 1], skip_special_tokens=True)
    match = frame[(frame["question"] == first) & (frame["sentence"] == second)]
    assert not match.empty  # the two segments are one row's question and sentence, in order
    batch = task.batch(task.train, np.arange(4), torch.device("cpu"))
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert int(batch["token_type_ids"].max()) == 1


def test_single_text_has_no_segment_ids(pair_cfg):
    task = build_task(pair_cfg(text_pair_column=None).task, 0)
    assert "token_type_ids" not in task.train.features


def test_missing_pair_column_is_a_data_error(pair_cfg):
    with pytest.raises(DataError, match="text column 'premise'"):
        build_task(pair_cfg(text_pair_column="premise").task, 0)


def test_a_short_run_on_pairs(pair_cfg, tmp_path):
    cfg = pair_cfg()
    summary = run_experiment(cfg, progress=False)
    check_short_run(summary, rounds=2, n_test=len(build_task(cfg.task, 0).test), target_epsilon=cfg.privacy.epsilon)
