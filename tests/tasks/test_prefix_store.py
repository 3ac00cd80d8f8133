"""The frozen-prefix cache on disk (tasks/prefix_store.py): bit-identical reloads, a miss for every key
change, corrupt entries recomputed, LRU eviction under the bound, one computation when processes race,
private files."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedlora.tasks.prefix_store import SUFFIX, PrefixStore, default_dir, open_store

CPU = torch.device("cpu")


def entries(root: Path) -> set[str]:
    return {p.name for p in root.glob(f"*{SUFFIX}")}


def hidden(task) -> dict[str, list[np.ndarray]]:
    return {name: getattr(task, name).features["hidden"] for name in ("train", "test")}


def same_rows(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]]) -> bool:
    return all(len(a[k]) == len(b[k]) and all(x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
                                              for x, y in zip(a[k], b[k], strict=True)) for k in a)


def no_compute(*args, **kwargs):
    raise AssertionError("the prefix was computed, not loaded from disk")


def recache(task, model, start: int = 1) -> dict[str, list[np.ndarray]]:
    task.prefix_start = 0
    task.cache_prefix(model, start, CPU)
    return hidden(task)


# ----------------------------------------------------------------------------- through the text task
def test_a_second_build_loads_bit_identical_states_and_trains_the_same(tiny_cfg, prefix_cache_root, monkeypatch):
    from fedlora.federation.simulation import Simulation
    from fedlora.tasks.text import TextClassificationTask

    cfg = tiny_cfg(adapter={"layers": [1]}, train={"device": "cpu"})  # the suite's cache: $FEDLORA_CACHE_DIR/prefix
    root = prefix_cache_root / "prefix"
    off = Simulation(tiny_cfg(adapter={"layers": [1]}, train={"device": "cpu"}, task={"prefix_cache_dir": "off"}))
    first = Simulation(cfg)
    assert default_dir() == root and len(entries(root)) >= 2  # train and test, never in the user's home
    monkeypatch.setattr(TextClassificationTask, "_run_prefix", no_compute)
    second = Simulation(cfg)
    assert second.rt.task.prefix_start == 1
    assert same_rows(hidden(first.rt.task), hidden(off.rt.task)) and same_rows(hidden(second.rt.task), hidden(off.rt.task))
    runs = [sim.run() for sim in (off, first, second)]
    for run in runs[1:]:
        assert [(m["accuracy"], m["loss"], m["epsilon"]) for m in run.metrics] == \
            [(m["accuracy"], m["loss"], m["epsilon"]) for m in runs[0].metrics]
        assert all(torch.equal(run.global_state[k], runs[0].global_state[k]) for k in runs[0].global_state)


def test_every_key_change_misses_and_only_those(tiny_cfg, tmp_path):
    from fedlora.federation.runtime import Runtime

    root = tmp_path / "cache"
    rt = Runtime(tiny_cfg(adapter={"layers": [1]}, task={"prefix_cache_dir": str(root)}, train={"device": "cpu"}))
    task, model = rt.task, rt.adapted.model
    base, seen = hidden(task), entries(root)
    assert len(seen) == 2

    def misses(expect: int) -> dict[str, list[np.ndarray]]:
        nonlocal seen
        got = recache(task, model, start)
        new = entries(root) - seen
        assert len(new) == expect, (expect, new)
        seen |= new
        return got

    start = 1
    assert same_rows(misses(0), base)  # the same key: a hit
    start = 2
    assert not same_rows(misses(2), base)  # another start layer
    start = 1
    layers = model.get_base_model().encoder.encoder.layer
    with torch.no_grad():
        layers[1].attention.self.key.weight.add_(0.5)  # above the prefix: the same values, a hit
        assert same_rows(misses(0), base)
        layers[1].attention.self.key.weight.sub_(0.5)
        layers[0].output.dense.bias.add_(1e-3)  # in the prefix
        assert not same_rows(misses(2), base)
        layers[0].output.dense.bias.sub_(1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        misses(2)  # another compute dtype
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads != 1 else 2)  # an earlier test may have left 1
    try:
        misses(2)  # another CPU thread count (it can change the rounding)
    finally:
        torch.set_num_threads(threads)
    assert same_rows(misses(0), base)
    cache = {"prefix_cache_dir": str(root)}
    # max_length 6 truncates the ~9-token sentences (12 would not: the same inputs, a hit); a smaller training
    # subset changes the training split only
    for changed, expect in (({"max_length": 6}, 2), ({"max_length": 12}, 0), ({"max_train_examples": 200}, 1)):
        Runtime(tiny_cfg(adapter={"layers": [1]}, task={**cache, **changed}, train={"device": "cpu"}))
        new = entries(root) - seen
        assert len(new) == expect, (changed, new)
        seen |= new


def test_a_corrupt_entry_is_recomputed_with_one_warning(tiny_cfg, tmp_path, capsys):
    from fedlora.federation.runtime import Runtime

    root = tmp_path / "cache"
    rt = Runtime(tiny_cfg(adapter={"layers": [1]}, task={"prefix_cache_dir": str(root)}, train={"device": "cpu"}))
    base = hidden(rt.task)
    store = PrefixStore(root, 10**9)
    for damage in ("truncate", "flip", "garbage"):
        capsys.readouterr()
        path = max(root.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_size)  # the training split's entry
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        elif damage == "flip":
            data[-7] ^= 0x40  # one bit of the last hidden value: only the checksum can see it
        else:
            data = bytearray(b"not an entry")
        path.write_bytes(bytes(data))
        got = recache(rt.task, rt.adapted.model)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "corrupt" in err[0] and "recomputing" in err[0], (damage, err)
        assert same_rows(got, base)
        store.load(path.stem)  # rewritten whole
    assert capsys.readouterr().err == ""


def test_an_unusable_folder_warns_and_caches_in_memory(tiny_cfg, tmp_path, capsys):
    from fedlora.federation.runtime import Runtime

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rt = Runtime(tiny_cfg(adapter={"layers": [1]}, task={"prefix_cache_dir": str(blocker / "cache")}))
    assert rt.task.prefix_start == 1 and len(rt.task.train.features["hidden"]) == len(rt.task.train)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and "unusable" in err[0] and "memory only" in err[0]


# ----------------------------------------------------------------------------- the store itself
def rows(n: int, seed: int = 0, width: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(k), width)).astype(np.float32) for k in rng.integers(1, 6, size=n)]


def test_eviction_keeps_the_folder_under_its_bound_least_recently_used_first(tmp_path):
    store = PrefixStore(tmp_path, 10**9)
    def same_size(i: int) -> list[np.ndarray]:
        return [np.full((3, 8), float(i), dtype=np.float32)] * 40

    for i, key in enumerate("abcde"):
        store.load_or_compute(key, lambda i=i: same_size(i))
        os.utime(store.path(key), (1000.0 + i, 1000.0 + i))  # written one after another
    size = store.path("a").stat().st_size
    assert store.load("a") is not None and (tmp_path / "a.lock").exists()
    assert store.load_or_compute("a", no_compute) is not None  # a hit: now the most recently used
    store.max_bytes = 3 * size + size // 2
    store.load_or_compute("f", lambda: same_size(9))
    assert entries(tmp_path) == {f"{k}{SUFFIX}" for k in ("a", "e", "f")}  # b, c, d were the oldest
    assert sum(p.stat().st_size for p in tmp_path.glob(f"*{SUFFIX}")) <= store.max_bytes
    assert not (tmp_path / "b.lock").exists() and (tmp_path / "a.lock").exists()
    store.max_bytes = size // 2  # an entry alone above the bound is not stored
    got = store.load_or_compute("g", lambda: rows(40, seed=3))
    assert len(got) == 40 and not store.path("g").exists()


def test_files_are_private_and_an_existing_folder_is_narrowed(tmp_path):
    root = tmp_path / "shared"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    store = open_store(SimpleNamespace(prefix_cache_dir=str(root), prefix_cache_max_gb=1.0))
    assert store is not None
    store.load_or_compute("k", lambda: rows(3))
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for name in (f"k{SUFFIX}", "k.lock"):
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o600, name
    assert open_store(SimpleNamespace(prefix_cache_dir="off", prefix_cache_max_gb=1.0)) is None


def test_the_default_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "root"))
    assert default_dir() == tmp_path / "root" / "prefix"
    monkeypatch.delenv("FEDLORA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_dir() == tmp_path / "xdg" / "fedlora" / "prefix"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_dir() == tmp_path / "home" / ".cache" / "fedlora" / "prefix"


def test_rows_round_trip_exactly_whatever_their_shape(tmp_path):
    store = PrefixStore(tmp_path, 10**9)
    images = [np.random.default_rng(i).standard_normal((3, 4, 4)).astype(np.float32) for i in range(5)]
    for key, value in (("text", rows(30)), ("images", images), ("one", rows(1))):
        store.load_or_compute(key, lambda value=value: value)
        back = store.load(key)
        assert len(back) == len(value) and all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(back, value, strict=True))
        back[0][...] = 99.0  # memory-mapped copy-on-write: the process's own copy changes, never the entry
        assert np.array_equal(store.load(key)[0], value[0])


def test_a_damaged_header_is_corrupt_not_a_crash(tmp_path):
    from fedlora.tasks.prefix_store import CorruptEntry

    store = PrefixStore(tmp_path, 10**9)
    header = {"descr": "|u1", "fortran_order": False, "shape": (10**15,)}  # claims a petabyte
    with store.path("huge").open("wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
    store.path("junk").write_bytes(np.lib.format.magic(1, 0) + b"\x10\x00{'descr': (((")
    for key in ("huge", "junk"):
        with pytest.raises(CorruptEntry):
            store.load(key)
    assert len(store.load_or_compute("huge", lambda: rows(2))) == 2 and len(store.load("huge")) == 2


def _race(root: str, barrier, log: str, out: str) -> None:
    """One of two processes asking for the same missing entry at the same moment."""
    def compute() -> list[np.ndarray]:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # long enough for the other process to ask meanwhile
        return rows(50, seed=7)

    store = PrefixStore(Path(root), 10**9)
    barrier.wait()
    np.save(out, np.concatenate(store.load_or_compute("raced", compute)))


def test_two_processes_racing_for_one_entry_compute_it_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, log = ctx.Barrier(2), tmp_path / "computed.log"
    outs = [tmp_path / f"out{i}.npy" for i in range(2)]
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "cache"), barrier, str(log), str(out))) for out in outs]
    (tmp_path / "cache").mkdir(mode=0o700)
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().splitlines()) == 1  # one computed, the other waited and loaded
    a, b = (np.load(o) for o in outs)
    assert np.array_equal(a, b) and np.array_equal(a, np.concatenate(rows(50, seed=7)))
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_fedlora_cache_reports_the_folder_and_clears_it(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from fedlora.cli import app

    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "root"))
    runner = CliRunner()
    out = runner.invoke(app, ["cache"])
    assert out.exit_code == 0 and "0 entries" in out.output and "no folder yet" in out.output
    store = PrefixStore(tmp_path / "root" / "prefix", 10**9)
    store.root.mkdir(parents=True)
    for key in ("a", "b"):
        store.load_or_compute(key, lambda: rows(50))
    entries_, size = store.usage()
    assert entries_ == 2 and size == sum(p.stat().st_size for p in store.root.glob(f"*{SUFFIX}"))
    out = runner.invoke(app, ["cache"])
    assert f"{store.root}: 2 entries" in out.output
    out = runner.invoke(app, ["cache", "--clear"])
    assert out.exit_code == 0 and "removed 2 entries" in out.output
    assert store.usage() == (0, 0) and not list(store.root.glob("*.lock"))
    other = tmp_path / "elsewhere"
    other.mkdir()
    PrefixStore(other, 10**9).load_or_compute("c", lambda: rows(5))
    out = runner.invoke(app, ["cache", "--dir", str(other), "--clear"])
    assert "removed 1 entry" in out.output and not list(other.glob(f"*{SUFFIX}"))
