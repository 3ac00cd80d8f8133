"""privacy/noise.EntropyPool: OS entropy read ahead, each byte handed out once, never across a fork."""

from __future__ import annotations

import os
import time

import pytest

from fedlora.privacy import noise
from fedlora.privacy.noise import EntropyPool


def test_pool_hands_out_fresh_bytes_of_the_asked_size_and_reads_ahead() -> None:
    pool = EntropyPool(limit=1 << 16, chunk=4096)
    first = pool.take(10_000)
    assert len(first) == 10_000
    deadline = time.time() + 5
    while pool._buffered < 2 * 10_000 and time.time() < deadline:  # the thread fills up to 2x the request
        time.sleep(0.01)
    assert pool._buffered >= 20_000
    seen = [pool.take(n) for n in (1, 4095, 4097, 10_000, 30_000)]
    assert [len(b) for b in seen] == [1, 4095, 4097, 10_000, 30_000]
    blob = first + b"".join(seen)
    chunks = {blob[i:i + 16] for i in range(0, len(blob) - 15, 16)}
    assert len(chunks) == len(range(0, len(blob) - 15, 16))  # no 16-byte block handed out twice


def test_a_pool_copied_into_another_process_drops_its_buffer(monkeypatch) -> None:
    pool = EntropyPool(limit=1 << 16, chunk=4096)
    pool.take(8192)
    deadline = time.time() + 5
    while pool._buffered == 0 and time.time() < deadline:
        time.sleep(0.01)
    buffered = b"".join(pool._blocks)
    assert buffered
    real = os.getpid()
    monkeypatch.setattr(noise.os, "getpid", lambda: real + 1)  # as seen from a forked child
    got = pool.take(len(buffered))
    assert pool._pid == real + 1 and got != buffered


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_a_fresh_pool() -> None:
    noise.secure_bytes(4096)
    parent_pool = noise._POOL
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report whether the module's pool was replaced
        os.close(r)
        os.write(w, b"1" if noise._POOL is not parent_pool and noise._POOL._buffered == 0 else b"0")
        os._exit(0)
    os.close(w)
    answer = os.read(r, 1)
    os.waitpid(pid, 0)
    os.close(r)
    assert answer == b"1"
