"""The FAISS index over the embedding table. Id i is row i of the table."""

from __future__ import annotations

import faiss
import numpy as np

from ae_core.config import IndexConfig


def build_index(emb: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """Exact L2 search; ids are insertion order, which is table row order."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    index = faiss.IndexFlatL2(emb.shape[1])
    index.add(emb)
    return index


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
