"""One Prefect server for the CLI tests that are not about Prefect's ephemeral mode, started on
first use and stopped at the end of the session (conftest.pytest_sessionfinish). A module of its
own so that the tests and conftest share one copy of its state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from moto_server import free_port

_SHARED_SERVER: dict = {}


def shared_prefect_env() -> dict[str, str]:
    """os.environ with PREFECT_API_URL pointing at one Prefect server for the whole session,
    started on first use (its own database beside PREFECT_HOME's). Without a server `ae run`
    starts Prefect's temporary one in each command, about 5 s of every run on 2 cores; the tests
    about that mode (its start, its stop, signals, its errors) keep running `ae` without this."""
    if "url" not in _SHARED_SERVER:
        home = Path(os.environ["PREFECT_HOME"])
        port = free_port()
        env = {**os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/shared-server.db"}
        env.pop("PREFECT_API_URL", None)
        log = open(home / "shared-server.log", "wb")  # noqa: SIM115 - open while the server runs
        proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port), "--no-ui", "--no-scheduler", "--no-late-runs", "--analytics-off"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _SHARED_SERVER.update(proc=proc, log=log)
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    stop_shared_server()
                    tail = (home / "shared-server.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the tests' Prefect server did not start:\n{tail}") from None
                time.sleep(0.2)
        _SHARED_SERVER["url"] = url
    return {**os.environ, "PREFECT_API_URL": _SHARED_SERVER["url"]}


def stop_shared_server() -> None:
    proc = _SHARED_SERVER.pop("proc", None)
    _SHARED_SERVER.pop("url", None)
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the server and the uvicorn process it starts
            proc.wait(wait)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    _SHARED_SERVER.pop("log").close()
