"""The scheduled deployment on a real Prefect server with real process workers, driven through
infra/local.sh exactly as the README tells a user; plus the GPU-pool path (the pretrain stage as
its own flow run on a second pool) and a retried flow run that resumes without retraining."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import MNIST, ROOT
from moto_server import free_port

pytestmark = pytest.mark.slow

LOCAL = ROOT / "infra" / "local.sh"


@pytest.fixture(scope="module")
def local_prefect(tmp_path_factory):
    """A Prefect server on a free loopback port, two process pools and their workers."""
    state = tmp_path_factory.mktemp("prefect-local")
    port = free_port()
    env = {**os.environ, "AE_STATE_DIR": str(state), "AE_PREFECT_PORT": str(port),
           "AE_BIN": str(Path(os.sys.executable).parent), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "AE_POOLS": "ae-cpu ae-gpu-standin", "AE_WATCH_TIMEOUT": "600"}
    env.pop("PREFECT_HOME", None)  # the server gets its own home under AE_STATE_DIR
    env["PREFECT_HOME"] = str(state / "home")
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"

    def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(LOCAL), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if check and proc.returncode != 0:
            raise AssertionError(f"local.sh {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    try:
        sh("server-start")
        pid = (state / "server.pid").read_text()
        # started again: says so and keeps the running server's pid (it wrote a dead one, and
        # `stop` then left the real server running); another state dir on the same port refuses
        assert "already running" in sh("server-start").stdout and (state / "server.pid").read_text() == pid
        other = subprocess.run([str(LOCAL), "server-start"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                               env={**env, "AE_STATE_DIR": str(state / "other")})
        assert other.returncode == 1 and f"port {port} is taken" in other.stderr
        assert not (state / "other" / "server.pid").exists()
        sh("pools")
        sh("deploy", "nightly", "nightly-gpu")
        # The GPU settings pointed at a second local pool: the pretrain stage's deployment `gpu`.
        prefect = str(Path(os.sys.executable).parent / "prefect")
        subprocess.run([prefect, "--no-prompt", "deploy", "flows/pretrain_stage.py:pretrain_stage",
                        "--name", "gpu", "--pool", "ae-gpu-standin"], cwd=ROOT, env=env, check=True,
                       capture_output=True, timeout=300)
        sh("worker-start", "ae-cpu")
        sh("worker-start", "ae-gpu-standin")
        yield sh, env, prefect
    finally:
        sh("stop", check=False)
    assert not list(state.glob("*.pid")), "a worker or the server did not stop"


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deploy-src") / "digits"
    folder.mkdir()
    for name in sorted(os.listdir(MNIST))[:120]:
        (folder / name).write_bytes((MNIST / name).read_bytes())
    return folder


_STAGE_RUNS = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["pretrain-stage"])))
print(json.dumps([r.state_type.value for r in runs]))
"""


_LAST_RUNS = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.sorting import FlowRunSort
with get_client(sync_client=True) as client:
    seen = {}
    for flow in ("pretrain-and-embed", "pretrain-stage"):
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                                     sort=FlowRunSort.START_TIME_DESC)
        seen[flow] = [{"state": r.state_type.value, "runs": r.run_count, "message": r.state.message or "",
                       "output": r.parameters.get("output")} for r in runs if r.state_type.value != "SCHEDULED"]
print(json.dumps(seen))
"""


_OVERLAP = """
import json, sys, time
from prefect.client.orchestration import get_client
params = {"source": sys.argv[1], "output": sys.argv[2], "train": {"epochs": 2}}
with get_client(sync_client=True) as client:
    dep = client.read_deployment_by_name("pretrain-and-embed/nightly")
    ids = [client.create_flow_run_from_deployment(dep.id, parameters=params).id for _ in range(2)]
    deadline = time.time() + 600
    while time.time() < deadline:
        runs = [client.read_flow_run(i) for i in ids]
        if all(r.state.is_final() for r in runs):
            break
        time.sleep(1)
    print(json.dumps({"limit": dep.global_concurrency_limit.limit,
                      "strategy": dep.concurrency_options.collision_strategy.value,
                      "runs": [{"state": r.state_type.value, "start": r.start_time.timestamp(),
                                "end": r.end_time.timestamp()} for r in runs]}))
"""


def _run_to_completion(sh, deployment: str, source: Path, output: Path) -> None:
    proc = sh("run", deployment, "--param", f"source={source}", "--param", f"output={output}",
              "--param", 'train={"epochs": 2}')
    assert "Completed" in proc.stdout


def _manifest(output: Path) -> dict:
    run_id = (output / "LATEST").read_text().strip()
    return json.loads((output / "runs" / run_id / "manifest.json").read_text())


def test_nightly_deployment_run_completes_and_publishes(local_prefect, small_corpus, tmp_path):
    sh, env, prefect = local_prefect
    out = tmp_path / "out"
    _run_to_completion(sh, "pretrain-and-embed/nightly", small_corpus, out)
    m = _manifest(out)
    assert m["rows"] == 120 and m["index"]["ntotal"] == 120
    run_dir = out / "runs" / m["run_id"]
    for name in ("embeddings.parquet", "index.faiss", "model.pt", "report.md", "loss.png",
                 "reconstructions.png", "neighbours.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert "PCA" in (run_dir / "report.md").read_text()
    artifacts = subprocess.run([prefect, "artifact", "ls"], env={**env, "COLUMNS": "250"}, capture_output=True, text=True,
                               timeout=120, check=True).stdout
    assert "ae-run-report" in artifacts and "ae-run-rejects" in artifacts


def test_gpu_pool_path_runs_pretrain_as_its_own_flow_run(local_prefect, small_corpus, tmp_path):
    sh, env, prefect = local_prefect
    out = tmp_path / "out"
    _run_to_completion(sh, "pretrain-and-embed/nightly-gpu", small_corpus, out)
    states = json.loads(subprocess.run([os.sys.executable, "-c", _STAGE_RUNS], env=env, capture_output=True,
                                       text=True, timeout=120, check=True).stdout)
    assert states and set(states) == {"COMPLETED"}
    m = _manifest(out)
    assert m["rows"] == 120 and m["train"].get("resumed_from_stage") is True
    assert "pretrain" not in m["timings_s"]  # the parent did not train; the stage did
    assert not (out / "runs" / m["run_id"] / "stage").exists()  # staged pixels are cleaned up


def test_a_stage_that_refuses_its_device_fails_the_gpu_run_once_with_its_reason(local_prefect, small_corpus,
                                                                                tmp_path):
    # The stage's worker has no CUDA: the stage refuses, and the parent ends on that reason, not
    # retried (before: "pretrain stage ... ended Failed", the flow run retried, decoded and
    # staged again, the stage refused again), its staged pixels deleted, nothing published
    sh, env, prefect = local_prefect

    def last_runs() -> dict:
        return json.loads(subprocess.run([os.sys.executable, "-c", _LAST_RUNS], env=env, capture_output=True,
                                         text=True, timeout=120, check=True).stdout)

    stages_before = len(last_runs()["pretrain-stage"])
    out = tmp_path / "out"
    proc = sh("run", "pretrain-and-embed/nightly-gpu", "--param", f"source={small_corpus}", "--param",
              f"output={out}", "--param", 'train={"epochs": 2, "device": "cuda"}', check=False)
    assert proc.returncode != 0 and "Failed" in proc.stdout
    seen = last_runs()
    [parent] = [r for r in seen["pretrain-and-embed"] if r["output"] == str(out)]
    stages = seen["pretrain-stage"]
    assert len(stages) == stages_before + 1 and stages[0]["state"] == "FAILED"
    assert parent["state"] == "FAILED" and parent["runs"] == 1, parent
    assert "refused: device 'cuda': torch sees 0 CUDA device(s)" in parent["message"], parent
    assert not (out / "LATEST").exists()
    assert [p.name for p in (out / "runs").iterdir()] and not list((out / "runs").glob("*/stage"))


def test_a_nightly_run_due_while_one_is_going_waits_for_it(local_prefect, small_corpus, tmp_path):
    sh, env, prefect = local_prefect
    out = tmp_path / "out"
    proc = subprocess.run([os.sys.executable, "-c", _OVERLAP, str(small_corpus), str(out)], env=env,
                          capture_output=True, text=True, timeout=900, check=True)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["limit"] == 1 and seen["strategy"] == "ENQUEUE"
    first, second = sorted(seen["runs"], key=lambda r: r["start"])
    assert first["state"] == second["state"] == "COMPLETED"
    assert second["start"] >= first["end"]  # queued behind the first, not run beside it
    assert len(list((out / "runs").iterdir())) == 2 and _manifest(out)["rows"] == 120
