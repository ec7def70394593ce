"""`ae` end to end in subprocesses, on real digits and on a folder of mixed and broken files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ae_core import checkpoint, outputs, query
from ae_core.encode import CALIBRATION_LEVELS, anomaly_scores, calibrate, encode_pixels, folds_of, median_ratio
from ae_core.decode import decode_image
from conftest import COIL, MNIST
from prefect_server import shared_prefect_env

pytestmark = pytest.mark.slow

AE = [sys.executable, "-m", "ae_core.cli"]


def ae(*args: str, check: bool = True, ephemeral: bool = False) -> subprocess.CompletedProcess:
    """`ae` in a subprocess, against the session's Prefect server (prefect_server.shared_prefect_env),
    or with `ephemeral` in Prefect's ephemeral mode: a temporary server of its own, as the
    README's first command runs (whatever PREFECT_API_URL the shell running the tests set)."""
    env = {**(os.environ if ephemeral else shared_prefect_env()), "PYTHONUNBUFFERED": "1"}
    if ephemeral:
        env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([*AE, *map(str, args)], capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"ae {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def prefect_servers_not_ours() -> set[int]:
    """Prefect temporary API servers whose parent is not this test process (an `ae` that exited
    without stopping its server leaves one behind, adopted by init)."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            cmdline, stat = (proc / "cmdline").read_bytes(), (proc / "stat").read_text()
        except (OSError, ValueError):
            continue
        if b"prefect.server.api.server:create_app" in cmdline and int(stat.rsplit(")", 1)[1].split()[1]) != os.getpid():
            found.add(int(proc.name))
    return found


SERVERS_LEFT_BEHIND: list[int] = []


@pytest.fixture(scope="module")
def digits_run(mnist_subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-out") / "out"
    before = prefect_servers_not_ours()
    proc = ae("run", mnist_subset, out, "--dim", 16, "--epochs", 3, "--seed", 1, ephemeral=True)
    SERVERS_LEFT_BEHIND[:] = sorted(prefect_servers_not_ours() - before)
    return out, proc


def test_run_prints_a_summary(digits_run):
    out, proc = digits_run
    assert "300 embedded, 0 rejected" in proc.stdout
    assert "PCA-16" in proc.stdout and "index    flat l2, 300 vectors, exact search (recall 1)" in proc.stdout
    # the figure to judge the model by: on the 15 images it held out (5%), PCA fitted on the rest
    assert "(mostly trained on)" in proc.stdout and "on 15 images held out of training" in proc.stdout
    m = query.info(str(out))
    ratio = m["quality"]["heldout"]["ae_over_pca"]  # 3 epochs: often above 1, and then the summary says what to do
    assert ("note     the autoencoder's reconstruction error is" in proc.stdout) == (ratio > 1)
    report = (out / "runs" / m["run_id"] / "report.md").read_text()
    assert ("**Note:** The autoencoder's reconstruction error" in report) == (ratio > 1)


def test_info_json_points_at_openable_outputs(digits_run, mnist_subset):
    out, _ = digits_run
    info = json.loads(ae("info", out, "--json").stdout)
    assert (info["rows"], info["rejected"], info["dim"], info["image_size"], info["channels"]) == (300, 0, 16, 28, 1)
    assert (info["width"], info["blocks_per_stage"]) == (32, 1)  # what `--retrain never` errors point to
    assert info["model_version"].startswith("ae-")
    df = pd.read_parquet(info["embeddings"])
    assert len(df) == 300 and df.key.is_unique
    assert sorted(df.key) == sorted(os.listdir(mnist_subset))
    emb = np.stack(df.embedding.to_numpy()).astype(np.float32)
    assert emb.shape == (300, 16) and np.isfinite(emb).all()
    assert (df.width == 28).all() and (df.height == 28).all() and (df.size_bytes > 0).all()
    assert df.fingerprint.str.len().eq(32).all()
    meta = pq.read_schema(info["embeddings"]).metadata
    assert meta[b"model_version"].decode() == info["model_version"] and meta[b"dim"] == b"16"
    assert pd.read_parquet(info["rejects"]).empty
    assert faiss.read_index(info["index"]).ntotal == 300


def test_every_key_is_its_own_nearest_neighbour(digits_run, mnist_subset):
    out, _ = digits_run
    keys = sorted(os.listdir(mnist_subset))
    misses = [k for k in keys if query.neighbours_of_key(str(out), k, 1)[0].key != k]
    assert misses == []
    cli = json.loads(ae("neighbours", out, "--key", keys[7], "-k", 1, "--json").stdout)
    assert [n["key"] for n in cli["neighbours"]] == [keys[7]]
    text = ae("neighbours", out, "--key", keys[7], "-k", 5).stdout
    assert text.count("\n") == 6 and keys[7] in text


def test_recon_error_matches_checkpoint_recomputation(digits_run, mnist_subset):
    out, _ = digits_run
    info = query.info(str(out))
    ckpt = checkpoint.from_bytes(Path(info["checkpoint"]).read_bytes())
    assert ckpt.version == info["model_version"]
    df = pd.read_parquet(info["embeddings"]).set_index("key")
    keys = sorted(os.listdir(mnist_subset))[:20]
    px = np.stack([decode_image((mnist_subset / k).read_bytes(), ckpt.preprocess).pixels for k in keys])
    emb, err = encode_pixels(ckpt.model, px)
    assert np.allclose(err, df.loc[keys, "recon_error"].to_numpy(), atol=1e-5)
    assert np.allclose(emb, np.stack(df.loc[keys, "embedding"].to_numpy()), atol=1e-4)
    # anomaly_score: each image scored by the fold model that did not train on it
    assert len(ckpt.anomaly_models) == 2
    folds = folds_of(keys)
    assert 0 < folds.sum() < len(keys)
    raw = [encode_pixels(ckpt.anomaly_models[1 - f], px[i:i + 1])[1][0] for i, f in enumerate(folds)]
    # calibrated by the quantiles of each fold model's errors on the half it never trained on
    every = sorted(os.listdir(mnist_subset))
    all_px = np.stack([decode_image((mnist_subset / k).read_bytes(), ckpt.preprocess).pixels for k in every])
    all_folds = folds_of(every)
    for k in (0, 1):
        held = encode_pixels(ckpt.anomaly_models[k], all_px[all_folds == 1 - k])[1].astype(np.float64)
        assert np.allclose(ckpt.anomaly_quantiles[k], np.quantile(held, CALIBRATION_LEVELS), rtol=1e-4)
    expected = [calibrate(np.array([r]), ckpt.anomaly_quantiles[1 - f], ckpt.anomaly_quantiles[f])[0]
                for r, f in zip(raw, folds)]
    assert np.allclose(expected, df.loc[keys, "anomaly_score"].to_numpy(), atol=1e-5)
    assert np.allclose(anomaly_scores(ckpt.anomaly_models, px, folds, quantiles=ckpt.anomaly_quantiles), expected,
                       atol=1e-6)
    assert outputs.resolve(str(out)).manifest["train"]["anomaly_median_ratio"] == median_ratio(ckpt.anomaly_quantiles)


def test_neighbours_of_a_new_image_file(digits_run, mnist_subset, tmp_path):
    out, _ = digits_run
    key = sorted(os.listdir(mnist_subset))[42]
    copy = tmp_path / "query-without-extension"
    copy.write_bytes((mnist_subset / key).read_bytes())
    res = json.loads(ae("neighbours", out, "--image", copy, "-k", 3, "--json").stdout)
    assert res["neighbours"][0]["key"] == key
    assert res["neighbours"][0]["distance"] < 1e-3
    assert len(res["neighbours"]) == 3


def test_mixed_formats_and_broken_files_complete(mixed_corpus, tmp_path):
    folder, good, broken = mixed_corpus
    out = tmp_path / "out"
    proc = ae("run", folder, out, "--epochs", 2, "--dim", 8)
    assert f"{len(good)} embedded, {len(broken)} rejected" in proc.stdout
    info = json.loads(ae("info", out, "--json").stdout)
    assert info["channels"] == 3 and info["rows"] == len(good)
    df = pd.read_parquet(info["embeddings"])
    assert sorted(df.key) == sorted(good)
    assert np.isfinite(np.stack(df.embedding.to_numpy())).all()
    rejects = pd.read_parquet(info["rejects"]).set_index("key")
    assert {k: rejects.reason[k] for k in rejects.index} == {k: r for k, (_, r) in broken.items()}
    assert rejects.detail.str.len().gt(0).all()
    # the file whose name is not UTF-8, asked for by its name as it is on disk (bytes in argv)
    raw = subprocess.run([*AE, "neighbours", str(out), "--key", os.fsencode("names/caf\udce9.png"), "-k", "2",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout)["neighbours"][0]["key"] == "names/caf\\xe9.png"
    key, reason = next(iter((k, r) for k, (_, r) in broken.items()))
    assert_one_line_error(ae("neighbours", out, "--key", key, check=False), f"was rejected ({reason})")


def test_a_corpus_smaller_than_the_embedding_runs_to_the_end(mnist_subset, tmp_path):
    # 3 images and dim 32: PCA-32 reproduces them exactly, so there is no AE/PCA ratio to report
    # (this once crashed the report after training)
    few = tmp_path / "few"
    few.mkdir()
    names = sorted(os.listdir(mnist_subset))[:3]
    for name in names:
        (few / name).write_bytes((mnist_subset / name).read_bytes())
    out = tmp_path / "out"
    proc = ae("run", few, out, "--epochs", 2, "--width", 8, "--lr", 0.005)
    assert "3 embedded, 0 rejected" in proc.stdout
    assert "(no ratio: PCA reproduces these images exactly)" in proc.stdout
    info = json.loads(ae("info", out, "--json").stdout)
    assert info["rows"] == 3 and info["quality"]["ae_over_pca"] is None and info["quality"]["sample"] == 3
    report = (Path(info["manifest"]).parent / "report.md").read_text()
    assert "reproduces these 3 images exactly" in report
    config = json.loads(Path(info["manifest"]).read_text())["config"]
    assert (config["model"]["width"], config["train"]["lr"]) == (8, 0.005)
    assert checkpoint.from_bytes(Path(info["checkpoint"]).read_bytes()).model.arch.width == 8 == info["width"]
    assert "width 8, 1 block(s) per stage" in ae("info", out).stdout
    hits = ae("neighbours", out, "--key", names[0], "-k", 3).stdout
    assert all(name in hits for name in names)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ae: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_user_errors_are_one_line_and_write_nothing(mnist_subset, tmp_path):
    def refused(*args):  # in Prefect's ephemeral mode: whether its temporary servers stop is checked
        return ae(*args, check=False, ephemeral=True)

    servers = prefect_servers_not_ours()
    out = tmp_path / "never-written"
    assert_one_line_error(refused("run", tmp_path / "no-such-dir", out), "no-such-dir", "missing")
    assert_one_line_error(refused("run", mnist_subset, out, "--image-size", 30), "image_size", "multiple of 4")
    assert_one_line_error(refused("run", mnist_subset, out, "--dim", 0), "dim")
    assert_one_line_error(refused("run", mnist_subset, out, "--lr", "inf"), "lr", "finite")
    assert_one_line_error(refused("run", mnist_subset, out, "--width", 300), "width", "256")
    # a learning rate that makes training diverge: NaN embeddings must never be published
    assert_one_line_error(refused("run", mnist_subset, out, "--lr", "1e6", "--epochs", 3), "diverged", "--lr")
    assert_one_line_error(refused("run", mnist_subset, mnist_subset / "out"), "inside source")
    assert_one_line_error(refused("run", mnist_subset, "nosuchproto://x/y"), "nosuchproto")
    assert_one_line_error(refused("run", "http://[::1]:1/x", out), "[::1]", "write the address in full")
    # an OUTPUT in ae's own memory: a warning that it goes with the process, before anything else
    proc = refused("run", tmp_path / "no-such-dir", "memory://o")
    assert proc.stderr.splitlines()[0].startswith("ae: warning: OUTPUT 'memory://o' is this process's memory")
    assert proc.returncode == 2 and "missing" in proc.stderr.splitlines()[1], proc.stderr
    assert not out.exists() and not (mnist_subset / "out").exists()
    assert_one_line_error(refused("info", out), "no published result", "ae run")
    assert_one_line_error(refused("neighbours", out, "--key", "x"), "no published result")
    for env, needles in (({"PREFECT_HOME": str(mnist_subset / "00000.png")}, ("PREFECT_HOME", "not a folder")),
                         ({"PREFECT_API_URL": "http://127.0.0.1:9/api"}, ("PREFECT_API_URL", "does not answer"))):
        proc = subprocess.run([*AE, "run", mnist_subset, out], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=300)
        assert_one_line_error(proc, *needles)
    for args in (("run", mnist_subset, out), ("info", out)):  # before: a traceback (httpx.ConnectError)
        proc = subprocess.run([*AE, *args, "--aws-credentials-block", "creds"], capture_output=True, text=True,
                              env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}, timeout=300)
        assert_one_line_error(proc, "AwsCredentials block 'creds'", "127.0.0.1:9/api does not answer")
    assert not out.exists()
    # Prefect's temporary server starts before the stores are checked; a refused run stops it
    assert prefect_servers_not_ours() - servers == set()


@pytest.fixture()
def http_folder(mnist_subset, tmp_path):
    """A plain HTTP server on loopback (no PUT) over a folder holding the digits; yields its base
    URL and the folder."""
    from http_server import serve_folder

    served = tmp_path / "served"
    shutil.copytree(mnist_subset, served / "digits")
    with serve_folder(served) as base:
        yield base, served


def test_an_http_source_is_read_and_an_http_store_that_fails_is_one_line(http_folder, mnist_subset, tmp_path):
    """Before: a dead host in an http(s) URL, or an HTTP server as OUTPUT (it refuses PUT),
    ended `ae run` with a 40-line aiohttp traceback. And a file changed on the server stayed
    "unchanged" forever (its listing page gives no size or date), its embedding stale."""
    http_folder, served = http_folder
    out = tmp_path / "out"
    from moto_server import free_port

    dead = f"http://127.0.0.1:{free_port()}/digits"  # nothing listens there
    assert_one_line_error(ae("run", dead, out, check=False), "source", "cannot reach the store", "host name")
    assert_one_line_error(ae("run", mnist_subset, f"{http_folder}/out", check=False), "output",
                          "could not write a test object", "501")
    assert_one_line_error(ae("run", f"{http_folder}/nothing-here", out, check=False), "missing")
    assert not out.exists()
    # a name the server's links percent-encode: its key is the name, as from a local folder
    # (before: "odd%20name%20%23%C3%A9.png"), and `--grid` finds it again on the server
    odd = "odd name #é.png"
    (served / "digits" / odd).write_bytes((COIL / sorted(os.listdir(COIL))[3]).read_bytes())
    ae("run", f"{http_folder}/digits/", out, "--epochs", 1, "--anomaly-steps", 0)
    table = pd.read_parquet(out / "runs" / (out / "LATEST").read_text().strip() / "embeddings.parquet")
    assert sorted(table.key) == sorted(os.listdir(served / "digits")) and odd in set(table.key)
    ranked = json.loads(ae("outliers", out, "--by", "recon_error", "-n", len(table), "--grid", tmp_path / "grid.png",
                           "--json").stdout)  # every image, read again from the server (before: 404 for the odd one)
    assert len(ranked["outliers"]) == len(table) and Image.open(tmp_path / "grid.png").size[0] > 0
    changed = sorted(os.listdir(mnist_subset))[7]
    (served / "digits" / changed).write_bytes((COIL / sorted(os.listdir(COIL))[0]).read_bytes())
    again = json.loads(ae("run", f"{http_folder}/digits/", out, "--epochs", 1, "--anomaly-steps", 0, "--json").stdout)
    assert again["changes"]["changed"] == 1 and again["changes"]["unchanged"] == len(table) - 1, again["changes"]
    now = pd.read_parquet(out / "runs" / again["run_id"] / "embeddings.parquet").set_index("key")
    before = table.set_index("key")
    assert not np.array_equal(now.loc[changed, "embedding"], before.loc[changed, "embedding"])

    # the published OUTPUT read back over HTTP from a server that lists no folder (before: `ae
    # info` listed the run's folder and failed there); a password in a query's URL is never shown
    from http_server import serve_folder

    with serve_folder(tmp_path, listings=False) as base:
        with pytest.raises(urllib.error.HTTPError, match="404"):  # the server really lists nothing
            urllib.request.urlopen(f"{base}/out/", timeout=10)
        shown = json.loads(ae("info", f"{base}/out", "--json").stdout)
        assert shown["run_id"] == again["run_id"] and shown["rows"] == len(table)
        assert shown["embeddings"] == f"{base}/out/runs/{again['run_id']}/embeddings.parquet"
        for key in (changed, odd):
            found = json.loads(ae("neighbours", f"{base}/out", "--key", key, "-k", 3, "--json").stdout)
            assert found["neighbours"][0]["key"] == key, found
        (out / "runs" / again["run_id"] / "rejects.parquet").unlink()
        assert_one_line_error(ae("info", f"{base}/out", check=False), "rejects.parquet", "is missing")
        secret = base.replace("http://", "http://reader:s3cr3t@")
        for args in (("info", f"{secret}/out"), ("info", f"{secret}/nothing"),
                     ("neighbours", f"{secret}/nothing", "--key", changed)):
            proc = ae(*args, check=False)
            assert_one_line_error(proc, base.removeprefix("http://"))
            assert "s3cr3t" not in proc.stderr + proc.stdout, proc.stderr


@pytest.fixture()
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs), where the machine lets the tests mount one."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_is_one_line_without_retries_and_leaves_no_temporaries(mnist_subset, small_disk, tmp_path):
    """Before: a 79-line traceback after two stage retries and a flow retry (~38 s on an error
    that cannot pass), and the half-written temporary files kept the disk full."""
    # the pixel cache: 10,000 digits (7.8 MB of pixels) into 1 MiB
    proc = ae("run", MNIST, tmp_path / "out", "--epochs", 1, "--work-dir", small_disk, check=False)
    assert_one_line_error(proc, "no space left on the disk holding", str(small_disk), "--work-dir")
    assert not (tmp_path / "out").exists()
    # OUTPUT: the model file does not fit
    proc = ae("run", mnist_subset, small_disk / "out", "--epochs", 1, "--anomaly-steps", 0, check=False)
    assert_one_line_error(proc, "no space left on the disk holding", "model.pt", "OUTPUT")
    assert not (small_disk / "out" / "LATEST").exists()
    left = [p.name for p in small_disk.rglob("*") if ".tmp" in p.name]
    assert left == [], left


def test_an_old_run_that_cannot_be_deleted_is_a_warning_and_the_rest_is_still_pruned(mnist_subset, tmp_path):
    """Before: the first run folder that could not be deleted (another user's) failed the publish
    stage after LATEST moved, the flow was retried, pruning stopped for good without a word
    (`--keep-runs 1`, four runs kept), and the pixel cache was never released."""
    from test_storage_ingest import _as_unprivileged

    out, work = tmp_path / "out", tmp_path / "work"
    args = ["run", mnist_subset, out, "--include", "000*", "--epochs", 1, "--anomaly-steps", 0, "--keep-runs", 1,
            "--work-dir", work]

    def run() -> subprocess.CompletedProcess:
        proc = subprocess.run([*_as_unprivileged(), *AE, *map(str, args)], capture_output=True, text=True,
                              env={**shared_prefect_env(), "PYTHONUNBUFFERED": "1"}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run()
    stuck = (out / "LATEST").read_text().strip()
    (out / "runs" / stuck).chmod(0o555)  # its files cannot be deleted
    try:
        second = run()
        published = (out / "LATEST").read_text().strip()
        assert published != stuck
        warnings = [line for line in second.stderr.splitlines() if line.startswith("ae: warning:")]
        assert len(warnings) == 1 and "could not delete old run" in warnings[0] and stuck in warnings[0], second.stderr
        third = run()
        assert sorted(p.name for p in (out / "runs").iterdir()) == sorted([stuck, (out / "LATEST").read_text().strip()])
        assert not (out / "runs" / published).exists()  # pruned, though the stuck one came first
        assert stuck in third.stderr and list(work.glob("ae-cache-*")) == []  # the cache released
    finally:
        (out / "runs" / stuck).chmod(0o755)


def test_a_prefect_server_that_cannot_start_is_one_line_naming_why(mnist_subset, tmp_path):
    out = tmp_path / "never-written"
    env = {**os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/no-such-dir/x.db"}
    env.pop("PREFECT_API_URL", None)
    started = time.monotonic()
    proc = subprocess.run([*AE, "run", mnist_subset, out], capture_output=True, text=True, env=env, timeout=300)
    assert_one_line_error(proc, "temporary server", "unable to open database file")
    assert time.monotonic() - started < 60  # no retries until Prefect's startup timeout
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_run_stops_its_prefect_server_before_the_fast_exit(digits_run):
    assert SERVERS_LEFT_BEHIND == []


def _prefect_server_children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline, stat = (proc / "cmdline").read_bytes(), (proc / "stat").read_text()
        except (OSError, ValueError):
            continue
        if b"prefect.server.api.server:create_app" in cmdline and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(proc.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig, group, status, line", [
    (signal.SIGTERM, False, 143, "ae: terminated"),  # kill, or a scheduler stopping the job
    (signal.SIGINT, True, 130, "ae: interrupted"),  # Ctrl-C in a terminal: the whole process group
    (signal.SIGHUP, True, 129, "ae: terminated"),  # the terminal closed
])
def test_a_signal_stops_the_run_and_its_prefect_server(mnist_subset, tmp_path, sig, group, status, line):
    """`kill`, Ctrl-C or a closed terminal ends `ae run` with one line and the signal's exit
    status, the temporary Prefect server stopped with it, nothing published. With Python's
    default SIGTERM handling the server was left running, adopted by init; a terminal's Ctrl-C
    also reached the server, and the run then spent ~70 s retrying it before a traceback."""
    out = tmp_path / "out"
    def as_in_a_terminal() -> None:  # a background job or nohup (CI, say) would pass these on ignored
        for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)

    work = tmp_path / "work"
    proc = subprocess.Popen([*AE, "run", str(mnist_subset), str(out), "--epochs", "500", "--work-dir", str(work)],
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=as_in_a_terminal,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        deadline, servers = time.monotonic() + 180, []
        while not servers and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            servers = _prefect_server_children(proc.pid)
        assert servers, f"no temporary Prefect server appeared (ae exit status {proc.poll()})"
        # into the flow run: its decode stage has written pixel shards, training has begun
        while not list(work.rglob("shard-*.npy")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert list(work.rglob("shard-*.npy")), f"the flow never decoded (ae exit status {proc.poll()})"
        time.sleep(1)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)  # an orphaned server would hold the pipes open
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == status, err[-3000:]
    assert err.strip().splitlines() == [line], err[-3000:]
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in servers), "the Prefect server outlived ae"
    assert not (out / "LATEST").exists()


def test_a_run_stopped_after_training_says_its_model_is_kept_and_the_same_command_reuses_it(mnist_subset, tmp_path):
    """A run killed after training (or one that lost its store while it encoded) says, in its
    one line, that its model is kept; the same command then publishes without training again."""
    from ae_core import pipeline

    out, work = tmp_path / "out", tmp_path / "work"
    args = ["run", str(mnist_subset), str(out), "--epochs", "2", "--anomaly-steps", "20", "--work-dir", str(work)]
    proc = subprocess.Popen([*AE, *args], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
                            env={**shared_prefect_env(), "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 300
        while not list(work.glob(f"ae-cache-*/{pipeline.KEPT_RECORD}")) and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # training is done; encoding has not finished
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    cache = next(work.glob("ae-cache-*"))
    assert err.strip().splitlines() == [
        f"ae: terminated; the run stopped after training: its model is kept in the work dir {str(cache)!r}, "
        "and a run with the same images and training settings reuses it instead of training again"], err[-3000:]
    assert not (out / outputs.LATEST).exists()
    killed = json.loads((cache / pipeline.KEPT_RECORD).read_text())["run_id"]

    again = ae(*args)
    assert f"trained by run {killed}, which stopped before publishing" in again.stdout
    m = outputs.resolve(str(out)).manifest
    assert m["run_id"] != killed and m["train"]["resumed_from_run"] == killed
    assert not cache.exists()  # published: the cache and the kept model are gone


_SIGNAL_IN_DEL = """
import os, signal, time
from ae_core import cli
signal.signal(signal.SIGTERM, cli._on_sigterm)
class Finalised:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here, inside __del__
try:
    Finalised()
    time.sleep(5)
    print("went on")
except KeyboardInterrupt:
    print("stopped")
"""


def test_a_stop_signal_that_lands_in_a_finaliser_still_stops_the_run():
    """Python prints and drops an exception raised while a __del__ runs: a SIGHUP that landed in
    the garbage collection of an asyncio transport let a run go on to publish."""
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_IN_DEL], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "stopped", proc.stdout + proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_the_prefect_server_goes_when_ae_is_killed_outright(mnist_subset, tmp_path):
    """SIGKILL (or the OOM killer) runs no exit handler: the server stops on its own."""
    proc = subprocess.Popen([*AE, "run", str(mnist_subset), str(tmp_path / "out"), "--epochs", "500"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    servers = []
    try:
        deadline = time.monotonic() + 180
        while not servers and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            servers = _prefect_server_children(proc.pid)
        assert servers, f"no temporary Prefect server appeared (ae exit status {proc.poll()})"
        time.sleep(3)
        proc.kill()
        proc.wait(30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in servers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in servers if Path(f"/proc/{pid}").exists()]
        assert not left, "the Prefect server outlived a killed ae"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in servers:  # still a Prefect server (not a reused pid): do not leave it behind
            try:
                if b"create_app" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def test_a_port_taken_before_the_temporary_server_binds_it_is_retried_on_another(monkeypatch):
    """ae picks a free port and the server binds it a moment later: another process may take it
    in between. The server then exits with uvicorn's status 3, and ae starts it again elsewhere."""
    from ae_core import cli

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = [taken.getsockname()[1]]

    class FirstPortTaken(socket.socket):
        def getsockname(self):  # noqa: ANN202
            return ("127.0.0.1", ports.pop()) if ports else super().getsockname()

    monkeypatch.setattr(cli.socket, "socket", FirstPortTaken)
    server = cli._TemporaryServer()
    try:
        server._start()
        first = server.port
        server.wait_ready()
        assert first == taken.getsockname()[1] and server.port != first
        assert "already in use" not in server._output()  # the log of the attempt that served
        assert urllib.request.urlopen(f"{server.api_url}/health", timeout=10).status == 200
    finally:
        server.stop()
        taken.close()


def test_exit_status_and_output_survive_the_fast_exit(digits_run):
    """`ae` leaves through os._exit after the exit handlers: the status and every line of output
    must still come through, whether stdout is a pipe or a file."""
    assert ae("--help").stdout.startswith("usage: ae")
    usage = ae("run", check=False)  # an argparse error: one line, as ae's other user errors
    assert_one_line_error(usage, "the following arguments are required: source, output", "`ae run --help`")
    out, _ = digits_run
    piped = json.loads(ae("info", out, "--json").stdout)
    with open(out.parent / "info.json", "w") as f:  # a file: block-buffered, flushed only at exit
        subprocess.run([*AE, "info", str(out), "--json"], stdout=f, check=True, timeout=300)
    assert json.loads((out.parent / "info.json").read_text()) == piped and piped["rows"] == 300
    # a reader that leaves early (`| head -1`): no BrokenPipeError traceback
    head = subprocess.run(["bash", "-c", f"{' '.join(AE)} neighbours {out} --key 00000.png -k 200 | head -1"],
                          capture_output=True, text=True, timeout=300)
    assert head.stdout.count("\n") == 1 and head.stderr == ""


def test_a_published_file_gone_missing_is_one_line(digits_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(digits_run[0], out)
    run = out / "runs" / (out / "LATEST").read_text().strip()
    (run / "index.faiss").unlink()
    assert_one_line_error(ae("neighbours", out, "--key", "00000.png", check=False), "index.faiss' is missing")
    # before: info exited 0, with the URL of a file that was gone
    assert_one_line_error(ae("info", out, "--json", check=False), "index.faiss' is missing")
    (run / "embeddings.parquet").unlink()
    assert_one_line_error(ae("outliers", out, check=False), "embeddings.parquet' is missing")


def test_an_output_inside_another_outputs_run_folder_is_refused(digits_run, mnist_subset):
    # before: accepted, and published inside a folder the other output's retention deletes
    out, _ = digits_run
    run = out / "runs" / query.info(str(out))["run_id"]
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for nested in (run, run / "nested"):
        proc = ae("run", mnist_subset, nested, "--epochs", 1, check=False)
        assert_one_line_error(proc, f"lies inside {str(run)!r}, a run folder of output {str(out)!r}",
                              f"give a folder outside {out}/runs")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written
    # a folder of the user's own beside the runs is not a run folder: nothing to refuse there
    assert outputs.run_folder_holding(str(out / "runs" / "mine" / "x"), os.path.isdir) is None
    assert outputs.run_folder_holding(str(out / "runs" / "20990101T000000Z-abc"), os.path.isdir) is None  # no such run
    assert outputs.run_folder_holding("bucket/o/runs/20990101T000000Z-abc/x", lambda p: True) == \
        ("bucket/o", "bucket/o/runs/20990101T000000Z-abc")


def test_a_reused_model_with_nothing_to_embed_writes_no_run_folder(digits_run, mnist_subset, tmp_path):
    # before: the refusal came after the reused model had been copied into a new run folder
    import shutil

    out = tmp_path / "out"
    shutil.copytree(digits_run[0], out)
    runs = sorted(os.listdir(out / "runs"))
    proc = ae("run", mnist_subset, out, "--dim", 16, "--retrain", "never", "--max-image-pixels", 10, check=False)
    assert_one_line_error(proc, "none of its 300 objects could be decoded", "300 decompression_bomb")
    assert sorted(os.listdir(out / "runs")) == runs


def test_a_run_whose_prefect_api_went_away_says_whether_it_published(digits_run, mnist_subset, capsys):
    # before: the flow published, then failed to report its end to a dead server: a traceback, exit 1
    import httpx

    from ae_core import cli
    from ae_core.errors import AeError

    out, lost = str(digits_run[0]), httpx.ConnectError("[Errno 111] Connection refused")
    run_id = (digits_run[0] / "LATEST").read_text().strip()
    source, long_ago = str(mnist_subset), "2000-01-01T00:00:00+00:00"
    manifest = cli.published_despite(source, out, None, None, long_ago, lost)
    assert manifest["run_id"] == run_id and manifest["published_url"].endswith(run_id)
    assert f"after run {run_id} was published; the run is complete" in capsys.readouterr().err
    with pytest.raises(AeError, match=f"nothing was published .* holds run {run_id}, not one of this command's"):
        cli.published_despite(source, out, None, run_id, long_ago, lost)  # LATEST did not move
    with pytest.raises(AeError, match="nothing was published"):  # LATEST names a run older than the command
        cli.published_despite(source, out, None, None, "2999-01-01T00:00:00+00:00", lost)
    with pytest.raises(AeError, match="nothing was published"):  # another source's run, into the same OUTPUT
        cli.published_despite(str(mnist_subset.parent), out, None, None, long_ago, lost)


def test_unknown_key_is_a_clear_error(digits_run):
    out, _ = digits_run
    assert_one_line_error(ae("neighbours", out, "--key", "nope.png", check=False), "nope.png", "not in the table")


def test_query_command_mistakes_are_one_line_errors(digits_run, mnist_subset, tmp_path):
    out, _ = digits_run
    (tmp_path / "a-file").write_text("not a folder")
    os.mkfifo(tmp_path / "fifo")  # reading it blocked forever
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes((Path(mnist_subset) / "00000.png").read_bytes())
    (tmp_path / "link").symlink_to(tmp_path / "src")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "no-such-folder" / "g.png")
    for args, needles in [
        (("neighbours", out, "--image", mnist_subset), ("is a folder",)),
        (("neighbours", out, "--image", "http://127.0.0.1:9/x.png"), ("cannot be read", "ClientConnectorError")),
        (("neighbours", out, "--image", tmp_path / "fifo"), ("not a regular file",)),
        (("probe", out, "--labels", tmp_path / "fifo"), ("not a regular file",)),
        (("probe", out, "--labels", "http://127.0.0.1:9/l.csv"), ("cannot be read", "ClientConnectorError")),
        (("outliers", out, "-n", -1), ("-n -1",)),
        (("outliers", out, "--grid", tmp_path / "no-such-folder" / "g.png"), ("no-such-folder", "does not exist")),
        (("outliers", out, "-n", 0, "--grid", tmp_path / "g.png"), ("no images to draw",)),
        (("evaluate", mnist_subset, "--labels", tmp_path / "x.csv", "--dims", "0"), ("--dims",)),
        (("evaluate", mnist_subset, "--labels", tmp_path / "x.csv", "--markdown", tmp_path / "nope" / "e.md"),
         ("does not exist",)),
        (("run", mnist_subset, tmp_path / "o", "--device", "tpu"), ("device",)),
        (("run", mnist_subset, tmp_path / "a-file" / "o"), ("is a file", "cannot be created")),
        (("run", mnist_subset, tmp_path / "o", "--work-dir", tmp_path / "a-file" / "w"), ("work dir", "is a file")),
        (("run", mnist_subset, "/proc/ae-out"), ("cannot write in",)),
        # before: these three crashed after decoding, or wrote Infinity into the manifest's JSON
        (("run", mnist_subset, tmp_path / "o", "--seed", -1), ("seed", "greater than or equal to 0")),
        (("run", mnist_subset, tmp_path / "o", "--seed", 10**23), ("seed", "less than")),
        (("run", mnist_subset, tmp_path / "o", "--max-minutes", "inf"), ("max_minutes", "finite")),
        # before: ran on (an embedding size ae run refuses), tracebacks at the end, or silently nothing
        (("evaluate", mnist_subset, "--labels", tmp_path / "x.csv", "--dims", "8,99999"), ("from 1 to 4096",)),
        (("evaluate", mnist_subset, "--labels", tmp_path / "x.csv", "--markdown", "/proc/e.md"), ("cannot write there",)),
        (("outliers", out, "--grid", "/proc/g.png"), ("cannot write there",)),
        (("outliers", out, "--grid", ""), ("--grid is empty",)),
        (("outliers", out, "--grid", tmp_path / "fifo"), ("is a pipe or a socket",)),  # before: waited forever
        (("outliers", out, "--grid", tmp_path / "dangling.png"), ("which does not exist",)),
        (("outliers", out, "--grid", "S3://AKID:SECRETX@b/g.png"), ("'s3://b/g.png': give a local file path",)),
        (("demo", ""), ("demo folder is empty",)),
        # before: a symlink or a /. part hid that the output lay inside the source
        (("run", tmp_path / "link", tmp_path / "src" / "o"), ("inside source",)),
        (("run", f"{tmp_path}/src/.", tmp_path / "src" / "o"), ("inside source",)),
        # before: a traceback; and 1,797 digits written before --epochs was refused (0 meant the default)
        (("demo", tmp_path / "a-file"), ("is a file",)),
        (("demo", tmp_path / "o", "--epochs", -5), ("epochs", "greater than 0")),
        (("demo", tmp_path / "o", "--epochs", 0), ("epochs", "greater than 0")),
    ]:
        assert_one_line_error(ae(*args, check=False), *needles)
    assert not (tmp_path / "o").exists() and not (tmp_path / "src" / "o").exists()
    # before: a traceback whose message held the secret (s3fs took "key:secret@bucket" for a bucket)
    for args in (("info", "s3://AKID:SECRETX@bkt/o"), ("neighbours", out, "--image", "s3://AKID:SECRETX@bkt/x.png"),
                 ("run", "s3://AKID:SECRETX@bkt/src", tmp_path / "o")):
        proc = ae(*args, check=False)
        assert_one_line_error(proc, "credentials in the URL are not used", "s3://bkt/")
        assert "SECRETX" not in proc.stdout + proc.stderr
    every = json.loads(ae("outliers", out, "-n", 10**22, "--json").stdout)["outliers"]  # before: OverflowError
    assert len(every) == pq.read_metadata(Path(out) / "runs" / (Path(out) / "LATEST").read_text().strip()
                                          / "embeddings.parquet").num_rows
    names = sorted(os.listdir(mnist_subset))
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "latin1.csv").write_bytes("filename,label\n".encode() + f"{names[0]},caf\xe9\n".encode("latin-1"))
    (labels / "one.csv").write_text("filename,label\n" + "".join(f"{n},same\n" for n in names[:20]))
    (labels / "six.csv").write_text("filename,label\n" + "".join(f"{n},{i % 2}\n" for i, n in enumerate(names[:6])))
    (labels / "notes.csv").write_text("# not a CSV, a, b\nsome words, more, words, than, the header\n")
    for name, needles in [("latin1.csv", ("not UTF-8",)), ("one.csv", ("same label",)),
                          ("six.csv", ("needs at least 5 labelled rows",)), ("notes.csv", ("needs columns",))]:
        assert_one_line_error(ae("probe", out, "--labels", labels / name, check=False), *needles)
    assert_one_line_error(ae("probe", out, "--labels", labels, check=False), "is a folder")
    # Excel's "CSV UTF-8" starts with a byte-order mark; the columns must still be found
    rows = (MNIST.parent / "mnist-test-labels.csv").read_text()
    (labels / "bom.csv").write_text("\ufeff" + rows, encoding="utf-8")
    with_bom = json.loads(ae("probe", out, "--labels", labels / "bom.csv", "--json").stdout)
    plain = json.loads(ae("probe", out, "--labels", MNIST.parent / "mnist-test-labels.csv", "--json").stdout)
    assert with_bom == {**plain, "output": with_bom["output"]} and with_bom["rows_labelled"] == 300


def test_retrain_never_with_a_setting_the_model_cannot_serve_stops_before_writing(digits_run, mnist_subset):
    out, _ = digits_run
    before = json.loads(ae("info", out, "--json").stdout)
    runs = sorted(os.listdir(out / "runs"))
    assert_one_line_error(ae("run", mnist_subset, out, "--retrain", "never", "--dim", 8, check=False),
                          "retrain=never", "dim changed (16 -> 8)")
    assert json.loads(ae("info", out, "--json").stdout) == before and sorted(os.listdir(out / "runs")) == runs


def test_outlier_grid_reads_a_relative_source_from_anywhere_and_refuses_changed_files(mnist_subset, tmp_path):
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    names = sorted(os.listdir(mnist_subset))[:40]
    for name in names:
        (work / "src" / name).write_bytes((mnist_subset / name).read_bytes())
    subprocess.run([*AE, "run", "src", "out", "--epochs", "1", "--dim", "4"], cwd=work, check=True,
                   capture_output=True, timeout=600)  # relative paths, run inside `work`
    grid = tmp_path / "grid.png"
    worst = json.loads(ae("outliers", work / "out", "-n", 3, "--grid", grid, "--json").stdout)["outliers"]
    picture = grid.read_bytes()
    assert picture.startswith(b"\x89PNG")
    (work / "src" / worst[0]["key"]).write_bytes((mnist_subset / names[-1]).read_bytes())  # changed since
    assert_one_line_error(ae("outliers", work / "out", "-n", 3, "--grid", grid, check=False),
                          worst[0]["key"], "has changed since run")
    assert grid.read_bytes() == picture  # a failed call leaves the earlier picture alone
    (work / "src" / worst[0]["key"]).unlink()
    assert_one_line_error(ae("outliers", work / "out", "-n", 3, "--grid", grid, check=False),
                          worst[0]["key"], "cannot be read")


_FAIL_ONE_READ = r"""
import sys
import ae_core.ingest as ingest
real = ingest.read_many
def read_many(fs, paths, *args, **kwargs):
    got = real(fs, paths, *args, **kwargs)
    for path in got:
        if path.endswith("/00003.png"):
            got[path] = PermissionError(13, "Permission denied (injected)", path)
    return got
ingest.read_many = read_many
from ae_core.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _first_digits(mnist_subset: Path, folder: Path, n: int) -> Path:
    """A source folder of the first n digits."""
    folder.mkdir()
    for name in sorted(os.listdir(mnist_subset))[:n]:
        (folder / name).write_bytes((mnist_subset / name).read_bytes())
    return folder


def test_a_file_that_failed_to_read_is_read_again_next_run(mnist_subset, tmp_path, capsys):
    """A read error (throttling, a network error, a permission since fixed) is not a verdict on
    the file: the next run reads it again even though the listing says it is unchanged."""
    src = _first_digits(mnist_subset, tmp_path / "src", 30)
    out = tmp_path / "out"
    first = subprocess.run([sys.executable, "-c", _FAIL_ONE_READ, "run", str(src), str(out), "--epochs", "1",
                            "--dim", "4", "--json"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout)["rejects_by_reason"] == {"read_error": 1}
    again = json.loads(ae("run", src, out, "--dim", 4, "--json").stdout)
    c = again["changes"]
    assert (c["new"], c["changed"], c["unchanged"], c["retried"], c["encoded"]) == (0, 0, 29, 1, 1)
    assert c["retrained"] is False and (again["rows"], again["rejected"]) == (30, 0)
    from ae_core.cli import _print_summary

    _print_summary(again)  # the summary names the count as the README and the manifest do
    assert "0 new, 0 changed, 29 unchanged, 0 deleted, 1 retried; 1 encoded this run" in capsys.readouterr().out
    df = pd.read_parquet(query.info(str(out))["embeddings"])
    assert "00003.png" in set(df.key) and len(df) == 30


def test_rerun_without_changes_encodes_nothing_and_keeps_every_row(mnist_subset, tmp_path, capsys):
    src = _first_digits(mnist_subset, tmp_path / "src", 30)
    (src / "broken.png").write_bytes(b"")
    out = tmp_path / "out"
    first = json.loads(ae("run", src, out, "--epochs", 1, "--dim", 4, "--json").stdout)
    again = json.loads(ae("run", src, out, "--dim", 4, "--json").stdout)
    c = again["changes"]
    assert (c["new"], c["changed"], c["deleted"], c["unchanged"], c["encoded"]) == (0, 0, 0, 31, 0)
    assert c["retrained"] is False and again["model_version"] == first["model_version"]
    assert (again["rows"], again["rejected"]) == (30, 1)
    a = pd.read_parquet(query.info(str(out))["embeddings"])
    assert len(a) == 30 and a.key.is_unique
    assert pd.read_parquet(query.info(str(out))["rejects"]).key.tolist() == ["broken.png"]
    # reused twice: the quality and the pictures still point at the run that trained the model
    third = json.loads(ae("run", src, out, "--dim", 4, "--json").stdout)
    assert third["quality"]["measured_in_run"] == again["quality"]["measured_in_run"] == first["run_id"]
    report = (Path(query.info(str(out))["manifest"]).parent / "report.md").read_text()
    assert (f"This run reused the model, so it draws no nearest neighbours (only the images it decoded are in "
            f"memory), and no reconstructions: it decoded no image; run {first['run_id']} drew them") in report
    assert sorted(p.name for p in Path(query.info(str(out))["manifest"]).parent.glob("*.png")) == ["loss.png"]
    first_report = (out / "runs" / first["run_id"] / "report.md").read_text()
    assert "reused the model" not in first_report and (out / "runs" / first["run_id"] / "neighbours.png").exists()
    # 30 images: too few to hold any out, so every image of the quality sample trained the model
    # (before: "mostly trained on"); a reused model's held-out figure names the run that measured it
    assert first["quality"]["trained_on"] == "all" and "heldout" not in first["quality"]
    assert "same 30 images, all images it trained on" in first_report
    from ae_core.cli import _print_summary
    _print_summary(first)
    assert "on 30 images (all trained on)" in capsys.readouterr().out
    held = {"images": 20, "ae_mse": 0.01, "pca_mse": 0.02, "ae_over_pca": 0.5}
    _print_summary({**third, "quality": {**third["quality"], "trained_on": "mostly", "heldout": held}})
    printed = capsys.readouterr().out
    assert (f"on 30 images (mostly trained on) (measured in run {first['run_id']}, which trained the model)" in printed
            and f"held out of training (measured in run {first['run_id']}, which trained the model)" in printed)
    from ae_core.report import summary_markdown
    held_report = summary_markdown({**third, "quality": {**third["quality"], "heldout": held}}, {})
    assert f"on 20 images held out of training (measured in run {first['run_id']})." in held_report


def test_files_swapped_with_their_size_and_mtime_kept_are_encoded_again(mnist_subset, tmp_path):
    src = _first_digits(mnist_subset, tmp_path / "src", 60)
    by_size: dict[int, list[str]] = {}
    for p in sorted(src.iterdir()):
        by_size.setdefault(p.stat().st_size, []).append(p.name)
    a, b = next(names for names in by_size.values() if len(names) >= 2)[:2]
    for p in src.iterdir():  # one timestamp for all, as an archive unpacks them
        os.utime(p, (1_700_000_000, 1_700_000_000))
    out = tmp_path / "out"
    ae("run", src, out, "--epochs", 1, "--dim", 4, "--anomaly-steps", 0)
    before = pd.read_parquet(query.info(str(out))["embeddings"]).set_index("key")
    os.rename(src / a, src / "swap.tmp")
    os.rename(src / b, src / a)
    os.rename(src / "swap.tmp", src / b)
    res = json.loads(ae("run", src, out, "--dim", 4, "--anomaly-steps", 0, "--json").stdout)
    c = res["changes"]
    assert (c["changed"], c["rechecked"], c["unchanged"], c["encoded"], c["retrained"]) == (0, 2, 58, 2, False)
    after = pd.read_parquet(query.info(str(out))["embeddings"]).set_index("key")
    # each key now has the embedding and fingerprint of the content it holds
    for key, was in ((a, b), (b, a)):
        assert np.allclose(after.embedding[key], before.embedding[was], atol=1e-6)
        assert after.fingerprint[key] == before.fingerprint[was]
    again = json.loads(ae("run", src, out, "--dim", 4, "--anomaly-steps", 0, "--json").stdout)["changes"]
    assert (again["rechecked"], again["encoded"]) == (0, 0)


def test_a_source_with_nothing_decodable_is_refused_with_its_reasons_reused_model_or_not(mnist_subset, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"d{i}.png").write_bytes(b"not a picture")
    (src / "e.png").write_bytes(b"")
    out = tmp_path / "out"
    reasons = "none of its 4 objects could be decoded as an image (3 not_an_image, 1 empty; first: 'd0.png': "
    assert_one_line_error(ae("run", src, out, "--epochs", 1, "--dim", 4, check=False), reasons, "nothing was published")
    assert not out.exists()
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,label\nd0.png,1\nd1.png,2\n")
    assert_one_line_error(ae("evaluate", src, "--labels", labels, "--dims", 4, "--epochs", 1, check=False),
                          reasons, "nothing to evaluate")
    good = _first_digits(mnist_subset, tmp_path / "good", 20)
    first = json.loads(ae("run", good, out, "--epochs", 1, "--dim", 4, "--json").stdout)
    for p in good.iterdir():  # the same keys, now junk: a reused model would publish an empty table
        p.write_bytes(b"not a picture")
    assert_one_line_error(ae("run", good, out, "--dim", 4, "--retrain", "never", check=False),
                          "none of its 20 objects could be decoded", "nothing was published")
    assert query.info(str(out))["run_id"] == first["run_id"] and len(pd.read_parquet(query.info(str(out))["embeddings"])) == 20


def test_anomaly_scores_asked_for_after_a_run_without_them_retrain(mnist_subset, tmp_path):
    src = _first_digits(mnist_subset, tmp_path / "src", 40)
    out = tmp_path / "out"
    ae("run", src, out, "--epochs", 1, "--dim", 4, "--anomaly-steps", 0)
    assert pd.read_parquet(query.info(str(out))["embeddings"]).anomaly_score.isna().all()
    for n in (3, 0):  # ranked by recon_error instead, and saying so, however many are asked for
        text = ae("outliers", out, "-n", n).stdout
        assert f"{n} most anomalous images, ranked by recon_error" in text and "has no anomaly scores" in text
        assert json.loads(ae("outliers", out, "-n", n, "--json").stdout)["ranked_by"] == "recon_error"
    kept = json.loads(ae("run", src, out, "--dim", 4, "--anomaly-steps", 20, "--retrain", "never", "--json").stdout)
    assert kept["changes"]["retrained"] is False  # never: the model is reused, the scores stay null
    again = json.loads(ae("run", src, out, "--epochs", 1, "--dim", 4, "--anomaly-steps", 20, "--json").stdout)
    assert again["changes"]["retrained"] is True and "anomaly" in again["changes"]["retrain_reason"]
    assert pd.read_parquet(query.info(str(out))["embeddings"]).anomaly_score.notna().all()
    text = ae("outliers", out, "-n", 0).stdout
    assert "ranked by anomaly_score" in text and "no anomaly scores" not in text


def test_a_changed_pixel_limit_reads_again_the_images_it_concerns(mnist_subset, tmp_path):
    src = _first_digits(mnist_subset, tmp_path / "src", 30)
    (src / "large.png").write_bytes((COIL / "obj1__0.png").read_bytes())  # 128 x 128 = 16,384 pixels
    out = tmp_path / "out"
    first = json.loads(ae("run", src, out, "--epochs", 1, "--dim", 4, "--max-image-pixels", 10_000, "--json").stdout)
    assert first["rejects_by_reason"] == {"decompression_bomb": 1} and first["rows"] == 30
    detail = pd.read_parquet(query.info(str(out))["rejects"]).detail[0]
    assert "128x128 pixels exceeds the limit of 10000" in detail and "--max-image-pixels" in detail
    # a limit still too low: read again once, rejected again, and then not on every later run
    for retried in (1, 0):
        still = json.loads(ae("run", src, out, "--dim", 4, "--max-image-pixels", 12_000, "--json").stdout)
        assert (still["changes"]["retried"], still["rejected"], still["changes"]["retrained"]) == (retried, 1, False)
    again = json.loads(ae("run", src, out, "--dim", 4, "--json").stdout)
    c = again["changes"]
    assert (c["unchanged"], c["retried"], c["encoded"], c["retrained"]) == (30, 1, 1, False)
    assert (again["rows"], again["rejected"]) == (31, 0)
    # queries take the images the published table took: the limit of the run, not of the model's
    assert query.neighbours_of_image(str(out), str(src / "large.png"), 1)[0].key == "large.png"
    grid = json.loads(ae("outliers", out, "-n", 31, "--grid", tmp_path / "all.png", "--json").stdout)
    assert "large.png" in {o["key"] for o in grid["outliers"]} and (tmp_path / "all.png").exists()
    # a lower limit again: the published row over it is read again and rejected, as a fresh run
    # would (it was carried over, whatever the limit)
    lower = json.loads(ae("run", src, out, "--dim", 4, "--max-image-pixels", 10_000, "--json").stdout)
    assert (lower["changes"]["retried"], lower["rows"], lower["rejects_by_reason"]) == (1, 30, {"decompression_bomb": 1})
    # and the other way: a model trained under the default limit, reused under a lower one, refuses
    # as a query the image the run rejected
    ae("run", src, out, "--epochs", 1, "--dim", 4, "--retrain", "always")
    reused = json.loads(ae("run", src, out, "--dim", 4, "--max-image-pixels", 10_000, "--json").stdout)
    assert reused["changes"]["retrained"] is False and reused["rejects_by_reason"] == {"decompression_bomb": 1}
    assert_one_line_error(ae("neighbours", out, "--image", src / "large.png", check=False),
                          "decompression_bomb", "exceeds the limit of 10000")


def test_a_run_while_another_holds_the_pixel_cache_decodes_into_its_own(mnist_subset, tmp_path):
    import fcntl

    from ae_core import pipeline
    from ae_core.config import RunConfig

    src, out, work = _first_digits(mnist_subset, tmp_path / "src", 20), tmp_path / "out", tmp_path / "work"
    shared = pipeline.prepare_run(RunConfig(source=str(src), output=str(out), work_dir=str(work))).work_dir
    os.makedirs(shared)
    (Path(shared) / "shard-00000.npy").write_bytes(b"another run's shard")
    held = os.open(os.path.join(shared, ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run of the same pair holds it
    try:
        res = json.loads(ae("run", src, out, "--epochs", 1, "--dim", 4, "--anomaly-steps", 0,
                            "--work-dir", work, "--json").stdout)
        assert res["rows"] == 20
        # the other run's cache is untouched, and this run's own cache is gone with it
        assert (Path(shared) / "shard-00000.npy").read_bytes() == b"another run's shard"
        assert sorted(p.name for p in work.iterdir()) == [os.path.basename(shared)]
    finally:
        os.close(held)
    # caches left beside it by runs that died: removed once 10 minutes old (a run may be making one)
    stale, recent = Path(shared + "-20200101T000000Z-aaaaaa"), Path(shared + "-20200101T000001Z-bbbbbb")
    for folder in (stale, recent):
        folder.mkdir()
        (folder / "shard-00000.npy").write_bytes(b"x")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    # other pairs' caches, left by runs that failed: deleted once unused for a week; and folders
    # that are not caches, however old
    days = {"ae-cache-0123456789abcdef": 8, "ae-cache-fedcba9876543210": 6, "ae-cache-notes": 30, "photos": 30}
    for folder, age in days.items():
        (work / folder).mkdir()
        (work / folder / "kept-model.pt").write_bytes(b"x")
        os.utime(work / folder, (time.time() - age * 86400, time.time() - age * 86400))
    ae("run", src, out, "--epochs", 1, "--dim", 4, "--anomaly-steps", 0, "--work-dir", work, "--retrain", "always")
    # free again: the run used the pair's cache and deleted it, and the stale ones
    assert sorted(p.name for p in work.iterdir()) == sorted([recent.name, "ae-cache-fedcba9876543210",
                                                              "ae-cache-notes", "photos"])


def test_a_finished_run_deletes_its_cache_not_the_work_dir_it_was_given(mnist_subset, tmp_path):
    src = _first_digits(mnist_subset, tmp_path / "src", 20)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("important")
    ae("run", src, tmp_path / "out", "--epochs", 1, "--dim", 4, "--anomaly-steps", 0, "--work-dir", mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # the cache went, the rest stayed
    refused = ae("run", src, tmp_path / "out", "--dim", 8, "--retrain", "never", "--work-dir", mine, check=False)
    assert_one_line_error(refused, "retrain=never")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # refused while planning: no cache made
    inside = ae("run", src, tmp_path / "out2", "--work-dir", src / ".cache", check=False)
    assert_one_line_error(inside, "lies inside source")
    assert not (src / ".cache").exists() and not (tmp_path / "out2").exists()
