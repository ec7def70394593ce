"""The pipeline's stages as plain functions: list, plan, decode, pretrain, encode, index, publish.

`flows/pretrain_and_embed.py` wraps each as a Prefect task and only orders them. Every stage
writes inside OUTPUT/runs/<run-id>/; only `publish_run` touches OUTPUT/LATEST, and it runs last.
`plan_run` compares the source with the published run: with the model reused, only new and
changed objects are decoded and encoded, and the other rows are carried over.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import numpy as np
import torch
from fsspec.spec import AbstractFileSystem
from tqdm.auto import tqdm

import ae_core
import pyarrow as pa
import pyarrow.compute as pc

from ae_core import checkpoint, index as ae_index, outputs, report, table
from ae_core.config import ModelConfig, RunConfig, TrainConfig
from ae_core.decode import DECOMPRESSION_BOMB, Preprocess
from ae_core.encode import anomaly_quantiles, anomaly_scores, encode_pixels, folds_of, median_ratio
from ae_core.errors import AeError
from ae_core.incremental import (SourceDiff, anomaly_mismatch, compatible, diff_listing, listing_from_table,
                                 retrain_decision, source_table)
from ae_core.ingest import READ_ERROR, DecodedCorpus, ShardedPixels, decode_corpus, nothing_decoded
from ae_core.model import AEArch
from ae_core.plan import probe_corpus, resolve_model_config
from ae_core.quality import pca_comparison
from ae_core.storage import (ObjectInfo, check_local_writable, check_store, check_store_writable, display_url,
                             is_local, join, list_objects, open_store, put_file_atomic, redact_url, refuse_password,
                             remove_tree, same_or_inside, underlying, write_bytes_atomic)
from ae_core.train import split_indices, train_autoencoder, train_fold_results


@dataclass
class RunContext:
    """Where one run reads and writes; built by `prepare_run` before anything is written."""

    config: RunConfig
    run_id: str
    src_fs: AbstractFileSystem
    src_root: str
    out_fs: AbstractFileSystem
    out_root: str
    work_dir: str
    timings: dict[str, float] = field(default_factory=dict)
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def run_dir(self) -> str:
        return outputs.run_path(self.out_root, self.run_id)

    def out(self, name: str) -> str:
        return join(self.run_dir, name)

    @contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - t0, 3)


def cache_dir(parent: str, source: str, output: str) -> str:
    """The pixel cache of one (source, output) pair: a folder of its own inside `parent` (the
    work dir), keyed by the resolved locations (`imgs` in two folders are two sources), so a
    rerun finds its cached shards and no other run's. A finished run deletes this folder only,
    never the work dir the user named."""
    return os.path.join(parent, "ae-cache-" + hashlib.sha1(f"{source}\n{output}".encode()).hexdigest()[:16])


def _private_work_dir() -> str:
    """The default work dir: a folder of the user's own under the temp dir (mode 700: the cache
    holds decoded private images), refused if someone else made it or it is a link."""
    parent = os.path.join(tempfile.gettempdir(), f"ae-embed-work-{os.getuid()}" if hasattr(os, "getuid") else "ae-embed-work")
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        st = os.lstat(parent)
    except OSError:
        return parent  # check_local_writable says why, in one line
    if hasattr(os, "getuid") and (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()):
        raise AeError(f"work dir {parent!r} is not a folder of your own (a link, or made by another user); "
                      "remove it, or pass --work-dir")
    if st.st_mode & 0o077:
        os.chmod(parent, 0o700)
    return parent


def _work_dir_parent(value: str) -> str:
    """--work-dir as an absolute local path: a plain path, or a file:// URL (before: taken for a
    folder named 'file:'); another URL is refused, as the cache is memory-mapped from local disk."""
    if value.lower().startswith("file://"):
        value = value[len("file://"):]
    elif "://" in value:
        raise AeError(f"work dir {redact_url(value)!r} is not a local folder; give a local path (the pixel "
                      "cache is memory-mapped from local disk), e.g. --work-dir /var/tmp/ae-work")
    if not value.strip():  # before: '' was the default and 'file://' the current directory
        raise AeError("work dir is empty; give a local folder, or leave --work-dir (the flow's work_dir) out "
                      "for a private one under the temp dir")
    return os.path.abspath(os.path.expanduser(value))


def prepare_run(config: RunConfig, storage_options: Mapping[str, dict] | None = None,
                run_id: str | None = None) -> RunContext:
    """Open both stores and check them; writes nothing.

    `storage_options` (protocol -> fsspec options) carries credentials that must not live in the
    config, which is stored in every manifest.
    """
    for role, url in (("source", config.source), ("output", config.output)):
        if not url.strip():  # fsspec would take it for the working directory (a worker's checkout)
            raise AeError(f"{role} is empty; give a folder or an fsspec URL such as s3://bucket/prefix")
    src_url, out_url = redact_url(config.source), redact_url(config.output)
    refuse_password(config.source, "source")
    refuse_password(config.output, "output")
    src_fs, src_root = open_store(config.source, storage_options)
    out_fs, out_root = open_store(config.output, storage_options)
    check_store(src_fs, src_root, src_url, "source")
    check_store(out_fs, out_root, out_url, "output")
    if same_or_inside(out_fs, out_root, src_fs, src_root):
        raise AeError(f"output {out_url!r} lies inside source {src_url!r}; choose an output "
                      "outside the source so results are never read back as images")
    if not underlying(src_fs).isdir(src_root):  # simplecache:: answers False for an http folder
        what = "a file, not a folder" if src_fs.exists(src_root) else "missing"
        raise AeError(f"source {src_url!r} is {what}; give the folder or prefix that holds the images")
    if out_fs.exists(out_root) and not out_fs.isdir(out_root):
        raise AeError(f"output {out_url!r} is a file; give a folder or prefix")
    base = underlying(out_fs)
    if held := outputs.run_folder_holding(os.path.realpath(out_root) if is_local(base) else out_root, base.isdir):
        owner, run = (redact_url(display_url(base, p)) for p in held)
        raise AeError(f"output {out_url!r} lies inside {run!r}, a run folder of output {owner!r}, which that "
                      f"output's next runs may delete (it keeps the newest --keep-runs); give a folder outside "
                      f"{owner.rstrip('/')}/{outputs.RUNS}")
    if is_local(out_fs):
        check_local_writable(out_root, "output")
        if os.path.isdir(join(out_root, outputs.LATEST)):  # where publishing writes the pointer
            raise AeError(f"output {out_url!r} holds a folder named {outputs.LATEST}, where a run records which "
                          "run is published; move that folder out of OUTPUT")
        # where the run's folder goes: OUTPUT/runs made by another user passed the check above,
        # and the run failed with a traceback after training
        check_local_writable(join(out_root, outputs.RUNS), "output")
    else:
        check_store_writable(out_fs, out_root, out_url, "output")
    parent = _work_dir_parent(config.work_dir) if config.work_dir is not None else _private_work_dir()
    if is_local(underlying(src_fs)) and same_or_inside(underlying(src_fs), os.path.realpath(parent), src_fs,
                                                       os.path.realpath(src_root)):
        raise AeError(f"work dir {parent!r} lies inside source {src_url!r}; choose one outside (--work-dir), "
                      "or the cached pixels would be read back as images")
    check_local_writable(parent, "work dir")
    work_dir = cache_dir(parent, display_url(src_fs, src_root), display_url(out_fs, out_root))
    return RunContext(config, run_id or outputs.new_run_id(), src_fs, src_root, out_fs, out_root, work_dir)


_CLAIMED: dict[str, int] = {}  # pixel cache folder -> descriptor of its held lock file, in this process


def _try_lock(folder: str) -> bool:
    """An exclusive flock on `folder`/.lock, held until released or this process ends (a crash
    releases it too). True when this process holds it."""
    if folder in _CLAIMED:
        return True
    path = os.path.join(folder, ".lock")
    for _ in range(10):
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # the folder was deleted in between (a run finishing): again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        try:  # the lock is worth something only on the file that is still at `path`
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                _CLAIMED[folder] = fd
                return True
        except FileNotFoundError:
            pass
        os.close(fd)  # a run finishing deleted it after this open: lock the new one
    return False


def claim_work_dir(ctx: RunContext) -> RunContext:
    """Hold the (SOURCE, OUTPUT) pixel cache for this run. When another live run holds it (two
    runs of the same pair at once: a scheduled run and a manual one), this run decodes into a
    cache of its own beside it instead, so neither deletes or rewrites the shards the other
    reads; which of the two publishes is settled at publishing (outputs.check_publishable)."""
    if _try_lock(ctx.work_dir):
        mark_cache_in_use(ctx)  # its age counts from its last run
        _remove_stale_caches(ctx.work_dir)
        return ctx
    own = f"{ctx.work_dir}-{ctx.run_id}"
    _try_lock(own)
    return dataclasses.replace(ctx, work_dir=own)


def mark_cache_in_use(ctx: RunContext) -> None:
    """Touch the pair's cache folder, where one is left, as a run of the pair starts: it holds the
    cache's lock only from decoding on, and while it lists and plans another pair's run could
    otherwise find the folder 7 days unused and delete it (_remove_stale_caches)."""
    with suppress(OSError):
        os.utime(ctx.work_dir)


SIBLING_MIN_AGE_S = 600.0  # a cache beside this pair's, named with a run id: its run may still be making it
CACHE_EXPIRY_S = 7 * 86400.0  # another pair's cache unused this long: its run failed and was not run again
_CACHE_NAME = re.compile(r"ae-cache-[0-9a-f]{16}(-.+)?")


def _remove_stale_caches(folder: str) -> None:
    """Delete, in the work dir that holds `folder` (this pair's cache), the caches that no run
    will use again: those of runs that decoded beside `folder` while it was held and then died
    (a later run never resumes them: their names hold a run id), once SIBLING_MIN_AGE_S old; and
    any other pair's cache (pixels, a kept model) unused for CACHE_EXPIRY_S, which only a run
    that failed and was never run again leaves (a published run deletes its own). A cache is
    left alone while its lock is held; nothing else in the work dir is touched."""
    parent, name = os.path.split(folder)
    for entry in os.scandir(parent):
        if entry.path == folder or not _CACHE_NAME.fullmatch(entry.name):
            continue
        min_age_s = SIBLING_MIN_AGE_S if entry.name.startswith(name + "-") else CACHE_EXPIRY_S
        try:
            if not entry.is_dir(follow_symlinks=False) or \
                    time.time() - entry.stat(follow_symlinks=False).st_mtime < min_age_s or not _try_lock(entry.path):
                continue
        except OSError:
            continue
        release_work_dir(entry.path)


def release_work_dir(folder: str) -> None:
    """Delete a run's pixel cache and let go of its lock (the cache only serves a resumed run)."""
    shutil.rmtree(folder, ignore_errors=True)
    fd = _CLAIMED.pop(folder, None)
    if fd is not None:
        os.close(fd)


def list_source(ctx: RunContext) -> list[ObjectInfo]:
    ing = ctx.config.ingest
    with ctx.timed("list"):
        # OUTPUT is never inside SOURCE (prepare_run), but a symlinked folder may lead into it;
        # SOURCE may lie inside OUTPUT (photos/ beside runs/), and then only runs/ is the output's
        skip = ctx.out_root if type(underlying(ctx.src_fs)) is type(underlying(ctx.out_fs)) else None
        if skip and same_or_inside(ctx.src_fs, ctx.src_root, ctx.out_fs, ctx.out_root):
            skip = join(ctx.out_root, outputs.RUNS)
        objects = sorted(list_objects(ctx.src_fs, ctx.src_root, ing.include, ing.exclude, skip), key=lambda o: o.key)
    if not objects:
        raise AeError(f"source {redact_url(ctx.config.source)!r} holds no objects"
                      + (" matching the include/exclude patterns" if ing.include or ing.exclude else "")
                      + "; check the path or the patterns")
    return objects


@dataclass
class PreviousRun:
    run_id: str
    manifest: dict
    listing: dict[str, tuple[int, str]]
    checkpoint_bytes: bytes
    ckpt: checkpoint.Checkpoint
    read_failed: frozenset[str] = frozenset()  # keys whose read failed (reject reason read_error)
    too_large: frozenset[str] = frozenset()  # keys rejected as decompression bombs


@dataclass
class RunPlan:
    """What this run will do; decided before any heavy work."""

    retrain: bool
    reason: str
    model: ModelConfig  # fully resolved: image_size and channels set
    spec: Preprocess
    to_decode: list[ObjectInfo]
    objects: list[ObjectInfo]
    diff: SourceDiff | None = None
    previous: PreviousRun | None = None
    carried: dict[str, pa.Table] | None = None  # kind -> published rows of unchanged objects

    def counts(self) -> dict:
        base = self.diff.counts() if self.diff else {"new": len(self.objects), "changed": 0, "unchanged": 0,
                                                     "deleted": 0, "retried": 0, "rechecked": 0}
        return {**base, "decoded": len(self.to_decode), "retrained": self.retrain,
                "retrain_reason": self.reason}


class DamagedRun(Exception):
    """The published run's files cannot be read: this run starts afresh and replaces it."""


def _damaged(run_id: str, name: str, err: BaseException) -> DamagedRun:
    return DamagedRun(f"the published run {run_id}'s {name} cannot be read ({type(err).__name__}); starting afresh")


def _read_published(ctx: RunContext, previous: PreviousRun, kind: str, columns: list[str] | None = None) -> pa.Table:
    """A table of the published run; a DamagedRun when its bytes are damaged (a page inside an
    intact file: reading the schema alone, as load_previous does, does not find it)."""
    name = previous.manifest["files"][kind]
    try:
        return table.read_table(ctx.out_fs, join(outputs.run_path(ctx.out_root, previous.run_id), name), columns)
    except (*outputs.CONTENT_ERRORS, OSError) as err:
        if not outputs.is_damage(err):
            raise
        raise _damaged(previous.run_id, name, err) from err


def _carried_tables(ctx: RunContext, previous: PreviousRun, diff: SourceDiff,
                    kinds: tuple[str, ...] = ("embeddings", "rejects")) -> dict[str, pa.Table]:
    """The published rows of unchanged objects, to carry over: read when the run plans, so a
    damaged table sends the run to start afresh instead of failing after decoding."""
    keep = pa.array([o.key for o in diff.unchanged], pa.string())
    out = {}
    for kind in kinds:
        prev = _read_published(ctx, previous, kind)
        out[kind] = prev.filter(pc.is_in(prev.column("key"), value_set=keep))
    return out


def load_previous(ctx: RunContext) -> PreviousRun | None:
    """The published run in OUTPUT, if it records its source listing (needed for a diff). A
    DamagedRun when a file it needs is unreadable (truncated, emptied after a power loss, edited)."""
    try:
        run_id = outputs.latest_run_id(ctx.out_fs, ctx.out_root)
    except outputs.LatestDamaged as err:  # nothing to diff against; this run starts afresh and replaces it
        raise DamagedRun(f"{outputs.LATEST} cannot be read ({err.problem}); starting afresh") from err
    if run_id is None:
        return None
    run_dir = outputs.run_path(ctx.out_root, run_id)
    name = outputs.MANIFEST
    try:
        manifest = json.loads(ctx.out_fs.cat_file(join(run_dir, name)))
        problem = outputs.manifest_problem(manifest)
        if problem:
            raise ValueError(problem)
        name = outputs.SOURCE
        listing = listing_from_table(table.read_table(ctx.out_fs, join(run_dir, name)))
        name = manifest["files"]["checkpoint"]
        data = ctx.out_fs.cat_file(join(run_dir, name))
        ckpt = checkpoint.from_bytes(data)
        name = manifest["files"]["rejects"]
        rejects = table.read_table(ctx.out_fs, join(run_dir, name), ["key", "reason"])
        name = manifest["files"]["embeddings"]  # its rows are carried over when the model is reused
        table.read_schema(ctx.out_fs, join(run_dir, name))
    except FileNotFoundError:
        return None
    except (*outputs.CONTENT_ERRORS, OSError) as err:
        if not outputs.is_damage(err):
            raise
        raise _damaged(run_id, name, err) from err
    def keys(reason: str) -> frozenset[str]:
        return frozenset(rejects.filter(pc.equal(rejects.column("reason"), reason)).column("key").to_pylist())

    return PreviousRun(run_id, manifest, listing, data, ckpt, keys(READ_ERROR), keys(DECOMPRESSION_BOMB))


def _probe_model(ctx: RunContext, objects: list[ObjectInfo]) -> ModelConfig:
    model = ctx.config.model
    if model.image_size is not None and model.channels is not None:
        return model
    with ctx.timed("probe"):
        probe = probe_corpus(ctx.src_fs, objects, ctx.config.ingest.max_image_pixels)
    return resolve_model_config(model, probe)


def _rows_over(ctx: RunContext, previous: PreviousRun, limit: int) -> frozenset[str]:
    """Keys of the published rows whose images have more than `limit` pixels."""
    rows = _read_published(ctx, previous, "embeddings", ["key", "width", "height"])
    pixels = pc.multiply(rows.column("width").cast(pa.int64()), rows.column("height").cast(pa.int64()))
    return frozenset(rows.filter(pc.greater(pixels, limit)).column("key").to_pylist())


def plan_run(ctx: RunContext, objects: list[ObjectInfo]) -> RunPlan:
    """Retrain on everything, or reuse the published model and decode only what changed."""
    cfg = ctx.config
    ae_index.check_trainable(cfg.index.kind, len(objects))  # at most this many vectors: before training
    limit = cfg.ingest.max_image_pixels
    with ctx.timed("plan"):
        try:
            previous, diff, carried = load_previous(ctx), None, None
            why_not = None
            if previous:
                # read again: failed reads; images over the pixel limit when the limit the published
                # run rejected them under has changed; under a lower limit, its rows now over it
                rejected_under = outputs.pixel_limit(previous.manifest)
                again = previous.read_failed | (previous.too_large if rejected_under != limit else frozenset())
                if rejected_under is None or limit < rejected_under:
                    again |= _rows_over(ctx, previous, limit)
                diff = diff_listing(previous.listing, objects, again)
                why_not = compatible(cfg.model, cfg.ingest, previous.ckpt.model.arch, previous.ckpt.preprocess)
                if why_not is None and cfg.train.retrain != "never":  # never: reuse, anomaly_score stays null
                    why_not = anomaly_mismatch(cfg.train.anomaly_steps, previous.ckpt.extra.get("train", {}).get("anomaly_steps"),
                                               bool(previous.ckpt.anomaly_models))
            retrain, reason = retrain_decision(cfg.train, diff, why_not)
            if previous and not retrain:
                carried = _carried_tables(ctx, previous, diff)
        except DamagedRun as err:  # nothing of it can be reused: start afresh, as without one
            previous, diff, carried = None, None, None
            retrain, reason = True, str(err)
    if retrain or previous is None:
        model = _probe_model(ctx, objects)
        spec = Preprocess(image_size=model.image_size, channels=model.channels,
                          resize=cfg.ingest.resize, max_image_pixels=cfg.ingest.max_image_pixels)
        return RunPlan(True, reason, model, spec, objects, objects, diff, previous)
    arch = previous.ckpt.model.arch
    model = cfg.model.model_copy(update={"dim": arch.dim, "image_size": arch.image_size,
                                         "channels": arch.channels, "width": arch.width,
                                         "blocks_per_stage": arch.blocks_per_stage})
    spec = dataclasses.replace(previous.ckpt.preprocess, max_image_pixels=limit)  # a filter, not the model's
    to_decode = [*diff.new, *diff.changed, *diff.retried, *diff.rechecked]
    return RunPlan(False, reason, model, spec, to_decode, objects, diff, previous, carried)


def decode_source(ctx: RunContext, plan: RunPlan) -> DecodedCorpus:
    """Decode the objects the plan names into cached uint8 shards (reused after a crash)."""
    ing = ctx.config.ingest
    with ctx.timed("decode"), tqdm(total=len(plan.to_decode), desc="decode", unit="img", disable=None) as bar:
        return decode_corpus(plan.to_decode, ctx.src_fs, plan.spec, ctx.work_dir,
                             ing.shard_size, ing.read_batch, ing.workers, bar.update)


def check_vectors(ctx: RunContext, corpus: DecodedCorpus, plan: RunPlan) -> None:
    """Refuse, once decoding has counted the vectors and before anything trains or is written, a
    run with nothing to publish (no image decoded, none carried over) or whose index cannot be
    built: no kind fits the memory budget, or IVF-PQ has too few vectors. Later stages would
    raise the same AeError after training and encoding. The count is exact here (the decoded
    images plus the rows carried over), where the listing only bounds it."""
    carried = plan.carried.get("embeddings") if plan.carried else None
    if carried is None and not plan.retrain and plan.previous is not None:
        return  # the carried rows were handed to encoding already: encoding and the index count them
    n = len(corpus) + (carried.num_rows if carried is not None else 0)
    if n == 0:
        old = plan.carried.get("rejects") if plan.carried else None
        raise nothing_decoded(redact_url(ctx.config.source), corpus.rejects + (old.to_pylist() if old else []))
    ae_index.choose_index(n, plan.model.dim, ctx.config.index.memory_budget_mb << 20, ctx.config.index.kind)


def pretrain(ctx: RunContext, corpus: DecodedCorpus, plan: RunPlan) -> checkpoint.Checkpoint:
    """Train on every decoded image and write the checkpoint into the run folder; or reuse the
    published model, as planned; or pick up the checkpoint that an earlier attempt of this run
    (or a pretrain stage on a GPU pool) already wrote there. First, check_vectors."""
    check_vectors(ctx, corpus, plan)
    if not plan.retrain and plan.previous is not None:
        with ctx.timed("pretrain"):
            write_bytes_atomic(ctx.out_fs, ctx.out(outputs.CHECKPOINT), plan.previous.checkpoint_bytes)
        return plan.previous.ckpt
    done = load_stage_checkpoint(ctx.out_fs, ctx.run_dir)
    if done is not None:
        return done
    images = corpus.images
    key = kept_model_key(images, corpus.spec, plan.model, ctx.config.train)
    with ctx.timed("pretrain"):
        kept = kept_model(ctx.work_dir, key, ctx.run_id) if ctx.config.train.retrain != "always" else None
        if kept is not None:  # trained by an earlier run of this pair (or attempt of this run) that stopped
            data, ckpt = kept
        else:
            ckpt, data = train_checkpoint(corpus.pixels(), corpus.spec, plan.model, ctx.config.train, ctx.run_id,
                                          [img["key"] for img in images])
            keep_model(ctx.work_dir, key, data, ctx.run_id)  # first: the store may be what fails next
        write_bytes_atomic(ctx.out_fs, ctx.out(outputs.CHECKPOINT), data)
    return ckpt


def load_stage_checkpoint(fs: AbstractFileSystem, run_dir: str) -> checkpoint.Checkpoint | None:
    """The checkpoint already in this run's folder, if a completed pretrain stage wrote it."""
    path = join(run_dir, outputs.CHECKPOINT)
    if not fs.exists(path):
        return None
    ckpt = checkpoint.from_bytes(fs.cat_file(path))
    ckpt.extra.setdefault("train", {})["resumed_from_stage"] = True
    return ckpt


def split_fingerprint(keys: Sequence[str], train: TrainConfig) -> dict:
    """What fixes the held-out rows of a model trained on images `keys` (in that order): the
    quality comparison on held-out images is made only for the corpus the model trained on. Pure."""
    return {"images": len(keys), "val_fraction": train.val_fraction, "seed": train.seed,
            "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()}


def train_and_save(fs: AbstractFileSystem, run_dir: str, pixels: np.ndarray, spec: Preprocess,
                   model: ModelConfig, train: TrainConfig, run_id: str, keys: list[str]) -> checkpoint.Checkpoint:
    """Train an autoencoder of the resolved `model` shape, and the two fold models behind
    anomaly_score, and write them all into `run_dir`/model.pt."""
    ckpt, data = train_checkpoint(pixels, spec, model, train, run_id, keys)
    write_bytes_atomic(fs, join(run_dir, outputs.CHECKPOINT), data)
    return ckpt


def train_checkpoint(pixels: np.ndarray, spec: Preprocess, model: ModelConfig, train: TrainConfig,
                     run_id: str, keys: list[str]) -> tuple[checkpoint.Checkpoint, bytes]:
    """train_and_save's training: the checkpoint and its bytes, written nowhere."""
    arch = AEArch(dim=model.dim, image_size=model.image_size, channels=model.channels,
                  width=model.width, blocks_per_stage=model.blocks_per_stage)
    with tqdm(desc="pretrain", unit="epoch", disable=None) as bar:
        def on_epoch(rec: dict) -> None:
            bar.update(1)
            bar.set_postfix(train=f"{rec['train_mse']:.5f}", val=f"{rec['val_mse'] or 0:.5f}")
        result = train_autoencoder(pixels, arch, train, on_epoch)
    t0 = time.perf_counter()
    fold_of = folds_of(keys)
    folds = train_fold_results(pixels, fold_of, arch, train)
    fold_models = [f.model for f in folds]
    quantiles = anomaly_quantiles(fold_models, pixels, fold_of, train.batch_size)  # a batch that fits where it trained
    summary = {**result.summary(), "anomaly_steps": train.anomaly_steps, "anomaly_models": len(fold_models),
               "anomaly_seconds": round(time.perf_counter() - t0, 2),
               "anomaly_steps_run": [f.steps for f in folds], "anomaly_stop_reasons": [f.stop_reason for f in folds],
               # how far apart the two models' held-out errors were before calibration (1 = alike)
               "anomaly_median_ratio": median_ratio(quantiles),
               "split": split_fingerprint(keys, train)}
    extra = {"train": summary, "run_id": run_id}
    data, version = checkpoint.to_bytes(result.model, spec, extra, fold_models, quantiles)
    return checkpoint.Checkpoint(result.model, spec, version, extra, fold_models, quantiles), data


# ---- a trained model kept beside the pixel cache until its run publishes ----------------------
# A run that stops after training (the store gone while it encodes, a kill, a verdict on the
# index) leaves its model here; the next run of the same (SOURCE, OUTPUT) pair with the same
# images and settings reuses it instead of training again. Publishing deletes it with the cache.
# Not on the GPU-pool path (pretrain_deployment): the pool's model is picked up from the run
# folder, and only a retry of the same flow run resumes it.
KEPT_MODEL, KEPT_RECORD = "kept-model.pt", "kept-model.json"
# (cache folder, run id) of the models kept or reused in this process, newest last: which folder
# holds the model of a run that just stopped, for its error line (ae_core.cli)
KEPT_IN_PROCESS: list[tuple[str, str]] = []


@functools.cache
def code_digest() -> str:
    """A digest of ae_core's own source files: a kept model from other code is not reused (the
    package version does not move with each change to training or encoding)."""
    h = hashlib.sha256()
    for path in sorted(Path(ae_core.__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def kept_model_key(images: Sequence[dict], spec: Preprocess, model: ModelConfig, train: TrainConfig) -> str:
    """What a kept model must have been trained on to stand in for training now: the same decoded
    images (keys and content digests, in table order), preprocessing, model shape and every
    training setting, by the same code and torch."""
    h = hashlib.sha256()
    for img in images:
        h.update(f"{img['key']}\0{img.get('fingerprint')}\n".encode())
    h.update(json.dumps({"spec": spec.to_dict(), "model": model.model_dump(mode="json"),
                         # not retrain/retrain_fraction: they choose whether to train, not how
                         "train": train.model_dump(mode="json", exclude={"retrain", "retrain_fraction"}),
                         "format": checkpoint.FORMAT, "code": code_digest(), "torch": torch.__version__},
                        sort_keys=True).encode())
    return h.hexdigest()


def keep_model(work_dir: str, key: str, data: bytes, run_id: str) -> None:
    """Keep a just-trained checkpoint in the pixel cache folder: the bytes first, then the record
    that names them (a crash between the two leaves a model no record points at). Best effort: a
    full disk here costs a rerun its shortcut, never this run."""
    record = {"key": key, "run_id": run_id, "version": checkpoint.version_of(data),
              "saved_at": datetime.now(timezone.utc).isoformat()}
    local = fsspec.filesystem("file")
    try:
        os.makedirs(work_dir, mode=0o700, exist_ok=True)
        with suppress(FileNotFoundError):
            os.unlink(os.path.join(work_dir, KEPT_RECORD))  # never a record beside another run's bytes
        write_bytes_atomic(local, os.path.join(work_dir, KEPT_MODEL), data)
        write_bytes_atomic(local, os.path.join(work_dir, KEPT_RECORD), json.dumps(record).encode())
    except (OSError, AeError):  # AeError: the disk is full
        return
    KEPT_IN_PROCESS.append((work_dir, run_id))


def kept_record(work_dir: str) -> dict | None:
    """The record of the model kept in `work_dir`, or None (none kept, or unreadable)."""
    try:
        with open(os.path.join(work_dir, KEPT_RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def kept_model(work_dir: str, key: str, run_id: str) -> tuple[bytes, checkpoint.Checkpoint] | None:
    """The kept model's bytes and checkpoint when it was trained for `key`, marked with the run
    that trained it (train.resumed_from_run; resumed_from_stage where that was an earlier attempt
    of `run_id` itself); None otherwise, or when its bytes are not the ones the record names (a
    damaged file is trained again, not trusted)."""
    record = kept_record(work_dir)
    if record is None or record.get("key") != key:
        return None
    try:
        with open(os.path.join(work_dir, KEPT_MODEL), "rb") as f:
            data = f.read()
        if checkpoint.version_of(data) != record.get("version"):
            return None
        ckpt = checkpoint.from_bytes(data)
    except (OSError, ValueError, RuntimeError):
        return None
    trained_by = str(record.get("run_id"))
    if trained_by == run_id:  # a retry of this flow run whose first attempt could not write model.pt
        ckpt.extra.setdefault("train", {})["resumed_from_stage"] = True
    else:
        ckpt.extra.setdefault("train", {})["resumed_from_run"] = trained_by
    KEPT_IN_PROCESS.append((work_dir, trained_by))
    return data, ckpt


# ---- the pretrain stage on another work pool (GPU workers) ------------------------------------
STAGE_DIR = "stage"


def stage_pixels(ctx: RunContext, corpus: DecodedCorpus, plan: RunPlan) -> str:
    """Copy the decoded pixels into the run folder so a pretrain stage elsewhere can read them."""
    stage = join(ctx.run_dir, STAGE_DIR)
    with ctx.timed("stage"):
        shards = [s for s in corpus.shards if s.pixels_path]
        for i, shard in enumerate(shards):
            put_file_atomic(ctx.out_fs, shard.pixels_path, join(stage, f"pixels-{i:05d}.npy"))
        meta = {"spec": corpus.spec.to_dict(), "model": plan.model.model_dump(mode="json"),
                "train": ctx.config.train.model_dump(mode="json"), "shards": len(shards),
                "keys": [img["key"] for img in corpus.images]}
        write_bytes_atomic(ctx.out_fs, join(stage, "stage.json"), json.dumps(meta).encode())
    return display_url(ctx.out_fs, stage)


def remove_stage(ctx: RunContext) -> None:
    """Delete the pixels staged in the run folder for a pretrain stage elsewhere, if any: after
    publishing, or when the stage refused them."""
    if ctx.out_fs.exists(ctx.out(STAGE_DIR)):
        remove_tree(ctx.out_fs, ctx.out(STAGE_DIR))


def pretrain_from_stage(run_url: str, run_id: str,
                        storage_options: Mapping[str, dict] | None = None) -> str:
    """Run by the pretrain stage's own flow (on a GPU pool): read the staged pixels from the run
    folder, train, write model.pt beside them. Returns the model version."""
    fs, run_dir = open_store(run_url, storage_options)
    done = load_stage_checkpoint(fs, run_dir)
    if done is not None:
        return done.version
    stage = join(run_dir, STAGE_DIR)
    meta = json.loads(fs.cat_file(join(stage, "stage.json")))
    spec = Preprocess(**meta["spec"])
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(meta["shards"]):
            paths.append(os.path.join(tmp, f"pixels-{i:05d}.npy"))
            fs.get_file(join(stage, f"pixels-{i:05d}.npy"), paths[-1])
        pixels = ShardedPixels(paths, (spec.channels, spec.image_size, spec.image_size))
        ckpt = train_and_save(fs, run_dir, pixels, spec, ModelConfig(**meta["model"]),
                              TrainConfig(**meta["train"]), run_id, meta["keys"])
    return ckpt.version


@dataclass
class Encoded:
    """The published table's contents: every row, carried over or encoded in this run."""

    embeddings: np.ndarray
    rows: int
    rejected: int
    rejects_by_reason: dict[str, int]
    encoded: int
    quality: dict


def _carried(ctx: RunContext, plan: RunPlan, name: str) -> pa.Table | None:
    """Rows of the previous run's table `name` whose objects are unchanged: as plan_run read
    them, handed over once (the plan is kept to the end of the run, the table need not be), or
    read again when they were handed over already (an encode stage run twice on one plan)."""
    if plan.retrain or plan.previous is None or plan.diff is None:
        return None
    held = plan.carried.pop(name, None) if plan.carried else None
    return held if held is not None else _carried_tables(ctx, plan.previous, plan.diff, (name,))[name]


def _merge(carried: pa.Table | None, fresh: pa.Table) -> pa.Table:
    if carried is None or carried.num_rows == 0:
        return fresh
    for f in fresh.schema:  # a column added since the carried table was written: null there
        if f.name not in carried.column_names:
            carried = carried.append_column(f.name, pa.nulls(carried.num_rows, f.type))
    merged = pa.concat_tables([carried.select(fresh.column_names).cast(fresh.schema), fresh]).sort_by("key")
    return merged.replace_schema_metadata(fresh.schema.metadata)


def encode_corpus(ctx: RunContext, corpus: DecodedCorpus, ckpt: checkpoint.Checkpoint, plan: RunPlan) -> Encoded:
    """Embed the decoded images, merge carried-over rows, and write the run's three tables."""
    pixels, images = corpus.pixels(), corpus.images
    keys = [img["key"] for img in images]
    with ctx.timed("encode"), tqdm(total=len(pixels), desc="encode", unit="img", disable=None) as bar:
        emb, err = encode_pixels(ckpt.model, pixels, ctx.config.encode.batch_size, bar.update)
        anomaly = (anomaly_scores(ckpt.anomaly_models, pixels, folds_of(keys),
                                  ctx.config.encode.batch_size, ckpt.anomaly_quantiles)
                   if ckpt.anomaly_models else None)
        meta = {"model_version": ckpt.version, "dim": ckpt.model.arch.dim,
                "image_size": ckpt.preprocess.image_size, "channels": ckpt.preprocess.channels,
                "resize": ckpt.preprocess.resize, "run_id": ctx.run_id, "metric": "l2",
                "recon_error": "mean squared error per pixel on [0,1] at the model's input size",
                "anomaly_score": "recon_error under the fold model not trained on the image (held out)"
                                 + (", calibrated so both halves share one scale" if ckpt.anomaly_quantiles else "")}
        embeddings = _merge(_carried(ctx, plan, "embeddings"), table.embeddings_table(images, emb, err, meta, anomaly))
        rejects = _merge(_carried(ctx, plan, "rejects"), table.rejects_table(corpus.rejects))
        if embeddings.num_rows == 0:  # a reused model on a source now all junk: refused as a fresh run is
            raise nothing_decoded(redact_url(ctx.config.source), rejects.to_pylist())
        table.write_table(ctx.out_fs, ctx.out(outputs.EMBEDDINGS), embeddings)
        table.write_table(ctx.out_fs, ctx.out(outputs.REJECTS), rejects)
        table.write_table(ctx.out_fs, ctx.out(outputs.SOURCE), source_table(plan.objects))
    with ctx.timed("quality"):
        if plan.retrain or plan.previous is None:
            # held out: only where the model trained on these very images, in this order (a retried
            # flow run reuses a checkpoint its first attempt trained, perhaps on another listing)
            trained = (ckpt.extra.get("train") or {}).get("split")
            same = trained == split_fingerprint(keys, ctx.config.train)
            split = split_indices(len(pixels), ctx.config.train.val_fraction, ctx.config.train.seed) if same else None
            quality = pca_comparison(pixels, err, ckpt.model.arch.dim, seed=ctx.config.train.seed, split=split)
        else:  # the model is unchanged: its comparison with PCA stands, measured when it was trained
            before = plan.previous.manifest.get("quality")
            before = before if isinstance(before, dict) else {}
            # the run that trained it, however many runs reused it since
            quality = {**before, "measured_in_run": before.get("measured_in_run") or plan.previous.run_id}
    reasons = pc.value_counts(rejects.column("reason")).to_pylist() if rejects.num_rows else []
    return Encoded(table.embeddings_matrix(embeddings), embeddings.num_rows, rejects.num_rows,
                   {r["values"]: r["counts"] for r in reasons}, len(pixels), quality)


def build_index(ctx: RunContext, encoded: Encoded) -> dict:
    """Build the chosen FAISS index, check its recall against exact search, and write it."""
    with ctx.timed("index"):
        idx, info = ae_index.build_index(encoded.embeddings, ctx.config.index)
        hit_rate = ae_index.self_hit_rate(idx, encoded.embeddings)
        write_bytes_atomic(ctx.out_fs, ctx.out(outputs.INDEX), ae_index.to_bytes(idx))
    return {**info, "metric": ctx.config.index.metric, "ntotal": int(idx.ntotal),
            "ids": "row position in embeddings.parquet", "self_hit_rate": hit_rate}


REPORT = "report.md"
PICTURES = {"training loss": "loss.png", "originals (top) and reconstructions (bottom)": "reconstructions.png",
            "sample images (left) and their nearest neighbours": "neighbours.png"}
REPORT_SAMPLE = 8  # images in the reconstruction grid
NEIGHBOUR_QUERIES, NEIGHBOURS_SHOWN = 4, 6


def draw_report(ctx: RunContext, corpus: DecodedCorpus, ckpt: checkpoint.Checkpoint, plan: RunPlan,
                encoded: Encoded) -> dict[str, str]:
    """Draw the report's pictures into the run folder; returns title -> file name."""
    drawn: dict[str, str] = {}
    titles = list(PICTURES)
    with ctx.timed("report"):
        history = ckpt.extra.get("train", {}).get("history", [])
        if history:
            write_bytes_atomic(ctx.out_fs, ctx.out(PICTURES[titles[0]]), report.loss_curve(history))
            drawn[titles[0]] = PICTURES[titles[0]]
        if len(corpus) == 0:
            return drawn
        rng = np.random.default_rng(ctx.config.train.seed)
        rows = np.sort(rng.choice(len(corpus), size=min(REPORT_SAMPLE, len(corpus)), replace=False))
        write_bytes_atomic(ctx.out_fs, ctx.out(PICTURES[titles[1]]),
                           report.reconstruction_grid(ckpt.model, corpus.take(rows)))
        drawn[titles[1]] = PICTURES[titles[1]]
        if plan.retrain:  # every table row was decoded in this run, in table order
            queries = rows[:NEIGHBOUR_QUERIES]
            # exact neighbours from the embeddings in memory: no download of the index just written
            ids = ae_index.exact_search(encoded.embeddings, encoded.embeddings[queries], NEIGHBOURS_SHOWN + 1)
            hits = [[q] + [int(i) for i in found if i >= 0 and i != q][:NEIGHBOURS_SHOWN]
                    for q, found in zip(queries, ids)]
            grid = [list(corpus.take(row)) for row in hits]
            write_bytes_atomic(ctx.out_fs, ctx.out(PICTURES[titles[2]]), report.image_grid(grid))
            drawn[titles[2]] = PICTURES[titles[2]]
    return drawn


def recorded_source(fs: AbstractFileSystem, root: str, url: str) -> str:
    """SOURCE as a manifest records it: a local folder as its absolute path (`ae outliers --grid`
    reads it again, from any folder), else the URL without credentials."""
    return root if is_local(fs) else redact_url(url)


def published_manifest(ctx: RunContext) -> dict | None:
    """The manifest of this run when an earlier attempt of it (a retried flow run or publish
    task) already published it: LATEST names it. A published run's files never change, so a
    retry returns this instead of planning again against itself and rewriting them."""
    try:
        if outputs.latest_run_id(ctx.out_fs, ctx.out_root) != ctx.run_id:
            return None
        manifest = json.loads(ctx.out_fs.cat_file(ctx.out(outputs.MANIFEST)))
    except Exception:  # noqa: BLE001 - damaged, half there, unreachable: the stages that read next retry
        return None
    return {**manifest, "pruned_runs": [], "published_url": display_url(ctx.out_fs, ctx.run_dir)}


def publish_run(ctx: RunContext, plan: RunPlan, ckpt: checkpoint.Checkpoint, encoded: Encoded,
                index_info: dict, pictures: dict[str, str] | None = None) -> dict:
    """Write the report and the manifest, point OUTPUT/LATEST at this run, prune old runs.
    Returns the manifest (the published one when an earlier attempt of this task got that far)."""
    done = published_manifest(ctx)
    if done is not None:  # an earlier attempt published, then failed in what follows: finish that
        return {**done, **after_publishing(ctx)}
    manifest = {
        "format": "ae-embed-run/1", "run_id": ctx.run_id, "started_at": ctx.started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "source": recorded_source(ctx.src_fs, ctx.src_root, ctx.config.source),
        "output": redact_url(ctx.config.output),
        "model_version": ckpt.version, "dim": ckpt.model.arch.dim,
        "image_size": ckpt.preprocess.image_size, "channels": ckpt.preprocess.channels,
        "width": ckpt.model.arch.width, "blocks_per_stage": ckpt.model.arch.blocks_per_stage,
        "rows": encoded.rows, "rejected": encoded.rejected, "rejects_by_reason": encoded.rejects_by_reason,
        "changes": {**plan.counts(), "encoded": encoded.encoded,
                    "previous_run": plan.previous.run_id if plan.previous else None},
        "files": {"embeddings": outputs.EMBEDDINGS, "rejects": outputs.REJECTS, "index": outputs.INDEX,
                  "checkpoint": outputs.CHECKPOINT, "source": outputs.SOURCE, "report": REPORT,
                  "pictures": dict(pictures or {})},
        "index": index_info, "quality": encoded.quality, "train": ckpt.extra.get("train", {}),
        "timings_s": dict(ctx.timings), "config": ctx.config.model_dump(mode="json"),
        "versions": _versions(),
    }
    manifest["config"]["source"], manifest["config"]["output"] = manifest["source"], manifest["output"]
    write_bytes_atomic(ctx.out_fs, ctx.out(REPORT), report.summary_markdown(manifest, dict(pictures or {})).encode())
    files = [*(v for k, v in manifest["files"].items() if k != "pictures"), *manifest["files"]["pictures"].values()]
    # before the manifest: a refused run stays unfinished, so pruning never counts it as a kept run
    outputs.check_publishable(ctx.out_fs, ctx.out_root, ctx.run_id, plan.previous.run_id if plan.previous else None,
                              files, manifest["output"])
    write_bytes_atomic(ctx.out_fs, ctx.out(outputs.MANIFEST), json.dumps(manifest, indent=2).encode())
    outputs.publish(ctx.out_fs, ctx.out_root, ctx.run_id)
    return {**manifest, **after_publishing(ctx)}


def after_publishing(ctx: RunContext) -> dict:
    """Delete what the published run no longer needs (pixels staged for a pretrain stage
    elsewhere, runs beyond --keep-runs, the pixel cache); safe to repeat. The run is published
    already: what cannot be deleted is a line in `cleanup_warnings`, never a failed run (a
    failure here once failed the stage, retried the flow and left the pixel cache behind)."""
    warnings: list[str] = []
    failed: dict[str, str] = {}
    pruned: list[str] = []
    try:
        remove_stage(ctx)
    except OSError as err:
        warnings.append(f"could not delete the staged pixels {display_url(ctx.out_fs, ctx.out(STAGE_DIR))!r} "
                        f"({type(err).__name__}: {err}); delete them by hand")
    try:
        pruned = outputs.prune_runs(ctx.out_fs, ctx.out_root, ctx.config.publish.keep_runs, ctx.run_id, failed)
    except OSError as err:  # the listing itself
        warnings.append(f"could not prune old runs in {display_url(ctx.out_fs, ctx.out_root)!r} "
                        f"({type(err).__name__}: {err})")
    for run_id, why in failed.items():
        where = display_url(ctx.out_fs, join(ctx.out_root, outputs.RUNS, run_id))
        warnings.append(f"could not delete old run {where!r} ({why}); --keep-runs is not met until it is "
                        "deleted by its owner or by hand")
    release_work_dir(ctx.work_dir)
    return {"pruned_runs": pruned, "published_url": display_url(ctx.out_fs, ctx.run_dir),
            "cleanup_warnings": warnings}


def read_rejects(ctx: RunContext, limit: int) -> list[dict]:
    """The first `limit` rows of this run's rejects table, as plain dicts."""
    return table.read_table(ctx.out_fs, ctx.out(outputs.REJECTS)).slice(0, limit).to_pylist()


def _versions() -> dict:
    import faiss
    import pyarrow
    import torch

    return {"ae_core": ae_core.__version__, "torch": torch.__version__, "faiss": faiss.__version__,
            "pyarrow": pyarrow.__version__}
