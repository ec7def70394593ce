"""One Prefect server for the CLI tests that are not about Prefect's ephemeral mode, started on
first use and stopped when pytest exits (atexit; killed with pytest however it ends, through the
parent-death wrapper `ae` uses for its own temporary server)."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ae_core.cli import _DIE_WITH_PARENT
from moto_server import free_port

_SHARED_SERVER: dict = {}


def shared_prefect_env() -> dict[str, str]:
    """os.environ with PREFECT_API_URL pointing at one Prefect server for the whole session,
    started on first use (its own database beside PREFECT_HOME's). Without a server `ae run`
    starts Prefect's temporary one in each command, about 5 s of every run on 2 cores; the tests
    about that mode (its start, its stop, signals, its errors) keep running `ae` without this."""
    if "url" not in _SHARED_SERVER:
        for _ in range(3):  # the free port may be taken before the server binds it
            if _start(Path(os.environ["PREFECT_HOME"])):
                break
        else:
            raise RuntimeError("the tests' Prefect server did not start: "
                               f"{_SHARED_SERVER.get('failure', '')[-2000:]}")
    return {**os.environ, "PREFECT_API_URL": _SHARED_SERVER["url"]}


def _start(home: Path) -> bool:
    port = free_port()
    env = {**os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/shared-server.db"}
    env.pop("PREFECT_API_URL", None)
    log_path = home / "shared-server.log"
    log = open(log_path, "ab")  # noqa: SIM115 - open while the server runs
    start = log.tell()
    args = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
            "--no-ui", "--no-scheduler", "--no-late-runs", "--analytics-off"]
    if sys.platform.startswith("linux"):  # gone with pytest, however pytest ends (SIGKILL too)
        args = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *args]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    _SHARED_SERVER.update(proc=proc, log=log)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
        except OSError:
            time.sleep(0.2)
            continue
        if proc.poll() is None:  # ours has not exited on a taken port (a foreign server answering
            # while ours still imports would be adopted: a window of seconds on a random port)
            _SHARED_SERVER["url"] = url
            atexit.register(stop_shared_server)
            return True
    stop_shared_server()
    with open(log_path, "rb") as f:
        f.seek(start)
        _SHARED_SERVER["failure"] = f.read().decode(errors="replace")
    return False


def stop_shared_server() -> None:
    proc = _SHARED_SERVER.pop("proc", None)
    _SHARED_SERVER.pop("url", None)
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the server and anything it started
            proc.wait(wait)
            break
        except ProcessLookupError:
            proc.poll()
            break
        except subprocess.TimeoutExpired:
            continue
    _SHARED_SERVER.pop("log").close()
