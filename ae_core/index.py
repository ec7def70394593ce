"""The FAISS index over the embedding table. Id i is row i of the table.

The kind of index is a small pure function of the vector count, the dimension and a memory
budget (`choose_index`), in the spirit of autofaiss: exact search while it is fast enough, HNSW
when its graph fits the budget, IVF-Flat when only the vectors fit, and under a tighter budget
IVF-PQ with exact re-ranking: compressed codes in memory pick candidates, and their exact
distances are computed from the full vectors, which stay in the index file and are memory-mapped
(`load`), so only the pages of the candidates are read. Every approximate build is tuned and
measured: recall@10 against exact search on held-out rows must reach the floor, or the index is
refused.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import faiss
import numpy as np

from ae_core.config import IndexConfig
from ae_core.errors import AeError
from ae_core.hardware import usable_cores
from ae_core.storage import is_local

# Exact search stays under ~5 ms a query on 2 cores up to here (dim 32: 200k x 32 floats scanned).
FLAT_MAX_VECTORS = 200_000
HNSW_M = 32  # graph degree: recall 0.96-0.98 at efSearch 128 on 1M overlapping clusters
HNSW_BYTES_PER_LINK = 4  # int32 neighbour ids; level 0 holds 2*M of them per vector
IVF_LISTS_PER_SQRT = 4  # nlist = 4 sqrt(n), the usual rule for IVF at this scale
PQ_MIN_VECTORS = 10_000  # each 8-bit PQ codebook has 256 centroids: ~39 training points apiece
REFINE_K_FACTOR = 8  # IVF-PQ returns k * this candidates, re-ranked by exact distance
EF_SEARCH_STEPS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)  # ~sqrt(2) steps
NPROBE_STEPS = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
RECALL_K = 10
APPROX_MIN_VECTORS = 100  # a requested HNSW or IVF on fewer vectors is built as exact search
HELD_OUT_SHARE = 0.1  # at most this share of rows is held out of the index while it is tuned
CONFIDENCE_Z = 2.0  # the floor must hold for the recall estimate minus two standard errors


@dataclass(frozen=True)
class IndexChoice:
    kind: str  # flat | hnsw | ivf
    factory: str  # the faiss index_factory string
    reason: str
    bytes_estimate: int


def pq_subvectors(dim: int) -> int:
    """PQ sub-quantizers: one 8-bit code per pair of dimensions (per dimension when dim is odd)."""
    return dim // 2 if dim % 2 == 0 else dim


def _bytes(kind: str, n: int, dim: int) -> int:
    """Memory of the loaded index, the estimate the budget is checked against. Flat and HNSW
    count their vectors although `load` maps them from the file (they are read on every search);
    IVF-PQ counts its codes, ids and centroids, not the vectors it re-ranks with, which are read
    only for each query's candidates (`mapped_bytes`)."""
    raw, ids = n * dim * 4, n * 8  # ids: the IndexIDMap's row ids
    if kind == "hnsw":
        return raw + ids + n * 2 * HNSW_M * HNSW_BYTES_PER_LINK * 3 // 2  # level 0 plus upper levels
    if kind == "ivf":
        return raw + ids + n * 8 + ivf_lists(n) * dim * 4  # ids beside the vectors in their lists
    if kind == "ivfpq":  # no precomputed distance table: `load` skips it (nlist x M x 256 floats)
        return n * pq_subvectors(dim) + ids + n * 8 + ivf_lists(n) * dim * 4 + 256 * dim * 4
    return raw


def mapped_bytes(kind: str, n: int, dim: int) -> int:
    """Bytes of the index file read on demand through the memory map and not counted in the
    budget: IVF-PQ's full vectors, touched only for each query's re-ranked candidates."""
    return n * dim * 4 if kind == "ivfpq" else 0


def ivf_lists(n: int) -> int:
    return max(1, min(n // 39, int(IVF_LISTS_PER_SQRT * math.sqrt(n))))  # faiss wants >= 39 points a list


def check_trainable(kind: str, n: int) -> None:
    """An AeError when the requested index kind cannot be trained on n vectors. A run checks it
    with its listing's count (at least the vectors it will have) before it trains."""
    if kind == "ivfpq" and n < PQ_MIN_VECTORS:
        raise AeError(f"an IVF-PQ index needs at least {PQ_MIN_VECTORS} vectors to train its codebooks "
                      f"(this run has {n}); use --index-kind auto or flat (index.kind in the flow's parameters)")


def choose_index(n: int, dim: int, memory_budget_bytes: int, kind: str = "auto") -> IndexChoice:
    """Pick the index from size and budget. Pure; tested as a table."""
    factories = {"flat": "Flat", "hnsw": f"HNSW{HNSW_M},Flat", "ivf": f"IVF{ivf_lists(n)},Flat",
                 "ivfpq": f"IVF{ivf_lists(n)},PQ{pq_subvectors(dim)}x8,RFlat"}
    check_trainable(kind, n)
    if kind in ("hnsw", "ivf") and n < APPROX_MIN_VECTORS:
        return IndexChoice("flat", "Flat", f"{kind} was requested, but {n} vectors are too few to tune and measure "
                           "an approximate index on: exact search", _bytes("flat", n, dim))
    if kind != "auto":
        need = _bytes(kind, n, dim)
        over = (f", over the memory budget of {memory_budget_bytes >> 20} MiB (--index-memory-mb applies to "
                "the automatic choice)") if need > memory_budget_bytes else ""
        return IndexChoice(kind, factories[kind], f"requested (about {_mib(need)} MiB{over})", need)
    if n <= FLAT_MAX_VECTORS and _bytes("flat", n, dim) <= memory_budget_bytes:
        return IndexChoice("flat", "Flat", f"n <= {FLAT_MAX_VECTORS}: exact search is fast enough",
                           _bytes("flat", n, dim))
    if n > FLAT_MAX_VECTORS and _bytes("hnsw", n, dim) <= memory_budget_bytes:
        return IndexChoice("hnsw", factories["hnsw"], "HNSW graph fits the memory budget", _bytes("hnsw", n, dim))
    if n > FLAT_MAX_VECTORS and _bytes("ivf", n, dim) <= memory_budget_bytes:
        return IndexChoice("ivf", factories["ivf"], "HNSW would exceed the memory budget", _bytes("ivf", n, dim))
    if n >= PQ_MIN_VECTORS and _bytes("ivfpq", n, dim) <= memory_budget_bytes:
        return IndexChoice("ivfpq", factories["ivfpq"], "the vectors themselves exceed the memory budget: "
                           "PQ codes in memory, exact re-ranking from the memory-mapped file",
                           _bytes("ivfpq", n, dim))
    raise AeError(f"{n} vectors of {dim} floats do not fit an index in {memory_budget_bytes >> 20} MiB "
                  f"(exact search needs {_mib(_bytes('flat', n, dim))} MiB"
                  + (f", IVF-PQ {_mib(_bytes('ivfpq', n, dim))} MiB" if n >= PQ_MIN_VECTORS else "")
                  + "); raise --index-memory-mb (index.memory_budget_mb in the flow's parameters)")


def _mib(nbytes: int) -> int:
    return -(-nbytes // 2**20)  # rounded up: "needs 1 MiB" of a 1 MiB budget would not be why it failed


def set_threads() -> None:
    """FAISS's OpenMP pool: one thread per usable core (OpenMP may count the host's cores)."""
    faiss.omp_set_num_threads(usable_cores())


def _inner(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def _set_search(index: faiss.Index, kind: str, value: int) -> None:
    inner = _inner(index)
    if kind == "hnsw":
        inner.hnsw.efSearch = value
    elif kind == "ivf":
        inner.nprobe = value
    elif kind == "ivfpq":
        faiss.downcast_index(inner.base_index).nprobe = value
        inner.k_factor = REFINE_K_FACTOR


def search_params(index: faiss.Index) -> dict:
    """The tuned search settings stored in the index (serialised with it)."""
    inner = _inner(index)
    if isinstance(inner, faiss.IndexHNSW):
        return {"efSearch": int(inner.hnsw.efSearch)}
    if isinstance(inner, faiss.IndexIVF):
        return {"nprobe": int(inner.nprobe)}
    if isinstance(inner, faiss.IndexRefine):
        return {"nprobe": int(faiss.downcast_index(inner.base_index).nprobe), "k_factor": float(inner.k_factor)}
    return {}


def measure_recall(index: faiss.Index, exact: faiss.Index, queries: np.ndarray,
                   vectors: np.ndarray | None = None) -> tuple[float, float]:
    """recall@10 of `index` against the exact index over the same vectors: (mean, standard error).
    The exact neighbours strictly nearer than the 10th must come back by id; the slots of the rows
    tied with the 10th (duplicate images: which copies come back is arbitrary) are filled by any
    returned rows as near, within float32 rounding, and by no more of them than there are such
    slots. The returned rows' distances are computed from `vectors` (row id -> vector) when given,
    else taken from `index` (exact for every kind ae builds: IVF-PQ re-ranks with the full vectors)."""
    k = min(RECALL_K, exact.ntotal)
    truth_d, truth = exact.search(queries, k)
    got_d, got = index.search(queries, k)
    if vectors is not None:
        rows = np.where(got >= 0, got, 0)
        got_d = np.where(got >= 0, ((vectors[rows] - queries[:, None, :]) ** 2).sum(-1), np.inf)
    scale = (queries.astype(np.float64) ** 2).sum(1)  # float32 rounding of |q - x|^2 grows with |q|^2
    per_query = np.empty(len(queries))
    for i in range(len(queries)):
        tol = 1e-5 * (truth_d[i, -1] + scale[i])
        strict = set(truth[i][truth_d[i] < truth_d[i, -1] - tol].tolist())
        valid = got_d[i] < np.inf
        returned = dict(zip(got[i][valid].tolist(), got_d[i][valid].tolist()))  # one entry per id
        tied_found = sum(1 for r, d in returned.items() if r not in strict and d <= truth_d[i, -1] + tol)
        per_query[i] = (len(strict & returned.keys()) + min(k - len(strict), tied_found)) / k
    return float(per_query.mean()), float(per_query.std() / np.sqrt(len(per_query)))


def build_index(emb: np.ndarray, cfg: IndexConfig, seed: int = 0) -> tuple[faiss.Index, dict]:
    """Build the chosen index, tune its search setting up to the recall floor, and measure it.

    An approximate index is tuned with truly held-out queries: sampled rows are left out while
    the rest are indexed, recall@10 of those rows against exact search over the rest decides
    efSearch or nprobe (the floor must hold two standard errors below the estimate), and the
    sampled rows are added last (ids are row positions throughout).
    Returns the index and what to record in the manifest. Raises AeError (nothing is written)
    when the index cannot reach the floor.
    """
    set_threads()
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, dim = emb.shape
    choice = choose_index(n, dim, cfg.memory_budget_mb << 20, cfg.kind)
    info = {"kind": choice.kind, "factory": choice.factory, "reason": choice.reason,
            "memory_estimate_mb": round(choice.bytes_estimate / 2**20, 1),
            "mapped_mb": round(mapped_bytes(choice.kind, n, dim) / 2**20, 1),
            "memory_budget_mb": cfg.memory_budget_mb, "recall_floor": cfg.recall_floor}
    if choice.kind == "flat":
        index = faiss.IndexFlatL2(dim)
        index.add(emb)
        return index, {**info, "recall_at_10": 1.0, "recall_queries": 0, "search_params": {}}
    held = np.sort(np.random.default_rng(seed).choice(n, size=max(1, min(cfg.recall_queries, int(n * HELD_OUT_SHARE))), replace=False))
    rest = np.setdiff1d(np.arange(n), held)
    index = faiss.IndexIDMap(faiss.index_factory(dim, choice.factory, faiss.METRIC_L2))
    index.train(emb)
    index.add_with_ids(emb[rest], rest.astype(np.int64))
    exact = faiss.IndexIDMap(faiss.IndexFlatL2(dim))
    exact.add_with_ids(emb[rest], rest.astype(np.int64))
    recall, stderr = 0.0, 0.0
    for value in {"hnsw": EF_SEARCH_STEPS, "ivf": NPROBE_STEPS, "ivfpq": NPROBE_STEPS}[choice.kind]:
        _set_search(index, choice.kind, value)
        recall, stderr = measure_recall(index, exact, emb[held], emb)
        if recall - CONFIDENCE_Z * stderr >= cfg.recall_floor:
            break
    index.add_with_ids(emb[held], held.astype(np.int64))
    info.update(recall_at_10=recall, recall_stderr=stderr, recall_queries=len(held),
                search_params=search_params(index))
    if recall - CONFIDENCE_Z * stderr < cfg.recall_floor:
        raise AeError(f"the {choice.kind} index reached recall@10 {recall:.3f} (+-{stderr:.3f}) against "
                      f"exact search, under the floor {cfg.recall_floor}; not published. Use --index-kind flat"
                      + (" or auto (index.kind in the flow's parameters)" if cfg.kind != "auto" else
                         " or a larger --index-memory-mb (index.kind, index.memory_budget_mb in the flow's parameters)"))
    return index, info


def to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def from_bytes(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


# Memory-map stored vectors; do not build IVF-PQ's precomputed distance table (nlist x M x 256
# floats, often larger than the codes): searching without it gives the same results.
_MMAP = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE


def load(fs, path: str) -> faiss.Index:  # noqa: ANN001 - an fsspec filesystem
    """Open a published index for searching, memory-mapped: the stored vectors (of Flat, HNSW and
    the re-ranking stage of IVF-PQ) stay in the file and the page cache, not in process memory.
    A remote index is first copied to a local temporary file (in TMPDIR: on a RAM-backed tmpfs
    the copy takes memory after all), which is unlinked at once (the mapping keeps it readable
    until the index is freed)."""
    set_threads()
    if is_local(fs):
        if not os.path.isfile(path):  # faiss says only "could not open", in a C++ traceback
            raise FileNotFoundError(2, "No such file or directory", path)
        return faiss.read_index(path, _MMAP)
    fd, tmp = tempfile.mkstemp(suffix=".faiss")
    os.close(fd)
    try:
        fs.get_file(path, tmp)
        return faiss.read_index(tmp, _MMAP)
    finally:
        os.unlink(tmp)


def _breadth(index: faiss.Index, k: int) -> tuple[object, str, int] | None:
    """(holder, attribute, wider value) of an approximate index's search breadth: every list of
    an IVF, a candidate list of 2k for HNSW. None for exact search."""
    inner = _inner(index)
    if isinstance(inner, faiss.IndexRefine):
        inner = faiss.downcast_index(inner.base_index)
    if isinstance(inner, faiss.IndexHNSW):
        return inner.hnsw, "efSearch", 2 * k
    if isinstance(inner, faiss.IndexIVF):
        return inner, "nprobe", inner.nlist
    return None


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances (not squared) and ids, nearest first. The index's tuned setting is
    made for k = 10: when it reaches fewer than k vectors (ids of -1), the search runs again
    wider, once (the setting is put back after). Queries still short of k (HNSW's graph can
    leave rows unreachable: many identical vectors, say) are answered by exact search over the
    vectors HNSW stores; ids of -1 then mean 'fewer than k'."""
    k = max(1, min(k, index.ntotal))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    d2, ids = index.search(queries, k)
    breadth = _breadth(index, k) if (ids < 0).any() else None
    if breadth is not None:
        holder, name, wide = breadth
        tuned = getattr(holder, name)
        setattr(holder, name, max(tuned, wide))
        try:
            d2, ids = index.search(queries, k)
        finally:
            setattr(holder, name, tuned)
    short = np.flatnonzero((ids < 0).any(axis=1))
    stored = _hnsw_storage(index) if len(short) else None
    if stored is not None:
        storage, row_ids = stored
        d2[short], positions = storage.search(queries[short], k)  # in place: the vectors are not copied
        ids[short] = np.where(positions >= 0, row_ids[np.maximum(positions, 0)], -1)
    return np.sqrt(np.maximum(d2, 0)), ids


def _hnsw_storage(index: faiss.Index) -> tuple[faiss.IndexFlat, np.ndarray | None] | None:
    """(the exact index of vectors under an HNSW index, the row id of each of its positions);
    None for other kinds (an IVF's widest search, every list, reaches every row already)."""
    outer, inner = faiss.downcast_index(index), _inner(index)
    storage = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else None
    if not isinstance(storage, faiss.IndexFlat):
        return None
    row_ids = faiss.vector_to_array(outer.id_map) if isinstance(outer, faiss.IndexIDMap) else np.arange(inner.ntotal)
    return storage, row_ids


def exact_search(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k nearest rows of `base` to each query, by brute force (for a few queries)."""
    base = np.ascontiguousarray(base, dtype=np.float32)
    _, ids = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), base, max(1, min(k, len(base))))
    return ids


def self_hit_rate(index: faiss.Index, emb: np.ndarray, sample: int = 1000, seed: int = 0) -> float:
    """Share of sampled rows whose nearest neighbour is the row itself (or an exact duplicate)."""
    n = len(emb)
    if n == 0:
        return 1.0
    rows = np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False)
    d, ids = search(index, emb[rows], 1)
    hits = (ids[:, 0] == rows) | (d[:, 0] <= 0.0)
    return float(hits.mean())
