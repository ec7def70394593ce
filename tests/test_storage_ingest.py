"""One storage suite over file://, memory:// and s3:// (moto's server on loopback): listing,
filters, concurrent reads, atomic writes, and the decode stage's shard cache."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from ae_core import ingest
from ae_core.decode import Preprocess
from ae_core.errors import AeError
from ae_core.storage import (ObjectInfo, check_store, key_matches, key_path, list_objects, open_store, read_many,
                             remove_tree, write_bytes_atomic)
from conftest import MNIST
from moto_server import free_port

FILES = {"a.png": 0, "sub/b.png": 1, "sub/deeper/c": 2, ".hidden": 3, "notes.txt": 4}


@pytest.fixture(params=["file", "memory", "s3"])
def store(request, tmp_path):
    """A fresh root URL holding FILES (real MNIST digits, and one text file)."""
    if request.param == "file":
        root = f"file://{tmp_path}/src"
    elif request.param == "memory":
        root = f"memory://t-{uuid.uuid4().hex[:8]}/src"
    else:
        root = f"s3://{request.getfixturevalue('s3_bucket')}/src"
    fs, path = open_store(root)
    for key, i in FILES.items():
        data = b"not an image" if key == "notes.txt" else (MNIST / f"{i:05d}.png").read_bytes()
        fs.makedirs(f"{path}/{key}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(f"{path}/{key}", data)
    yield root
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_listing_finds_every_object_whatever_its_name(store):
    fs, root = open_store(store)
    keys = sorted(o.key for o in list_objects(fs, root))
    assert keys == sorted(FILES)


def test_listing_filters_and_skips_output(store):
    fs, root = open_store(store)
    assert sorted(o.key for o in list_objects(fs, root, include=["*.png"])) == ["a.png", "sub/b.png"]
    assert sorted(o.key for o in list_objects(fs, root, exclude=["sub/*"])) == [".hidden", "a.png", "notes.txt"]
    assert sorted(o.key for o in list_objects(fs, root, skip_prefix=f"{root}/sub")) == [".hidden", "a.png", "notes.txt"]


def test_missing_source_is_a_clear_error(store):
    fs, root = open_store(store)
    with pytest.raises(AeError, match="missing"):
        list(list_objects(fs, root + "-nope"))
    with pytest.raises(AeError, match="a file, not a folder"):
        list(list_objects(fs, root + "/a.png"))


def test_read_many_returns_bytes_and_errors(store):
    fs, root = open_store(store)
    got = read_many(fs, [f"{root}/a.png", f"{root}/missing.png"])
    assert got[f"{root}/a.png"] == (MNIST / "00000.png").read_bytes()
    assert isinstance(got[f"{root}/missing.png"], Exception)


def test_a_large_object_that_is_not_an_image_is_never_read_whole(store, monkeypatch):
    # a video in a photo folder: identified from its head, rejected without reading the rest
    monkeypatch.setattr(ingest, "SNIFF_ABOVE", 1000)
    monkeypatch.setattr(ingest, "HEAD_BYTES", 64)
    fs, root = open_store(store)
    video = b"\0\0\0\x18ftypmp42isom" + bytes(5000)
    bmp = io.BytesIO()
    Image.open(MNIST / "00000.png").save(bmp, "BMP")  # ~1.9 kB: over the threshold, and an image
    fs.pipe_file(f"{root}/clip.mp4", video)
    fs.pipe_file(f"{root}/big.bmp", bmp.getvalue())
    objs = {o.key: o for o in list_objects(fs, root)}
    got = ingest.read_objects(fs, list(objs.values()))
    assert got[objs["clip.mp4"].path] == video[:64]
    assert got[objs["big.bmp"].path] == bmp.getvalue()
    assert got[objs["a.png"].path] == (MNIST / "00000.png").read_bytes()
    items = ingest._fetch(fs, [objs["clip.mp4"], objs["big.bmp"]])
    images, rejects, _ = ingest.decode_batch(items, Preprocess(image_size=28, channels=1))
    assert [i["key"] for i in images] == ["big.bmp"]
    assert [(r["key"], r["reason"], r["size_bytes"]) for r in rejects] == [("clip.mp4", "not_an_image", len(video))]
    # nor an image whose header says it has more pixels than the limit (before: read whole, then refused)
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)).save(noisy, "PNG")
    fs.pipe_file(f"{root}/bomb.png", noisy.getvalue())
    objs = {o.key: o for o in list_objects(fs, root)}
    assert isinstance(ingest.read_objects(fs, [objs["bomb.png"]], 10_000)[objs["bomb.png"].path], ingest.Unread)
    assert ingest.read_objects(fs, [objs["bomb.png"]], 40_000)[objs["bomb.png"].path] == noisy.getvalue()
    images, rejects, _ = ingest.decode_batch(ingest._fetch(fs, [objs["bomb.png"]], 10_000),
                                             Preprocess(image_size=28, channels=1, max_image_pixels=10_000))
    assert images == [] and [(r["reason"], r["size_bytes"], r["fingerprint"]) for r in rejects] == [
        ("decompression_bomb", len(noisy.getvalue()), None)]
    assert rejects[0]["detail"] == ("200x200 pixels exceeds the limit of 10000 (max_image_pixels; ae run "
                                    "--max-image-pixels) (the rest of the file was not read)")


def test_batches_hold_a_bounded_number_of_bytes():
    objs = [ObjectInfo(f"k{i}", f"p{i}", size) for i, size in enumerate([10, 10, 30, 100, 5, 5, 5])]
    batches = [[o.key for o in b] for b in ingest.byte_batches(objs, count=3, max_bytes=50)]
    assert batches == [["k0", "k1", "k2"], ["k3"], ["k4", "k5", "k6"]]


def test_names_with_glob_characters_are_names_not_patterns(store):
    # before, on S3 and memory://: fsspec's cat, mv and rm expanded `[1]` as a character class,
    # so `br[1].png` read as `br1.png` or as missing (a read_error reject every run), and an
    # OUTPUT named `out [1]` could never publish (its temporary files "vanished")
    fs, root = open_store(store)
    folder = f"{root}/set [2024]"
    names = {"br[1].png": 1, "br1.png": 2, "photo [2].png": 3, "star*.png": 4, "what?.png": 5}
    for name, i in names.items():
        write_bytes_atomic(fs, f"{folder}/{name}", (MNIST / f"{i:05d}.png").read_bytes())
    got = read_many(fs, [f"{folder}/{n}" for n in names])
    assert got == {f"{folder}/{n}": (MNIST / f"{i:05d}.png").read_bytes() for n, i in names.items()}
    assert sorted(o.key for o in list_objects(fs, folder)) == sorted(names)  # no temporary left
    write_bytes_atomic(fs, f"{root}/set 2/keep.png", b"x")  # `set [2024]` as a pattern matches `set 2`
    remove_tree(fs, folder)
    fs.invalidate_cache()
    assert not fs.exists(f"{folder}/br1.png") and fs.cat_file(f"{root}/set 2/keep.png") == b"x"


def test_an_s3_key_with_an_empty_segment_is_listed_and_read(s3_bucket):
    # before: fs.walk split `a//b.png` into folders and dropped it, with no row and no reject
    # and a key with an empty first segment (/lead.png) read back by its key (outliers --grid
    # read /lead.png at the bucket's root); an object whose key ends in / but holds bytes is a
    # candidate, not a folder marker (it was dropped, neither a row nor a reject)
    fs, root = open_store(f"s3://{s3_bucket}/slashes")
    data = (MNIST / "00001.png").read_bytes()
    for key in ("a//b.png", "a/c.png", "d.png", "/lead.png", "m/"):
        fs.pipe_file(f"{root}/{key}", data)
    fs.pipe_file(f"{root}/empty/", b"")  # a console's folder marker
    fs.invalidate_cache()
    objects = sorted(list_objects(fs, root), key=lambda o: o.key)
    assert [o.key for o in objects] == ["/lead.png", "a//b.png", "a/c.png", "d.png", "m/"]
    assert all(v == data for v in read_many(fs, [o.path for o in objects if o.key != "m/"]).values())
    assert fs.cat_file(key_path(fs, root, "/lead.png")) == data
    # through a caching layer, the same one flat listing (before: walked folder by folder as if
    # the store had no buckets, and a//b.png was lost again)
    fs, root = open_store(f"simplecache::s3://{s3_bucket}/slashes")
    assert sorted(o.key for o in list_objects(fs, root)) == ["/lead.png", "a//b.png", "a/c.png", "d.png", "m/"]


def test_atomic_write_leaves_no_temporary(store):
    fs, root = open_store(store)
    write_bytes_atomic(fs, f"{root}/out/x.bin", b"123")
    write_bytes_atomic(fs, f"{root}/out/x.bin", b"456")
    assert fs.cat_file(f"{root}/out/x.bin") == b"456"
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/out", detail=False)] == ["x.bin"]


def test_decode_corpus_quarantines_and_caches(store, tmp_path, monkeypatch):
    fs, root = open_store(store)
    objects = sorted(list_objects(fs, root), key=lambda o: o.key)
    spec = Preprocess(image_size=28, channels=1)
    corpus = ingest.decode_corpus(objects, fs, spec, str(tmp_path / "work"), shard_size=2)
    assert [i["key"] for i in corpus.images] == [".hidden", "a.png", "sub/b.png", "sub/deeper/c"]
    assert [(r["key"], r["reason"]) for r in corpus.rejects] == [("notes.txt", "not_an_image")]
    px = corpus.pixels()
    assert px.shape == (4, 1, 28, 28)
    assert np.array_equal(px[1, 0], np.asarray(__import__("PIL.Image").Image.open(MNIST / "00000.png")))

    # A rerun (say after a crash) reuses every finished shard and decodes nothing.
    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached shard was decoded again")
    monkeypatch.setattr(ingest, "decode_batch", no_decoding)
    again = ingest.decode_corpus(objects, fs, spec, str(tmp_path / "work"), shard_size=2)
    assert again.images == corpus.images and np.array_equal(again.pixels(), px)


@pytest.mark.parametrize("damage", ["truncated pixels", "replaced pixels", "broken metadata"])
def test_a_damaged_cached_shard_is_decoded_again(tmp_path, damage):
    fs, root = open_store(str(MNIST))
    objects = sorted(list_objects(fs, root), key=lambda o: o.key)[:6]
    spec, work = Preprocess(image_size=28, channels=1), tmp_path / "work"
    first = ingest.decode_corpus(objects, fs, spec, str(work), shard_size=3)
    px = np.array(first.pixels())
    npy, meta = work / "shard-00000.npy", work / "shard-00000.json"
    if damage == "truncated pixels":  # a crash or a power loss before the data reached the disk
        npy.write_bytes(npy.read_bytes()[:1000])
    elif damage == "replaced pixels":
        np.save(npy, np.zeros((3, 1, 28, 28), np.uint8))
    else:
        meta.write_text(meta.read_text()[:40])
    again = ingest.decode_corpus(objects, fs, spec, str(work), shard_size=3)
    assert again.images == first.images and np.array_equal(np.array(again.pixels()), px)


def test_process_pool_path_gives_the_same_pixels(tmp_path):
    fs = fsspec.filesystem("file")
    objects = sorted(list_objects(fs, str(MNIST)), key=lambda o: o.key)[:600]
    spec = Preprocess(image_size=28, channels=1)
    pooled = ingest.decode_corpus(objects, fs, spec, str(tmp_path / "a"), workers=2, shard_size=256)
    inline = ingest.decode_corpus(objects, fs, spec, str(tmp_path / "b"), workers=1, shard_size=256)
    assert len(pooled) == 600 and pooled.images == inline.images
    assert np.array_equal(pooled.pixels(), inline.pixels())


def test_sharded_pixels_index_like_the_concatenated_array(tmp_path):
    rng = np.random.default_rng(0)
    full = rng.integers(0, 256, (23, 1, 4, 4)).astype(np.uint8)
    paths = []
    for i, (a, b) in enumerate([(0, 10), (10, 10), (10, 23)]):  # the middle shard is empty
        np.save(tmp_path / f"{i}.npy", full[a:b])
        paths.append(str(tmp_path / f"{i}.npy"))
    px = ingest.ShardedPixels(paths, (1, 4, 4))
    assert len(px) == 23 and px.shape == full.shape and np.array_equal(np.asarray(px), full)
    for index in (slice(None), slice(5, 15), slice(20, 30), [0, 22, 11, 3], np.arange(23)[::-1], []):
        assert np.array_equal(px[index], full[index]), index
    assert np.array_equal(px[7], full[7]) and np.array_equal(px[-1], full[-1])
    assert np.array_equal(px[1, 0], full[1, 0]) and np.array_equal(px[[1, 2], 0], full[[1, 2], 0])
    with pytest.raises(IndexError):
        px[[23]]
    assert len(ingest.ShardedPixels([], (1, 4, 4))) == 0


def _fsspec_listing(fs, root: str, skip_prefix: str | None = None) -> list[tuple]:
    """What list_objects gave on local folders before it had its own walk: fsspec's walk with
    details, folders in sorted order, the same key, size and tag rules. The reference."""
    from ae_core.storage import _under, listing_tag
    prefix, out = root.rstrip("/") + "/", []
    for dirpath, dirs, files in fs.walk(root, detail=True):
        names = sorted(dirs)
        dirs.clear()
        for name in names:
            if skip_prefix is None or not _under(f"{dirpath}/{name}", skip_prefix):
                dirs[name] = None
        for name in sorted(files):
            info = files[name]
            if info.get("type") != "directory" and not (skip_prefix and _under(info["name"], skip_prefix)):
                out.append((info["name"][len(prefix):], info["name"], int(info.get("size") or 0), listing_tag(info)))
    return out


def test_local_listing_gives_what_fsspec_walk_gives(tmp_path):
    import os
    root = tmp_path / "src"
    (root / "a" / "b").mkdir(parents=True)
    (root / "out" / "x").mkdir(parents=True)
    (root / "z.png").write_bytes(b"12")
    (root / "a" / "b" / "f.png").write_bytes(b"x" * 10)
    (root / "out" / "x" / "o.png").write_bytes(b"1")
    (root / "epoch.png").write_bytes(b"123")
    os.utime(root / "epoch.png", (0, 0))  # mtime 0: the tag falls back on the creation time
    os.symlink(root / "z.png", root / "a" / "link.png")
    os.symlink(root / "a" / "b", root / "dirlink")
    os.symlink(root / "missing", root / "broken")
    os.symlink(root, root / "a" / "b" / "up")  # a loop
    os.symlink(root / "out", root / "outlink")  # into the skipped OUTPUT, through a link
    os.mkfifo(root / "pipe")
    os.utime(root / "a" / "link.png", (1, 1), follow_symlinks=False)  # older than its target
    fs, path = open_store(str(root))
    for skip in (None, f"{path}/out"):
        ours = [(o.key, o.path, o.size, o.tag) for o in list_objects(fs, path, skip_prefix=skip)]
        ref = _fsspec_listing(fs, path, skip)
        # deliberate differences: a link's tag follows its target's mtime too (fsspec: the
        # link's own only), so a target rewritten at the same size is seen as changed; a link to
        # a folder is followed (fsspec lists it as a file), not when it loops; a pipe is left out
        odd = ("a/link.png", "dirlink", "dirlink/f.png", "pipe", "a/b/up", "dirlink/up", "outlink", "outlink/x/o.png")
        assert [r for r in ours if r[0] not in odd] == [r for r in ref if r[0] not in odd]
        target = [r for r in ours if r[0] == "z.png"][0]
        assert [r[2:] for r in ours if r[0] == "a/link.png"] == [target[2:]]
        f_png = [r for r in ours if r[0] == "a/b/f.png"][0]
        assert [r[2:] for r in ours if r[0] == "dirlink/f.png"] == [f_png[2:]]
        assert ("outlink/x/o.png" in [r[0] for r in ours]) is (skip is None)
    before = [o.tag for o in list_objects(fs, path) if o.key == "a/link.png"]
    (root / "z.png").write_bytes(b"34")  # same size, new content
    os.utime(root / "z.png", (2e9, 2e9))
    assert [o.tag for o in list_objects(fs, path) if o.key == "a/link.png"] != before
    keys = [o.key for o in list_objects(fs, path)]
    assert {"z.png", "a/b/f.png", "a/link.png", "dirlink/f.png", "broken", "epoch.png", "out/x/o.png",
            "outlink/x/o.png"} == set(keys)
    assert [o.tag for o in list_objects(fs, path) if o.key == "epoch.png"][0] != "size:3:mtime:"
    mnist_fs, mnist = open_store(str(MNIST))
    assert [(o.key, o.path, o.size, o.tag) for o in list_objects(mnist_fs, mnist)] == _fsspec_listing(mnist_fs, mnist)


def test_local_reads_go_on_to_the_end_of_the_file(tmp_path, monkeypatch):
    """Short reads (files over 2 GiB, FUSE and network mounts) and a file that grew since its
    stat are read to the end, not taken as the whole file."""
    import os

    from ae_core import storage
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(256)) * 4000)
    local = fsspec.filesystem("file")
    real_read, real_fstat = os.read, os.fstat
    monkeypatch.setattr(storage.os, "read", lambda fd, n: real_read(fd, min(n, 1000)))  # short reads
    assert read_many(local, [str(p)])[str(p)] == p.read_bytes()
    monkeypatch.setattr(storage.os, "read", real_read)

    class Stat:
        st_size = 10
    monkeypatch.setattr(storage.os, "fstat", lambda fd: Stat())  # it grew after its stat
    assert read_many(local, [str(p)])[str(p)] == p.read_bytes()
    monkeypatch.setattr(storage.os, "fstat", real_fstat)
    err = read_many(local, [str(tmp_path)])[str(tmp_path)]  # a folder: the read fails, naming it
    assert isinstance(err, OSError) and str(tmp_path) in str(err)


@pytest.mark.parametrize("key, pattern, matches", [
    ("a.png", "*.png", True),
    ("sub/deeper/c.png", "*.png", True),  # fnmatch: * crosses folders
    ("a.png", "**/*.png", True),  # **/ also matches no folder
    ("sub/b.png", "**/*.png", True),
    ("sub/b.png", "sub/**/b.png", True),
    ("sub/x/y/b.png", "sub/**/b.png", True),
    ("other/b.png", "sub/**/b.png", False),
    ("a**/b.png", "a**/b.png", True),  # ** inside a name is two stars, not a folder wildcard
    ("ab.png", "a**/b.png", False),
    ("a.jpg", "**/*.png", False),
])
def test_include_globs(key, pattern, matches):
    assert key_matches(key, [pattern], []) is matches
    assert key_matches(key, [], [pattern]) is not matches


def test_a_key_leads_back_to_its_file_even_when_the_name_is_not_utf8(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    with open(os.fsencode(root) + b"/caf\xe9 \xff.png", "wb") as f:
        f.write(b"latin")
    (root / "plain\\x41.png").write_bytes(b"literal")  # a real name that looks like an escape
    # real names spelling the first file's key, and an escape of a backslash: each a key of its own
    (root / "caf\\xe9 \\xff.png").write_bytes(b"spelled")
    (root / "back\\x5c.png").write_bytes(b"backslash")
    fs, path = open_store(str(root))
    objs = {o.key: o for o in list_objects(fs, path)}
    assert set(objs) == {"caf\\xe9 \\xff.png", "plain\\x41.png", "caf\\x5cxe9 \\x5cxff.png", "back\\x5cx5c.png"}
    for key, obj in objs.items():
        assert fs.cat_file(key_path(fs, path, key)) == read_many(fs, [obj.path])[obj.path]
    assert fs.cat_file(key_path(fs, path, "caf\\xe9 \\xff.png")) == b"latin"


_KILLED_PARENT = """
import sys, time
import fsspec
from ae_core import ingest
from ae_core.decode import Preprocess
from ae_core.storage import list_objects

fs = fsspec.filesystem("file")
objects = sorted(list_objects(fs, sys.argv[1]), key=lambda o: o.key)

def on_done(n):  # the workers exist and wait for more: stop here until killed
    print("decoding", flush=True)
    time.sleep(600)

ingest.decode_corpus(objects, fs, Preprocess(28, 1), sys.argv[2], shard_size=64, workers=2, on_done=on_done)
"""


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name: state, parent pid, ...; [] when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _alive(pid: int) -> bool:
    return _stat(pid)[:1] not in ([], ["Z"])


def _children(pid: int) -> set[int]:
    return {int(e) for e in os.listdir("/proc") if e.isdigit() and _stat(int(e))[1:2] == [str(pid)] and _alive(int(e))}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_decode_workers_go_when_their_process_is_killed_outright(mnist_subset, tmp_path):
    # before: SIGKILL or the OOM killer left the spawned workers running forever, orphaned
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT, str(mnist_subset), str(tmp_path / "work")],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline() == "decoding\n"
        workers = _children(proc.pid)
        assert len(workers) >= 2  # two decode workers (and multiprocessing's resource tracker)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, f"decode workers {sorted(workers)} outlived their killed parent"
        time.sleep(0.2)


def test_a_store_that_stops_answering_while_decoding_fails_the_stage_as_transient(tmp_path):
    # before: every object after the outage became a read_error reject, and the run published
    # a model and a table made from what it had read before
    import s3fs

    from ae_core.decode import Preprocess
    from ae_core.errors import AeError
    from ae_core.ingest import decode_corpus

    port = free_port()  # nothing listens on it: connection refused at once
    # the endpoint as a credentials block gives it (client_kwargs), not in AWS_ENDPOINT_URL
    fs = s3fs.S3FileSystem(key="k", secret="s", skip_instance_cache=True,
                           client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"},
                           config_kwargs={"connect_timeout": 1, "retries": {"max_attempts": 1}})
    objects = [ObjectInfo(key=f"{i}.png", path=f"bucket/{i}.png", size=300) for i in range(3)]
    with pytest.raises(AeError, match=r"the store stopped answering while decoding \(EndpointConnectionError on '0.png'") as err:
        decode_corpus(objects, fs, Preprocess(28, 1), str(tmp_path / "work"))
    assert err.value.transient
    with pytest.raises(AeError, match=rf"cannot reach the store at http://127.0.0.1:{port}; check the endpoint"):
        check_store(fs, "bucket/src", "s3://bucket/src", "source")


def test_fsspec_s_configuration_that_wins_over_the_aws_variables_is_named(s3_bucket, monkeypatch):
    # fsspec's configuration is passed to s3fs as arguments and so wins over AWS_ENDPOINT_URL and
    # AWS_ACCESS_KEY_ID (the README said the other way round); before, a stale file sent the run
    # to another store and the message pointed at the AWS variables, which were right (helper)
    import fsspec

    from ae_core.errors import AeError
    from ae_core.storage import _config_note

    fs, root = open_store(f"s3://{s3_bucket}/src")
    check_store(fs, root, f"s3://{s3_bucket}/src", "source")  # the AWS variables: moto, reachable
    port = free_port()
    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
                                                   "config_kwargs": {"retries": {"max_attempts": 1}}})
    fs, root = open_store(f"s3://{s3_bucket}/src")
    with pytest.raises(AeError, match=rf"cannot reach the store at http://127.0.0.1:{port} \(fsspec's configuration "
                                      r"in .* sets the endpoint, and wins over the AWS_\* variables\)"):
        check_store(fs, root, f"s3://{s3_bucket}/src", "source")
    # a credentials block's endpoint overrides the file's: then the file is not named
    block = {"s3": {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}}
    fs, root = open_store(f"s3://{s3_bucket}/src", block)
    assert _config_note(fs) == ""
    check_store(fs, root, f"s3://{s3_bucket}/src", "source")
    monkeypatch.setitem(fsspec.config.conf, "s3", {"key": "bogus", "secret": "bogus"})
    fs, _ = open_store(f"s3://{s3_bucket}/src")  # moto takes any keys: what a refusal would add
    assert "sets the keys, and wins over the AWS_* variables" in _config_note(fs)
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    assert _config_note(open_store(f"s3://{s3_bucket}/src")[0]) == ""


def test_an_empty_location_or_a_bucketless_url_is_refused_not_taken_for_the_working_directory():
    from ae_core.errors import AeError

    from ae_core.storage import is_local

    for url in ("", "  "):
        with pytest.raises(AeError, match="an empty path or URL"):
            open_store(url)
    for url in ("s3://", "s3:///", "s3a://"):
        with pytest.raises(AeError, match=r"names no bucket; give s3a?://bucket"):
            open_store(url)
    assert open_store("s3://b")[1] == "b" and is_local(open_store("file:///tmp")[0])
    assert open_store("memory://")[1] == ""  # memory has no buckets: its root is a folder


def test_a_source_inside_the_output_is_listed_without_the_outputs_runs(mnist_subset, tmp_path):
    # before: every object under OUTPUT was skipped, so the run said SOURCE "holds no objects"
    import shutil

    from ae_core import pipeline
    from ae_core.config import RunConfig

    out = tmp_path / "out"
    shutil.copytree(mnist_subset, out / "digits")
    (out / "runs" / "20260101T000000Z-aaaaaa").mkdir(parents=True)
    shutil.copy(mnist_subset / "00000.png", out / "runs" / "20260101T000000Z-aaaaaa" / "reconstructions.png")
    ctx = pipeline.prepare_run(RunConfig(source=str(out / "digits"), output=str(out), work_dir=str(tmp_path / "w")))
    assert len(pipeline.list_source(ctx)) == 300
    # SOURCE that holds OUTPUT's runs (through a link): those are still never read back
    (out / "digits" / "results").symlink_to(out / "runs")
    assert len(pipeline.list_source(ctx)) == 300
    # nor one of their files (before: a file link was listed; only folder links were checked)
    (out / "digits" / "recon.png").symlink_to(out / "runs" / "20260101T000000Z-aaaaaa" / "reconstructions.png")
    assert len(pipeline.list_source(ctx)) == 300


def test_credentials_in_a_bucket_url_are_refused_without_echoing_them():
    from ae_core.errors import AeError
    from ae_core.storage import open_store

    for url in ("s3://AKID:SECRETX@bkt/photos", "gs://AKID:SECRETX@bkt", "S3://AKID:SECRETX@bkt/photos",
                "simplecache::s3://AKID:SECRETX@bkt/photos"):  # before: the last two leaked the secret
        with pytest.raises(AeError, match="credentials in the URL are not used") as err:
            open_store(url)
        assert "SECRETX" not in str(err.value)
    try:  # Azure's own form names the container before the @: not refused as credentials
        open_store("abfs://container@account.dfs.core.windows.net/photos")
    except AeError as err:  # adlfs not installed here: any other one-line error
        assert "credentials in the URL" not in str(err)
    with pytest.raises(AeError, match="empty path part"):  # before: it slipped past the OUTPUT-in-SOURCE check
        open_store("s3://bkt//photos")


def test_a_source_inside_the_output_never_lists_the_outputs_runs(store, tmp_path):
    # before: over S3 (and memory://) OUTPUT/runs as SOURCE embedded earlier runs' pictures
    from ae_core import pipeline
    from ae_core.config import RunConfig

    fs, root = open_store(store)
    fs.makedirs(f"{root}/runs/20260101T000000Z-aaaaaa", exist_ok=True)
    fs.pipe_file(f"{root}/runs/20260101T000000Z-aaaaaa/loss.png", (MNIST / "00000.png").read_bytes())

    def listed(source):
        ctx = pipeline.prepare_run(RunConfig(source=source, output=store, work_dir=str(tmp_path / "w")))
        return sorted(o.key for o in pipeline.list_source(ctx))

    assert listed(f"{store}/sub") == ["b.png", "deeper/c"]
    with pytest.raises(AeError, match="holds no objects"):
        listed(f"{store}/runs")


def _as_unprivileged() -> list[str]:
    """A command prefix under which file permissions hold: root reads a mode-000 folder anyway,
    so as root the listing runs without the capabilities that override permissions."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    if not shutil.which("setpriv") or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root where setpriv cannot drop capabilities: a mode-000 folder stays readable")
    return prefix


def test_a_folder_that_cannot_be_listed_stops_the_listing_unless_excluded(tmp_path):
    # before: skipped without a word, so a nightly run took its images for deleted ones and
    # dropped their published rows
    src = tmp_path / "src"
    (src / "locked").mkdir(parents=True)
    (src / "a.png").write_bytes(b"x")
    (src / "locked" / "b.png").write_bytes(b"x")
    (src / "locked").chmod(0)
    code = ("import sys; from ae_core.errors import AeError; from ae_core.storage import list_objects, open_store\n"
            "fs, root = open_store(sys.argv[1])\n"
            "try:\n    print(sorted(o.key for o in list_objects(fs, root, exclude=sys.argv[2:])))\n"
            "except AeError as err:\n    print('AeError', err.transient, err)\n")
    try:
        def listing(*exclude: str) -> str:
            proc = subprocess.run([*_as_unprivileged(), sys.executable, "-c", code, str(src), *exclude],
                                  capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
            assert proc.returncode == 0, proc.stderr
            return proc.stdout.strip()

        refused = listing()
        assert refused.startswith("AeError False source folder") and "locked" in refused, refused
        assert "Permission denied" in refused and "--exclude 'locked/*'" in refused
        assert listing("locked/*") == "['a.png']"
        (src / "locked").chmod(0o755)
        src.chmod(0)
        assert "give a folder you may read" in listing()
    finally:
        src.chmod(0o755)
        (src / "locked").chmod(0o755)


def test_a_tree_deeper_than_python_s_recursion_limit_is_listed(tmp_path):
    # before: RecursionError from the walk's nested generators, a traceback
    deep = tmp_path
    for _ in range(1100):  # one by one: mkdir(parents=True) and os.makedirs recurse themselves
        deep = deep / "a"
        deep.mkdir()
    try:
        (deep / "x.png").write_bytes((MNIST / "00000.png").read_bytes())
        (tmp_path / "b.png").write_bytes(b"top")
        fs, root = open_store(str(tmp_path))
        assert sorted(o.key for o in list_objects(fs, root)) == ["a/" * 1100 + "x.png", "b.png"]
    finally:  # bottom up, as pytest's clean-up (shutil.rmtree) recurses too
        (deep / "x.png").unlink(missing_ok=True)
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent


def test_an_output_path_that_cannot_be_used_is_one_line(mnist_subset, tmp_path):
    # before: the check of its parent passed, and the run failed later with a traceback
    from ae_core.config import RunConfig
    from ae_core.pipeline import prepare_run

    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    for out, why in ((tmp_path / "loop-a", "Too many levels of symbolic links"),
                     (tmp_path / ("O" * 300), "File name too long")):
        with pytest.raises(AeError, match=rf"output '.*' cannot be used \({why}\); give another path"):
            prepare_run(RunConfig(source=str(mnist_subset), output=str(out)))


def test_an_output_whose_runs_folder_is_not_writable_is_refused_before_the_work(mnist_subset, tmp_path):
    # before: OUTPUT itself writable passed the check; the run failed after training, with a
    # traceback, at its own folder in OUTPUT/runs (made by a colleague, say)
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs").chmod(0o555)
    code = ("import sys; from ae_core.config import RunConfig; from ae_core.errors import AeError\n"
            "from ae_core.pipeline import prepare_run\n"
            "try:\n    prepare_run(RunConfig(source=sys.argv[1], output=sys.argv[2], work_dir=sys.argv[3]))\n"
            "    print('accepted')\nexcept AeError as err:\n    print('AeError', err)\n")
    try:
        proc = subprocess.run([*_as_unprivileged(), sys.executable, "-c", code, str(mnist_subset), str(out),
                               str(tmp_path / "work")], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    finally:
        (out / "runs").chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("AeError output") and f"cannot write in {str(out / 'runs')!r}" in proc.stdout, proc.stdout


def test_urls_that_cannot_be_opened_are_one_line_and_passwords_are_refused(tmp_path):
    # before: a zip:// of a file that is no zip, or an FTP host that refuses, was a traceback; a
    # password in an http URL reached Prefect's flow-run parameters and the rejects table
    (tmp_path / "fake.zip").write_text("not a zip")
    with pytest.raises(AeError, match=r"cannot open 'zip://::.*fake.zip' \(BadZipFile") as err:
        open_store(f"zip://::file://{tmp_path}/fake.zip")
    assert not err.value.transient
    with pytest.raises(AeError, match="cannot reach the store") as err:
        open_store(f"ftp://127.0.0.1:{free_port()}/x")
    assert err.value.transient
    from ae_core.storage import refuse_password

    for url, example in (("http://user:s3cr3t@127.0.0.1:1/x", '"Authorization"'),
                         ("simplecache::https://u:s3cr3t@example.invalid/x", '"Authorization"'),
                         ("sftp://u:s3cr3t@example.invalid/x", '{"sftp": {"username"')):
        with pytest.raises(AeError, match="source .* a password in the URL is refused") as err:
            refuse_password(url, "source")
        assert "s3cr3t" not in str(err.value) and example in str(err.value)
    for url in ("ftps://u:s3cr3t@h/x", "hdfs://u:s3cr3t@h/x"):
        with pytest.raises(AeError, match="a password in the URL is refused"):
            refuse_password(url, "source")
    refuse_password("https://user@example.invalid/x", "source")  # no secret there
    refuse_password("http://example.invalid?a=b:c@d", "source")  # a query, not a user
    from ae_core.config import RunConfig
    from ae_core.pipeline import prepare_run

    with pytest.raises(AeError, match="output .* a password in the URL is refused"):
        prepare_run(RunConfig(source=str(tmp_path), output="ftp://u:s3cr3t@127.0.0.1:1/out"))
    assert type(open_store("http://user:s3cr3t@127.0.0.1:1/x")[0]).__name__ == "HTTPFileSystem"  # a query reads


def test_an_ipv6_host_written_with_a_double_colon_is_refused_with_the_fix(tmp_path):
    # before: a traceback (ValueError: Invalid IPv6 URL) from cutting the URL at '::' as a chain
    from ae_core.config import RunConfig
    from ae_core.pipeline import prepare_run
    from ae_core.storage import redact_url

    for url in ("http://[::1]:8765/imgs", "simplecache::https://[fe80::1%25eth0]/imgs"):
        with pytest.raises(AeError, match=r"IPv6 address written with '::' .* write the address in full"):
            prepare_run(RunConfig(source=url, output=str(tmp_path / "out")))
    with pytest.raises(AeError, match="a password in the URL is refused") as err:
        prepare_run(RunConfig(source="http://u:s3cr3t@[::1]:1/x", output=str(tmp_path / "out")))
    assert "s3cr3t" not in str(err.value) and "'http://[::1]:1/x'" in str(err.value)
    assert redact_url("simplecache::ftp://u:s3cr3t@[::1]:21/a") == "simplecache::ftp://[::1]:21/a"
    assert redact_url("http://u:s3cr3t@[::1/a") == "http://[::1/a"  # malformed: still no secret
    # a '::' in a folder's name (before: '/data/a::b' opened '/data/a' without a word) or a key,
    # or before something that is not a protocol: refused, naming the fix
    (tmp_path / "a").mkdir()
    (tmp_path / "a::b").mkdir()
    for url in (f"{tmp_path}/a::b", f"{tmp_path}/[c::d]", "s3://b/[x::y]", f"SIMPLECACHE::{tmp_path}", f"::{tmp_path}"):
        with pytest.raises(AeError, match=r"'::' separates the URLs of an fsspec chain .* rename that folder"):
            open_store(url)
    assert open_store(f"simplecache::{tmp_path}/a")[1] == f"{tmp_path}/a"  # a chain stays a chain
    # a ']' later in the chain does not glue its parts together (the password was kept and passed)
    assert redact_url("simplecache::https://u:s3cr3t@h.example/set]1/") == "simplecache::https://h.example/set]1/"
    with pytest.raises(AeError, match="a password in the URL is refused"):
        prepare_run(RunConfig(source="simplecache::https://u:s3cr3t@h.example/set]1/", output=str(tmp_path / "out")))
    assert type(open_store("http://[0:0:0:0:0:0:0:1]:1/x")[0]).__name__ == "HTTPFileSystem"
    assert not (tmp_path / "out").exists()


def test_a_work_dir_given_as_a_url_is_the_local_folder_or_refused(mnist_subset, tmp_path):
    # before: --work-dir file:///x made a folder named 'file:' in the current directory
    from ae_core.config import RunConfig
    from ae_core.pipeline import prepare_run

    ctx = prepare_run(RunConfig(source=str(mnist_subset), output=str(tmp_path / "o"), work_dir=f"file://{tmp_path}/w"))
    assert ctx.work_dir.startswith(f"{tmp_path}/w/ae-cache-")
    with pytest.raises(AeError, match=r"work dir 's3://bkt/w' is not a local folder; give a local path"):
        prepare_run(RunConfig(source=str(mnist_subset), output=str(tmp_path / "o"), work_dir="s3://u:s3cr3t@bkt/w"))
    for empty in ("", " ", "file://"):  # before: the temp dir, and the current directory
        with pytest.raises(AeError, match="work dir is empty; give a local folder"):
            prepare_run(RunConfig(source=str(mnist_subset), output=str(tmp_path / "o"), work_dir=empty))
    from ae_core.storage import read_named_file

    with pytest.raises(AeError, match="the image is an empty path; give an image"):  # before: "give a folder"
        read_named_file(" ", "image", "give an image")
    assert not (tmp_path / "o").exists()


def test_a_zip_member_rewritten_at_the_same_size_gets_a_new_tag(tmp_path):
    # before: the tag was size and an mtime that a zip member's listing does not give, so a
    # re-zipped member of the same size was "unchanged" and its embedding stale
    import zipfile

    def tags() -> dict[str, str]:
        fs, root = open_store(f"zip://imgs::file://{tmp_path}/a.zip")
        return {o.key: o.tag for o in list_objects(fs, root)}

    for first, second in ((b"AAAA", b"BBBB"), (b"BBBB", b"AAAA")):
        with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
            z.writestr("imgs/1.png", first)
            z.writestr("imgs/2.png", second)
        if first == b"AAAA":
            before = tags()
    after = tags()
    assert before["1.png"] != after["1.png"] and before["1.png"] == after["2.png"]
    # at the zip's root, a key keeps its folders: a/x.png and b/x.png both had the key x.png
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as z:
        z.writestr("a/x.png", b"1")
        z.writestr("b/x.png", b"2")
    fs, root = open_store(f"zip://::file://{tmp_path}/b.zip")
    assert sorted(o.key for o in list_objects(fs, root)) == ["a/x.png", "b/x.png"]
    # members named from "/": the nested ones too (a walk by ls lost them; an archive is listed
    # with one find, as ls reads every member on each call)
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as z:
        for name in ("/a.png", "/sub/b.png", "/sub/deep/c.png"):
            z.writestr(name, b"1")
    fs, root = open_store(f"zip://::file://{tmp_path}/c.zip")
    assert len(list(list_objects(fs, root))) == 3


def test_an_http_listing_asks_for_the_versions_of_the_included_files_only(tmp_path):
    # before: one HEAD for every file of the site, whatever --include / --exclude left out
    from http_server import serve_folder

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for i in range(5):
            (tmp_path / folder / f"{i}.png").write_bytes(b"x" * (i + 1))
    heads: list[str] = []
    with serve_folder(tmp_path, heads) as base:
        fs, root = open_store(f"{base}/")
        got = list(list_objects(fs, root, include=["a/*"], exclude=["a/4.png"]))
    assert [(o.key, o.size) for o in got] == [(f"a/{i}.png", i + 1) for i in range(4)]
    assert sorted(heads) == [f"/a/{i}.png" for i in range(4)]


def test_an_http_listing_that_links_back_to_itself_is_listed_once(tmp_path):
    # before: a RecursionError (session 13 made it a one-line refusal); only a folder's own
    # subfolders are followed now, so the page's one image is listed, once
    from http_server import serve_folder

    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "index.html").write_text('<a href="./">here</a> <a href="../loop/">again</a> '
                                                  '<a href="../">up</a> <a href="a.png">a</a> '
                                                  '<a href="a%20b.png">a b</a>')
    (tmp_path / "x.png").write_bytes(b"x")  # a link to a file above is not the folder's (it was a
    (tmp_path / "loop" / "index.html").write_text(  # second key x.png, one more row each run)
        (tmp_path / "loop" / "index.html").read_text() + ' <a href="../x.png">x</a> <a href="/x.png">x</a>')
    with serve_folder(tmp_path) as base:
        for url in (f"{base}/loop/", f"simplecache::{base}/loop/"):  # the same under a caching layer
            fs, root = open_store(url)
            assert [o.key for o in list_objects(fs, root)] == ["a b.png", "a.png"], url


def test_an_http_folder_that_cannot_be_listed_stops_the_run_and_exclude_leaves_it_out(tmp_path):
    # before: aiohttp's 403 as a traceback, and --exclude 'private/*' did not help (fsspec's walk
    # entered the folder before any pattern applied)
    from http_server import serve_folder

    for folder in ("public", "private dir", "public/deeper"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(b"x")
    with serve_folder(tmp_path, forbidden=("/private%20dir",)) as base:
        fs, root = open_store(f"{base}/")
        # the --exclude it gives is the folder's name as the patterns see it (not private%20dir)
        with pytest.raises(AeError, match=r"source folder '.*/private%20dir/' cannot be listed \(ClientResponseError: "
                                          r"403.*--exclude 'private dir/\*'. Nothing was published") as err:
            list(list_objects(fs, root))
        assert not err.value.transient  # a refusal: not retried
        for exclude, include in ((["private dir/*"], []), ([], ["public/*"]), (["**/private dir/*"], [])):
            assert [o.key for o in list_objects(fs, root, include, exclude)] == ["public/deeper/x.png", "public/x.png"]
    # a server that hides the folder behind a 404: the same (before: skipped as a dead link, its
    # images counted as deleted)
    (tmp_path / "index.html").write_text('<a href="public/">public</a> <a href="gone/">gone</a>')
    with serve_folder(tmp_path) as base:
        fs, root = open_store(f"{base}/")
        with pytest.raises(AeError, match=r"source folder '.*/gone/' cannot be listed \(FileNotFoundError"):
            list(list_objects(fs, root))
        assert [o.key for o in list_objects(fs, root, (), ["gone/*"])] == ["public/deeper/x.png", "public/x.png"]


def test_exclude_patterns_leave_a_served_folder_out_only_when_they_cover_all_of_it(tmp_path):
    # before: one made-up key ('cats/-') stood for the whole folder, and --exclude '*-*' left out
    # cats/a.png with it (counted as deleted); a pattern that cannot cover a folder opens it
    from http_server import serve_folder

    (tmp_path / "cats").mkdir()
    for name in ("top.png", "img-copy.png", "cats/a.png", "cats/b-copy.png"):
        (tmp_path / name).write_bytes(b"x")
    with serve_folder(tmp_path) as base:
        fs, root = open_store(f"{base}/")
        for exclude, kept in ((["*-*"], ["cats/a.png", "top.png"]), (["*[!g]"], ["cats/a.png", "cats/b-copy.png",
                                                                                   "img-copy.png", "top.png"]),
                              (["cats*"], ["img-copy.png", "top.png"]), (["*/b*"], ["cats/a.png", "img-copy.png",
                                                                                      "top.png"])):
            assert [o.key for o in list_objects(fs, root, (), exclude)] == kept, exclude


def test_an_output_inside_the_source_is_caught_through_a_caching_chain(tmp_path):
    # before: the caching layer's filesystem type differed from the plain one, so a run through
    # simplecache::file:// embedded its own report pictures
    from ae_core.storage import same_or_inside

    src, out = open_store(f"simplecache::file://{tmp_path}"), open_store(str(tmp_path / "out"))
    assert same_or_inside(*out, *src)
    assert same_or_inside(*open_store(f"filecache::file://{tmp_path}/out"), *open_store(str(tmp_path)))
    assert not same_or_inside(*open_store(f"simplecache::file://{tmp_path}/a"), *open_store(str(tmp_path / "b")))
