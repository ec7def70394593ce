"""Two runs into one OUTPUT at once, through the library's stages (no Prefect): the run that
started later wins, an earlier one that finishes after it publishes nothing, runs one after
another never conflict, and a run whose files vanished while it worked never becomes LATEST.
Runs of the same relative paths from different folders never share a pixel cache."""

from __future__ import annotations

import os
import re
from contextlib import nullcontext

import pyarrow.parquet as pq
import pytest

from ae_core import outputs, pipeline
from ae_core.config import IngestConfig, RunConfig, TrainConfig
from ae_core.errors import AeError
from test_cli_e2e import _first_digits


def _up_to_publish(config: RunConfig, run_id: str):
    """Every stage of a run but the last; returns its publish step (the run's checkpoint as its `ckpt`)."""
    ctx = pipeline.prepare_run(config, run_id=run_id)
    objects = pipeline.list_source(ctx)
    plan = pipeline.plan_run(ctx, objects)
    corpus = pipeline.decode_source(ctx, plan)
    ckpt = pipeline.pretrain(ctx, corpus, plan)
    encoded = pipeline.encode_corpus(ctx, corpus, ckpt, plan)
    index_info = pipeline.build_index(ctx, encoded)
    pictures = pipeline.draw_report(ctx, corpus, ckpt, plan, encoded)
    def publish() -> dict:
        return pipeline.publish_run(ctx, plan, ckpt, encoded, index_info, pictures)

    publish.ckpt = ckpt
    return publish


def test_of_two_runs_into_one_output_the_later_start_wins(mnist_subset, tmp_path):
    out = tmp_path / "out"

    def config(name: str) -> RunConfig:
        return RunConfig(source=str(mnist_subset), output=str(out), work_dir=str(tmp_path / f"work-{name}"),
                         ingest=IngestConfig(include=["000*"], workers=1),
                         train=TrainConfig(epochs=1, anomaly_steps=0))

    publish_early = _up_to_publish(config("a"), "20260101T000000Z-aaaaaa")
    publish_later = _up_to_publish(config("b"), "20260101T000001Z-bbbbbb")
    manifest = publish_later()
    assert (out / outputs.LATEST).read_text().strip() == "20260101T000001Z-bbbbbb"
    # publishing prunes unfinished runs that started before it: the early run's folder
    assert "20260101T000000Z-aaaaaa" in manifest["pruned_runs"]

    with pytest.raises(AeError, match="which started after it, was published"):
        publish_early()
    assert (out / outputs.LATEST).read_text().strip() == "20260101T000001Z-bbbbbb"
    assert outputs.resolve(str(out)).manifest["rows"] == manifest["rows"] > 0

    # a run after it with an earlier id (a queued deployment run keeps its scheduled time) is
    # no conflict: LATEST is still the run its plan read
    publish_queued = _up_to_publish(config("q"), "20251231T235959Z-dddddd")
    assert publish_queued()["changes"]["previous_run"] == "20260101T000001Z-bbbbbb"
    assert (out / outputs.LATEST).read_text().strip() == "20251231T235959Z-dddddd"

    # a later run whose index was deleted while it worked is refused too
    publish_last = _up_to_publish(config("c"), "20260101T000002Z-cccccc")
    (out / "runs" / "20260101T000002Z-cccccc" / outputs.INDEX).unlink()
    with pytest.raises(AeError, match=r"index\.faiss vanished"):
        publish_last()
    # a refused run stays unfinished (no manifest): pruning never keeps it in place of a published one
    assert not (out / "runs" / "20260101T000002Z-cccccc" / outputs.MANIFEST).exists()
    assert (out / outputs.LATEST).read_text().strip() == "20251231T235959Z-dddddd"
    assert outputs.resolve(str(out)).manifest["run_id"] == "20251231T235959Z-dddddd"


def test_a_run_stopped_after_training_leaves_its_model_to_the_next_run_of_the_same_settings(
        mnist_subset, tmp_path, monkeypatch):
    """A run that stops after training (here: before it publishes) keeps its model beside the
    pixel cache; the next run of the same pair with the same images and settings reuses those
    very bytes instead of training, and publishing deletes them with the cache. Another training
    setting, --retrain always, an image whose content changed, or a damaged kept file trains again."""
    trainings: list[int] = []
    real_train = pipeline.train_autoencoder
    monkeypatch.setattr(pipeline, "train_autoencoder", lambda *a, **k: trainings.append(1) or real_train(*a, **k))
    src, out, work = _first_digits(mnist_subset, tmp_path / "src", 100), tmp_path / "out", tmp_path / "work"

    def stop_before_publishing(run_id: str, **train):
        config = RunConfig(source=str(src), output=str(out), work_dir=str(work), ingest=IngestConfig(workers=1),
                           train=TrainConfig(epochs=1, anomaly_steps=20, **train))
        publish = _up_to_publish(config, run_id)
        return publish, (out / outputs.RUNS / run_id / outputs.CHECKPOINT).read_bytes()

    _, first = stop_before_publishing("20260101T000000Z-aaaaaa")
    assert len(trainings) == 1 and len(list(work.glob(f"ae-cache-*/{pipeline.KEPT_MODEL}"))) == 1
    # a retry of that flow run (same run id) whose model.pt never reached OUTPUT: the kept model,
    # as a resumed stage, not as another run's
    (out / outputs.RUNS / "20260101T000000Z-aaaaaa" / outputs.CHECKPOINT).unlink()
    publish, retried = stop_before_publishing("20260101T000000Z-aaaaaa")
    assert len(trainings) == 1 and retried == first
    assert publish.ckpt.extra["train"].get("resumed_from_run") is None
    assert publish.ckpt.extra["train"]["resumed_from_stage"] is True
    _, other_lr = stop_before_publishing("20260101T000001Z-bbbbbb", lr=1e-3)
    assert len(trainings) == 2 and other_lr != first  # a training setting changed: trained again
    _, always = stop_before_publishing("20260101T000002Z-cccccc", lr=1e-3, retrain="always")
    assert len(trainings) == 3 and always != other_lr
    (src / "00007.png").write_bytes((mnist_subset / "00200.png").read_bytes())  # same key, other digit
    _, changed = stop_before_publishing("20260101T000003Z-dddddd", lr=1e-3)
    assert len(trainings) == 4 and changed != always
    kept = next(work.glob(f"ae-cache-*/{pipeline.KEPT_MODEL}"))
    damaged = bytearray(kept.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    kept.write_bytes(bytes(damaged))  # damaged: trained again, not trusted
    _, after_damage = stop_before_publishing("20260101T000004Z-eeeeee", lr=1e-3)
    assert len(trainings) == 5 and after_damage != changed

    publish, resumed = stop_before_publishing("20260101T000005Z-ffffff", lr=1e-3)
    assert len(trainings) == 5 and resumed == after_damage  # the kept bytes, not a new training
    manifest = publish()
    assert manifest["train"]["resumed_from_run"] == "20260101T000004Z-eeeeee"
    assert "Trained by run 20260101T000004Z-eeeeee, which stopped before publishing" in \
        (out / outputs.RUNS / manifest["run_id"] / pipeline.REPORT).read_text()
    assert manifest["rows"] == 100 and manifest["model_version"] == pipeline.checkpoint.version_of(after_damage)
    assert not list(work.iterdir())  # published: the cache and the model kept in it are gone


def test_the_kept_model_note_names_only_a_model_the_next_run_will_find(tmp_path):
    """`ae run`'s error line mentions a kept model only when this command's run kept (or reused)
    it in the pair's own cache folder and it is still there."""
    from ae_core.cli import _kept_model_note

    pair, beside = str(tmp_path / "ae-cache-0123456789abcdef"), str(tmp_path / "ae-cache-0123456789abcdef-r2")
    for folder, run_id in ((pair, "r1"), (beside, "r2")):
        pipeline.keep_model(folder, "k", b"model bytes", run_id)
    assert _kept_model_note(pair, [], "auto") == ""  # stopped before training: nothing of its own
    assert _kept_model_note(pair, [(beside, "r2")], "auto") == ""  # kept where no run looks
    assert _kept_model_note(pair, [(pair, "r0")], "auto") == ""  # replaced since by another run's
    note = _kept_model_note(pair, [(pair, "r1")], "auto")
    assert note == (f"the run stopped after training: its model is kept in the work dir {pair!r}, and a run "
                    "with the same images and training settings reuses it instead of training again")
    assert "settings, without --retrain always, reuses it" in _kept_model_note(pair, [(pair, "r1")], "always")
    os.unlink(os.path.join(pair, pipeline.KEPT_RECORD))
    assert _kept_model_note(pair, [(pair, "r1")], "auto") == ""


def test_a_pair_s_old_cache_is_kept_once_a_run_of_that_pair_starts(mnist_subset, tmp_path):
    """Another pair's run deletes a cache folder unused for 7 days, but not one whose own pair has
    just started a run (listing and planning, before it holds the cache's lock)."""
    import time

    work = tmp_path / "work"
    starting, idle = (pipeline.prepare_run(RunConfig(source=str(mnist_subset), output=str(tmp_path / name),
                                                     work_dir=str(work))) for name in ("out-a", "out-b"))
    week_ago = time.time() - 8 * 86400
    for ctx in (starting, idle):
        os.makedirs(ctx.work_dir)
        pipeline.keep_model(ctx.work_dir, "k", b"model bytes", "r1")
        os.utime(ctx.work_dir, (week_ago, week_ago))
    pipeline.mark_cache_in_use(starting)
    other = pipeline.prepare_run(RunConfig(source=str(mnist_subset), output=str(tmp_path / "out-c"), work_dir=str(work)))
    pipeline.claim_work_dir(other)
    try:
        assert os.path.isdir(starting.work_dir) and not os.path.exists(idle.work_dir)
    finally:
        pipeline.release_work_dir(other.work_dir)


def test_the_pixel_cache_is_keyed_by_where_source_and_output_really_are(tmp_path, monkeypatch):
    work_dirs = {}
    for project in ("a", "b"):
        (tmp_path / project / "imgs").mkdir(parents=True)
        monkeypatch.chdir(tmp_path / project)
        for spelling in ("imgs", "./imgs/", str(tmp_path / project / "imgs")):
            ctx = pipeline.prepare_run(RunConfig(source=spelling, output="out"))
            work_dirs.setdefault(project, set()).add(ctx.work_dir)
    # one cache per project whatever the spelling; `imgs` in two folders are two sources
    assert len(work_dirs["a"]) == len(work_dirs["b"]) == 1 and work_dirs["a"] != work_dirs["b"]
    parent = os.path.dirname(next(iter(work_dirs["a"])))  # the user's own: decoded private images
    assert os.stat(parent).st_uid == os.getuid() and os.stat(parent).st_mode & 0o077 == 0


@pytest.mark.parametrize("damage", [bytes(26), b"\x00\xff\xfe", b"../../etc\n", b"", b"\n"])
def test_a_damaged_latest_is_one_line_and_the_next_run_replaces_it(mnist_subset, tmp_path, damage):
    out = tmp_path / "out; a folder"  # before: a '; ' in OUTPUT cut the retrain reason out of the message
    out.mkdir()
    # zeros after a power loss, stray bytes, a path, emptied (before: "no LATEST file", and the
    # next run's retrain reason said "no previous run to reuse")
    (out / outputs.LATEST).write_bytes(damage)
    with pytest.raises(AeError, match="is damaged: it should hold the id of a run"):
        outputs.resolve(str(out))
    config = RunConfig(source=str(mnist_subset), output=str(out), work_dir=str(tmp_path / "work"),
                       ingest=IngestConfig(include=["000*"], workers=1), train=TrainConfig(epochs=1, anomaly_steps=0))
    manifest = _up_to_publish(config, "20260101T000000Z-eeeeee")()
    assert manifest["changes"]["previous_run"] is None
    assert manifest["changes"]["retrain_reason"].startswith("LATEST cannot be read (it should hold the id of a run")
    assert outputs.resolve(str(out)).run_id == "20260101T000000Z-eeeeee"


def _query_reading(name: str, out: str, digits) -> None:
    """The query that reads the published file `name`."""
    from ae_core import query

    if name == "model.pt":
        query.neighbours_of_image(out, str(digits / "00001.png"))
    elif name == "rejects.parquet":  # read to say why a key has no row
        query.neighbours_of_key(out, "no-such-key.png")
    elif name == "manifest.json":
        outputs.resolve(out)
    else:
        query.neighbours_of_key(out, "00001.png")


# each published file, damaged as a power loss or a hand edit leaves it: emptied or cut short
_DAMAGE = {"manifest.json": 0.5, "source.parquet": 0.0, "model.pt": 0.1, "rejects.parquet": 0.0,
           "embeddings.parquet": 0.5, "index.faiss": 0.5}


def test_an_encode_stage_run_twice_on_one_plan_carries_every_unchanged_row_both_times(mnist_subset, tmp_path):
    # the plan hands the carried rows over once (not kept to the end of the run); a second
    # encode on the same plan reads them again rather than publishing a table without them
    out, config, _ = _published_once(mnist_subset, tmp_path, outputs.MANIFEST)
    ctx = pipeline.prepare_run(config, run_id="20260101T000001Z-bbbbbb")
    plan = pipeline.plan_run(ctx, pipeline.list_source(ctx))
    assert not plan.retrain and plan.carried
    corpus = pipeline.decode_source(ctx, plan)
    ckpt = pipeline.pretrain(ctx, corpus, plan)
    first = pipeline.encode_corpus(ctx, corpus, ckpt, plan)
    assert not plan.carried  # handed over
    again = pipeline.encode_corpus(ctx, corpus, ckpt, plan)
    assert first.rows == again.rows == outputs.resolve(str(out)).manifest["rows"] > 0


def test_pruning_leaves_folders_under_runs_that_are_not_runs(mnist_subset, tmp_path):
    # before: a folder of the user's own under OUTPUT/runs sorting before the published run's id
    # counted as an unfinished run and was deleted
    out, config, _ = _published_once(mnist_subset, tmp_path, outputs.MANIFEST)
    mine = out / outputs.RUNS / "2024-archive"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    (out / outputs.RUNS / "backup").mkdir()
    (out / outputs.RUNS / "backup" / outputs.MANIFEST).write_text("{}")  # takes no --keep-runs slot
    for i, run_id in enumerate(("20260101T000001Z-bbbbbb", "20260101T000002Z-cccccc")):
        manifest = _up_to_publish(config.model_copy(update={"publish": config.publish.model_copy(
            update={"keep_runs": 1})}), run_id)()
        assert manifest["pruned_runs"] == [("20260101T000000Z-aaaaaa", "20260101T000001Z-bbbbbb")[i]]
    assert (mine / "keep.txt").read_text() == "mine" and (out / outputs.RUNS / "backup").is_dir()


def test_a_manifest_that_parses_but_lacks_what_the_queries_read_is_one_line(mnist_subset, tmp_path):
    import json

    from ae_core import evaluate, query

    out, config, path = _published_once(mnist_subset, tmp_path, outputs.MANIFEST)
    good = json.loads(path.read_text())
    no_rows = {k: v for k, v in good.items() if k != "rows"}
    no_index = {**good, "files": {k: v for k, v in good["files"].items() if k != "index"}}
    for damaged, problem in [({}, "'files' is missing"), ([], "a JSON list, not an object"),
                             (None, "a JSON NoneType"), (no_rows, "'rows' is missing or not of type int"),
                             ({**good, "dim": "32"}, "'dim' is missing or not of type int"),
                             (no_index, "'files' names no index"),
                             # before: a traceback in `ae info` (AttributeError) from each of these
                             ({**good, "quality": [1]}, "'quality' is not an object"),
                             ({**good, "config": None}, "'config' is not an object"),
                             ({**good, "config": {**good["config"], "model": 3}}, "'config.model' is not an object")]:
        path.write_text(json.dumps(damaged))
        for reading in (lambda: query.info(str(out)), lambda: evaluate.outliers(str(out), 2),
                        lambda: evaluate.probe(str(out), str(mnist_subset.parent / "mnist-test-labels.csv"))):
            with pytest.raises(AeError, match=rf"manifest of run .* is damaged \({re.escape(problem)}"):
                reading()
    manifest = _up_to_publish(config, "20260101T000001Z-bbbbbb")()  # the next run replaces the run
    assert manifest["changes"]["retrained"] and "manifest.json cannot be read" in manifest["changes"]["retrain_reason"]
    assert query.info(str(out))["rows"] == manifest["rows"]


def test_a_key_typed_in_the_other_unicode_form_is_found_and_a_file_as_output_is_one_line(mnist_subset, tmp_path):
    import shutil
    import unicodedata

    from ae_core import query

    src = _first_digits(mnist_subset, tmp_path / "src", 20)
    nfd = unicodedata.normalize("NFD", "café.png")  # as macOS writes names, and zips made there
    shutil.copy(mnist_subset / "00001.png", src / nfd)
    out = tmp_path / "out"
    _up_to_publish(RunConfig(source=str(src), output=str(out), work_dir=str(tmp_path / "work"),
                             train=TrainConfig(epochs=1, anomaly_steps=0)), "20260101T000000Z-aaaaaa")()
    for typed in ("café.png", nfd):  # the first as most keyboards type it: one character é
        assert query.neighbours_of_key(str(out), typed, 1)[0].key == nfd
    with pytest.raises(AeError, match="'nope.png' is not in the table"):
        query.neighbours_of_key(str(out), "nope.png", 1)
    with pytest.raises(AeError, match=r"is a file, not an output folder; give the folder `ae run` wrote"):
        query.info(str(src / "00001.png"))


def _published_once(mnist_subset, tmp_path, name: str):
    """(OUTPUT, the config that published run aaaaaa into it, the path of its file `name`)."""
    out = tmp_path / "out"
    config = RunConfig(source=str(mnist_subset), output=str(out), work_dir=str(tmp_path / "work"),
                       ingest=IngestConfig(include=["000*"], workers=1), train=TrainConfig(epochs=1, anomaly_steps=0))
    _up_to_publish(config, "20260101T000000Z-aaaaaa")()
    return out, config, out / outputs.RUNS / "20260101T000000Z-aaaaaa" / name


@pytest.mark.parametrize("name", ["embeddings.parquet", "source.parquet"])
def test_a_table_damaged_inside_an_intact_footer_is_one_line_and_the_next_run_replaces_the_run(mnist_subset, tmp_path, name):
    # before: pyarrow's OSError (a failed decompression) was no damage: the queries printed a
    # traceback, and every later run failed, the embeddings table only once its rows were merged
    out, config, path = _published_once(mnist_subset, tmp_path, name)
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")  # the pages lie between "PAR1" and the footer
    data[4:len(data) - 8 - footer] = bytes(len(data) - 12 - footer)
    path.write_bytes(bytes(data))
    assert pq.read_schema(path).names  # the footer still reads
    if name == "embeddings.parquet":
        with pytest.raises(AeError, match=r"embeddings\.parquet' cannot be read, it is damaged \(OSError"):
            _query_reading(name, str(out), mnist_subset)
    manifest = _up_to_publish(config, "20260101T000001Z-bbbbbb")()  # nothing changed: it would reuse
    assert manifest["changes"]["retrained"] and manifest["changes"]["previous_run"] is None
    assert f"{name} cannot be read (OSError)" in manifest["changes"]["retrain_reason"]
    assert outputs.resolve(str(out)).run_id == "20260101T000001Z-bbbbbb"
    _query_reading("embeddings.parquet", str(out), mnist_subset)


def test_ae_info_names_a_table_that_is_not_its_run_s_own(mnist_subset, tmp_path):
    from ae_core import query

    out, _, path = _published_once(mnist_subset, tmp_path, "embeddings.parquet")
    rows = query.info(str(out))["rows"]
    pq.write_table(pq.read_table(path).slice(0, rows - 1), path)  # a readable table, one row short
    with pytest.raises(AeError, match=rf"embeddings\.parquet' holds {rows - 1} rows where its run's manifest says "
                                      rf"{rows}: it is not the run's own"):
        query.info(str(out))


@pytest.mark.parametrize("name", sorted(_DAMAGE))
def test_a_damaged_published_file_is_one_line_and_the_next_run_replaces_the_run(mnist_subset, tmp_path, name):
    # before: an unreadable file made every later run fail with a traceback (after Prefect's
    # retries), even with --retrain always, and queries printed tracebacks
    out, config, path = _published_once(mnist_subset, tmp_path, name)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * _DAMAGE[name])])
    if name != "source.parquet":  # read by the next run only
        with pytest.raises(AeError, match=rf"{name.split('.')[0]}.*damaged"):
            _query_reading(name, str(out), mnist_subset)
    if name in ("embeddings.parquet", "rejects.parquet"):  # ae info, which scripts use to find them, says
        from ae_core import query  # so too (before: it gave their URLs as healthy; a review)

        with pytest.raises(AeError, match=rf"{name.split('.')[0]}\.parquet' cannot be read, it is damaged"):
            query.info(str(out))
    manifest = _up_to_publish(config, "20260101T000001Z-bbbbbb")()
    assert outputs.resolve(str(out)).run_id == "20260101T000001Z-bbbbbb"
    if name != "index.faiss":  # the index is built afresh by every run: the rows are reused
        assert manifest["changes"]["retrained"] and manifest["changes"]["previous_run"] is None
        assert f"{name} cannot be read" in manifest["changes"]["retrain_reason"]
    for query_of in _DAMAGE:
        if query_of != "source.parquet":
            with pytest.raises(AeError, match="no-such-key") if query_of == "rejects.parquet" else nullcontext():
                _query_reading(query_of, str(out), mnist_subset)


@pytest.mark.parametrize("manifest, limit", [
    ({"config": {"ingest": {"max_image_pixels": 5_000}}}, 5_000),
    ({}, 100_000_000), ({"config": 3}, 100_000_000), ({"config": {"ingest": []}}, 100_000_000),
    ({"config": {"ingest": {"max_image_pixels": True}}}, 100_000_000),
])
def test_queries_decode_under_the_published_runs_pixel_limit(manifest, limit):
    """The run's own limit where its manifest has one (a reused model keeps its trainer's), the
    model's where a manifest lacks it or holds something else there."""
    from ae_core.decode import Preprocess

    spec = outputs.Published(None, "out", "r1", manifest).image_spec(Preprocess(28, 1, max_image_pixels=100_000_000))
    assert (spec.max_image_pixels, spec.image_size, spec.channels) == (limit, 28, 1)


def test_an_index_or_table_from_another_run_is_one_line_not_wrong_keys(mnist_subset, tmp_path):
    # before: a table cut short gave pyarrow's IndexError, an index of another dim a bare
    # AssertionError from FAISS, and a larger index could answer with rows the table lacks
    import faiss
    import numpy as np
    import pyarrow.parquet as pq

    from ae_core import query

    out, _, index_path = _published_once(mnist_subset, tmp_path, "index.faiss")
    table_path = index_path.parent / "embeddings.parquet"
    good_index, good_table = index_path.read_bytes(), table_path.read_bytes()
    keys = pq.read_table(table_path, columns=["key"]).column("key").to_pylist()
    assert len(query.neighbours_of_key(str(out), keys[5], 3)) == 3
    other = faiss.IndexFlatL2(16)
    other.add(np.random.default_rng(0).random((len(keys), 16), dtype=np.float32))
    faiss.write_index(other, str(index_path))
    for ask in (lambda: query.neighbours_of_key(str(out), keys[5], 3),
                lambda: query.neighbours_of_image(str(out), str(mnist_subset / keys[5]), 3)):
        with pytest.raises(AeError, match=rf"index.faiss' holds {len(keys)} vectors of dim 16, but the run's table "
                                          rf"has {len(keys)} rows and its embeddings dim 32: .* run `ae run`"):
            ask()
    index_path.write_bytes(good_index)
    pq.write_table(pq.read_table(table_path).slice(0, 10), table_path)
    with pytest.raises(AeError, match=rf"holds {len(keys)} vectors of dim 32, but the run's table has 10 rows"):
        query.neighbours_of_key(str(out), keys[5], 3)
    table_path.write_bytes(good_table)
    assert [h.key for h in query.neighbours_of_key(str(out), keys[5], 3)][0] == keys[5]


def test_a_run_folder_given_as_output_names_its_output_and_a_folder_as_latest_is_damage(mnist_subset, tmp_path):
    # before: "no published result ... run `ae run SOURCE <run folder>` first", which would have
    # published into the run's folder; a folder named LATEST was an IsADirectoryError traceback
    out, config, manifest_path = _published_once(mnist_subset, tmp_path, outputs.MANIFEST)
    with pytest.raises(AeError, match=rf"is a run's folder, not an OUTPUT; give the OUTPUT it was published to, "
                                      rf"'{re.escape(str(out))}'"):
        outputs.resolve(str(manifest_path.parent))
    (out / outputs.LATEST).unlink()
    (out / outputs.LATEST).mkdir()
    # its fix is to move the folder away (before: "write the newest run's id into it", a folder)
    with pytest.raises(AeError, match="LATEST' is a folder: it should be a file holding the id of a run in runs/; "
                                      "move the folder out of OUTPUT"):
        outputs.resolve(str(out))
    # a run into it is refused before any work (before: it published, its pointer moved into the folder)
    with pytest.raises(AeError, match="holds a folder named LATEST, where a run records which run is published"):
        pipeline.prepare_run(config)
    with pytest.raises(AeError, match=r"no published result at .* run `ae run SOURCE"):
        outputs.resolve(str(tmp_path))
