"""Parquet round trip is exact; the index finds every image as its own nearest neighbour."""

from __future__ import annotations

import io

import faiss
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ae_core import index as ae_index, table
from ae_core.config import IndexConfig


def _images(n):
    return [{"key": f"img/{i:03d}.png", "width": 10 + i, "height": 20, "size_bytes": 100 + i,
             "fingerprint": f"{i:032x}", "mode": "L", "format": "PNG"} for i in range(n)]


def test_parquet_round_trip_is_exact():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 32)).astype(np.float32)
    err = rng.random(50).astype(np.float32)
    meta = {"model_version": "ae-123", "dim": 32, "image_size": 28, "channels": 1}
    tbl = table.embeddings_table(_images(50), emb, err, meta)
    fs = fsspec.filesystem("memory")
    table.write_table(fs, "/rt/embeddings.parquet", tbl)
    back = table.read_table(fs, "/rt/embeddings.parquet")
    assert back.equals(tbl)
    assert back.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert np.array_equal(table.embeddings_matrix(back), emb)
    assert np.array_equal(back.column("recon_error").to_numpy(), err)
    assert table.table_metadata(back) == meta
    assert back.schema.metadata[b"model_version"] == b"ae-123"
    # pandas sees one fixed-width vector per row
    df = pd.read_parquet(io.BytesIO(fs.cat_file("/rt/embeddings.parquet")))
    assert len(df) == 50 and len(df.embedding.iloc[7]) == 32
    assert np.array_equal(np.asarray(df.embedding.iloc[7], np.float32), emb[7])


def test_rejects_table_schema():
    tbl = table.rejects_table([{"key": "a", "reason": "empty", "detail": "0 bytes", "size_bytes": 0}])
    assert tbl.schema == table.REJECTS_SCHEMA
    assert tbl.to_pylist()[0]["fingerprint"] is None
    buf = io.BytesIO()
    pq.write_table(table.rejects_table([]), buf)
    assert pq.read_table(io.BytesIO(buf.getvalue())).num_rows == 0


def test_index_matches_brute_force_and_finds_self():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((500, 16)).astype(np.float32)
    index = ae_index.from_bytes(ae_index.to_bytes(ae_index.build_index(emb, IndexConfig())[0]))
    assert isinstance(index, faiss.Index) and index.ntotal == 500
    d, ids = ae_index.search(index, emb, 5)
    assert (ids[:, 0] == np.arange(500)).all()
    brute = np.sqrt(((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1))
    ref = np.argsort(brute, axis=1)[:, :5]
    assert (ids == ref).mean() > 0.999
    assert np.allclose(d, np.take_along_axis(brute, ref, 1), atol=1e-3)
    assert ae_index.self_hit_rate(index, emb) == 1.0


def test_a_key_ranks_first_among_its_exact_duplicates():
    from ae_core.query import _rank

    keys = pa.array([f"k{i}" for i in range(12)])
    emb = np.zeros((12, 4), np.float32)  # twelve identical images
    index = ae_index.build_index(emb, IndexConfig())[0]
    d, ids = ae_index.search(index, emb[7:8], 3)
    hits = _rank(d[0], ids[0], keys, 3, self_row=7)
    assert [h.key for h in hits][0] == "k7" and len(hits) == 3
    assert len({h.key for h in hits}) == 3 and all(h.distance == 0 for h in hits)


MiB = 1 << 20


@pytest.mark.parametrize("n,dim,budget_mb,kind", [
    (1_000, 32, 4096, "flat"), (200_000, 32, 4096, "flat"), (200_001, 32, 4096, "hnsw"),
    (1_000_000, 32, 4096, "hnsw"), (1_000_000, 32, 300, "ivf"), (10_000_000, 64, 4096, "ivf"),
    (100_000_000, 32, 20_000, "ivf"),
    # budgets under the vectors' own size: PQ codes in memory, re-ranking vectors memory-mapped
    (1_000_000, 32, 100, "ivfpq"), (200_000, 32, 20, "ivfpq"), (10_000_000, 64, 1024, "ivfpq"),
    (100_000_000, 32, 4096, "ivfpq"), (10_000, 32, 1, "ivfpq"),
])
def test_choose_index_table(n, dim, budget_mb, kind):
    choice = ae_index.choose_index(n, dim, budget_mb * MiB)
    assert choice.kind == kind
    assert choice.bytes_estimate <= budget_mb * MiB


@pytest.mark.parametrize("dim,subvectors", [(32, 16), (64, 32), (10, 5), (7, 7)])
def test_pq_codes_one_byte_per_pair_of_dimensions(dim, subvectors):
    assert ae_index.pq_subvectors(dim) == subvectors
    assert ae_index.choose_index(1_000_000, dim, 1, "ivfpq").factory.endswith(f"PQ{subvectors}x8,RFlat")


@pytest.mark.parametrize("n,dim,budget_mb", [(10_000_000, 64, 256), (9_000, 64, 1), (100_000_000, 32, 1024)])
def test_choose_index_refuses_what_cannot_fit(n, dim, budget_mb):
    from ae_core.errors import AeError
    with pytest.raises(AeError, match="memory_budget_mb"):
        ae_index.choose_index(n, dim, budget_mb * MiB)


def test_a_budget_error_names_the_flag_and_rounds_the_need_up():
    from ae_core.errors import AeError
    # 1,440 x 256 floats: 1.4 MiB, "needs 1 MiB" of a 1 MiB budget would not explain the refusal
    with pytest.raises(AeError, match=r"exact search needs 2 MiB\); raise --index-memory-mb"):
        ae_index.choose_index(1_440, 256, 1 * MiB)


def test_a_requested_kind_says_when_it_exceeds_the_budget_and_is_exact_search_on_few_vectors():
    assert ae_index.choose_index(10_000, 32, 1 * MiB, "hnsw").reason.startswith("requested (about 5 MiB, over the memory budget of 1 MiB")
    assert ae_index.choose_index(10_000, 32, 4096 * MiB, "hnsw").reason == "requested (about 5 MiB)"
    for kind in ("hnsw", "ivf"):
        tiny = ae_index.choose_index(99, 32, 4096 * MiB, kind)
        assert tiny.kind == "flat" and "too few" in tiny.reason
    index, info = ae_index.build_index(np.ones((1, 8), np.float32), IndexConfig(kind="hnsw"))  # was an assert in faiss
    assert (info["kind"], index.ntotal, info["recall_at_10"]) == ("flat", 1, 1.0)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_duplicate_vectors_returned_in_another_order_than_exact_search_count_as_found(kind):
    """100 images, each 30 times: any 10 of an image's copies are its 10 nearest. Counting only the
    ids exact search returned made a correct HNSW index fail the floor at recall ~0.6."""
    emb = np.repeat(_clusters(100, 16, seed=3), 30, axis=0)
    index, info = ae_index.build_index(emb, IndexConfig(kind=kind, recall_queries=300))
    assert info["recall_at_10"] >= 0.95
    exact = faiss.IndexFlatL2(16)
    exact.add(emb[:1500])
    far = faiss.IndexFlatL2(16)  # returns rows that are not tied: not counted
    far.add(emb[1500:])
    recall, _ = ae_index.measure_recall(ae_index_shift(far, 1500), exact, emb[:50], emb)
    assert recall == 0.0


def test_tied_rows_fill_only_the_tied_slots_and_tiny_distances_are_not_all_ties():
    """4 copies of the query, 5 of image B at distance 1, 5 of image C at distance 4: exact search
    returns the copies, the B's and one C. Returning the B's and all C's finds 6 of 10, not 10."""
    q = np.zeros((1, 2), np.float32)
    emb = np.concatenate([np.zeros((4, 2)), np.tile([1, 0], (5, 1)), np.tile([2, 0], (5, 1))]).astype(np.float32)
    exact = faiss.IndexFlatL2(2)
    exact.add(emb)
    stub = faiss.IndexIDMap(faiss.IndexFlatL2(2))
    stub.add_with_ids(emb[4:], np.arange(4, 14))
    assert ae_index.measure_recall(stub, exact, q, emb)[0] == pytest.approx(0.6)
    assert ae_index.measure_recall(stub, exact, q)[0] == pytest.approx(0.6)
    # embeddings of a tiny scale (a collapsed model): random rows are not ties
    small = (_clusters(2_000, 16, seed=4) * 1e-4).astype(np.float32)
    exact = faiss.IndexFlatL2(16)
    exact.add(small)
    shuffled = faiss.IndexIDMap(faiss.IndexFlatL2(16))
    perm = np.random.default_rng(0).permutation(2_000)
    shuffled.add_with_ids(small, perm.astype(np.int64))  # row i answers as a random other row
    assert ae_index.measure_recall(shuffled, exact, small[:100], small)[0] < 0.1


def ae_index_shift(index, offset):
    """`index` with its ids moved by offset (rows beyond the exact index's)."""
    mapped = faiss.IndexIDMap(faiss.IndexFlatL2(index.d))
    mapped.add_with_ids(index.reconstruct_n(0, index.ntotal), np.arange(offset, offset + index.ntotal))
    return mapped


def test_ivfpq_on_too_few_vectors_is_a_clear_error():
    from ae_core.errors import AeError
    with pytest.raises(AeError, match="IVF-PQ index needs at least 10000 vectors.*has 500"):
        ae_index.choose_index(500, 32, 4096 * MiB, "ivfpq")


def test_ivfpq_on_too_few_images_is_refused_before_training(mnist_subset, tmp_path):
    # before: the run decoded and trained, then failed at the index stage
    from ae_core import pipeline
    from ae_core.config import RunConfig
    from ae_core.errors import AeError

    config = RunConfig(source=str(mnist_subset), output=str(tmp_path / "out"), work_dir=str(tmp_path / "work"),
                       index=IndexConfig(kind="ivfpq"))
    ctx = pipeline.prepare_run(config)
    objects = pipeline.list_source(ctx)
    with pytest.raises(AeError, match="--index-kind auto or flat"):
        pipeline.plan_run(ctx, objects)  # the stage before decoding and training


def _decoded(source, tmp_path, dim, budget_mb):
    from ae_core import pipeline
    from ae_core.config import ModelConfig, RunConfig, TrainConfig

    config = RunConfig(source=str(source), output=str(tmp_path / "out"), work_dir=str(tmp_path / "work"),
                       model=ModelConfig(dim=dim), index=IndexConfig(memory_budget_mb=budget_mb),
                       train=TrainConfig(epochs=1, anomaly_steps=0))  # quick, should the check let it train
    ctx = pipeline.prepare_run(config)
    plan = pipeline.plan_run(ctx, pipeline.list_source(ctx))
    return ctx, plan, pipeline.decode_source(ctx, plan)


def test_an_index_that_cannot_fit_the_budget_is_refused_before_training(mnist_subset, tmp_path):
    # before: the run trained and encoded, then failed at the index stage
    from ae_core import outputs, pipeline
    from ae_core.errors import AeError

    ctx, plan, corpus = _decoded(mnist_subset, tmp_path, dim=1024, budget_mb=1)  # 300 x 4 KiB: 1.2 MiB
    with pytest.raises(AeError, match=r"300 vectors of 1024 floats do not fit .*raise --index-memory-mb"):
        pipeline.pretrain(ctx, corpus, plan)
    assert not ctx.out_fs.exists(ctx.out(outputs.CHECKPOINT))


def test_the_index_check_counts_decoded_images_and_carried_rows(mnist_subset, tmp_path):
    import dataclasses
    import shutil

    from ae_core import pipeline
    from ae_core.errors import AeError

    source = tmp_path / "src"
    shutil.copytree(mnist_subset, source)
    for i in range(100):
        (source / f"broken{i:03d}.png").write_bytes(b"not a png")
    # 800 floats a vector, 1 MiB: 300 vectors fit (0.92 MiB), 400 do not (1.22 MiB)
    ctx, plan, corpus = _decoded(source, tmp_path, dim=800, budget_mb=1)
    assert (len(plan.objects), len(corpus)) == (400, 300)
    pipeline.check_vectors(ctx, corpus, plan)  # the 300 that decoded, not the 400 listed
    # a reused model: the unchanged rows carried over count too
    reused = dataclasses.replace(plan, retrain=False, previous=object(),
                                 carried={"embeddings": pa.table({"key": [f"old{i}" for i in range(100)]})})
    with pytest.raises(AeError, match="400 vectors of 800 floats do not fit"):
        pipeline.check_vectors(ctx, corpus, reused)


@pytest.mark.parametrize("ivf_n,lists", [(100, 2), (10_000, 256), (1_000_000, 4000)])
def test_ivf_lists(ivf_n, lists):
    assert ae_index.ivf_lists(ivf_n) == lists


def _clusters(n, dim, centres=50, spread=0.6, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    return (c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, dim))).astype(np.float32)


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_approximate_index_is_tuned_to_the_recall_floor(kind):
    emb = _clusters(20_000, 32)
    index, info = ae_index.build_index(emb, IndexConfig(kind=kind, recall_queries=300))
    assert info["kind"] == kind and index.ntotal == 20_000
    assert info["recall_at_10"] >= 0.95 and info["recall_queries"] == 300
    _, ids = index.search(emb[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() > 0.9  # ids are row positions, held-out rows included
    fresh = _clusters(500, 32, seed=0)[-200:]  # new points of the same distribution, not in the index
    exact = faiss.IndexFlatL2(32)
    exact.add(emb)
    assert ae_index.measure_recall(index, exact, fresh)[0] >= 0.9
    back = ae_index.from_bytes(ae_index.to_bytes(index))
    assert ae_index.search_params(back) == info["search_params"]  # the tuned setting travels with it
    assert back.ntotal == 20_000
    # far more neighbours than the setting tuned for k = 10 reaches: every one found all the same
    dist, ids = ae_index.search(back, emb[:3], 3000)
    assert (ids >= 0).all() and all(len(set(row)) == 3000 for row in ids)
    assert (np.diff(dist, axis=1) >= -1e-4).all()
    assert ae_index.search_params(back) == info["search_params"]  # and the setting is put back


def test_ivfpq_reranks_by_exact_distance_from_a_memory_mapped_file(tmp_path):
    emb = _clusters(20_000, 32)
    index, info = ae_index.build_index(emb, IndexConfig(kind="ivfpq", recall_queries=300))
    assert info["search_params"]["k_factor"] == ae_index.REFINE_K_FACTOR
    assert info["mapped_mb"] == pytest.approx(20_000 * 32 * 4 / MiB, abs=0.1)
    path = tmp_path / "index.faiss"
    path.write_bytes(ae_index.to_bytes(index))
    fs = fsspec.filesystem("file")
    loaded = ae_index.load(fs, str(path))
    assert ae_index.search_params(loaded) == info["search_params"]
    refine = faiss.downcast_index(faiss.downcast_index(loaded).index)
    assert faiss.downcast_index(refine.base_index).precomputed_table.size() == 0  # not built: not budgeted
    queries = emb[:20] + 0.01
    dist, ids = ae_index.search(loaded, queries, 10)
    exact = np.sqrt(((queries[:, None, :] - emb[ids]) ** 2).sum(-1))
    assert np.allclose(dist, exact, atol=1e-3)  # re-ranked distances are exact, not PQ estimates
    assert (ids[:, 0] == np.arange(20)).all()
    memory = fsspec.filesystem("memory")
    memory.pipe_file("/idx/index.faiss", path.read_bytes())  # a remote store: copied, then mapped
    assert np.array_equal(ae_index.search(ae_index.load(memory, "/idx/index.faiss"), queries, 10)[1], ids)


def test_index_under_the_recall_floor_is_refused(monkeypatch):
    from ae_core.errors import AeError
    monkeypatch.setattr(ae_index, "measure_recall", lambda *a, **k: (0.5, 0.01))
    with pytest.raises(AeError, match=r"0.500 \(\+-0.010\).*under the floor 0.95; not published"):
        ae_index.build_index(_clusters(5_000, 16), IndexConfig(kind="hnsw"))


def test_reading_a_table_then_exiting_at_once_never_aborts(tmp_path):
    """Arrow threads holding the Python file after a read made ~1 in 3 short processes abort at
    exit ("terminate called without an active exception"), and ~1 in 150 under load even when
    ParquetFile read on the calling thread; table.read_table and read_schema must not."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(10_000 * 32, dtype=np.float32)), 32)
    pq.write_table(pa.table({"key": [f"img/{i:05d}.png" for i in range(10_000)], "embedding": emb}),
                   tmp_path / "t.parquet")
    code = ("import fsspec; from ae_core import table; "
            f"fs, p = fsspec.filesystem('file'), {str(tmp_path / 't.parquet')!r}; "
            "table.read_table(fs, p, ['key']); table.read_schema(fs, p)")
    codes = [subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode
             for _ in range(20)]
    assert codes == [0] * 20


@pytest.mark.parametrize("protocol", ["file", "memory"])
def test_tables_reach_arrow_as_arrow_files_never_as_python_files(tmp_path, protocol, monkeypatch):
    """What aborted short processes at exit was Arrow holding a Python file object (and its
    buffers) on its IO threads: reading a table or its schema must not open one. The memory
    store stands in for a remote one (ranged reads into Arrow memory, the footer alone for the
    schema), with ranges small enough that every code path runs."""
    fs = fsspec.filesystem(protocol)
    path = str(tmp_path / "t.parquet") if protocol == "file" else f"/{tmp_path.name}/t.parquet"
    rng = np.random.default_rng(0)
    written = pa.table({"key": [f"k{i}" for i in range(500)],
                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(500 * 8, dtype=np.float32)), 8)},
                       metadata={b"ae": b'{"dim": 8}'})
    table.write_table(fs, path, written)

    def no_python_files(*args, **kwargs):
        raise AssertionError("a Python file object was opened for Arrow")

    monkeypatch.setattr(fs, "open", no_python_files)
    monkeypatch.setattr(table, "_RANGE", 1000)
    monkeypatch.setattr(table, "_TAIL", 64)
    assert table.read_table(fs, path, ["key"]).column("key").to_pylist() == written.column("key").to_pylist()
    assert table.read_table(fs, path).equals(written)
    schema = table.read_schema(fs, path)
    assert schema.names == ["key", "embedding"] and schema.metadata[b"ae"] == b'{"dim": 8}'


def test_reading_a_column_the_table_lacks_is_a_clear_error(tmp_path):
    from ae_core.errors import AeError

    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(AeError, match="no column 'anomaly_score'"):
        table.read_table(fsspec.filesystem("file"), str(tmp_path / "t.parquet"), ["key", "anomaly_score"])


def test_rows_hnsw_s_graph_cannot_reach_are_found_by_exact_search(tmp_path):
    # 300 identical vectors among 20 others: HNSW's graph leaves some copies unreachable however
    # wide the search (before: `ae neighbours -k 200` listed 138 of 150 copies without a word).
    # The rows it misses are found by exact search over the vectors HNSW stores, in place, under
    # their row ids (the index adds its held-out rows last: storage positions are not row ids)
    rng = np.random.default_rng(0)
    others = rng.random((20, 32), dtype=np.float32)
    emb = np.vstack([others[:10], np.tile(rng.random((1, 32), dtype=np.float32), (300, 1)), others[10:]])
    index, info = ae_index.build_index(emb, IndexConfig(kind="hnsw"))
    (tmp_path / "index.faiss").write_bytes(ae_index.to_bytes(index))
    loaded = ae_index.load(fsspec.filesystem("file"), str(tmp_path / "index.faiss"))  # memory-mapped, as ae reads it
    queries, k = emb[[10, 309]], 310
    graph = faiss.downcast_index(faiss.downcast_index(loaded).index).hnsw
    graph.efSearch = 5000
    assert (loaded.search(queries, k)[1] < 0).any()  # the premise: rows the graph cannot reach
    graph.efSearch = info["search_params"]["efSearch"]
    dist, ids = ae_index.search(loaded, queries, k)
    exact = ae_index.exact_search(emb, queries, k)
    assert ids.shape == (2, k) and (ids >= 0).all()
    for row in range(2):
        assert set(ids[row, :300].tolist()) == set(range(10, 310))  # every copy, at distance 0
        assert set(ids[row].tolist()) == set(exact[row].tolist())  # and the 10 nearest others, by their ids
        assert np.allclose(dist[row], np.linalg.norm(emb[exact[row]] - queries[row], axis=1), atol=1e-5)
        assert np.allclose(dist[row], np.linalg.norm(emb[ids[row]] - queries[row], axis=1), atol=1e-5)
