"""Bad input, as a table: each case through the CLI gives exit code 2, exactly one line on
stderr naming the problem (and the fix), no traceback, and leaves earlier outputs untouched."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fedlora.cli import app
from tests.helpers import make_idx_folder, tiny_tree

runner = CliRunner()


@dataclass
class Env:
    tmp: Path
    runs: Path
    tree: dict
    done: Path  # a finished 2-round run directory (for --resume cases)

    def cfg(self, **sections) -> str:
        tree = yaml.safe_load(yaml.safe_dump(self.tree))
        for name, values in sections.items():
            tree.setdefault(name, {}).update(values)
        path = self.tmp / "cfg.yaml"
        path.write_text(yaml.safe_dump(tree))
        return str(path)

    def data(self, name: str, content: bytes | pd.DataFrame) -> str:
        path = self.tmp / name
        if isinstance(content, pd.DataFrame):
            content.to_csv(path, index=False)
        else:
            path.write_bytes(content)
        return str(path)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tiny_csv, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_tree(tiny_model_dir, tiny_csv, root / "runs", output={"keep_checkpoints": 1})))
    assert runner.invoke(app, ["run", str(cfg), "--name", "done", "-q"]).exit_code == 0
    return root / "runs" / "done"


@pytest.fixture
def env(tiny_model_dir, tiny_csv, tmp_path, finished_run) -> Env:
    runs = tmp_path / "runs"
    shutil.copytree(finished_run, runs / "done")
    (runs / "earlier.txt").write_text("an earlier result\n")
    return Env(tmp_path, runs, tiny_tree(tiny_model_dir, tiny_csv, runs), runs / "done")


def _checkpoint(e: Env) -> Path:
    return e.done / "checkpoints" / "round_2" / "federation.pt"


def _truncate_checkpoint(e: Env) -> list[str]:
    data = _checkpoint(e).read_bytes()
    _checkpoint(e).write_bytes(data[: len(data) // 3])
    return ["run", "--resume", str(e.done), "-q"]


def _other_config(e: Env) -> list[str]:
    saved = yaml.safe_load((e.done / "config.yaml").read_text())
    saved["train"]["lr"] = 0.05
    (e.done / "config.yaml").write_text(yaml.safe_dump(saved))
    return ["run", "--resume", str(e.done), "-q"]


def _disk_full_on_new_run(e: Env, monkeypatch) -> list[str]:
    from fedlora.report import rundir

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "_atomic_write", full)
    return ["run", e.cfg(), "--name", "new", "-q"]


def _disk_full_on_checkpoint(e: Env, monkeypatch) -> list[str]:
    import torch

    from fedlora.federation import checkpoint

    shutil.rmtree(e.done / "adapter")
    (e.done / "checkpoints" / "round_2").rename(e.done / "checkpoints" / "round_1")  # resume must rewrite round 2
    ckpt = torch.load(e.done / "checkpoints" / "round_1" / "federation.pt", weights_only=True)
    ckpt["round"], ckpt["metrics_rows"] = 1, 1
    for client in ckpt["clients"]:
        client["dp_steps"] //= 2
    metrics = e.done / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    torch.save(ckpt, e.done / "checkpoints" / "round_1" / "federation.pt")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    return ["run", "--resume", str(e.done), "-q"]


def _one_class(e: Env) -> list[str]:
    df = pd.DataFrame({"text": [f"good movie {i}" for i in range(60)], "label": [1] * 60})
    return ["run", e.cfg(task={"dataset": e.data("one.csv", df)}), "-q"]


MARKER = "code-ran"  # a file a malicious payload would create in Env.tmp


class _RunsCode:
    """Pickles as a call that creates the marker file when the pickle is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _malicious_checkpoint(e: Env) -> list[str]:
    import torch

    state = torch.load(_checkpoint(e), weights_only=True)  # the real checkpoint, plus one object that runs code
    torch.save({**state, "memory": {"ema": _RunsCode(e.tmp / MARKER)}}, _checkpoint(e))
    return ["run", "--resume", str(e.done), "-q"]


def _images(e: Env, name: str, classes: dict[str, int], corrupt: str | None = None) -> list[str]:
    from PIL import Image

    root = e.tmp / name
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(root / cls / f"{i}.png")
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
    return ["run", e.cfg(task={"name": "image-classification", "dataset": str(root), "model": "efficientnet-lite0"}), "-q"]


def _idx(e: Env, damage: Callable[[bytes], bytes], file: str = "train-labels-idx1-ubyte.gz") -> list[str]:
    root = make_idx_folder(e.tmp / "idx", n_train=40, n_test=10)
    path = root / file
    path.write_bytes(damage(path.read_bytes()))
    return ["run", e.cfg(task={"name": "image-classification", "dataset": str(root), "model": "efficientnet-lite0"}), "-q"]


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _squad(e: Env, answers: list, suffix: str = ".json") -> list[str]:
    rows = [{"question": "the story was", "context": f"the movie was good {i}", "answers": a} for i, a in enumerate(answers)]
    path = e.tmp / f"squad{suffix}"
    if suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        path.write_text(json.dumps(rows))
    return ["run", e.cfg(task={"name": "question-answering", "dataset": str(path)}), "-q"]


_GOOD = {"text": ["good"], "answer_start": [14]}

# id -> (argv builder, fragments the line must contain)
CASES: dict[str, tuple[Callable[..., list[str]], tuple[str, ...]]] = {
    "malformed-yaml": (lambda e: ["run", e.data("bad.yaml", b"task: [unclosed\n  x: 1"), "-q"], ("not valid YAML", "line")),
    "config-not-utf8": (lambda e: ["run", e.data("latin.yaml", "task:\n  name: caf\xe9\n".encode("latin-1")), "-q"],
                        ("not UTF-8",)),
    "config-missing": (lambda e: ["run", str(e.tmp / "nope.yaml"), "-q"], ("does not exist",)),
    "unknown-key": (lambda e: ["run", e.cfg(federation={"round": 3}), "-q"], ("federation.round", "did you mean 'rounds'")),
    "unknown-section": (lambda e: ["run", e.cfg(privcy={"epsilon": 1}), "-q"], ("privcy", "did you mean 'privacy'")),
    "unknown-override-key": (lambda e: ["run", e.cfg(), "-s", "federation.num_client=3", "-q"],
                             ("unknown config key 'federation.num_client'", "did you mean 'num_clients'")),
    "wrong-type": (lambda e: ["run", e.cfg(), "-s", "federation.rounds=many", "-q"], ("federation.rounds", "integer")),
    "override-syntax": (lambda e: ["run", e.cfg(), "-s", "federation.rounds", "-q"], ("key.path=value",)),
    "zero-rounds": (lambda e: ["run", e.cfg(), "--rounds", "0", "-q"], ("federation.rounds", "greater than 0")),
    "negative-batch": (lambda e: ["run", e.cfg(train={"batch_size": -4}), "-q"], ("train.batch_size",)),
    "zero-rank": (lambda e: ["run", e.cfg(adapter={"rank": 0}), "-q"], ("adapter.rank",)),
    "epsilon-zero": (lambda e: ["run", e.cfg(), "--epsilon", "0", "-q"], ("epsilon must be > 0", "--no-dp")),
    "epsilon-negative": (lambda e: ["run", e.cfg(), "--epsilon", "-2", "-q"], ("epsilon must be > 0", "--no-dp")),
    "delta-zero": (lambda e: ["run", e.cfg(privacy={"delta": 0}), "-q"], ("delta must be in (0, 1)",)),
    "delta-one": (lambda e: ["run", e.cfg(), "-s", "privacy.delta=1", "-q"], ("delta must be in (0, 1)",)),
    "delta-above-one": (lambda e: ["run", e.cfg(privacy={"delta": 1.5}), "-q"], ("delta must be in (0, 1)",)),
    "epsilon-too-small-for-steps": (lambda e: ["run", e.cfg(privacy={"epsilon": 0.001}), "-q"], ("cannot be met",)),
    "epsilon-too-small-for-fixed-noise": (
        lambda e: ["run", e.cfg(privacy={"epsilon": 0.5, "noise_multiplier": 0.3}), "-q"], ("too small for one round",)),
    "no-clients-sampled": (lambda e: ["run", e.cfg(federation={"clients_per_round": 0.1}), "-q"], ("clients_per_round",)),
    "more-clients-than-examples": (lambda e: ["run", e.cfg(), "--clients", "5000", "-q"], ("clients",)),
    "unknown-method": (lambda e: ["run", e.cfg(), "--method", "dp-lorra", "-q"], ("unknown method 'dp-lorra'", "dp-lora")),
    "unknown-task": (lambda e: ["run", e.cfg(task={"name": "text-clasification"}), "-q"], ("text-clasification",)),
    "missing-data-file": (lambda e: ["run", e.cfg(task={"dataset": str(e.tmp / "none.csv")}), "-q"], ("does not exist",)),
    "empty-data-file": (lambda e: ["run", e.cfg(task={"dataset": e.data("empty.csv", b"")}), "-q"], ("empty",)),
    "data-not-utf8": (lambda e: ["run", e.cfg(task={"dataset": e.data("latin.csv", "text,label\ncaf\xe9 bad,0\n".encode("latin-1"))}), "-q"],
                      ("not UTF-8",)),
    "missing-label-column": (lambda e: ["run", e.cfg(task={"label_column": "sentiment"}), "-q"],
                             ("no label column 'sentiment'", "task.label_column")),
    "one-class-labels": (_one_class, ("single class",)),
    "missing-image-folder": (lambda e: ["run", e.cfg(task={"name": "image-classification", "dataset": str(e.tmp / "imgs")}), "-q"],
                             ("does not exist",)),
    "model-path-missing": (lambda e: ["run", e.cfg(task={"model": str(e.tmp / "no-model")}), "-q"], ("model path", "does not exist")),
    "run-dir-exists": (lambda e: ["run", e.cfg(), "--name", "done", "-q"], ("already exists",)),
    "resume-not-a-run-dir": (lambda e: ["run", "--resume", str(e.tmp), "-q"], ("not a run directory",)),
    "resume-contradicting-override": (lambda e: ["run", "--resume", str(e.done), "--rounds", "5", "-q"],
                                      ("federation.rounds", "differs")),
    "resume-truncated-checkpoint": (_truncate_checkpoint, ("no readable checkpoint", "truncated")),
    "resume-checkpoint-of-another-config": (_other_config, ("another config", "train.lr")),
    "disk-full-new-run": (_disk_full_on_new_run, ("No space left on device",)),
    "disk-full-checkpoint": (_disk_full_on_checkpoint, ("No space left on device",)),
    "resume-checkpoint-carrying-code": (_malicious_checkpoint, ("no readable checkpoint", "corrupted", "federation.pt")),
    "image-folder-corrupt-image": (lambda e: _images(e, "imgs", {"cat": 3, "dog": 3}, corrupt="dog/9.png"),
                                   ("dog/9.png", "cannot be read", "replace or remove")),
    "image-folder-one-class-has-images": (lambda e: _images(e, "imgs", {"cat": 4, "dog": 0}), ("single class", "'cat'")),
    "idx-body-not-a-multiple-of-the-value-size": (
        lambda e: _idx(e, lambda d: _gz(bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + b"\0" * 11)),
        ("train-labels-idx1-ubyte.gz", "not a multiple", "reinstall")),
    "idx-header-longer-than-the-file": (lambda e: _idx(e, lambda d: _gz(bytes([0, 0, 0x08, 3, 0, 0]))),
                                        ("train-labels-idx1-ubyte.gz", "shorter", "header")),
    "idx-corrupt-gzip": (lambda e: _idx(e, lambda d: d[: len(d) // 2] + b"\xff" * 16), ("train-labels-idx1-ubyte.gz", "cannot be read")),
    "qa-answers-not-a-dict": (lambda e: _squad(e, ["good"] * 20, ".csv"), ("'answers' is not a dict", "row 0")),
    "qa-unanswerable-question": (lambda e: _squad(e, [_GOOD] * 19 + [{"text": [], "answer_start": []}]),
                                 ("row 19", "no answer", "drop such rows")),
}


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every visible file's digest; metrics.jsonl's bytes (a failed round may only append to it)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.name == "metrics.jsonl" else hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(env, monkeypatch, case):
    build, fragments = CASES[case]
    argv = build(env, monkeypatch) if build.__code__.co_argcount == 2 else build(env)
    before = _snapshot(env.runs)
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, (case, result.output, result.exception)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in result.output
    for f in fragments:
        assert f in err, err
    after = _snapshot(env.runs)
    for key, value in before.items():  # nothing earlier overwritten or removed
        assert after[key].startswith(value) if key.endswith("metrics.jsonl") else after[key] == value, key
    assert (env.runs / "earlier.txt").read_text() == "an earlier result\n"
    assert not (env.tmp / MARKER).exists(), "a file's contents ran as code"
