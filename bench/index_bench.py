"""Index benchmark: the automatically chosen index against exact search, on clustered synthetic
vectors of the product's dimension whose clusters overlap (the hard case for IVF).

    .venv/bin/python bench/index_bench.py [--sizes 100000,1000000] [--dim 32] [--queries 1000]

Prints build time, memory estimate, queries/s and recall@10 for exact search and the chosen
index, and the ratio of their query rates, measured in the same run. Each size is built twice:
under --budget-mb (HNSW at 1M vectors of dim 32) and under a tight budget, --tight-budget-share
of the raw vectors' size (IVF-PQ with exact re-ranking). The chosen indexes are written to a file
and searched as `ae` searches them: loaded through `ae_core.index.load`, memory-mapped.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ae_core import index as ae_index  # noqa: E402
from ae_core.config import IndexConfig  # noqa: E402
from ae_core.storage import open_store  # noqa: E402
from bench.common import machine, median_time, table  # noqa: E402


def overlapping_clusters(n: int, dim: int, centres: int = 1000, seed: int = 0) -> np.ndarray:
    """Gaussian clusters whose spread is about their spacing, so neighbourhoods straddle cells."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    spread = 0.7 * np.median(np.linalg.norm(c[:50, None] - c[None, :50], axis=-1)) / np.sqrt(dim)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 200_000):
        m = min(200_000, n - start)
        out[start:start + m] = c[rng.integers(0, centres, m)] + spread * rng.standard_normal((m, dim))
    return out


def qps(index: faiss.Index, queries: np.ndarray, k: int = 10) -> float:
    return len(queries) / median_time(lambda: index.search(queries, k))


def chosen_row(emb: np.ndarray, queries: np.ndarray, exact: faiss.Index, exact_qps: float, budget_mb: int,
               n_queries: int) -> dict:
    t0 = time.perf_counter()
    index, info = ae_index.build_index(emb, IndexConfig(memory_budget_mb=budget_mb, recall_queries=n_queries))
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.faiss")
        with open(path, "wb") as f:
            f.write(ae_index.to_bytes(index))
        del index
        loaded = ae_index.load(open_store(tmp)[0], path)
        recall, _ = ae_index.measure_recall(loaded, exact, queries)
        chosen_qps = qps(loaded, queries)
    return {"vectors": len(emb), "index": f"{info['factory']} {info['search_params']}", "budget_mb": budget_mb,
            "build_s": build_s, "memory_mb": info["memory_estimate_mb"], "mapped_mb": info["mapped_mb"],
            "queries_per_s": chosen_qps, "recall@10": recall, "speedup": chosen_qps / exact_qps}


def bench(n: int, dim: int, n_queries: int, budget_mb: int, tight_share: float) -> list[dict]:
    data = overlapping_clusters(n + n_queries, dim)  # one distribution; queries held out of the index
    emb, queries = data[:n], np.ascontiguousarray(data[n:])
    exact = faiss.IndexFlatL2(dim)
    exact.add(emb)
    exact_qps = qps(exact, queries)
    raw_mb = n * dim * 4 / 2**20
    rows = [{"vectors": n, "index": "exact (Flat)", "budget_mb": "", "build_s": 0.0, "memory_mb": raw_mb,
             "mapped_mb": 0.0, "queries_per_s": exact_qps, "recall@10": 1.0, "speedup": 1.0},
            chosen_row(emb, queries, exact, exact_qps, budget_mb, n_queries)]
    if tight_share:
        rows.append(chosen_row(emb, queries, exact, exact_qps, max(1, int(raw_mb * tight_share)), n_queries))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--budget-mb", type=int, default=4096)
    p.add_argument("--tight-budget-share", type=float, default=0.5,
                   help="second build per size under this share of the raw vectors' size (0 = skip)")
    args = p.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        new = bench(n, args.dim, args.queries, args.budget_mb, args.tight_budget_share)
        rows += new
        print(table(new), flush=True)
    print(f"\nmachine: {machine()}; dim {args.dim}; {args.queries} held-out queries; memory budgets "
          f"{args.budget_mb} MiB and {args.tight_budget_share} of the raw vectors; recall@10 against exact "
          f"search on the same queries\n")
    print(table(rows))


if __name__ == "__main__":
    main()
