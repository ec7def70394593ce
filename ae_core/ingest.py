"""Ingest: fetch objects, decode them once in worker processes, cache the pixels as uint8 shards.

Training epochs and encoding read the shards, so no file is decoded twice. Each shard is written
atomically (temporary name, then rename) with a small JSON beside it, so a rerun after a crash
reuses the shards that were finished. A file that cannot be decoded becomes a reject row.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import signal
import sys
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from fsspec.spec import AbstractFileSystem

from ae_core.decode import DECOMPRESSION_BOMB, Preprocess, decode_image, fingerprint, might_be_image, read_header
from ae_core.errors import AeError, DecodeError
from ae_core.hardware import usable_cores
from ae_core.storage import (ObjectInfo, is_connection_error, is_local, no_space, out_of_space, read_heads,
                             read_many)

READ_ERROR = "read_error"  # the reject reason of an object that could not be read (worth retrying)
_IN_PROCESS_BELOW = 512  # objects; below this a process pool costs more to start than it saves
_IN_PROCESS_MEDIAN_BYTES = 4096  # files smaller than this decode faster than they travel to a worker
_TINY_FILES_IN_PROCESS_BELOW = 20_000  # ...unless there are so many that two cores pay off
SNIFF_ABOVE = 16 << 20  # bytes; a larger object is identified from its head before it is read whole
HEAD_BYTES = 64 << 10
BATCH_BYTES = 256 << 20  # a batch of objects in memory at once holds at most this much (or one object)


class Head(bytes):
    """The first bytes of an object that was not read whole, because they are not an image."""


@dataclass(frozen=True)
class Unread:
    """An image that was not read whole: its header, in its first bytes, already rejects it
    (more pixels than the limit: a 2 GB file was read into memory only to be refused)."""

    reason: str
    detail: str


@dataclass(frozen=True)
class ShardPlan:
    index: int
    objects: tuple[ObjectInfo, ...]


@dataclass
class ShardResult:
    """What decoding one shard produced: pixels of the good images, metadata, and rejects."""

    index: int
    pixels_path: str | None
    images: list[dict] = field(default_factory=list)  # key, width, height, size_bytes, fingerprint, mode, format
    rejects: list[dict] = field(default_factory=list)  # key, reason, detail, size_bytes


def nothing_decoded(source: str, rejects: Sequence[dict], outcome: str = "nothing was published") -> AeError:
    """The error for a source whose objects all failed to decode: counts by reason and the first
    object's detail, since nothing is published and there is no rejects table to look at."""
    counts = Counter(r["reason"] for r in rejects)
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    first = min(rejects, key=lambda r: r["key"]) if rejects else None
    example = f"; first: {first['key']!r}: {first.get('detail') or first['reason']}" if first else ""
    return AeError(f"source {source!r}: none of its {len(rejects)} objects could be decoded as an image "
                   f"({reasons or 'no objects'}{example}); {outcome}")


@dataclass
class DecodedCorpus:
    spec: Preprocess
    shards: list[ShardResult]

    @property
    def images(self) -> list[dict]:
        return [img for s in self.shards for img in s.images]

    @property
    def rejects(self) -> list[dict]:
        return [r for s in self.shards for r in s.rejects]

    def __len__(self) -> int:
        return sum(len(s.images) for s in self.shards)

    def take(self, rows: Sequence[int]) -> np.ndarray:
        """Some images by table row, read from the memory-mapped shards (no copy of the rest)."""
        return self.pixels()[np.asarray(rows, np.int64)]

    def pixels(self) -> ShardedPixels:
        """All good images, (N, channels, size, size) uint8, in table order, read on demand."""
        c, n = self.spec.channels, self.spec.image_size
        return ShardedPixels([s.pixels_path for s in self.shards if s.pixels_path], (c, n, n))


class ShardedPixels:
    """The decoded pixels of a corpus, (N, C, H, W) uint8, as a view over the memory-mapped cache
    shards. Indexing with a slice or an integer array returns an in-memory copy of those rows
    only; `np.asarray` copies everything. Training and encoding gather their batches from it, so
    the pixels live in the OS page cache (evictable under memory pressure), not in the process's
    own memory."""

    dtype = np.dtype(np.uint8)

    def __init__(self, paths: Sequence[str], image_shape: tuple[int, int, int]) -> None:
        self._parts = [np.load(p, mmap_mode="r") for p in paths]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        self.shape = (int(self._starts[-1]), *image_shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:  # noqa: ANN001 - as numpy: int, slice, rows, tuple
        if isinstance(index, tuple):  # rows first, then within each image
            head = self[index[0]]
            return head[index[1:]] if np.ndim(index[0]) == 0 and not isinstance(index[0], slice) \
                else head[(slice(None), *index[1:])]
        if isinstance(index, (int, np.integer)):
            return self[np.array([index if index >= 0 else len(self) + index])][0]
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, np.int64)
        if rows.ndim != 1:
            raise IndexError("index ShardedPixels with an int, a slice or a 1-d array of rows")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(shard):
            hit = shard == s
            out[hit] = self._parts[s][rows[hit] - self._starts[s]]
        return out

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


def plan_shards(objects: Sequence[ObjectInfo], shard_size: int) -> list[ShardPlan]:
    """Split the listing (in key order) into fixed-size shards. Pure."""
    ordered = sorted(objects, key=lambda o: o.key)
    return [ShardPlan(i, tuple(ordered[start:start + shard_size]))
            for i, start in enumerate(range(0, len(ordered), shard_size))]


def decode_batch(items: list[tuple[str, int, bytes | Unread | None, str | None]],
                 spec: Preprocess) -> tuple[list[dict], list[dict], np.ndarray]:
    """Decode (key, size, data, read_error) items; runs in a worker process. Returns the good
    images' metadata, the rejects, and the good images' pixels stacked into one
    (k, C, H, W) uint8 array: one array to send back per batch, not one per image."""
    images, rejects = [], []
    c, n = spec.channels, spec.image_size
    pixels = np.empty((len(items), c, n, n), np.uint8)
    for key, size, data, read_error in items:
        if read_error is not None or data is None:
            rejects.append({"key": key, "reason": READ_ERROR, "detail": read_error or "no data",
                            "size_bytes": size, "fingerprint": None})
            continue
        if isinstance(data, Head):
            rejects.append({"key": key, "reason": "not_an_image", "size_bytes": size, "fingerprint": None,
                            "detail": f"its first {len(data)} bytes are no image format Pillow can read "
                                      "(the rest was not read)"})
            continue
        if isinstance(data, Unread):
            rejects.append({"key": key, "reason": data.reason, "size_bytes": size, "fingerprint": None,
                            "detail": data.detail})
            continue
        digest = fingerprint(data)
        try:
            dec = decode_image(data, spec)
        except DecodeError as err:
            rejects.append({"key": key, "reason": err.reason, "detail": err.detail,
                            "size_bytes": len(data), "fingerprint": digest})
            continue
        pixels[len(images)] = dec.pixels
        images.append({"key": key, "width": dec.width, "height": dec.height, "size_bytes": len(data),
                       "fingerprint": digest, "mode": dec.mode, "format": dec.format})
    return images, rejects, pixels[:len(images)]


class _InlineExecutor(Executor):
    """Runs submitted calls at once in this process (small corpora, or workers=1)."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(err)
        return fut


def decode_workers(n_objects: int, requested: int, median_bytes: float = float("inf")) -> int:
    """Worker processes for decoding: 0 = in this process. Pure.

    `requested` > 0 is the user's choice (1 = in this process). Otherwise: in this process for
    small corpora, and for tiny files unless there are many of them: starting the workers
    (~0.3 s) costs more than two cores save there (measured on 2 cores, decoding only: 10,000
    28x28 PNGs at 52-55k/s in one process, 24-30k/s with two workers; 100,000 of them at 55k/s
    and ~69k/s). One worker per core otherwise.
    """
    if requested:
        return 0 if requested == 1 else requested
    if n_objects < _IN_PROCESS_BELOW or (median_bytes < _IN_PROCESS_MEDIAN_BYTES and n_objects < _TINY_FILES_IN_PROCESS_BELOW):
        return 0
    return usable_cores()


_LOCAL_TASK_MAX = 1024  # objects in one worker task when the worker reads the files itself


def task_size(n_objects: int, n_workers: int, read_batch: int, workers_read: bool,
              median_bytes: float = float("inf")) -> int:
    """Objects per decode task. Pure.

    `read_batch` when this process fetches (it is the fetch concurrency, for S3), when decoding
    here, and for files of ordinary size (a task's bytes are all in memory at once). When
    workers read tiny local files themselves, larger tasks, up to `_LOCAL_TASK_MAX`, while each
    worker still gets at least 8: per task the main process pickles the listing and unpickles
    the results, and with 64 objects a task it could not keep two workers busy (100,000 28x28
    PNGs on 2 cores: 1.9 s with 64, 1.6 s with 1,024)."""
    if not workers_read or n_workers < 1 or median_bytes >= _IN_PROCESS_MEDIAN_BYTES:
        return read_batch
    return max(read_batch, min(_LOCAL_TASK_MAX, n_objects // (8 * n_workers)))


def _shard_paths(work_dir: str, index: int) -> tuple[str, str]:
    base = os.path.join(work_dir, f"shard-{index:05d}")
    return base + ".npy", base + ".json"


def _shard_signature(plan: ShardPlan, spec: Preprocess) -> dict:
    return {"spec": spec.to_dict(), "objects": [[o.key, o.size, o.tag, o.stat] for o in plan.objects]}


def _digest(pixels: np.ndarray) -> str:
    """A check of a shard's pixels against damage, not tampering: CRC-32, 5x faster than BLAKE2b
    (11 against 55 ms on 100,000 28x28 images), on every shard written."""
    return f"crc32:{zlib.crc32(np.ascontiguousarray(pixels).data):08x}"


def _load_cached(plan: ShardPlan, spec: Preprocess, work_dir: str) -> ShardResult | None:
    """A shard an earlier try finished, or None: missing, made for other objects or settings, or
    damaged (a truncated or replaced file after a crash or a power loss), so decoded again."""
    npy, meta_path = _shard_paths(work_dir, plan.index)
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("signature") != _shard_signature(plan, spec):
            return None
        images, rejects = meta["images"], meta["rejects"]
        if images:
            pixels = np.load(npy, mmap_mode="r")  # reads the header; a short file fails here
            shape = (len(images), spec.channels, spec.image_size, spec.image_size)
            if pixels.shape != shape or pixels.dtype != np.uint8 or meta.get("pixels") != _digest(pixels):
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ShardResult(plan.index, npy if images else None, images, rejects)


def _save_shard(result: ShardResult, plan: ShardPlan, spec: Preprocess, work_dir: str,
                pixels: list[np.ndarray]) -> ShardResult:
    npy, meta_path = _shard_paths(work_dir, plan.index)
    digest = None
    tmp = npy + ".tmp.npy"
    try:
        if result.images:
            stacked = np.concatenate(pixels)
            digest = _digest(stacked)
            np.save(tmp, stacked)
            os.replace(tmp, npy)
            result.pixels_path = npy
        tmp = meta_path + ".tmp"
        with open(tmp, "w") as f:  # json.dumps, not json.dump: dump to a file runs the pure-Python encoder
            f.write(json.dumps({"signature": _shard_signature(plan, spec), "images": result.images,
                                "rejects": result.rejects, "pixels": digest}))
        os.replace(tmp, meta_path)
    except BaseException as err:  # a full disk kept the half-written temporary, filling it further
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if out_of_space(err):
            raise no_space(err, work_dir, "give --work-dir on a larger disk") from err
        raise
    return result


def read_objects(fs: AbstractFileSystem, objects: Sequence[ObjectInfo],
                 max_pixels: int | None = None) -> dict[str, bytes | Unread | Exception]:
    """Every object's bytes, by path; but an object over SNIFF_ABOVE bytes is never read whole
    when its first HEAD_BYTES are not an image (a video or an archive in a photo folder: a
    `Head` of it stands in, which decoding rejects as not an image), or are the header of an
    image of more than `max_pixels` pixels (an `Unread` stands in, rejected for it)."""
    big = [o.path for o in objects if o.size > SNIFF_ABOVE]
    got: dict[str, bytes | Unread | Exception] = dict(read_many(fs, [o.path for o in objects if o.size <= SNIFF_ABOVE]))
    heads = read_heads(fs, big, HEAD_BYTES)
    whole = []
    for path, head in heads.items():
        if not isinstance(head, bytes) or not might_be_image(head):
            got[path] = Head(head) if isinstance(head, bytes) else head
        elif (over := _over_the_limit(head, max_pixels)) is not None:
            got[path] = Unread(DECOMPRESSION_BOMB, f"{over} (the rest of the file was not read)")
        else:
            whole.append(path)
    got.update(read_many(fs, whole))
    return got


def _over_the_limit(head: bytes, max_pixels: int | None) -> str | None:
    """Why the image whose header is in `head` has too many pixels, or None (within the limit,
    or a header that runs past the head: then the whole object is read and decoding decides)."""
    if max_pixels is None:
        return None
    try:
        read_header(head, max_pixels)
    except DecodeError as err:
        return err.detail if err.reason == DECOMPRESSION_BOMB else None
    return None


def byte_batches(objects: Sequence[ObjectInfo], count: int, max_bytes: int = BATCH_BYTES) -> Iterator[list[ObjectInfo]]:
    """Consecutive batches of at most `count` objects and `max_bytes` listed bytes (a larger
    object alone), so that large files never pile up in memory. Pure."""
    batch: list[ObjectInfo] = []
    size = 0
    for o in objects:
        if batch and (len(batch) == count or size + o.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(o)
        size += o.size
    if batch:
        yield batch


def _fetch(fs: AbstractFileSystem, batch: list[ObjectInfo],
           max_pixels: int | None = None) -> list[tuple[str, int, bytes | Unread | None, str | None]]:
    got = read_objects(fs, batch, max_pixels)
    items = []
    for o in batch:
        data = got.get(o.path)
        if isinstance(data, BaseException) and is_connection_error(data):
            # the store, not this object: rejecting the rest one by one would publish a run made
            # from what was read before the outage. Transient: the stage and the flow retry, and
            # the shards decoded so far are kept for them
            raise AeError(f"the store stopped answering while decoding ({type(data).__name__} on {o.key!r}: "
                          f"{str(data)[:200]}); nothing was published", transient=True)
        if isinstance(data, BaseException) or data is None:
            err = f"{type(data).__name__}: {data}" if data is not None else "object vanished"
            items.append((o.key, o.size, None, err))
        else:
            items.append((o.key, o.size, data if isinstance(data, (bytes, Unread)) else bytes(data), None))
    return items


def fetch_and_decode(fs: AbstractFileSystem, batch: list[ObjectInfo], spec: Preprocess) -> tuple[list[dict], list[dict], np.ndarray]:
    """Read and decode a batch in a worker process: for local files, where shipping the bytes
    to the worker would cost as much as reading them there."""
    return decode_batch(_fetch(fs, batch, spec.max_image_pixels), spec)


def _die_with_parent(parent: int) -> None:
    """A decode worker's initializer: on Linux the worker is killed when the process that
    started it dies without shutting the pool down (SIGKILL, the OOM killer). Each worker holds
    both ends of its call queue, so it never sees the parent go and would run on forever."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl
        os._exit(0)


def decode_corpus(objects: Sequence[ObjectInfo], fs: AbstractFileSystem, spec: Preprocess,
                  work_dir: str, shard_size: int = 2048, read_batch: int = 64, workers: int = 0,
                  on_done: Callable[[int], None] = lambda n: None) -> DecodedCorpus:
    """Decode every object into cached uint8 shards; finished shards from an earlier try are reused."""
    os.makedirs(work_dir, exist_ok=True)
    plans = plan_shards(objects, shard_size)
    sizes = sorted(o.size for o in objects)
    median_bytes = sizes[len(sizes) // 2] if sizes else 0
    n_workers = decode_workers(len(objects), workers, median_bytes)
    # the parent-death signal fires when the thread that started a worker ends: this one, which
    # also shuts the pool down before it returns
    pool: Executor = (ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn"),
                                          initializer=_die_with_parent, initargs=(os.getpid(),))
                      if n_workers else _InlineExecutor())
    shards: list[ShardResult | None] = [None] * len(plans)
    todo = []
    for plan in plans:
        cached = _load_cached(plan, spec, work_dir)
        if cached is None:
            todo.append(plan)
        else:
            on_done(len(plan.objects))
            shards[plan.index] = cached
    # One pipeline across shards: batches are fetched (here, or in the workers for local files)
    # while earlier ones decode, and a shard is written as its last batch comes back, without
    # draining the pool at shard boundaries.
    workers_read = bool(n_workers) and is_local(fs)
    pending: deque[tuple[ShardPlan, Future, bool]] = deque()
    partial: dict[int, tuple[ShardResult, list[np.ndarray]]] = {}

    def drain_one() -> None:
        plan, future, last = pending.popleft()
        images, rejects, px = future.result()
        result, pixels = partial.setdefault(plan.index, (ShardResult(plan.index, None), []))
        result.images += images
        result.rejects += rejects
        pixels.append(px)
        on_done(len(images) + len(rejects))
        if last:
            shards[plan.index] = _save_shard(result, plan, spec, work_dir, pixels)
            del partial[plan.index]

    per_task = task_size(len(objects), n_workers, read_batch, workers_read, median_bytes)
    try:
        for plan in todo:
            batches = list(byte_batches(plan.objects, per_task))
            for i, batch in enumerate(batches):
                future = (pool.submit(fetch_and_decode, fs, list(batch), spec) if workers_read
                          else pool.submit(decode_batch, _fetch(fs, batch, spec.max_image_pixels), spec))
                pending.append((plan, future, i == len(batches) - 1))
                while len(pending) > 2 * max(n_workers, 1):
                    drain_one()
        while pending:
            drain_one()
    finally:
        pool.shutdown(cancel_futures=True)
    return DecodedCorpus(spec, [s for s in shards if s is not None])
