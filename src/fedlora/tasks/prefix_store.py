"""The frozen-prefix cache on disk: a split's hidden states, computed once per machine (issue 21).

``cache_prefix`` of the text and image tasks runs the frozen layers below the first adapter over
a whole split; this module keeps the result on disk so that the next run, every ``fedlora compare``
worker and every test on the same inputs load it instead.

Key: a SHA-256 over everything the values depend on, so that any change gives a new entry and
never a stale hit: a format version; the prefix's modules (every parameter and buffer, bytes and
dtype; their ``repr``; the source files of their classes and of the task's module; the model
config); ``start`` and the batch size of the pass; the exact model inputs of the split (token ids,
or pixel arrays with the transform's size and normalisation); the compute device (type and name),
the autocast state, float32 matmul settings, CPU threads; the torch, transformers and numpy
versions.

Entry: one file ``<key>.prefix``, three ``.npy`` records back to back (no pickle; object dtypes
are refused): a JSON header (key, row count, per-row shape, byte count, CRC-32 of the data), the
per-example lengths along axis 0, and all examples concatenated along axis 0, memory-mapped on
load. Written to a 0600 temporary file in the same folder, fsynced and renamed
(``files.write_private_atomic``).
A per-key ``fcntl`` lock makes one process compute a missing entry while the others wait and then
load it. A corrupt or truncated entry is recomputed with a one-line warning; a folder that cannot
be used leaves the cache in memory only, with a warning. After each write the least recently used
entries (the file's mtime, refreshed on every hit) are removed until the folder is under its bound.

The values are computed from a client's private data: the folder is 0700, its files 0600, and
nothing here ever sends them anywhere (docs/privacy.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from fedlora.files import private_folder, write_private_atomic

FORMAT = 1
SUFFIX = ".prefix"
OFF = "off"  # task.prefix_cache_dir: no disk store
ENV = "FEDLORA_CACHE_DIR"  # fedlora's cache root; the prefix cache is its 'prefix' folder
STALE_TMP_S = 3600.0  # a temporary file this old is a crashed writer's: removed when evicting

Rows = list[np.ndarray]


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def default_dir() -> Path:
    """``$FEDLORA_CACHE_DIR/prefix``, else the user cache folder: ``$XDG_CACHE_HOME`` or ``~/.cache``,
    then ``fedlora/prefix``."""
    root = os.environ.get(ENV)
    if root:
        return Path(root).expanduser() / "prefix"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "fedlora" / "prefix"


def open_store(cfg: Any) -> PrefixStore | None:
    """The store of ``cfg.prefix_cache_dir`` (a TaskConfig), or None: switched off ('off'), or its folder
    cannot be made private and writable here (warned)."""
    where = cfg.prefix_cache_dir
    if where == OFF:
        return None
    root = Path(where).expanduser() if where is not None else default_dir()
    try:
        private_folder(root)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as err:
        warn(f"prefix cache folder '{root}' unusable ({getattr(err, 'strerror', None) or err}); "
             "caching in memory only (set task.prefix_cache_dir, or 'off')")
        return None
    return PrefixStore(root, int(cfg.prefix_cache_max_gb * 1e9))


class PrefixKey:
    """A running SHA-256 over named, length-prefixed parts; ``hexdigest()`` names the entry."""

    def __init__(self, kind: str) -> None:
        self._h = hashlib.sha256()
        self.add("format", FORMAT)
        self.add("kind", kind)

    def copy(self) -> PrefixKey:
        out = PrefixKey.__new__(PrefixKey)
        out._h = self._h.copy()
        return out

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def _part(self, name: str, data: bytes | memoryview) -> None:
        self._h.update(f"{name}:{len(data)}:".encode())
        self._h.update(data)

    def add(self, name: str, value: Any) -> PrefixKey:
        """A JSON-able value (int, float, str, lists, dicts; anything else by ``str``)."""
        self._part(name, json.dumps(value, sort_keys=True, default=str).encode())
        return self

    def add_file(self, path: str | Path) -> PrefixKey:
        self._part(f"file:{Path(path).name}", Path(path).read_bytes())
        return self

    def add_arrays(self, name: str, arrays: Iterable[np.ndarray]) -> PrefixKey:
        """Each array's dtype, shape and bytes, in order (a split's model inputs)."""
        count = 0
        for a in arrays:
            a = np.ascontiguousarray(a)
            self._part(f"{name}[{count}]:{a.dtype.str}:{a.shape}", memoryview(a).cast("B"))
            count += 1
        self.add(f"{name}:count", count)
        return self

    def add_modules(self, modules: Iterable[nn.Module]) -> PrefixKey:
        """Every parameter and buffer (name, dtype, shape, bytes), the ``repr`` and the source file of
        every module class inside (code changes of the layers miss, too)."""
        files: set[str] = set()
        for i, module in enumerate(modules):
            self.add(f"module{i}", repr(module))
            named = [*module.named_parameters(), *module.named_buffers()]
            for name, t in named:
                flat = t.detach().to("cpu").contiguous().reshape(-1)
                self._part(f"module{i}.{name}:{t.dtype}:{tuple(t.shape)}", flat.view(torch.uint8).numpy().data)
            for sub in module.modules():
                path = getattr(sys.modules.get(type(sub).__module__), "__file__", None)
                if path:
                    files.add(path)
        for path in sorted(files):
            self.add_file(path)
        return self

    def add_compute(self, device: torch.device | str) -> PrefixKey:
        """Where and how the pass runs: device, autocast, matmul settings, threads, library versions."""
        import transformers  # noqa: PLC0415

        device = torch.device(device)
        state: dict[str, Any] = {
            "device": device.type, "autocast": _autocast_state(device.type),
            "matmul": torch.get_float32_matmul_precision(), "default_dtype": str(torch.get_default_dtype()),
            "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
        }
        if device.type == "cuda":
            state.update(name=torch.cuda.get_device_name(device), tf32=torch.backends.cuda.matmul.allow_tf32,
                         cudnn_tf32=torch.backends.cudnn.allow_tf32, cuda=torch.version.cuda)
        elif device.type == "cpu":
            state["threads"] = torch.get_num_threads()
        return self.add("compute", state)


def _autocast_state(device_type: str) -> tuple[bool, str]:
    try:
        return torch.is_autocast_enabled(device_type), str(torch.get_autocast_dtype(device_type))
    except (TypeError, AttributeError):  # torch < 2.4
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled(), str(torch.get_autocast_cpu_dtype())
        return torch.is_autocast_enabled(), str(torch.get_autocast_gpu_dtype())


class CorruptEntry(Exception):
    pass


class PrefixStore:
    """Entries ``<key>.prefix`` in one private folder, at most ``max_bytes`` of them in all."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes

    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def load_or_compute(self, key: str, compute: Callable[[], Rows]) -> Rows:
        """The rows stored under ``key``; else ``compute()``'s, stored. One process computes a missing
        entry; others asking for it meanwhile wait for it and load it. Never raises for the store's
        sake: a failing disk leaves the computed rows in memory, with a warning."""
        rows = self._load_quiet(key, announce=True)
        if rows is not None:
            return rows
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self._locked(key))
            except OSError as err:
                warn(f"prefix cache: cannot lock '{key}.lock' ({err.strerror or err}); computing without the store")
                return compute()
            rows = self._load_quiet(key, announce=False)  # written while this process waited
            if rows is not None:
                return rows
            rows = compute()
            try:
                self._store(key, rows)
            except OSError as err:
                warn(f"prefix cache: could not store '{self.path(key).name}' ({err.strerror or err}); kept in memory only")
                return rows
        with contextlib.suppress(OSError):
            self.evict(keep=key)
        return rows

    # ------------------------------------------------------------------ reading
    def _load_quiet(self, key: str, *, announce: bool) -> Rows | None:
        path = self.path(key)
        try:
            rows = self.load(key)
        except FileNotFoundError:
            return None
        except CorruptEntry as err:
            if announce:
                warn(f"prefix cache entry '{path.name}' is corrupt ({err}); recomputing it")
            return None
        except OSError as err:
            if announce:
                warn(f"prefix cache entry '{path.name}' unreadable ({err.strerror or err}); recomputing it")
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # the access time eviction goes by
        return rows

    def load(self, key: str) -> Rows:
        """The entry's rows: views into the file, memory-mapped copy-on-write (pages from the page cache,
        shared by every process using the entry; a write to a row stays in this process). Raises
        FileNotFoundError when absent, CorruptEntry when its header, size or checksum does not match.
        Entries are only ever replaced by a rename or removed, so a mapping never loses its file."""
        with self.path(key).open("rb") as f:
            try:
                head = json.loads(_read_array(f, np.uint8).tobytes())
                lengths = _read_array(f, np.int64)
                shape, dtype = _read_header(f, np.dtype(head["dtype"]))
                offset, size = f.tell(), os.fstat(f.fileno()).st_size
                nbytes = int(np.prod(shape)) * dtype.itemsize
                problems = [
                    (head.get("format") != FORMAT, "format"), (head.get("key") != key, "key"),
                    (offset + nbytes > size, "truncated"), (offset + nbytes < size, "trailing bytes"),
                    (len(lengths) != head.get("rows"), "row count"), (int(lengths.sum()) != shape[0], "lengths"),
                    (list(shape[1:]) != head.get("tail"), "shape"), (nbytes != head.get("nbytes"), "size"),
                ]
                bad = [what for failed, what in problems if failed]
                if bad:
                    raise CorruptEntry(", ".join(bad))
                data = (np.memmap(f, dtype=dtype, mode="c", offset=offset, shape=shape).view(np.ndarray) if nbytes
                        else np.empty(shape, dtype=dtype))
            except (ValueError, EOFError, KeyError, TypeError, AttributeError, SyntaxError) as err:
                raise CorruptEntry(str(err).splitlines()[0][:80] if str(err) else type(err).__name__) from None
        if zlib.crc32(memoryview(data).cast("B")) != head.get("crc32"):
            raise CorruptEntry("checksum")
        return list(np.split(data, np.cumsum(lengths)[:-1])) if len(lengths) else []

    # ------------------------------------------------------------------ writing
    def _store(self, key: str, rows: Rows) -> None:
        """Write the entry atomically (0600); skipped (warned) when it alone exceeds the bound, or rows
        differ in dtype or per-row shape."""
        if not rows or any(r.dtype != rows[0].dtype or r.shape[1:] != rows[0].shape[1:] for r in rows):
            return
        nbytes = sum(int(r.nbytes) for r in rows)
        if nbytes > self.max_bytes:
            warn(f"prefix cache entry of {nbytes / 1e9:.2f} GB exceeds task.prefix_cache_max_gb; not stored")
            return
        crc = 0
        for r in rows:
            crc = zlib.crc32(memoryview(np.ascontiguousarray(r)).cast("B"), crc)
        tail = list(rows[0].shape[1:])
        head = {"format": FORMAT, "key": key, "rows": len(rows), "tail": tail, "dtype": rows[0].dtype.str,
                "nbytes": nbytes, "crc32": crc}

        def write(f: BinaryIO) -> None:
            np.save(f, np.frombuffer(json.dumps(head).encode(), dtype=np.uint8), allow_pickle=False)
            np.save(f, np.array([len(r) for r in rows], dtype=np.int64), allow_pickle=False)
            shape = (sum(len(r) for r in rows), *tail)  # (all rows, *per-row shape)
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(rows[0].dtype), "fortran_order": False, "shape": shape})
            for r in rows:
                f.write(memoryview(np.ascontiguousarray(r)).cast("B"))

        write_private_atomic(self.path(key), write)

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """An exclusive ``flock`` on ``<key>.lock`` (0600). Re-opened when eviction removed the file
        between open and lock, so two holders never lock different files of one name."""
        path = self.root / f"{key}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield
        finally:
            os.close(fd)  # releases the lock

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) in the folder (0, 0 when it does not exist)."""
        if not self.root.is_dir():
            return 0, 0
        sizes = []
        for p in self.root.glob(f"*{SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                sizes.append(p.stat().st_size)
        return len(sizes), sum(sizes)

    def clear(self) -> int:
        """Remove every entry (and its lock unless a process holds it); return how many were removed.
        A run that is computing an entry meanwhile still writes it when it finishes."""
        before, _ = self.usage()
        if before:
            PrefixStore(self.root, 0).evict()
        return before - self.usage()[0]

    def evict(self, keep: str | None = None) -> None:
        """Remove least recently used entries (oldest mtime first, never ``keep``) until the folder's
        entries take at most ``max_bytes``; also a crashed writer's stale temporary files."""
        now = time.time()
        entries = []
        for p in self.root.iterdir():
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                if p.suffix == SUFFIX:
                    entries.append((st.st_mtime, st.st_size, p))
                elif p.name.startswith(".") and p.name.endswith(".tmp") and now - st.st_mtime > STALE_TMP_S:
                    p.unlink(missing_ok=True)
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            if p.stem == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            self._drop_lock(p.stem)

    def _drop_lock(self, key: str) -> None:
        """Remove an evicted entry's lock file unless some process holds it."""
        path = self.root / f"{key}.lock"
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(fd)


def _read_header(f: BinaryIO, dtype: np.dtype) -> tuple[tuple[int, ...], np.dtype]:
    """The next ``.npy`` record's header: its shape, checked to hold C-ordered ``dtype`` (never objects)."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, found = read(f)
    if fortran or found != dtype or found.hasobject:
        raise ValueError("unexpected record")
    return tuple(shape), found


def _read_array(f: BinaryIO, dtype: np.dtype | type) -> np.ndarray:
    """A small ``.npy`` record (the header and the lengths) into memory."""
    shape, found = _read_header(f, np.dtype(dtype))
    if int(np.prod(shape)) * found.itemsize > os.fstat(f.fileno()).st_size - f.tell():
        raise EOFError("truncated")
    out = np.empty(shape, dtype=found)
    view = memoryview(out).cast("B")
    if f.readinto(view) != len(view):
        raise EOFError("truncated")
    return out
