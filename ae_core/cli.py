"""The `ae` command line. Each subcommand maps onto library functions.

User mistakes (a wrong argument, a missing store or key) print one line, `ae: error: ...`, and
exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import ctypes
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import NoReturn
from datetime import datetime, timezone

from pydantic import ValidationError

from ae_core.errors import AeError


def _offline_prefect_env(verbose: bool) -> None:
    """Prefect's ephemeral mode, quiet and offline unless the user set otherwise."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A fresh PREFECT_HOME migrates its database on first start (~10-30 s on 2 cores).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if os.environ.get("PREFECT_HOME"):  # the ephemeral server hangs, not fails, when it is missing
        try:
            os.makedirs(os.path.expanduser(os.environ["PREFECT_HOME"]), exist_ok=True)
        except OSError as err:
            raise AeError(f"PREFECT_HOME {os.environ['PREFECT_HOME']!r} is not a folder Prefect can use "
                          f"({err.strerror}); point it at a folder") from err
    # The CLI prints its own progress and summary; Prefect's per-task logs are opt-in.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "CRITICAL")


def _run_config_kwargs(args: argparse.Namespace) -> dict:
    from ae_core.config import IndexConfig, IngestConfig, ModelConfig, PublishConfig, TrainConfig

    model = {k: v for k, v in {"dim": args.dim, "image_size": args.image_size, "channels": args.channels,
                                "width": args.width, "blocks_per_stage": args.blocks_per_stage}.items()
             if v is not None}
    train = {k: v for k, v in {"epochs": args.epochs, "max_minutes": args.max_minutes,
                                "seed": args.seed, "batch_size": args.batch_size,
                                "device": args.device, "retrain": args.retrain,
                                "retrain_fraction": args.retrain_fraction, "precision": args.precision,
                                "anomaly_steps": args.anomaly_steps, "lr": args.lr}.items() if v is not None}
    ingest = {k: v for k, v in {"include": args.include, "exclude": args.exclude,
                                 "resize": args.resize, "workers": args.workers}.items() if v}
    if args.max_image_pixels is not None:
        ingest["max_image_pixels"] = args.max_image_pixels
    publish = {"keep_runs": args.keep_runs} if args.keep_runs is not None else {}
    index = {k: v for k, v in {"kind": args.index_kind, "memory_budget_mb": args.index_memory_mb,
                                "recall_floor": args.recall_floor}.items() if v is not None}
    return {"ingest": IngestConfig(**ingest), "model": ModelConfig(**model),
            "train": TrainConfig(**train), "publish": PublishConfig(**publish), "index": IndexConfig(**index),
            "work_dir": args.work_dir,
            "aws_credentials_block": args.aws_credentials_block}


def _run_flow(source: str, output: str, kwargs: dict) -> dict:
    """Check the arguments and both stores first (fast, writes nothing), then run the flow.
    Prefect's temporary server, when no server is configured, starts as soon as the arguments
    are valid and gets ready while the stores are checked and the pipeline imports."""
    global _kept_note
    from ae_core.config import RunConfig

    verbose = kwargs.pop("verbose", False)
    block = kwargs.get("aws_credentials_block")
    config = RunConfig(source=source, output=output, **{k: v for k, v in kwargs.items() if k != "aws_credentials_block"})
    _offline_prefect_env(verbose)
    server = _TemporaryServer.launch()
    from ae_core.pipeline import prepare_run

    options = None
    if block:  # the block lives in Prefect's database: load it for the preflight check too
        from flows.credentials import s3_options_from_block

        with _prefect_api(server):
            options = s3_options_from_block(block)
    work_dir = prepare_run(config, options).work_dir
    from ae_core.pipeline import KEPT_IN_PROCESS
    from flows.pretrain_and_embed import pretrain_and_embed

    import httpx  # Prefect's HTTP client

    before, _ = _latest_published(output, options, manifest=False)
    started = datetime.now(timezone.utc).isoformat()
    kept_before = len(KEPT_IN_PROCESS)
    try:
        with _prefect_api(server):
            try:
                return pretrain_and_embed(source=source, output=output, **kwargs)
            except RuntimeError as err:  # Prefect's client, before the flow run exists: nothing was written
                if server is None and str(err).startswith("Failed to reach API"):
                    raise AeError(f"the Prefect server configured in PREFECT_API_URL ({_configured_api_url()}) "
                                  "does not answer; start it, or unset PREFECT_API_URL (in the environment "
                                  "or your Prefect profile) to let ae start a temporary one") from err
                raise
            except httpx.TransportError as err:  # the server died (the OOM killer, say) while the flow ran
                return published_despite(source, output, options, before, started, err)
    except BaseException as err:
        _kept_note = _kept_model_note(work_dir, KEPT_IN_PROCESS[kept_before:], config.train.retrain)
        if _kept_note and isinstance(err, AeError):
            raise AeError(f"{err}; {_kept_note}", err.transient) from err
        if _kept_note and not isinstance(err, KeyboardInterrupt):  # printed after the traceback
            err.add_note(f"ae: {_kept_note}")
        raise


_kept_note = ""  # for the line `ae: terminated`: what a run stopped after training left for the next


def _kept_model_note(work_dir: str, kept: list[tuple[str, str]], retrain: str) -> str:
    """A sentence for the error line of a run that stopped after training: its model is kept in
    the pair's pixel cache `work_dir`, where the next run looks (pipeline.kept_model). `kept`: the
    (folder, run id) of the models this command's run kept or reused. '' when it kept none (it
    stopped before training, or reused a published model), or kept it where no run will look (a
    cache of its own beside the pair's, held by another run), or the model is gone since."""
    from ae_core.pipeline import kept_record

    if not kept:
        return ""
    folder, run_id = kept[-1]
    record = kept_record(folder)
    if folder != work_dir or record is None or record.get("run_id") != run_id:
        return ""
    unless = ", without --retrain always," if retrain == "always" else ""
    return (f"the run stopped after training: its model is kept in the work dir {folder!r}, and a run with "
            f"the same images and training settings{unless} reuses it instead of training again")


def _kept_suffix() -> str:
    return f"; {_kept_note}" if _kept_note else ""


def _latest_published(output: str, options: dict | None, manifest: bool = True) -> tuple[str | None, dict | None]:
    """(the run OUTPUT/LATEST names, its manifest with published_url, if asked for); Nones where
    either cannot be read."""
    from ae_core.outputs import latest_run_id, published_run, run_path
    from ae_core.storage import display_url, open_store

    try:
        fs, root = open_store(output, options)
        if not manifest:
            return latest_run_id(fs, root), None
        run_id, stored = published_run(fs, root)
        return (run_id, None if stored is None else {**stored, "published_url": display_url(fs, run_path(root, run_id))})
    except Exception:  # noqa: BLE001 - only a hint for the message: what stands in OUTPUT
        return None, None


def _after(stamp: object, started: str) -> bool:
    try:
        return datetime.fromisoformat(str(stamp)) >= datetime.fromisoformat(started)
    except ValueError:
        return False


def _source_as_published(source: str, options: dict | None) -> str | None:
    from ae_core.pipeline import recorded_source
    from ae_core.storage import open_store

    try:
        return recorded_source(*open_store(source, options), source)
    except AeError:
        return None


def published_despite(source: str, output: str, options: dict | None, before: str | None, started: str,
                      err: Exception) -> dict:
    """After Prefect's API stopped answering mid-run: the manifest of the run this command
    published, when LATEST moved to a run of this SOURCE that started after the command did
    (the flow runs on without the API and fails only where it must report, at its end); else
    one AeError saying nothing was published."""
    from ae_core.storage import redact_url

    run_id, manifest = _latest_published(output, options)
    if run_id is not None and run_id != before and _after(manifest.get("started_at"), started) \
            and manifest.get("source") == _source_as_published(source, options):
        print(f"ae: warning: Prefect's API stopped answering during the run ({type(err).__name__}: {err}), "
              f"after run {run_id} was published; the run is complete", file=sys.stderr)
        return {**manifest, "pruned_runs": []}
    lost = f"Prefect's API stopped answering during the run ({type(err).__name__}: {err})"
    if run_id is None:  # no LATEST, or OUTPUT unreadable just now
        raise AeError(f"{lost}; {redact_url(output)!r} shows no run this command published (`ae info "
                      f"{redact_url(output)}` tells what stands); run again") from err
    raise AeError(f"{lost}; nothing was published ({redact_url(output)!r} holds run {run_id}, "
                  "not one of this command's); run again") from err


def _configured_api_url() -> str:
    from prefect.settings import get_current_settings

    return str(get_current_settings().api.url)


# Started in front of Prefect's server command: the server gets SIGTERM when ae dies, however
# it dies (SIGKILL, the OOM killer), instead of running on, orphaned. Linux's parent-death signal.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                    "os.getppid() == int(sys.argv[1]) or sys.exit(0); os.execv(sys.argv[2], sys.argv[2:])")


class _TemporaryServer:
    """Prefect's temporary API server, the one its ephemeral mode starts, started by ae instead.

    - Earlier: Prefect starts it when the flow first calls the API and waits for it there. ae
      starts it as soon as the arguments are valid. It gets ready (~3 s of imports and database
      checks, in its own process) while ae checks the stores and imports the pipeline, and ae
      never imports Prefect's server module itself. On 2 cores a 1-epoch run went from
      10.5-10.8 s to 7.8-8.1 s (docs/benchmarks.md).
    - In a session of its own: a terminal's Ctrl-C goes to the whole process group. It stopped
      Prefect's server at once, and the interrupted run then spent ~70 s retrying the dead
      server before a traceback. Here only ae stops it, with its exit handlers, after the run
      has been marked. On Linux it also stops when ae dies without exit handlers.

    The command and environment are Prefect's own (prefect.server.api.server.SubprocessASGIServer).
    """

    _current: _TemporaryServer | None = None  # one per process, like Prefect's own

    def __init__(self) -> None:
        self.process, self.port, self.ready, self.log = None, 0, False, None

    @classmethod
    def launch(cls) -> _TemporaryServer | None:
        """Start it, without waiting; None when a Prefect server is configured. It starts before
        Prefect is imported here (~0.9 s), in the environment Prefect would give it, and is
        stopped again if a Prefect profile names a server."""
        if os.environ.get("PREFECT_API_URL"):
            return None
        if cls._current is not None and cls._current.process is not None:  # main() called again in-process
            return cls._current
        server = cls._current = cls()
        server._start()
        atexit.register(server.stop)
        from prefect.settings import get_current_settings

        if get_current_settings().api.url:
            server.stop()
            return None
        return server

    def _start(self) -> None:
        prefect_dir = importlib.util.find_spec("prefect").submodule_search_locations[0]
        with socket.socket() as sock:  # a free port; another process may take it first (retried)
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        args = [sys.executable, "-m", "uvicorn", "--app-dir", os.path.dirname(prefect_dir), "--factory",
                "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on"]
        if sys.platform.startswith("linux"):
            args = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *args]
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        if self.log is not None:
            self.log.close()
        self.log = tempfile.TemporaryFile()  # what it prints; shown only if it fails to start
        self.process = subprocess.Popen(args, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self) -> None:
        """Block until the server answers; the timeout is Prefect's own setting."""
        if self.ready:
            return
        import httpx
        from prefect.settings import get_current_settings

        deadline = time.monotonic() + get_current_settings().server.ephemeral.startup_timeout_seconds
        retries = 2
        with httpx.Client() as client:
            while not self.ready:
                status = self.process.poll()
                if status == 3 and retries and "already in use" in self._output():  # the port was taken meanwhile
                    retries -= 1
                    self._start()
                    continue
                if status is not None:
                    raise AeError(f"Prefect's temporary server exited with status {status} before it was ready "
                                  f"({self._last_line()}); set PREFECT_API_URL to a running server, or fix the "
                                  "cause and run again")
                if time.monotonic() > deadline:
                    raise AeError("Prefect's temporary server did not start in time; raise "
                                  "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL to a running server")
                try:
                    self.ready = client.get(f"{self.api_url}/health").status_code == 200
                except httpx.TransportError:
                    pass
                if not self.ready:
                    time.sleep(0.05)

    def _output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def _last_line(self) -> str:
        """The exception it died of (a traceback's last line), else the last line it printed."""
        lines = [ln.strip() for ln in self._output().splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"[\w.]+(Error|Exception|Exit)\b.*:", ln)]
        return (errors or lines or ["it printed nothing"])[-1]

    def stop(self) -> None:
        """Terminate it. One not ready yet is killed: stopping in the middle of its start made it
        print a traceback and took up to 3 s; its database is SQLite, which a kill leaves intact."""
        if self.process is None:
            return
        self.process.terminate() if self.ready else self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@contextlib.contextmanager
def _prefect_api(server: _TemporaryServer | None) -> Iterator[None]:
    """Prefect's client pointed at `server` once it answers; as configured when it is None."""
    if server is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    server.wait_ready()
    # no UI is served, and the server goes with ae: no "View at http://..." link in the logs
    with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_UI_URL: ""}):
        yield


def _measured_in(quality: dict) -> str:
    """Where a reused model's figures come from: the run that trained it, on its images."""
    run = quality.get("measured_in_run")
    return f" (measured in run {run}, which trained the model)" if run else ""


def _print_summary(m: dict) -> None:
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(m["rejects_by_reason"].items()))
    t, q = m.get("train", {}), m.get("quality", {})
    print(f"published run {m['run_id']} -> {m['published_url']}")
    c = m.get("changes", {})
    print(f"  images   {m['rows']} embedded, {m['rejected']} rejected" + (f" ({reasons})" if reasons else ""))
    print(f"  source   {c.get('new', 0)} new, {c.get('changed', 0)} changed, {c.get('unchanged', 0)} unchanged,"
          f" {c.get('deleted', 0)} deleted" + (f", {c['retried']} retried" if c.get("retried") else "")
          + (f", {c['rechecked']} rechecked (replaced in place, or listed with no version)" if c.get("rechecked") else "")
          + f"; {c.get('encoded', 0)} encoded this run")
    print(f"  model    {'retrained' if c.get('retrained') else 'reused'}: {c.get('retrain_reason')}")
    print(f"           {m['model_version']}: dim {m['dim']}, input {m['image_size']}x{m['image_size']}"
          f"x{m['channels']}, {t.get('epochs_run')} epoch{'' if t.get('epochs_run') == 1 else 's'} in {t.get('seconds')} s on {t.get('device')}"
          f" ({t.get('stop_reason')})")
    if t.get("resumed_from_run"):
        print(f"           trained by run {t['resumed_from_run']}, which stopped before publishing (kept in the work dir)")
    from ae_core.quality import heldout_text, ratio_text, run_notes, trained_on

    if q.get("sample"):
        ratio = q.get("ae_over_pca")
        versus = f" = {ratio:.2f}x PCA's error" if ratio is not None else f" ({ratio_text(None)})"
        print(f"  quality  reconstruction MSE {q['ae_mse']:.5f} vs PCA-{m['dim']} {q['pca_mse']:.5f}{versus},"
              f" on {q['sample']} image{'' if q['sample'] == 1 else 's'} ({trained_on(q)} trained on)" + _measured_in(q))
        if held := heldout_text(q):
            print(f"           held out: {held}" + _measured_in(q))
    for note in run_notes(q, t):
        print(f"  note     {note}")
    ix = m["index"]
    queries = f" on {ix['recall_queries']} held-out queries" if isinstance(ix.get("recall_queries"), int) else ""
    measured = (f"recall@10 {ix.get('recall_at_10', 1.0):.3f}{queries}, "
                f"self-hit rate {ix['self_hit_rate']:.3f}") if ix.get("recall_queries") != 0 else "exact search (recall 1)"
    print(f"  index    {ix['kind']} {ix['metric']}, {ix['ntotal']} vector{'' if ix['ntotal'] == 1 else 's'}, {measured}")
    print("  stages   " + ", ".join(f"{k} {v:.1f}s" for k, v in m["timings_s"].items()))


def cmd_run(args: argparse.Namespace) -> int:
    kwargs = _run_config_kwargs(args)
    kwargs["verbose"] = args.verbose
    if re.search(r"(^|::)memory://", args.output, re.IGNORECASE):  # useful from Python, not from a shell
        print(f"ae: warning: OUTPUT {args.output!r} is this process's memory: the run is published there and "
              "gone when ae exits; give a folder or a store URL (s3://bucket/prefix) to keep it", file=sys.stderr)
    manifest = _run_flow(args.source, args.output, kwargs)
    for line in manifest.get("cleanup_warnings", []):  # published; what it could not delete after
        print(f"ae: warning: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(manifest))
    else:
        _print_summary(manifest)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ae_core.query import info

    out = info(args.output)
    if args.json:
        print(json.dumps(out))
        return 0
    q = out["quality"]
    print(f"run {out['run_id']} ({out['finished_at']}) from {out['source']}")
    print(f"  rows {out['rows']}, rejected {out['rejected']}, dim {out['dim']}, "
          f"input {out['image_size']}x{out['image_size']}x{out['channels']}, width {out['width']}, "
          f"{out['blocks_per_stage']} block(s) per stage, model {out['model_version']}")
    numbers = (all(isinstance(q.get(k), (int, float)) for k in ("ae_mse", "pca_mse"))  # a hand-edited manifest
               and isinstance(q.get("ae_over_pca"), (int, float, type(None))))
    if q.get("sample") and numbers:
        from ae_core.quality import heldout_text, ratio_text, trained_on

        print(f"  reconstruction MSE {q['ae_mse']:.5f} vs PCA {q['pca_mse']:.5f} ({ratio_text(q.get('ae_over_pca'))})"
              + f" on images {trained_on(q)} trained on" + _measured_in(q))
        if held := heldout_text(q):
            print(f"  held out: {held}" + _measured_in(q))
    for name in ("embeddings", "rejects", "index", "checkpoint"):
        print(f"  {name:<11}{out[name]}")
    return 0


def _print_neighbours(query: str, hits: list, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"query": query, "neighbours": [h.__dict__ for h in hits]}))
        return
    print(f"nearest neighbours of {_shown(query)}:")
    for h in hits:
        print(f"  {h.rank:>3}  {h.distance:10.4f}  {_shown(h.key)}")


def _shown(key: str) -> str:
    """A key as printed in a table: as is, or quoted and escaped (repr) where it holds a newline,
    a tab, another control character or an invisible format one (a right-to-left override would
    reorder the line on the terminal), so that each hit stays on one line and reads as stored."""
    return key if key.isprintable() else repr(key)


def cmd_neighbours(args: argparse.Namespace) -> int:
    from ae_core.query import neighbours_of_image, neighbours_of_key

    if args.k < 1:
        raise AeError(f"-k {args.k}: ask for at least one neighbour")
    if args.key is not None:
        hits, query = neighbours_of_key(args.output, args.key, args.k), args.key
    else:
        hits, query = neighbours_of_image(args.output, args.image, args.k), args.image
    _print_neighbours(query, hits, args.json)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ae_core.demo import write_digits_corpus
    from ae_core.query import neighbours_of_key

    train = _demo_train(args)  # a wrong --epochs stops it before the digits are written
    if not args.output.strip():
        raise AeError("the demo folder is empty; give a folder (default demo-out)")
    root = os.path.abspath(args.output)
    if os.path.exists(root) and not os.path.isdir(root):
        raise AeError(f"demo folder {args.output!r} is a file; give a folder (created if missing)")
    corpus, result = os.path.join(root, "digits"), os.path.join(root, "result")
    try:
        labels = write_digits_corpus(corpus)
    except OSError as err:
        raise AeError(f"demo folder {args.output!r}: cannot write the digits there ({err.strerror or err}); "
                      "give a writable folder") from err
    print(f"wrote {len(labels)} digit images (scikit-learn) to {corpus}")
    manifest = _run_flow(corpus, result, {"train": train})
    _print_summary(manifest)
    key = "00000.png"
    hits = neighbours_of_key(result, key, 6)
    print(f"\nnearest neighbours of {key} (digit {labels[key]}); labels shown only to judge them:")
    for h in hits:
        print(f"  {h.rank:>3}  {h.distance:10.4f}  {h.key}  digit {labels[h.key]}")
    return 0


def _check_writable(option: str, path: str | None) -> None:
    """A file the command will write at the end: its folder must exist now, not after the work."""
    from ae_core.storage import redact_url

    if path is None:
        return
    if not path.strip():
        raise AeError(f"{option} is empty; give a file name")
    if "://" in path or "::" in path:
        raise AeError(f"{option} {redact_url(path)!r}: give a local file path; the file is written on this machine")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AeError(f"{option} {path!r}: folder {folder!r} does not exist; create it or give another path")
    if os.path.isdir(path):
        raise AeError(f"{option} {path!r} is a folder; give a file name")
    if os.path.islink(path) and not os.path.exists(path):
        raise AeError(f"{option} {path!r} is a link to {os.readlink(path)!r}, which does not exist; give another path")
    mode = os.stat(path).st_mode if os.path.exists(path) else 0
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise AeError(f"{option} {path!r} is a pipe or a socket (opening it waits for a reader); give a file name")
    try:  # the file itself if it exists (its folder need not be writable), else a trial file beside it
        if os.path.exists(path):
            open(path, "ab").close()  # appends nothing: the content and its time stay as they are
        else:
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise AeError(f"{option} {path!r}: cannot write there ({err.strerror or err}); give a writable path") from err


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ae_core.config import ModelConfig, TrainConfig
    from ae_core.evaluate import evaluate_corpus, evaluation_markdown

    try:
        dims = list(dict.fromkeys(int(d) for d in args.dims.split(",") if d.strip()))  # 4,4: trained once
    except ValueError as err:
        raise AeError(f"--dims {args.dims!r}: give comma-separated integers, e.g. 10,32,64") from err
    top = ModelConfig.model_fields["dim"].metadata  # the limits `ae run --dim` has
    most = next(m.le for m in top if getattr(m, "le", None) is not None)
    if not dims or min(dims) < 1 or max(dims) > most:
        raise AeError(f"--dims {args.dims!r}: give one or more embedding sizes from 1 to {most}, e.g. 10,32,64")
    _check_writable("--markdown", args.markdown)
    train = TrainConfig(**{k: v for k, v in {"epochs": args.epochs, "max_minutes": args.max_minutes,
                                              "seed": args.seed}.items() if v is not None})
    t0 = time.perf_counter()
    rows = evaluate_corpus(args.source, args.labels, args.key_col, args.label_col, dims, train)
    text = evaluation_markdown(args.source, rows) + f"\nWall time: {time.perf_counter() - t0:.0f} s\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from ae_core.evaluate import probe, shared_name_note

    out = probe(args.output, args.labels, args.key_col, args.label_col)
    if args.json:
        print(json.dumps(out))
    else:
        shared = shared_name_note(out.get("rows_with_shared_name", 0))
        print(f"{out['rows_labelled']} labelled rows ({out['rows_without_label']} without a label{shared}), "
              f"{out['classes']} classes, {out['folds']}-fold cross-validation:")
        print(f"  5-NN accuracy                {out['knn5_accuracy']:.4f}")
        print(f"  logistic regression accuracy {out['logreg_accuracy']:.4f}")
    return 0


def cmd_outliers(args: argparse.Namespace) -> int:
    from ae_core.evaluate import GRID_COLUMNS, outlier_grid, ranked_outliers

    if args.n < 0:
        raise AeError(f"-n {args.n}: give a number of images, 0 or more")
    _check_writable("--grid", args.grid)
    if args.grid and os.path.splitext(args.grid)[1].lower() not in ("", ".png"):
        raise AeError(f"--grid {args.grid!r}: the picture is written as a PNG; give a file name ending in .png")
    by, worst = ranked_outliers(args.output, args.n, args.by)
    if args.grid:
        png = outlier_grid(args.output, [w["key"] for w in worst])  # before the file is opened:
        with open(args.grid, "wb") as f:  # an error leaves an earlier picture as it was
            f.write(png)
    if args.json:
        print(json.dumps({"outliers": worst, "grid": args.grid, "ranked_by": by}))
        return 0
    what = "reconstruction error under a model that never trained on the image, calibrated across the two halves" \
        if by == "anomaly_score" \
        else "the published model's reconstruction error"
    print(f"{len(worst)} most anomalous images, ranked by {by} ({what}):")
    if by != args.by:
        print("  (this run has no anomaly scores: it ran with --anomaly-steps 0 (run again with --anomaly-steps N,"
              " N > 0, to rank by them), on too few images to split in two halves, or before they existed)")
    print(f"  {'rank':>4}  {'anomaly':>9}  {'recon':>9}  key")
    for w in worst:
        score = w.get("anomaly_score")
        print(f"  {w['rank']:>4}  {score if score is not None else float('nan'):9.5f}  {w['recon_error']:9.5f}  {_shown(w['key'])}")
    if args.grid:
        print(f"picture (originals, captioned with their rank, above their reconstructions; "
              f"{GRID_COLUMNS} a band): {args.grid}")
    return 0


def _demo_train(args: argparse.Namespace):
    from ae_core.config import TrainConfig

    return TrainConfig() if args.epochs is None else TrainConfig(epochs=args.epochs)


def _label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", required=True, help="CSV with a key column and a label column, "
                   "joined to the images by key (or by file name)")
    p.add_argument("--key-col", default="filename", help="the labels file's column of keys or file names "
                   "(default filename)")
    p.add_argument("--label-col", default="label", help="the labels file's column of labels (default label)")


def _versions() -> str:
    """ae's version and those of the engines its results depend on, read without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    import ae_core

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"ae {ae_core.__version__} (" + ", ".join(f"{d} {of(d)}" for d in ("torch", "faiss-cpu", "prefect", "pyarrow")) + ")"


class _VersionAction(argparse.Action):
    """--version, its versions read only when it is given (reading them takes ~40 ms)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print ae's version and those of its engines, then exit")

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:  # noqa: ANN001
        print(_versions())  # on stdout, as argparse's own version action
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as ae's other user errors: one line (before: the usage, then
    the error), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"ae: error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ae", description="Autoencoder image embeddings: pretrain, "
                                "embed to Parquet, search with FAISS.")
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="pretrain on SOURCE and publish embeddings to OUTPUT")
    r.add_argument("source", help="folder or fsspec URL of the images (every object is a candidate)")
    r.add_argument("output", help="folder or fsspec URL for the results")
    r.add_argument("--dim", type=int, help="embedding size (default 32)")
    r.add_argument("--image-size", type=int, help="model input side, a multiple of 4 (default: from the corpus)")
    r.add_argument("--channels", type=int, choices=(1, 3), help="default: 1 if every sampled image is gray")
    r.add_argument("--blocks-per-stage", type=int, metavar="N",
                   help="residual blocks per conv stage (default 1; 0 trains ~3x faster per epoch)")
    r.add_argument("--width", type=int, metavar="N", help="channels of the first conv stage, doubled per "
                   "stage up to 256 (default 32, at most 256)")
    r.add_argument("--epochs", type=int, help="training epochs (default: from corpus size, 20 to 500)")
    r.add_argument("--max-minutes", type=float, help="training time budget (default 5)")
    r.add_argument("--batch-size", type=int, help="images per optimizer step (default 128)")
    r.add_argument("--lr", type=float, help="peak learning rate of AdamW, warmup then cosine decay (default 0.002)")
    r.add_argument("--seed", type=int, help="default 0")
    r.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:N, mps")
    r.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="training arithmetic (default auto: bf16 mixed precision where the hardware has it)")
    r.add_argument("--anomaly-steps", type=int, metavar="N",
                   help="steps of each of the two fold models behind anomaly_score (default 300; 0 = off)")
    r.add_argument("--include", action="append", metavar="GLOB", help="only keys matching (repeatable)")
    r.add_argument("--exclude", action="append", metavar="GLOB", help="skip keys matching (repeatable)")
    r.add_argument("--resize", choices=("stretch", "crop", "pad"), help="how images fit the square input "
                   "(default stretch; crop: the centred square; pad: the whole image on black)")
    r.add_argument("--workers", type=int, help="decode processes (default: one per core)")
    r.add_argument("--max-image-pixels", type=int, metavar="N",
                   help="larger images are rejected as decompression bombs (default 100,000,000)")
    r.add_argument("--work-dir", help="local folder for the decoded-pixel cache, kept in a subfolder "
                   "ae-cache-* that a finished run deletes (default: a private folder under the temp dir)")
    r.add_argument("--retrain", choices=("auto", "always", "never"),
                   help="auto (default): reuse the published model unless there is none (or it cannot be read), "
                   "the model or input settings differ, --anomaly-steps turns anomaly scores on, or the "
                   "corpus changed by more than --retrain-fraction; never: reuse it however the corpus changed (a "
                   "model that does not fit the settings stops the run)")
    r.add_argument("--retrain-fraction", type=float, help="default 0.2")
    r.add_argument("--index-kind", choices=("auto", "flat", "hnsw", "ivf", "ivfpq"),
                   help="auto (default): exact search up to 200,000 vectors, then HNSW, IVF or IVF-PQ with "
                   "exact re-ranking, by the memory budget")
    r.add_argument("--index-memory-mb", type=int, help="memory budget of the index (default 4096)")
    r.add_argument("--recall-floor", type=float, help="approximate indexes under this recall@10 are "
                   "not published (default 0.95)")
    r.add_argument("--keep-runs", type=int, help="finished runs kept under OUTPUT/runs (default 3)")
    r.add_argument("--aws-credentials-block", metavar="NAME",
                   help="a prefect-aws AwsCredentials block to use for s3:// URLs")
    r.add_argument("--json", action="store_true", help="print the run's manifest as JSON")
    r.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs")
    r.set_defaults(func=cmd_run)

    block_help = "a prefect-aws AwsCredentials block to use for s3:// URLs (as `ae run` takes it)"
    i = sub.add_parser("info", help="what is published in OUTPUT")
    i.add_argument("output", help="the OUTPUT a run published to")
    i.add_argument("--json", action="store_true", help="print it as JSON, with the files' URLs")
    i.add_argument("--aws-credentials-block", metavar="NAME", help=block_help)
    i.set_defaults(func=cmd_info)

    n = sub.add_parser("neighbours", aliases=["neighbors"], help="nearest neighbours of a key or a new image")
    n.add_argument("output", help="the OUTPUT a run published to")
    q = n.add_mutually_exclusive_group(required=True)
    q.add_argument("--key", help="a key of the table (path relative to SOURCE)")
    q.add_argument("--image", help="a new image file or URL, encoded with the published model")
    n.add_argument("-k", type=int, default=10, help="neighbours to return (default 10)")
    n.add_argument("--json", action="store_true", help="print the neighbours as JSON")
    n.add_argument("--aws-credentials-block", metavar="NAME", help=block_help)
    n.set_defaults(func=cmd_neighbours)

    e = sub.add_parser("evaluate", help="AE vs PCA vs raw pixels on a labelled corpus")
    e.add_argument("source", help="folder or fsspec URL of the labelled images")
    _label_args(e)
    e.add_argument("--dims", default="10,32,64", help="comma-separated embedding sizes (default 10,32,64)")
    e.add_argument("--epochs", type=int, help="training epochs of each model (default: from corpus size)")
    e.add_argument("--max-minutes", type=float, help="training time budget of each model (default 5)")
    e.add_argument("--seed", type=int, help="default 0")
    e.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    e.add_argument("--aws-credentials-block", metavar="NAME", help=block_help)
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("probe", help="k-NN and logistic-regression accuracy of published embeddings")
    pr.add_argument("output", help="the OUTPUT a run published to")
    _label_args(pr)
    pr.add_argument("--json", action="store_true", help="print the accuracies as JSON")
    pr.add_argument("--aws-credentials-block", metavar="NAME", help=block_help)
    pr.set_defaults(func=cmd_probe)

    o = sub.add_parser("outliers", help="the worst-reconstructed images (highest anomaly scores)")
    o.add_argument("output", help="the OUTPUT a run published to")
    o.add_argument("-n", type=int, default=20, help="how many images (default 20)")
    o.add_argument("--by", choices=("anomaly_score", "recon_error"), default="anomaly_score",
                   help="anomaly_score (default): error under a model that never trained on the image; "
                        "recon_error: the published model's own error")
    o.add_argument("--grid", metavar="PNG", help="write a picture of them above their reconstructions")
    o.add_argument("--json", action="store_true", help="print them as JSON")
    o.add_argument("--aws-credentials-block", metavar="NAME", help=block_help)
    o.set_defaults(func=cmd_outliers)

    d = sub.add_parser("demo", help="embed scikit-learn's digits and show neighbours")
    d.add_argument("output", nargs="?", default="demo-out", help="folder for the corpus and result")
    d.add_argument("--epochs", type=int, help="training epochs (default: from corpus size)")
    d.set_defaults(func=cmd_demo)
    return p


# the settings whose flag is not the field's name with dashes
_FLAG_OF = {"memory_budget_mb": "--index-memory-mb", "kind": "--index-kind"}


def _run_flags() -> set[str]:
    """The options of `ae run`."""
    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    return {opt for action in run._actions for opt in action.option_strings}


def _validation_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = [str(x) for x in first.get("loc", ())]
    where = ".".join(loc)
    flag = _FLAG_OF.get(loc[-1], "--" + loc[-1].replace("_", "-")) if loc else None
    named = f" ({flag})" if flag in _run_flags() else ""
    return f"invalid setting {where}{named}: {first.get('msg')} (got {first.get('input')!r})"


def _use_block_credentials(block: str) -> dict:
    """For the commands that read a published result: the AwsCredentials block's s3 options as
    fsspec's defaults for s3:// in this process (fsspec.config.conf), so every store they open
    uses them. `ae run` hands them to the flow instead. Prefect's temporary server is started to
    read the block when no server is configured; it stops when the command ends (stopped at
    once, it missed the events Prefect sends on loading a block, and Prefect logged an ERROR).
    Returns fsspec's settings as they were, for main to put back: they last this command only."""
    import fsspec.config

    from flows.credentials import s3_options_from_block

    before = copy.deepcopy(fsspec.config.conf)
    _offline_prefect_env(False)
    server = _TemporaryServer.launch()  # stopped at exit, after Prefect has sent its events to it
    with _prefect_api(server):
        options = s3_options_from_block(block)
    for protocol, opts in options.items():
        merged = {**fsspec.config.conf.get(protocol, {}), **opts}
        if "client_kwargs" in opts:  # the block's endpoint or region, beside the user's other client settings
            merged["client_kwargs"] = {**fsspec.config.conf.get(protocol, {}).get("client_kwargs", {}),
                                       **opts["client_kwargs"]}
        fsspec.config.conf[protocol] = merged
    return before


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fsspec_conf = None
    try:
        if getattr(args, "aws_credentials_block", None) and args.func is not cmd_run:
            fsspec_conf = _use_block_credentials(args.aws_credentials_block)
        return args.func(args)
    except AeError as err:
        from ae_core.storage import redact_text

        print(f"ae: error: {redact_text(str(err))}", file=sys.stderr)
    except ValidationError as err:
        print(f"ae: error: {_validation_line(err)}", file=sys.stderr)
    except KeyboardInterrupt:
        return _interrupted()
    except FileNotFoundError as err:  # a published run's file gone: altered by hand, or pruned meanwhile
        quoted = re.search(r"'([^']+)'", str(err))  # Arrow's errors name the file only in the text
        what = err.filename or (quoted.group(1) if quoted else str(err))
        from ae_core.storage import redact_text

        print(f"ae: error: {redact_text(what)} is missing; if it belongs to a published run, its folder "
              "was altered or a newer run pruned it meanwhile: run the command again, or `ae run` again"
              + _kept_suffix(), file=sys.stderr)
    except BrokenPipeError:  # `ae info | head -1`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as err:  # a full disk where no stage named it (a temporary file, the report)
        from ae_core.storage import out_of_space

        if not out_of_space(err):
            raise
        print(f"ae: error: no space left on the disk ({err}); free space, or give --work-dir or OUTPUT on a larger "
              "disk" + _kept_suffix(), file=sys.stderr)
    finally:
        if fsspec_conf is not None:
            import fsspec.config

            fsspec.config.conf.clear()
            fsspec.config.conf.update(fsspec_conf)
    return 2


_STOPPING = (signal.SIGTERM, signal.SIGHUP)  # handled like Ctrl-C
_terminated_by = 0  # the signal of _STOPPING that arrived, if one did


def _in_finalizer(frame) -> bool:  # noqa: ANN001 - a frame
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (kill, a scheduler stopping the job) or SIGHUP (the terminal closed) unwinds like
    Ctrl-C, so every context closes: Prefect stops its temporary server (with the default
    handlers it was left running, orphaned) and marks the flow run; nothing unfinished is
    published. Ctrl-C (SIGINT) comes here too. A signal that lands while a `__del__` runs (the
    garbage collector finalising an asyncio transport, say) cannot stop the run from there:
    Python prints an exception raised in `__del__` and drops it, and the run went on to publish.
    It is sent again a moment later instead."""
    global _terminated_by
    if signum != signal.SIGINT:
        _terminated_by = signum
    if _in_finalizer(frame):
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    raise KeyboardInterrupt


def _sigterm_while_exiting(signum: int, frame: object) -> None:
    """After main() returned: the exit handlers (Prefect stopping its server) finish undisturbed,
    and the process ends with the signal's status."""
    global _exit_status, _terminated_by
    _terminated_by, _exit_status = signum, 128 + signum


def _interrupted() -> int:
    print(f"ae: {'terminated' if _terminated_by else 'interrupted'}" + _kept_suffix(), file=sys.stderr)
    return 128 + (_terminated_by or signal.SIGINT)


_exit_status = 1  # what the process returns if main() never comes back (an uncaught exception)


def _exit_without_finalizing() -> None:
    """The last exit handler: every other one has run (Prefect stops its temporary server in
    one) and the output is flushed; skip the interpreter's final collection of every module's
    objects, which after a run takes ~2 s on 2 cores and only frees memory the OS takes back anyway."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe (`ae ... | head`) or a closed stream
            pass
    try:  # what native libraries (faiss, OpenMP) wrote through C stdio
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
    os._exit(_exit_status)


def console_main() -> None:
    """The `ae` command (and `python -m ae_core.cli`): main(), then a fast exit."""
    global _exit_status
    atexit.register(_exit_without_finalizing)  # registered first, so it runs after all the others
    ours = []
    try:
        for sig in (*_STOPPING, signal.SIGINT):  # not if the parent chose to ignore one (nohup, &)
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(sig, _on_sigterm)
                ours.append(sig)
    except ValueError:  # not the main thread: no signal handlers there
        pass
    try:
        _exit_status = main()
    except SystemExit as stop:  # argparse's --help and usage errors
        _exit_status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:  # outside main's own handler (while parsing or importing)
        _exit_status = _interrupted()
    for sig in ours:
        signal.signal(sig, _sigterm_while_exiting)
    sys.exit(_exit_status)


if __name__ == "__main__":
    console_main()
