"""The FAISS index over the embedding table. Id i is row i of the table.

The kind of index is a small pure function of the vector count, the dimension and a memory
budget (`choose_index`), in the spirit of autofaiss: exact search while it is fast enough, HNSW
when its graph fits the budget, IVF-Flat otherwise. Every approximate build is tuned and measured:
recall@10 against exact search on sampled rows must reach the floor, or the index is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

from ae_core.config import IndexConfig
from ae_core.errors import AeError

# Exact search stays under ~5 ms a query on 2 cores up to here (dim 32: 200k x 32 floats scanned).
FLAT_MAX_VECTORS = 200_000
HNSW_M = 32  # graph degree: recall 0.96-0.98 at efSearch 128 on 1M overlapping clusters
HNSW_BYTES_PER_LINK = 4  # int32 neighbour ids; level 0 holds 2*M of them per vector
IVF_LISTS_PER_SQRT = 4  # nlist = 4 sqrt(n), the usual rule for IVF at this scale
EF_SEARCH_STEPS = (64, 128, 256, 512, 1024)
NPROBE_STEPS = (8, 16, 32, 64, 128, 256)
RECALL_K = 10


@dataclass(frozen=True)
class IndexChoice:
    kind: str  # flat | hnsw | ivf
    factory: str  # the faiss index_factory string
    reason: str
    bytes_estimate: int


def _bytes(kind: str, n: int, dim: int) -> int:
    raw = n * dim * 4
    if kind == "hnsw":
        return raw + n * 2 * HNSW_M * HNSW_BYTES_PER_LINK * 3 // 2  # level 0 plus upper levels
    if kind == "ivf":
        return raw + n * 8  # ids beside the vectors in their lists
    return raw


def ivf_lists(n: int) -> int:
    return max(1, min(n // 39, int(IVF_LISTS_PER_SQRT * math.sqrt(n))))  # faiss wants >= 39 points a list


def choose_index(n: int, dim: int, memory_budget_bytes: int, kind: str = "auto") -> IndexChoice:
    """Pick the index from size and budget. Pure; tested as a table."""
    factories = {"flat": "Flat", "hnsw": f"HNSW{HNSW_M},Flat", "ivf": f"IVF{ivf_lists(n)},Flat"}
    if kind != "auto":
        return IndexChoice(kind, factories[kind], "requested", _bytes(kind, n, dim))
    if _bytes("flat", n, dim) > memory_budget_bytes:
        raise AeError(f"{n} vectors of {dim} floats need {_bytes('flat', n, dim) >> 20} MiB, over the "
                      f"index memory budget; raise index.memory_budget_mb")
    if n <= FLAT_MAX_VECTORS:
        return IndexChoice("flat", "Flat", f"n <= {FLAT_MAX_VECTORS}: exact search is fast enough",
                           _bytes("flat", n, dim))
    if _bytes("hnsw", n, dim) <= memory_budget_bytes:
        return IndexChoice("hnsw", factories["hnsw"], "HNSW graph fits the memory budget", _bytes("hnsw", n, dim))
    return IndexChoice("ivf", factories["ivf"], "HNSW would exceed the memory budget", _bytes("ivf", n, dim))


def _set_search(index: faiss.Index, kind: str, value: int) -> None:
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = value
    elif kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = value


def search_params(index: faiss.Index) -> dict:
    """The tuned search settings stored in the index (serialised with it)."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        return {"efSearch": int(inner.hnsw.efSearch)}
    if isinstance(inner, faiss.IndexIVF):
        return {"nprobe": int(inner.nprobe)}
    return {}


def measure_recall(index: faiss.Index, emb: np.ndarray, queries: int, seed: int = 0) -> float:
    """recall@10 of `index` against exact search, on rows sampled from `emb` as queries."""
    n = len(emb)
    rows = np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False)
    exact = faiss.IndexFlatL2(emb.shape[1])
    exact.add(emb)
    k = min(RECALL_K, n)
    _, truth = exact.search(emb[rows], k)
    _, got = index.search(emb[rows], k)
    return float(np.mean([len(set(t) & set(g)) / k for t, g in zip(truth, got)]))


def build_index(emb: np.ndarray, cfg: IndexConfig) -> tuple[faiss.Index, dict]:
    """Build the chosen index, tune its search setting up to the recall floor, and measure it.

    Returns the index and what to record in the manifest. Raises AeError (nothing is written)
    when an approximate index cannot reach the floor.
    """
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, dim = emb.shape
    choice = choose_index(n, dim, cfg.memory_budget_mb << 20, cfg.kind)
    index = faiss.index_factory(dim, choice.factory, faiss.METRIC_L2)
    if not index.is_trained:
        index.train(emb)
    index.add(emb)
    recall = 1.0 if choice.kind == "flat" else 0.0
    for value in {"hnsw": EF_SEARCH_STEPS, "ivf": NPROBE_STEPS}.get(choice.kind, ()):
        _set_search(index, choice.kind, value)
        recall = measure_recall(index, emb, cfg.recall_queries)
        if recall >= cfg.recall_floor:
            break
    info = {"kind": choice.kind, "factory": choice.factory, "reason": choice.reason,
            "memory_estimate_mb": round(choice.bytes_estimate / 2**20, 1),
            "memory_budget_mb": cfg.memory_budget_mb, "recall_at_10": recall,
            "recall_floor": cfg.recall_floor, "recall_queries": min(cfg.recall_queries, n),
            "search_params": search_params(index)}
    if recall < cfg.recall_floor:
        raise AeError(f"the {choice.kind} index reached recall@10 {recall:.3f} against exact search, "
                      f"under the floor {cfg.recall_floor}; not published. Use index.kind=flat or a "
                      "larger index.memory_budget_mb")
    return index, info


def to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def from_bytes(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances (not squared) and ids, nearest first; ids of -1 mean 'fewer than k'."""
    k = max(1, min(k, index.ntotal))
    d2, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return np.sqrt(np.maximum(d2, 0)), ids


def self_hit_rate(index: faiss.Index, emb: np.ndarray, sample: int = 1000, seed: int = 0) -> float:
    """Share of sampled rows whose nearest neighbour is the row itself (or an exact duplicate)."""
    n = len(emb)
    if n == 0:
        return 1.0
    rows = np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False)
    d, ids = search(index, emb[rows], 1)
    hits = (ids[:, 0] == rows) | (d[:, 0] <= 0.0)
    return float(hits.mean())
