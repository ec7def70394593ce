"""Pure planning decisions, tested as tables."""

from __future__ import annotations

import pytest

from ae_core.config import ModelConfig
from ae_core.ingest import decode_workers, plan_shards, task_size
from ae_core.plan import CorpusProbe, choose_channels, choose_image_size, probe_sample, resolve_model_config
from ae_core.storage import ObjectInfo, key_matches
from ae_core.train import lr_at, split_indices


@pytest.mark.parametrize("median_side,size", [(8, 16), (16, 16), (28, 28), (30, 28), (32, 32),
                                              (50, 48), (92, 64), (128, 64), (4000, 64)])
def test_choose_image_size(median_side, size):
    assert choose_image_size(median_side) == size


@pytest.mark.parametrize("gray,channels", [([True] * 5, 1), ([True, False], 3), ([False], 3), ([], 3)])
def test_choose_channels(gray, channels):
    assert choose_channels(gray) == channels


def test_user_choices_win_over_the_probe():
    probe = CorpusProbe(3, 3, (28, 28, 28), (True, True, True))
    assert resolve_model_config(ModelConfig(), probe).image_size == 28
    assert resolve_model_config(ModelConfig(), probe).channels == 1
    assert resolve_model_config(ModelConfig(image_size=64, channels=3), probe).image_size == 64
    assert resolve_model_config(ModelConfig(channels=3), probe).channels == 3


def _objs(n):
    return [ObjectInfo(f"k{i:04d}", f"/r/k{i:04d}", 10) for i in range(n)]


@pytest.mark.parametrize("n,size,shards,last", [(0, 4, 0, 0), (1, 4, 1, 1), (4, 4, 1, 4), (9, 4, 3, 1)])
def test_plan_shards(n, size, shards, last):
    plans = plan_shards(list(reversed(_objs(n))), size)
    assert len(plans) == shards
    if plans:
        assert len(plans[-1].objects) == last
        keys = [o.key for p in plans for o in p.objects]
        assert keys == sorted(keys) and len(keys) == n


def test_probe_sample_spreads_over_listing():
    sample = probe_sample(_objs(1000), 10)
    assert [o.key for o in sample] == [f"k{i:04d}" for i in range(0, 1000, 100)]
    assert len(probe_sample(_objs(5), 10)) == 5


@pytest.mark.parametrize("key,include,exclude,ok", [
    ("a/b.png", [], [], True), ("a/b.png", ["*.png"], [], True), ("a/b.jpg", ["*.png"], [], False),
    ("a/b.png", [], ["a/*"], False), ("a/b.png", ["*.png"], ["*b.png"], False), ("noext", [], [], True),
])
def test_key_matches(key, include, exclude, ok):
    assert key_matches(key, include, exclude) is ok


@pytest.mark.parametrize("n,requested,median_bytes,workers", [
    (10, 0, 50_000, 0), (10_000, 1, 50_000, 0), (10_000, 3, 50_000, 3), (10_000, 3, 300, 3),
    (10_000, 0, 300, 0), (100, 2, 300, 2),
])
def test_decode_workers(n, requested, median_bytes, workers):
    assert decode_workers(n, requested, median_bytes) == workers


def test_decode_workers_default_is_core_count_for_large_files():
    import os
    assert decode_workers(10_000, 0, 50_000) == (os.cpu_count() or 1)
    assert decode_workers(19_999, 0, 300) == 0  # tiny files: the pool's start costs more
    assert decode_workers(100_000, 0, 300) == (os.cpu_count() or 1)  # ...until there are many


def test_lr_schedule_warms_up_and_anneals():
    assert lr_at(0.0, 1.0) == 0.0
    assert lr_at(0.03, 1.0) == pytest.approx(1.0)
    assert lr_at(0.5, 1.0) == pytest.approx(0.5, abs=0.05)
    assert lr_at(1.0, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_split_is_seeded_and_disjoint():
    a_train, a_val = split_indices(1000, 0.1, 3)
    b_train, b_val = split_indices(1000, 0.1, 3)
    assert (a_val == b_val).all() and len(a_val) == 100
    assert set(a_train).isdisjoint(a_val) and len(a_train) + len(a_val) == 1000
    assert len(split_indices(10, 0.1, 0)[1]) == 0


@pytest.mark.parametrize("n_train,batch,epochs", [(10, 128, 500), (400, 128, 375), (1707, 128, 108),
                                                  (9500, 128, 20), (1_000_000, 128, 20)])
def test_auto_epochs_from_corpus_size(n_train, batch, epochs):
    from ae_core.train import auto_epochs
    assert auto_epochs(n_train, batch) == epochs


@pytest.mark.parametrize("n,workers,read_batch,workers_read,median_bytes,size", [
    (100_000, 2, 64, True, 300, 1024),     # workers reading tiny local files: large tasks, capped
    (10_000, 2, 64, True, 300, 625),       # ...while each worker still gets 8 of them
    (1_000, 2, 64, True, 300, 64),         # never below read_batch
    (100_000, 2, 64, True, 5_000_000, 64),  # photos: read_batch bounds the bytes a task holds
    (100_000, 2, 64, False, 300, 64),      # this process fetches (S3): read_batch is the fetch concurrency
    (100_000, 0, 64, True, 300, 64),       # decoding in this process
    (100_000, 2, 2000, True, 300, 2000),   # the user's larger read_batch stands
])
def test_task_size(n, workers, read_batch, workers_read, median_bytes, size):
    assert task_size(n, workers, read_batch, workers_read, median_bytes) == size
