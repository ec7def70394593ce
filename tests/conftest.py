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
