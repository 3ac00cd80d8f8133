"""The one-run audit end to end: canaries in one client, membership scores, the epsilon lower bound.

A model and data where memorisation is easy (so that without noise the audit must fail): a tiny
BERT with hidden size 64 and 400 made-up whole words, 8 classes (random canary labels collide
with a confident prediction only 1 time in 8), 2 clients, full-batch-ish Adam, many local
steps, a clip norm that never binds.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedlora.audit.canaries import (
    best_guess_bound,
    claimed_epsilon,
    concat_examples,
    make_canaries,
    refuse_unreleased,
    run_audit,
)
from fedlora.cli import app
from fedlora.config import build_config
from fedlora.errors import ConfigError
from fedlora.federation.simulation import Simulation
from fedlora.tasks import build_task
from tests.helpers import VOCAB, tiny_tree

WORDS = ["".join(t) for t in itertools.product("bdfgklmnprstvz", "aeiou", "bdgkmnprst")][:400]


@pytest.fixture(scope="module")
def audit_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("audit-bert")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB + WORDS)}, do_lower_case=True).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(VOCAB) + len(WORDS), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=64)).save_pretrained(path)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(200):  # class y: 3 of its 5 words and 3 common words
        y = int(rng.integers(0, 8))
        words = [*rng.choice(WORDS[5 * y : 5 * y + 5], 3), *rng.choice(VOCAB[5:], 3)]
        rows.append({"text": " ".join(words), "label": y})
    data = path / "eight.csv"
    pd.DataFrame(rows).to_csv(data, index=False)
    return path, data


def _tree(audit_files, tmp_path, **sections) -> dict:
    model, data = audit_files
    tree = tiny_tree(model, data, tmp_path / "runs",
                     task={"max_train_examples": 60, "test_fraction": 0.2},
                     adapter={"rank": 8, "alpha": 16},
                     federation={"num_clients": 2, "rounds": 2, "local_steps": 100, "partition": "iid", "min_client_size": 1},
                     privacy={"epsilon": 1.0, "clip_norm": 100.0, "max_sample_rate": 1.0, "accountant": "rdp"},
                     train={"batch_size": 40, "optimizer": "adam", "lr": 0.01, "threads": 1})
    for name, values in sections.items():
        tree[name].update(values)
    return tree


def test_canaries_are_seeded_random_sentences_with_random_labels(audit_files, tmp_path):
    task = build_task(build_config(_tree(audit_files, tmp_path)).task, 0)
    a, b = make_canaries(task, 50, seed=0), make_canaries(task, 50, seed=0)
    assert a.extra["sentences"] == b.extra["sentences"] and (a.labels == b.labels).all()
    assert len(set(a.extra["sentences"])) == 50 and set(a.labels.tolist()) <= set(range(8)) and len(set(a.labels)) > 3
    assert make_canaries(task, 50, seed=1).extra["sentences"] != a.extra["sentences"]
    joined = concat_examples(task.train, a)
    assert len(joined) == len(task.train) + 50 and (joined.labels[-50:] == a.labels).all()


def test_extra_rows_go_to_one_client_and_held_out_rows_to_none(audit_files, tmp_path):
    cfg = build_config(_tree(audit_files, tmp_path, federation={"num_clients": 3}))
    plain = Simulation(cfg)
    extra, held = np.array([3, 7, 11]), np.array([5, 9])
    sim = Simulation(cfg, runtime=plain.rt, extra_rows={1: extra}, held_out_rows=held)
    assert set(extra) <= set(sim.parts[1]) and not set(extra) & set(np.concatenate([sim.parts[0], sim.parts[2]]))
    assert not set(held) & set(np.concatenate(sim.parts))
    assert sum(map(len, sim.parts)) == sum(map(len, plain.parts)) - len(held)
    assert len(sim.specs[1].indices) == len(sim.parts[1])  # canaries count in the client's n (and q)


def test_guesses_pick_the_best_split_with_a_bonferroni_correction():
    included = np.array([True] * 50 + [False] * 50)
    perfect = best_guess_bound(np.where(included, 1.0, -1.0) + np.linspace(0, 0.1, 100), included, 0.95)
    assert perfect["guesses"] == 100 and perfect["correct"] == 100
    assert perfect["per_test_confidence"] > 0.99 and 2.5 < perfect["epsilon_lower_bound"] < 3.49
    assert best_guess_bound(np.random.default_rng(0).normal(size=100), included, 0.95)["epsilon_lower_bound"] == 0.0


@pytest.mark.slow
def test_with_dp_the_lower_bound_stays_below_the_claimed_epsilon(audit_files, tmp_path):
    cfg = build_config(_tree(audit_files, tmp_path, output={"name": "audit-dp"}))
    audit = run_audit(cfg, canaries=200)
    assert 0.99 < audit["claimed_epsilon"] <= 1.0
    assert audit["epsilon_lower_bound"] < audit["claimed_epsilon"]
    saved = json.loads((tmp_path / "runs" / "audit-dp" / "audit.json").read_text())
    assert saved["epsilon_lower_bound"] == audit["epsilon_lower_bound"] and saved["canaries"] == 200
    assert "consistent" in audit["line"] and not saved["noise_disabled_for_tests"]


@pytest.mark.slow
def test_without_noise_the_audit_fails_far_above_the_claim(audit_files, tmp_path):
    cfg = build_config(_tree(audit_files, tmp_path))
    audit = run_audit(cfg, canaries=200, write=False, _disable_noise_for_tests=True)
    assert 0.99 < audit["claimed_epsilon"] <= 1.0  # the ledger still claims the calibrated epsilon
    assert audit["epsilon_lower_bound"] > 2 * audit["claimed_epsilon"], audit
    assert "VIOLATION" in audit["line"]


def test_cli_audit_prints_one_line_and_writes_audit_json(audit_files, tmp_path):
    tree = _tree(audit_files, tmp_path, federation={"rounds": 1, "local_steps": 2}, output={"name": "a"})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["audit", str(path), "--canaries", "20"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().startswith("audit: empirical epsilon >= ") and len(result.output.strip().splitlines()) == 1
    assert json.loads((tmp_path / "runs" / "a" / "audit.json").read_text())["canaries"] == 20
    plain = CliRunner().invoke(app, ["audit", str(path), "--canaries", "20", "--name", "c", "-s", "privacy.enabled=false"])
    assert plain.exit_code == 0 and "no DP claimed" in plain.output, plain.output
    bad = CliRunner().invoke(app, ["audit", str(path), "--canaries", "1", "--name", "b"])
    assert bad.exit_code == 2 and bad.output.strip().startswith("error: --canaries must be at least 2"), bad.output


def test_black_box_audit_refuses_a_method_whose_global_model_ignores_the_uploads(audit_files, tmp_path):
    tree = _tree(audit_files, tmp_path)
    tree["method"] = {"name": "fedsa-lora"}  # B stays on the clients, 0 globally: the global model ignores A
    with pytest.raises(ConfigError) as err:
        run_audit(build_config(tree), canaries=20, write=False)
    message = str(err.value)
    assert "\n" not in message and "fedsa-lora" in message and "--white-box" in message
    refuse_unreleased(build_config(_tree(audit_files, tmp_path)))  # dp-lora: audited as before


def test_user_level_claim_is_that_of_changing_one_users_data():
    sim = SimpleNamespace(cfg=SimpleNamespace(privacy=SimpleNamespace(enabled=False)),
                          user_dp=SimpleNamespace(epsilon=lambda rounds: 1.5))
    claimed, unit = claimed_epsilon(sim, 0, 3)
    assert claimed == 3.0 and "2 x epsilon_user" in unit  # replace one user = remove + add
    none = SimpleNamespace(cfg=SimpleNamespace(privacy=SimpleNamespace(enabled=False)), user_dp=None)
    assert claimed_epsilon(none, 0, 3) == (None, "none")
