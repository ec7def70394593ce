"""Shared fixtures: real images from ../shared/data, and an offline, project-local Prefect."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AE_SHARED_DATA", ROOT.parent / "shared" / "data"))
MNIST = DATA / "mnist-test"
COIL = DATA / "coil20"

# Offline Prefect with a project-local home; set before anything imports prefect.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect" / "test-home"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moto_server import start_moto  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not MNIST.is_dir():
        pytest.exit(f"real test images are missing: {MNIST} (the shared data folder beside the project)", 2)


@pytest.fixture(scope="session")
def mnist_subset(tmp_path_factory) -> Path:
    """The first 300 MNIST test digits, copied to their own folder (a read-only source)."""
    folder = tmp_path_factory.mktemp("mnist300") / "digits"
    folder.mkdir()
    for name in sorted(os.listdir(MNIST))[:300]:
        shutil.copy(MNIST / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def mixed_corpus(tmp_path_factory):
    """Real images re-encoded in many formats and modes, plus broken files."""
    from corpora import make_mixed_corpus

    folder = tmp_path_factory.mktemp("mixed") / "src"
    good, broken = make_mixed_corpus(folder, COIL, MNIST)
    return folder, good, broken


# ---- a real S3 endpoint on loopback: moto's server in its own process --------------------------

SECRET = "test-secret-key-that-must-never-be-printed"


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free loopback port; the AWS variables point every client at it."""
    proc, url = start_moto()
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket for one test; returns its name."""
    import uuid

    import s3fs

    name = f"t-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    yield name
    fs.rm(name, recursive=True)


def upload_folder(folder: Path, url: str, names: list[str] | None = None) -> None:
    """Put local files under an fsspec URL (s3 uploads go through s3fs's concurrent puts)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    names = names if names is not None else sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    fs.put([str(folder / n) for n in names], [f"{root}/{n}" for n in names])
    fs.invalidate_cache()
