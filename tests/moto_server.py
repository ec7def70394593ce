"""moto's S3 server in its own process on a free loopback port: for the tests and the benchmarks
(the in-process `mock_aws` does not work with s3fs)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start `moto_server` from this interpreter's environment; returns (process, endpoint URL)."""
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(extra_env or {})})
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto_server exited at start") from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")
