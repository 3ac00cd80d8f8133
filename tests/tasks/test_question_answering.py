"""Extractive QA on a small SQuAD-style JSON file the test writes and a tiny random
BertForQuestionAnswering saved locally: windows with stride, offsets, exact match and F1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.config import build_config
from fedlora.experiment import run_experiment
from fedlora.report.rundir import read_metrics
from fedlora.tasks import build_task
from fedlora.tasks.qa import f1_score, normalize
from tests.helpers import NEGATIVE, NEUTRAL, POSITIVE, VOCAB


@pytest.fixture(scope="module")
def tiny_qa_model(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForQuestionAnswering, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-qa")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertForQuestionAnswering(cfg).save_pretrained(path)
    return path


def make_squad(n: int, seed: int = 0, context_words: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = list(rng.choice(NEUTRAL, size=context_words))
        answer = str(rng.choice(POSITIVE + NEGATIVE))
        at = int(rng.integers(0, len(words)))
        words.insert(at, answer)
        context = " ".join(words)
        start = len(" ".join(words[:at])) + (1 if at else 0)
        assert context[start : start + len(answer)] == answer
        rows.append({"id": str(i), "question": "the story was", "context": context,
                     "answers": {"text": [answer], "answer_start": [start]}})
    return rows


@pytest.fixture
def qa_cfg(tiny_qa_model, tmp_path):
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(make_squad(80)), encoding="utf-8")

    def make(**task):
        return build_config({
            "task": {"name": "question-answering", "dataset": str(data), "model": str(tiny_qa_model),
                     "max_length": 16, "doc_stride": 4, **task},
            "adapter": {"rank": 2, "alpha": 4},
            "federation": {"num_clients": 2, "rounds": 2, "local_steps": 2, "min_client_size": 5},
            "train": {"batch_size": 16, "lr": 0.1},
            "output": {"root": str(tmp_path / "runs")},
        })

    return make


def test_squad_metrics():
    assert normalize("The  Great, movie!") == "great movie"
    assert f1_score("great movie", "the great film") == pytest.approx(0.5)
    assert f1_score("", "") == 1.0 and f1_score("bad", "") == 0.0


def test_windows_point_at_the_answer_or_at_cls(qa_cfg):
    task = build_task(qa_cfg().task, 0)
    windows = task.train.extra["windows"]
    feats = windows.features
    assert len(task.train) == 72 and len(windows) > 72  # 15-token contexts in 16-token windows: overflow windows exist
    found = 0
    for ids, span, off, ex in zip(feats["input_ids"], feats["span"], feats["offsets"], feats["example"], strict=True):
        assert len(ids) <= 16
        if span[1] > 0:
            context = task.train.extra["contexts"][int(ex[0])]
            assert context[off[span[0]][0] : off[span[1]][1]] == task.train.extra["answers"][int(ex[0])][0]
            found += 1
        else:
            assert span[0] == 0
    assert found >= 72  # every training example has a window holding its answer
    assert set(windows.labels.tolist()) == {0, 1}


def test_oracle_logits_give_exact_match_one(qa_cfg):
    task = build_task(qa_cfg().task, 0)

    class Oracle(torch.nn.Module):
        def forward(self, input_ids, attention_mask, **extra):
            return torch.zeros(*input_ids.shape, 2)

    oracle = Oracle()

    def logits(model, batch):
        out = torch.full((*batch["input_ids"].shape, 2), -10.0)
        for r, (a, b) in enumerate(batch["span"].tolist()):
            out[r, a, 0], out[r, b, 1] = 10.0, 10.0
        return out

    task._logits = logits  # a model that predicts the gold span of every window
    metrics = task.evaluate(oracle, task.test, 16, torch.device("cpu"))
    assert metrics["exact_match"] == 1.0 and metrics["f1"] == 1.0
    task._logits = lambda model, batch: logits(model, batch).flip(1)  # wrong spans score lower
    assert task.evaluate(oracle, task.test, 16, torch.device("cpu"))["exact_match"] < 1.0


def test_short_dp_run_reports_exact_match_and_f1(qa_cfg):
    summary = run_experiment(qa_cfg(), progress=False)
    final = summary["final"]
    assert summary["rounds"] == 2
    # accuracy is exact match; F1 gives partial credit, so it is never below it
    assert final["accuracy"] == final["exact_match"] and 0.0 <= final["exact_match"] <= final["f1"] <= 1.0
    records = read_metrics(summary["run_dir"])
    assert [r["round"] for r in records] == [1, 2] and all({"exact_match", "f1"} <= set(r) for r in records)


def test_answers_written_as_text_in_a_csv_cell_load_like_json(qa_cfg, tmp_path):
    import pandas as pd

    rows = make_squad(80)
    csv = tmp_path / "squad.csv"
    pd.DataFrame([{**r, "answers": json.dumps(r["answers"])} for r in rows]).to_csv(csv, index=False)
    a, b = build_task(qa_cfg().task, 0), build_task(qa_cfg(dataset=str(csv)).task, 0)
    assert a.train.extra["answers"] == b.train.extra["answers"]
    spans = [t.train.extra["windows"].features["span"] for t in (a, b)]
    assert all(np.array_equal(x, y) for x, y in zip(*spans, strict=True))


def test_an_example_not_a_window_is_the_unit_of_privacy(qa_cfg, tmp_path):
    """All windows of an example land on one client, are sampled together, and removing the example
    moves the noiseless clipped sum by at most C (the whole example is one clipped contribution)."""
    from fedlora.federation.simulation import Simulation
    from fedlora.privacy.dpsgd import clip_factors, clipped_sum, sum_by_record

    data = tmp_path / "long.json"
    data.write_text(json.dumps(make_squad(40, seed=1, context_words=40)), encoding="utf-8")  # >= 3 windows each
    sim = Simulation(qa_cfg(dataset=str(data)))
    task, windows = sim.rt.task, sim.rt.task.train.extra["windows"]
    counts = [len(g) for g in task.train.features["windows"]]
    assert min(counts) >= 3 and len(task.train) == 36  # 40 examples, 10% held out; each has >= 3 windows
    owners = {}
    for spec in sim.specs:  # the partition is over examples: every window of an example on one client
        for w in np.concatenate([task.train.features["windows"][int(i)] for i in spec.indices]):
            owners.setdefault(int(windows.features["example"][w][0]), set()).add(spec.cid)
    assert all(len(c) == 1 for c in owners.values()) and len(owners) == 36
    spec = sim.specs[0]
    assert spec.expected_batch == pytest.approx(spec.sample_rate * len(spec.indices))  # q over examples
    rows = np.arange(min(6, len(spec.indices)))
    batch = task.batch(task.train, spec.indices[rows], sim.rt.device)
    assert batch["input_ids"].shape[0] == sum(counts[int(i)] for i in spec.indices[rows])  # all windows together
    names = sim.rt.adapted.names()
    rt = sim.rt
    rt.hooks.enabled = True
    try:
        losses = task.loss(rt.adapted.model, batch)
        torch.autograd.grad(losses.sum(), [rt.adapted.params[k] for k in names])
        per_window = rt.hooks.fused_grads(names)
    finally:
        rt.hooks.enabled = False
        rt.hooks.clear()
    per_example = sum_by_record(per_window, batch["record"], len(rows))
    c = 1e-3  # small: every example is clipped, the bound is tight
    full = clipped_sum(per_example, clip_factors(per_example, c))
    keep = torch.arange(1, len(rows))
    part = clipped_sum({k: g[keep] for k, g in per_example.items()}, clip_factors({k: g[keep] for k, g in per_example.items()}, c))
    moved = torch.sqrt(sum((full[k] - part[k]).pow(2).sum() for k in full))
    assert moved <= c * (1 + 1e-4)
    window_level = clipped_sum(per_window, clip_factors(per_window, c))  # what clipping windows would allow
    first = batch["record"] != 0
    without = {k: g[first] for k, g in per_window.items()}
    moved_windows = torch.sqrt(sum((window_level[k] - clipped_sum(without, clip_factors(without, c))[k]).pow(2).sum()
                                   for k in full))
    assert moved_windows > 2 * c  # per-window clipping would let one example move the sum by ~m x C


def test_spans_reach_the_device_through_the_non_blocking_copy(qa_cfg, monkeypatch):
    from fedlora.tasks import qa, text

    copied = []
    for mod in (qa, text):
        real = mod.to_device
        monkeypatch.setattr(mod, "to_device", lambda t, d, real=real: copied.append(t.shape) or real(t, d))
    task = build_task(qa_cfg().task, 0)
    windows = task.train.extra["windows"]
    batch = task.batch(windows, np.arange(3), torch.device("cpu"))
    assert "span" in batch and (3, 2) in copied
