"""The layout of OUTPUT and atomic publishing.

    OUTPUT/LATEST                      one line: the published run's id
    OUTPUT/runs/<run-id>/manifest.json counts, configs, timings, lineage, file names
    OUTPUT/runs/<run-id>/embeddings.parquet
    OUTPUT/runs/<run-id>/rejects.parquet
    OUTPUT/runs/<run-id>/index.faiss
    OUTPUT/runs/<run-id>/model.pt
    OUTPUT/runs/<run-id>/source.parquet the source listing (key, size, tag) for the next run's diff

A run writes only inside its own folder; LATEST is replaced (atomically) after every file of the
run is complete, so readers always see a whole result: the new one or the previous one.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar

from fsspec.spec import AbstractFileSystem

from ae_core.errors import AeError
from ae_core.storage import (check_store, display_url, is_read_only, join, open_store, read_text, redact_url,
                             remove_tree, write_bytes_atomic)

LATEST = "LATEST"
RUNS = "runs"
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.parquet"
REJECTS = "rejects.parquet"
INDEX = "index.faiss"
CHECKPOINT = "model.pt"
SOURCE = "source.parquet"

# What reading a file whose bytes are damaged (truncated, emptied after a power loss, edited)
# raises: pyarrow's ArrowInvalid and json's errors are ValueErrors, torch's zip reader and faiss
# raise RuntimeError, torch's weights-only unpickler UnpicklingError; a manifest without an entry,
# KeyError or TypeError. A missing file stays a FileNotFoundError, and access errors OSErrors.
CONTENT_ERRORS = (ValueError, RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError)


def is_damage(err: BaseException) -> bool:
    """Whether reading a file raised because its bytes are damaged: CONTENT_ERRORS, or a bare
    OSError without an errno, which is how pyarrow reports a damaged page inside an intact file
    (a failed decompression, a page header it cannot parse); the stores' own I/O errors carry
    an errno, or are subclasses (FileNotFoundError, PermissionError)."""
    return isinstance(err, CONTENT_ERRORS) or (type(err) is OSError and err.errno is None)

T = TypeVar("T")


def new_run_id(now: datetime | None = None) -> str:
    """Sortable by time, unique across concurrent runs."""
    now = now or datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def run_path(root: str, run_id: str) -> str:
    return join(root, RUNS, run_id)


_RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]+$")


def publish(fs: AbstractFileSystem, root: str, run_id: str) -> None:
    """Point LATEST at a finished run (a single atomic replace)."""
    write_bytes_atomic(fs, join(root, LATEST), (run_id + "\n").encode())


def check_publishable(fs: AbstractFileSystem, root: str, run_id: str, planned_against: str | None,
                      names: list[str], output: str) -> None:
    """Refuse, with an AeError, to point LATEST at this run when another run into the same
    OUTPUT got in the way: one that started later was published while this one worked (LATEST
    is no longer `planned_against`, the run this one's plan read), so this result would replace
    a newer one; or files of this run are gone (a run publishing before it prunes unfinished
    runs that started earlier). Run ids sort by start time. Runs one after another (a queued
    deployment run) never conflict. This narrows the race to the moment between the check and
    the replace; it is not a lock."""
    try:
        current = latest_run_id(fs, root)
    except AeError:  # damaged: this run replaces it
        current = None
    if (current not in (planned_against, run_id) and current is not None and _RUN_ID.match(current)
            and current > run_id):
        raise AeError(f"run {run_id}: run {current}, which started after it, was published to {output!r} "
                      "while this run was working; nothing published (of two runs into one OUTPUT, "
                      "the later start wins; run again to publish this corpus state)")
    folder = run_path(root, run_id)
    fs.invalidate_cache(folder)
    try:
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
    except FileNotFoundError:
        present = set()
    missing = sorted(set(names) - present)
    if missing:
        raise AeError(f"run {run_id}: {', '.join(missing)} vanished from {output!r}/{RUNS}/{run_id} while "
                      "the run was working (another run into the same OUTPUT deletes unfinished runs that "
                      "started before it); nothing published, run again")


@dataclass(frozen=True)
class Published:
    """A published run, resolved through OUTPUT/LATEST."""

    fs: AbstractFileSystem
    root: str
    run_id: str
    manifest: dict

    @property
    def path(self) -> str:
        return run_path(self.root, self.run_id)

    def file(self, name: str) -> str:
        return join(self.path, name)

    def url(self, name: str) -> str:
        return display_url(self.fs, self.file(name))

    def shown(self, name: str) -> str:
        """The file's URL for messages: without any user:password@ of an http(s) OUTPUT."""
        return redact_url(self.url(name))

    def image_spec(self, spec):  # noqa: ANN001, ANN201 - a decode.Preprocess, from the run's checkpoint
        """The checkpoint's preprocessing with the pixel limit this run decoded its source under
        (`--max-image-pixels`): a reused model keeps the limit of the run that trained it, and a
        query must take and refuse the images the published table did."""
        limit = pixel_limit(self.manifest)
        return spec if limit is None else dataclasses.replace(spec, max_image_pixels=limit)

    def missing(self, name: str) -> AeError:
        return AeError(f"{self.shown(name)!r} is missing; its run's folder was altered, or a newer run pruned it "
                       "meanwhile: run the command again, or `ae run` again")

    def load(self, kind: str, read: Callable[..., T], *args: object) -> T:
        """`read(fs, path, *args)` of the run's file `kind` (a key of the manifest's "files").
        Damaged content is one AeError naming the file and the fix (a run replaces a damaged one)."""
        files = self.manifest.get("files") if isinstance(self.manifest, dict) else None
        name = files.get(kind) if isinstance(files, dict) else None
        if not isinstance(name, str):
            raise AeError(f"{self.shown(MANIFEST)!r} names no {kind} file, it is damaged; {RERUN}")
        try:
            return read(self.fs, self.file(name), *args)
        except FileNotFoundError as err:  # named here as a URL (s3fs's error names bucket/key only)
            raise self.missing(name) from err
        except (*CONTENT_ERRORS, OSError) as err:
            if not is_damage(err):
                raise
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise AeError(f"{self.shown(name)!r} cannot be read, it is damaged ({type(err).__name__}: {detail}); "
                          f"{RERUN}") from err


def pixel_limit(manifest: object) -> int | None:
    """The --max-image-pixels a published run decoded its source under, or None where its
    manifest does not say (an older version) or holds something else there. Pure."""
    config = manifest.get("config") if isinstance(manifest, dict) else None
    ingest = config.get("ingest") if isinstance(config, dict) else None
    limit = ingest.get("max_image_pixels") if isinstance(ingest, dict) else None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


RERUN = "run `ae run` into this output again: a run replaces a published run it cannot read"


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # what a run folder's name may be


class LatestDamaged(AeError):
    """OUTPUT's LATEST holds no run id; `problem` says what it holds, without the path or the fix."""

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


def latest_run_id(fs: AbstractFileSystem, root: str) -> str | None:
    """The run LATEST names, None without one; an AeError when its content is not a run id (zeros
    after a power loss, a path, stray text)."""
    try:
        text = read_text(fs, join(root, LATEST)).strip()
    except FileNotFoundError:
        return None
    except IsADirectoryError:  # a folder made there by hand
        text = "a folder"
    except UnicodeDecodeError:
        text = "\ufffd"
    if not _RUN_NAME.match(text):  # nothing (emptied by a power loss, say) included
        shown = redact_url(display_url(fs, join(root, LATEST)))
        if text == "a folder":  # neither a run nor a query can replace a folder: it has to go first
            raise AeError(f"{shown!r} is a folder: it should be a file holding the id of a run in {RUNS}/; "
                          f"move the folder out of OUTPUT, then run `ae run` again (it writes {LATEST}) or "
                          f"write the newest run's id into a file {LATEST}")
        problem = f"it should hold the id of a run in {RUNS}/ and holds {repr(text[:40]) if text else 'nothing'}"
        raise LatestDamaged(f"{shown!r} is damaged: {problem}; write the newest run's id into it, or run "
                            "`ae run` again (it replaces it)", problem)
    return text


def published_run(fs: AbstractFileSystem, root: str) -> tuple[str | None, dict | None]:
    """(the run LATEST names, its manifest as stored), (None, None) without a LATEST. Raises
    what reading them raises; `resolve` is the checked version for queries."""
    run_id = latest_run_id(fs, root)
    if run_id is None:
        return None, None
    return run_id, json.loads(read_text(fs, join(run_path(root, run_id), MANIFEST)))


def run_folder_holding(root: str, is_dir: Callable[[str], bool]) -> tuple[str, str] | None:
    """(the output, its run folder) when `root` is, or lies inside, an existing run folder of
    another output (OUTPUT/runs/<run id>): that output's retention deletes the folder, and
    whatever was published inside it, once newer runs replace it. None otherwise; `is_dir`
    asks the store only where the path has that shape."""
    parts = root.rstrip("/").split("/")
    for i in range(1, len(parts) - 1):
        if parts[i] == RUNS and _RUN_ID.match(parts[i + 1]):
            run = "/".join(parts[:i + 2])
            if is_dir(run):
                return "/".join(parts[:i]) or "/", run
    return None


def prune_runs(fs: AbstractFileSystem, root: str, keep: int, published: str,
               failed: dict[str, str] | None = None) -> list[str]:
    """Delete all but the newest `keep` finished runs, and unfinished runs older than the
    published one (left by crashed or killed runs). The published run is never deleted.
    Returns the deleted run ids; a run that cannot be deleted (another user's folder) is left,
    with why in `failed` (run id -> one line), and the others are still deleted."""
    runs_dir = join(root, RUNS)
    try:
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(runs_dir, detail=False))
    except FileNotFoundError:
        return []
    ids = sorted(n for n in names if _RUN_ID.match(n))  # a folder of the user's own there is not a run
    finished = [r for r in ids if fs.exists(join(runs_dir, r, MANIFEST))]
    kept = set(finished[-keep:]) | {published}
    doomed = [r for r in ids if r not in kept and (r in finished or r < published)]
    deleted = []
    for run_id in doomed:
        try:
            remove_tree(fs, join(runs_dir, run_id))
        except OSError as err:  # before: the first failure stopped the pruning for good, silently
            if failed is None:
                raise
            failed[run_id] = f"{type(err).__name__}: {err}"
            continue
        deleted.append(run_id)
    return deleted


def resolve(output: str) -> Published:
    """Open the run that OUTPUT/LATEST names, or fail with a message naming OUTPUT and the fix."""
    fs, root = open_store(output)
    shown = redact_url(output)  # a query may read an http(s) OUTPUT with user:password@: never in a message
    check_store(fs, root, shown, "output")  # unreachable, no bucket, access denied: one line
    try:
        run_id = latest_run_id(fs, root)
    except NotADirectoryError as err:  # a local file given as OUTPUT
        raise AeError(f"output {shown!r} is a file, not an output folder; give the folder "
                      "`ae run` wrote (it holds LATEST and runs/)") from err
    except OSError as err:  # access denied on the object, a dropped connection
        raise AeError(f"cannot read {LATEST} at {shown!r} ({type(err).__name__}: {err}); "
                      "check the credentials and the endpoint") from err
    if run_id is None:
        parent, _, name = root.rpartition(f"/{RUNS}/")
        if _RUN_ID.match(name) and fs.exists(join(root, MANIFEST)):  # the folder `ae run` printed
            raise AeError(f"{shown!r} is a run's folder, not an OUTPUT; give the OUTPUT it was "
                          f"published to, {redact_url(display_url(fs, parent))!r} (the queries read the run its {LATEST} names)")
        fix = (f"run `ae run SOURCE {shown}` first" if not is_read_only(fs)
               else "give the OUTPUT a run was published to (an http(s) store is read-only)")
        raise AeError(f"no published result at {shown!r} (no {LATEST} file); {fix}")
    try:
        manifest = json.loads(read_text(fs, join(run_path(root, run_id), MANIFEST)))
    except FileNotFoundError as err:
        raise AeError(f"{shown!r}: {LATEST} names run {run_id!r} but its manifest is missing; "
                      "the folder was altered by hand, rerun `ae run`") from err
    except ValueError as err:  # not JSON, not UTF-8: damaged
        raise AeError(f"{shown!r}: the manifest of run {run_id!r} is damaged ({err}); rerun `ae run`") from err
    problem = manifest_problem(manifest)
    if problem:
        raise AeError(f"{shown!r}: the manifest of run {run_id!r} is damaged ({problem}); {RERUN}")
    return Published(fs, root, run_id, manifest)


# what the queries read from every manifest, with its JSON type
_MANIFEST_FIELDS = {"files": dict, "rows": int, "rejected": int, "dim": int, "image_size": int, "channels": int,
                    "model_version": str, "source": str}
_MANIFEST_FILES = ("embeddings", "rejects", "index", "checkpoint")
# optional (older versions wrote fewer), but objects where present: the commands read into them
_MANIFEST_OBJECTS = ("config", "quality", "index", "train", "changes", "timings_s", "rejects_by_reason")


def manifest_problem(manifest: object) -> str | None:
    """What is wrong with a manifest that parsed as JSON (not an object, a field missing or of
    another type), or None. Pure."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    for name, kind in _MANIFEST_FIELDS.items():
        value = manifest.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{name!r} is missing or not of type {kind.__name__}"
    for name in _MANIFEST_OBJECTS:
        if name in manifest and not isinstance(manifest[name], dict):
            return f"{name!r} is not an object"
    if "model" in manifest.get("config", {}) and not isinstance(manifest["config"]["model"], dict):
        return "'config.model' is not an object"
    missing = [k for k in _MANIFEST_FILES if not isinstance(manifest["files"].get(k), str)]
    return f"'files' names no {', '.join(missing)}" if missing else None
