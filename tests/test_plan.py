"""Pure planning decisions, tested as tables."""

from __future__ import annotations

import pytest

from ae_core.config import ModelConfig
from ae_core.incremental import anomaly_mismatch, diff_listing, retrain_decision
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


def test_diff_reads_again_what_failed_to_read_and_is_otherwise_unchanged():
    def obj(key, size, tag):
        return ObjectInfo(key=key, path=f"/src/{key}", size=size, tag=tag)
    previous = {"same": (1, "t"), "failed": (2, "t"), "failed-changed": (3, "t"), "gone": (4, "t")}
    current = [obj("same", 1, "t"), obj("failed", 2, "t"), obj("failed-changed", 3, "t2"), obj("new", 5, "t")]
    d = diff_listing(previous, current, read_failed={"failed", "failed-changed", "gone"})
    assert [o.key for o in d.retried] == ["failed"] and [o.key for o in d.changed] == ["failed-changed"]
    assert [o.key for o in d.unchanged] == ["same"] and [o.key for o in d.new] == ["new"]
    assert d.deleted == ("gone",)
    assert d.counts() == {"new": 1, "changed": 1, "unchanged": 1, "deleted": 1, "retried": 1, "rechecked": 0}
    assert diff_listing(previous, current).retried == ()  # nothing failed: nothing retried


def test_diff_reads_again_a_file_with_its_size_and_mtime_but_another_identity_without_counting_churn():
    from ae_core.config import TrainConfig

    def obj(key, stat):
        return ObjectInfo(key=key, path=f"/src/{key}", size=1, tag="m", stat=stat)
    previous = {"same": (1, "m", "7:100"), "swapped": (1, "m", "8:100"), "touched": (1, "m", "9:100"),
                "old-table": (1, "m", None), "remote": (1, "m", None)}
    current = [obj("same", "7:100"), obj("swapped", "12:300"), obj("touched", "9:200"), obj("old-table", "10:1"),
               obj("remote", "")]
    d = diff_listing(previous, current)
    assert [o.key for o in d.rechecked] == ["swapped", "touched"]
    assert [o.key for o in d.unchanged] == ["same", "old-table", "remote"]  # nothing recorded: size and tag decide
    assert d.churn == 0 and d.counts()["rechecked"] == 2
    # a corpus copied to another disk (every stat new) is read again, not retrained on
    assert retrain_decision(TrainConfig(), d, None) == (
        False, "0 new, changed or deleted objects, 0% of the published run's 5 (<= 20%)")
    assert diff_listing({"a": (1, "m")}, [obj("a", "1:1")]).unchanged  # a (size, tag) listing still compares


def test_retrain_never_with_settings_the_published_model_cannot_serve_is_an_error():
    from ae_core.config import TrainConfig
    from ae_core.errors import AeError
    diff = diff_listing({"a": (1, "t")}, [ObjectInfo(key="a", path="/a", size=1, tag="t")])
    assert retrain_decision(TrainConfig(retrain="never"), diff, None) == (False, "retrain=never")
    assert retrain_decision(TrainConfig(retrain="auto"), diff, "dim changed (32 -> 16)")[0] is True
    assert retrain_decision(TrainConfig(retrain="always"), diff, "dim changed (32 -> 16)")[0] is True
    with pytest.raises(AeError, match=r"retrain=never.*dim changed \(32 -> 16\)"):
        retrain_decision(TrainConfig(retrain="never"), diff, "dim changed (32 -> 16)")


@pytest.mark.parametrize("wanted, published_steps, has_models, mismatch", [
    (300, 0, False, True),  # trained without fold models, scores wanted now: retrain
    (0, 0, False, False),
    (300, 300, True, False),
    (0, 300, True, False),  # the reused model keeps scoring: no column half empty
    (300, 300, False, False),  # asked for, but a fold was empty: retraining would change nothing
    (300, None, False, False),  # a checkpoint from before it recorded its anomaly_steps
])
def test_anomaly_mismatch_table(wanted, published_steps, has_models, mismatch):
    assert (anomaly_mismatch(wanted, published_steps, has_models) is not None) is mismatch


def test_a_source_table_written_before_stat_was_recorded_compares_by_size_and_tag():
    import pyarrow as pa

    from ae_core.incremental import listing_from_table

    old = pa.table({"key": ["a", "b"], "size": [1, 2], "tag": ["m1", "m2"]})  # no stat column
    listing = listing_from_table(old)
    assert listing == {"a": (1, "m1", None), "b": (2, "m2", None)}
    d = diff_listing(listing, [ObjectInfo(key="a", path="/a", size=1, tag="m1", stat="5:9"),
                               ObjectInfo(key="b", path="/b", size=2, tag="m3", stat="6:9")])
    assert [o.key for o in d.unchanged] == ["a"] and [o.key for o in d.changed] == ["b"] and d.rechecked == ()


def test_damage_is_what_the_bytes_cause_never_an_io_error_of_the_store():
    import errno
    import pickle

    from ae_core.outputs import is_damage

    assert is_damage(OSError("Couldn't deserialize thrift"))  # pyarrow: a page it cannot parse
    assert is_damage(ValueError("Parquet magic bytes not found")) and is_damage(pickle.UnpicklingError("x"))
    for err in (FileNotFoundError(errno.ENOENT, "gone"), PermissionError(errno.EACCES, "denied"),
                OSError(errno.EIO, "Internal Server Error"), OSError(errno.EREMOTEIO, "remote"),
                ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("slow")):
        assert not is_damage(err), err


def test_an_object_whose_tag_tells_no_version_is_rechecked_not_churn():
    # before: an http listing's "size:None:mtime:" never changed (stale embeddings); once the
    # tags carried a version, the first run would count every http or zip object as changed
    # (and retrain), and an object whose HEAD failed, tagged anew each run, would every night
    def obj(key: str, size: int, tag: str) -> ObjectInfo:
        return ObjectInfo(key=key, path=f"/{key}", size=size, tag=tag)

    previous = {"old-http": (0, "size:None:mtime:"), "old-zip": (5, "size:5:mtime:"), "unknown": (0, "unknown:ab"),
                "plain": (5, "size:5:mtime:1.0"), "etag": (5, "etag:x")}
    current = [obj("old-http", 254, "size:254:mtime:Sat, 28 Nov 2026 03:18:10 GMT"), obj("old-zip", 5, "crc:1:size:5"),
               obj("unknown", 0, "unknown:cd"), obj("plain", 5, "size:5:mtime:2.0"), obj("etag", 5, "etag:y")]
    previous["unstatable"] = (5, "size:5:mtime:1.0")  # a file now in a folder it may list but not enter
    current.append(obj("unstatable", 0, "unstatable:size:0"))
    d = diff_listing(previous, current)
    assert [o.key for o in d.rechecked] == ["old-http", "old-zip", "unknown"]
    assert [o.key for o in d.changed] == ["plain", "etag", "unstatable"] and d.churn == 3


def test_the_probe_counts_only_images_that_decode(tmp_path):
    # before: a truncated gray PNG counted by its header alone: 30 digits and 40 truncated
    # 128x128 photos made the model's input 64x64, every embedded image upsampled ~2.3x
    import fsspec

    from ae_core.plan import probe_corpus
    from ae_core.storage import list_objects
    from conftest import COIL, MNIST

    for i in range(30):
        (tmp_path / f"d{i:02}.png").write_bytes((MNIST / f"{i:05}.png").read_bytes())
    for i in range(40):
        (tmp_path / f"part{i:02}.png").write_bytes((COIL / f"obj3__{i}.png").read_bytes()[:2000])
    fs = fsspec.filesystem("file")
    probe = probe_corpus(fs, list_objects(fs, str(tmp_path)), 100_000_000)
    assert probe.decodable == 30 and set(probe.sides) == {28}
    assert resolve_model_config(ModelConfig(), probe).image_size == 28
