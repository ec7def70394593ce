"""S3 end to end against moto's server on loopback: s3 -> s3 runs, incremental runs, a run killed
with SIGKILL during encoding, and store errors that stop the run before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import s3fs

from conftest import MNIST, SECRET, upload_folder
from prefect_server import shared_prefect_env
from moto_server import free_port, start_moto
from test_cli_e2e import assert_one_line_error, ae

pytestmark = pytest.mark.slow

STORAGE_OPTIONS = {"client_kwargs": {"endpoint_url": os.environ.get("AWS_ENDPOINT_URL")}}


def _names(lo: int, hi: int) -> list[str]:
    return [f"{i:05d}.png" for i in range(lo, hi)]


def _fs() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture
def corpus_400(s3_bucket):
    upload_folder(MNIST, f"s3://{s3_bucket}/faces", _names(0, 400))
    return s3_bucket


def test_s3_to_s3_then_incremental(corpus_400):
    bucket = corpus_400
    src, out = f"s3://{bucket}/faces", f"s3://{bucket}/out"
    ae("run", src, out, "--dim", 32, "--epochs", 2)
    info = json.loads(ae("info", out, "--json").stdout)
    assert (info["rows"], info["dim"]) == (400, 32)
    assert info["embeddings"].startswith("s3://")
    df = pd.read_parquet(info["embeddings"], storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    assert len(df) == 400 and df.key.is_unique
    first_run, first_model = info["run_id"], info["model_version"]

    fs = _fs()
    # folders made in the S3 console are zero-byte keys ending in "/": not images, not rejects
    fs.pipe({f"{bucket}/faces/": b"", f"{bucket}/faces/empty-folder/": b""})
    upload_folder(MNIST, src, _names(400, 410))
    fs.rm([f"{bucket}/faces/{n}" for n in _names(0, 5)])
    proc = ae("run", src, out, "--json")
    manifest = json.loads(proc.stdout)
    changes = manifest["changes"]
    assert (changes["new"], changes["changed"], changes["deleted"], changes["unchanged"]) == (10, 0, 5, 395)
    assert changes["encoded"] == 10 and changes["retrained"] is False
    assert manifest["model_version"] == first_model and manifest["rows"] == 405
    assert manifest["rejected"] == 0 and changes.get("retried", 0) == 0
    info = json.loads(ae("info", out, "--json").stdout)
    assert info["run_id"] != first_run
    df = pd.read_parquet(info["embeddings"], storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    assert len(df) == 405 and df.key.is_unique
    assert set(df.key) == set(_names(5, 410))
    # new rows are scored by the published model's fold models, carried rows keep their scores
    assert df.anomaly_score.notna().all() and (df.anomaly_score > 0).all()
    # every key, carried over or new, is its own nearest neighbour in the rebuilt index
    for key in ("00005.png", "00399.png", "00400.png", "00409.png"):
        hit = json.loads(ae("neighbours", out, "--key", key, "-k", 1, "--json").stdout)["neighbours"][0]
        assert hit["key"] == key
    # a published file gone: named as its URL (before: bucket/key, without s3://)
    fs.rm_file(info["index"])
    proc = ae("neighbours", out, "--key", "00005.png", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"ae: error: {info['index']!r} is missing"), proc.stderr


_KILL_DURING_ENCODING = r"""
import os, signal, sys
import ae_core.pipeline as p
real = p.encode_pixels
def encode_then_die(model, pixels, batch_size=512, on_batch=lambda n: None):
    def die(n):
        on_batch(n)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(model, pixels, 8, die)
p.encode_pixels = encode_then_die
from ae_core.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_encoding_keeps_previous_result(s3_bucket, tmp_path):
    src, out = f"s3://{s3_bucket}/src", f"s3://{s3_bucket}/out"
    upload_folder(MNIST, src, _names(0, 60))
    ae("run", src, out, "--epochs", 1, "--dim", 8)
    before = json.loads(ae("info", out, "--json").stdout)

    upload_folder(MNIST, src, _names(60, 80))
    # Output to a file, not a pipe: the orphaned Prefect server would hold a pipe open.
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen([sys.executable, "-c", _KILL_DURING_ENCODING, "run", src, out],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        killed.wait(timeout=600)
    try:
        os.killpg(killed.pid, signal.SIGKILL)  # its ephemeral Prefect server, orphaned by the kill
    except ProcessLookupError:
        pass
    assert killed.returncode == -signal.SIGKILL
    runs = _fs().ls(f"{s3_bucket}/out/runs")
    assert len(runs) == 2  # the killed run's folder exists but was never published

    after = json.loads(ae("info", out, "--json").stdout)
    assert after == before
    hit = json.loads(ae("neighbours", out, "--key", "00003.png", "-k", 1, "--json").stdout)
    assert hit["neighbours"][0]["key"] == "00003.png"

    ae("run", src, out)
    final = json.loads(ae("info", out, "--json").stdout)
    assert final["rows"] == 80 and final["run_id"] != before["run_id"]
    # the killed run's leftover folder is pruned once a newer run is published
    assert len(_fs().ls(f"{s3_bucket}/out/runs")) == 2


def _assert_nothing_written(bucket: str | None) -> None:
    if bucket:
        assert _fs().ls(bucket) == [f"{bucket}/src"]


def test_store_errors_stop_before_writing(s3_bucket, tmp_path):
    upload_folder(MNIST, f"s3://{s3_bucket}/src", _names(0, 3))
    src = f"s3://{s3_bucket}/src"

    proc = ae("run", src, "s3://no-such-bucket-here/out", check=False)
    assert_one_line_error(proc, "no-such-bucket-here", "does not exist")
    proc = ae("run", "s3://no-such-bucket-here/src", tmp_path / "out", check=False)
    assert_one_line_error(proc, "no-such-bucket-here", "does not exist")
    proc = ae("run", src, f"s3://{s3_bucket}/src/results", check=False)
    assert_one_line_error(proc, "inside source")
    _assert_nothing_written(s3_bucket)
    assert not (tmp_path / "out").exists()

    dead = f"http://127.0.0.1:{free_port()}"
    proc = _with_env(["run", src, tmp_path / "out"], AWS_ENDPOINT_URL=dead)
    assert_one_line_error(proc, src, "cannot reach", dead)
    assert not (tmp_path / "out").exists()
    # the read commands say the same in one line (they ended in a botocore traceback)
    reads = [_with_env([*args], AWS_ENDPOINT_URL=dead) for args in
             (["info", f"s3://{s3_bucket}/out"], ["neighbours", f"s3://{s3_bucket}/out", "--key", "x"],
              ["outliers", f"s3://{s3_bucket}/out"])]
    for read in reads:
        assert_one_line_error(read, "cannot reach", dead)
    for p in [proc, *reads]:
        assert SECRET not in p.stdout + p.stderr


def test_bad_credentials_are_one_line_without_secrets(tmp_path):
    proc_server, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # moto checks keys here
    try:
        none = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        proc = subprocess.run([sys.executable, "-m", "ae_core.cli", "run", "s3://corpus/faces", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=300,
                              env={**none, "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true",
                                   "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                                   "AWS_CONFIG_FILE": str(tmp_path / "none")})
        assert_one_line_error(proc, "s3://corpus/faces", "no credentials found", "AWS_ACCESS_KEY_ID")
        unknown = {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000", "AWS_SECRET_ACCESS_KEY": SECRET}
        proc = _with_env(["run", "s3://corpus/faces", tmp_path / "out"], AWS_ENDPOINT_URL=url, **unknown)
        assert_one_line_error(proc, "s3://corpus/faces", "access denied", "AWS_ACCESS_KEY_ID")
        assert SECRET not in proc.stdout + proc.stderr
        info = _with_env(["info", "s3://corpus/out"], AWS_ENDPOINT_URL=url, **unknown)
        assert_one_line_error(info, "s3://corpus/out", "access denied")
        assert SECRET not in info.stdout + info.stderr
        assert not (tmp_path / "out").exists()
    finally:
        proc_server.terminate()
        proc_server.wait(10)


def _user_with_policy(iam, name: str, actions: list[str]) -> dict:
    actions = [*actions, "s3:HeadBucket"]  # moto checks a bucket's HEAD as this; AWS as s3:ListBucket
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def test_credentials_that_cannot_write_or_delete_stop_the_run_before_the_work():
    import boto3
    from botocore.exceptions import ClientError

    # moto lets the first requests through unchecked (the set-up below), then checks IAM policies
    server, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "60"})
    try:
        admin = {"endpoint_url": url, "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        s3 = boto3.client("s3", **admin)
        s3.create_bucket(Bucket="corpus")
        for name in _names(0, 20):
            s3.put_object(Bucket="corpus", Key=f"digits/{name}", Body=(MNIST / name).read_bytes())
        iam = boto3.client("iam", region_name="us-east-1", **admin)
        reader = _user_with_policy(iam, "reader", ["s3:GetObject", "s3:ListBucket"])
        no_delete = _user_with_policy(iam, "no-delete", ["s3:GetObject", "s3:ListBucket", "s3:PutObject"])
        with pytest.raises(ClientError):  # use up the unchecked requests
            for _ in range(60):
                s3.list_objects_v2(Bucket="corpus", MaxKeys=1)

        for creds, verb in ((reader, "write"), (no_delete, "delete")):
            proc = _with_env(["run", "s3://corpus/digits", "s3://corpus/out", "--epochs", 1],
                             AWS_ENDPOINT_URL=url, **creds)
            assert_one_line_error(proc, "s3://corpus/out", f"access denied when trying to {verb}",
                                  "s3:PutObject and s3:DeleteObject")
            assert creds["AWS_SECRET_ACCESS_KEY"] not in proc.stderr
        # nothing of a run was written: only the test object that could not be deleted, named in the message
        left = boto3.client("s3", endpoint_url=url, aws_access_key_id=no_delete["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=no_delete["AWS_SECRET_ACCESS_KEY"])
        keys = [o["Key"] for o in left.list_objects_v2(Bucket="corpus", Prefix="out/").get("Contents", [])]
        assert len(keys) == 1 and keys[0].startswith("out/.ae-write-check-") and keys[0] in proc.stderr
    finally:
        server.terminate()
        server.wait(10)


def _with_env(args: list, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ae_core.cli", *map(str, args)], capture_output=True,
                          text=True, env={**shared_prefect_env(), **env}, timeout=300)


_SAVE_BLOCK = r"""
import sys
from prefect_aws import AwsCredentials
from prefect_aws.client_parameters import AwsClientParameters
AwsCredentials(aws_access_key_id="block-key-id", aws_secret_access_key=sys.argv[2],
               aws_client_parameters=AwsClientParameters(endpoint_url=sys.argv[3])).save(sys.argv[1], overwrite=True)
"""


def test_credentials_from_a_prefect_block(s3_bucket, s3_endpoint, tmp_path):
    upload_folder(MNIST, f"s3://{s3_bucket}/src", _names(0, 30))
    block_secret = "block-secret-that-must-never-be-printed"
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="CRITICAL")
    subprocess.run([sys.executable, "-c", _SAVE_BLOCK, "ae-test-creds", block_secret, s3_endpoint],
                   env=env, check=True, capture_output=True, timeout=300)
    # Without the block nothing points at the loopback endpoint, so only the block can make this work.
    proc = subprocess.run([sys.executable, "-m", "ae_core.cli", "run", f"s3://{s3_bucket}/src",
                           f"s3://{s3_bucket}/out", "--epochs", "1", "--dim", "4",
                           "--aws-credentials-block", "ae-test-creds", "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads(proc.stdout)
    assert manifest["rows"] == 30
    assert block_secret not in proc.stdout + proc.stderr
    stored = _fs().cat_file(f"{s3_bucket}/out/runs/{manifest['run_id']}/manifest.json").decode()
    assert block_secret not in stored and "block-key-id" not in stored
    # the commands that read the result take the block too (before: "unrecognized arguments")
    out = f"s3://{s3_bucket}/out"
    without = subprocess.run([sys.executable, "-m", "ae_core.cli", "info", out], env=env, capture_output=True,
                             text=True, timeout=300)
    assert without.returncode == 2 and "--aws-credentials-block" in without.stderr
    for args in (["info", out, "--json"], ["neighbours", out, "--key", _names(0, 1)[0], "-k", "2", "--json"],
                 ["outliers", out, "-n", "2", "--json"]):
        proc = subprocess.run([sys.executable, "-m", "ae_core.cli", *args, "--aws-credentials-block", "ae-test-creds"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert block_secret not in proc.stdout + proc.stderr
        assert "ERROR" not in proc.stderr  # the temporary server stopped before Prefect's events reached it
        if args[0] == "info":
            assert json.loads(proc.stdout)["run_id"] == manifest["run_id"]
