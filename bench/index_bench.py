"""Index benchmark: the automatically chosen index against exact search, on clustered synthetic
vectors of the product's dimension whose clusters overlap (the hard case for IVF).

    .venv/bin/python bench/index_bench.py [--sizes 100000,1000000] [--dim 32] [--queries 1000]

Prints build time, memory estimate, queries/s and recall@10 for exact search and the chosen
index, and the ratio of their query rates, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ae_core import index as ae_index  # noqa: E402
from ae_core.config import IndexConfig  # noqa: E402
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


def bench(n: int, dim: int, n_queries: int, budget_mb: int) -> list[dict]:
    data = overlapping_clusters(n + n_queries, dim)  # one distribution; queries held out of the index
    emb, queries = data[:n], np.ascontiguousarray(data[n:])
    exact = faiss.IndexFlatL2(dim)
    exact.add(emb)
    exact_qps = qps(exact, queries)
    t0 = time.perf_counter()
    index, info = ae_index.build_index(emb, IndexConfig(memory_budget_mb=budget_mb, recall_queries=n_queries))
    build_s = time.perf_counter() - t0
    recall, _ = ae_index.measure_recall(index, exact, queries)
    chosen_qps = qps(index, queries)
    return [{"vectors": n, "index": "exact (Flat)", "build_s": 0.0, "memory_mb": n * dim * 4 / 2**20,
             "queries_per_s": exact_qps, "recall@10": 1.0, "speedup": 1.0},
            {"vectors": n, "index": f"{info['factory']} {info['search_params']}", "build_s": build_s,
             "memory_mb": info["memory_estimate_mb"], "queries_per_s": chosen_qps,
             "recall@10": recall, "speedup": chosen_qps / exact_qps}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--budget-mb", type=int, default=4096)
    args = p.parse_args()
    faiss.omp_set_num_threads(faiss.omp_get_max_threads())
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += bench(n, args.dim, args.queries, args.budget_mb)
        print(table(rows[-2:]), flush=True)
    print(f"\nmachine: {machine()}; dim {args.dim}; {args.queries} held-out queries; memory budget "
          f"{args.budget_mb} MiB; recall@10 against exact search on the same queries\n")
    print(table(rows))


if __name__ == "__main__":
    main()
