"""The pipeline's stages as plain functions: list, plan, decode, pretrain, encode, index, publish.

`flows/pretrain_and_embed.py` wraps each as a Prefect task and only orders them. Every stage
writes inside OUTPUT/runs/<run-id>/; only `publish_run` touches OUTPUT/LATEST, and it runs last.
`plan_run` compares the source with the published run: with the model reused, only new and
changed objects are decoded and encoded, and the other rows are carried over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from fsspec.spec import AbstractFileSystem
from tqdm.auto import tqdm

import ae_core
import pyarrow as pa
import pyarrow.compute as pc

from ae_core import checkpoint, index as ae_index, outputs, table
from ae_core.config import ModelConfig, RunConfig
from ae_core.decode import Preprocess
from ae_core.encode import encode_pixels
from ae_core.errors import AeError
from ae_core.incremental import (SourceDiff, compatible, diff_listing, listing_from_table,
                                 retrain_decision, source_table)
from ae_core.ingest import DecodedCorpus, decode_corpus
from ae_core.model import AEArch
from ae_core.plan import probe_corpus, resolve_model_config
from ae_core.quality import pca_comparison
from ae_core.storage import (ObjectInfo, check_store, display_url, join, list_objects, open_store,
                             same_or_inside, write_bytes_atomic)
from ae_core.train import train_autoencoder


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


def redact_url(url: str) -> str:
    """Drop any user:password@ part of a URL before it is logged or stored."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        return urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path,
                           parts.query, parts.fragment))
    return url


def default_work_dir(config: RunConfig) -> str:
    """A local scratch folder keyed by source and output, so a rerun finds its cached shards."""
    digest = hashlib.sha1(f"{config.source}\n{config.output}".encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "ae-embed-work", digest)


def prepare_run(config: RunConfig, storage_options: Mapping[str, dict] | None = None,
                run_id: str | None = None) -> RunContext:
    """Open both stores and check them; writes nothing.

    `storage_options` (protocol -> fsspec options) carries credentials that must not live in the
    config, which is stored in every manifest.
    """
    src_url, out_url = redact_url(config.source), redact_url(config.output)
    src_fs, src_root = open_store(config.source, storage_options)
    out_fs, out_root = open_store(config.output, storage_options)
    check_store(src_fs, src_root, src_url, "source")
    check_store(out_fs, out_root, out_url, "output")
    if same_or_inside(out_fs, out_root, src_fs, src_root):
        raise AeError(f"output {out_url!r} lies inside source {src_url!r}; choose an output "
                      "outside the source so results are never read back as images")
    if not src_fs.isdir(src_root):
        what = "a file, not a folder" if src_fs.exists(src_root) else "missing"
        raise AeError(f"source {src_url!r} is {what}; give the folder or prefix that holds the images")
    if out_fs.exists(out_root) and not out_fs.isdir(out_root):
        raise AeError(f"output {out_url!r} is a file; give a folder or prefix")
    return RunContext(config, run_id or outputs.new_run_id(), src_fs, src_root, out_fs, out_root,
                      config.work_dir or default_work_dir(config))


def list_source(ctx: RunContext) -> list[ObjectInfo]:
    ing = ctx.config.ingest
    with ctx.timed("list"):
        objects = sorted(list_objects(ctx.src_fs, ctx.src_root, ing.include, ing.exclude),
                         key=lambda o: o.key)
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

    def counts(self) -> dict:
        base = self.diff.counts() if self.diff else {"new": len(self.objects), "changed": 0,
                                                     "unchanged": 0, "deleted": 0}
        return {**base, "decoded": len(self.to_decode), "retrained": self.retrain,
                "retrain_reason": self.reason}


def load_previous(ctx: RunContext) -> PreviousRun | None:
    """The published run in OUTPUT, if it records its source listing (needed for a diff)."""
    run_id = outputs.latest_run_id(ctx.out_fs, ctx.out_root)
    if run_id is None:
        return None
    run_dir = outputs.run_path(ctx.out_root, run_id)
    try:
        manifest = json.loads(ctx.out_fs.cat_file(join(run_dir, outputs.MANIFEST)))
        listing = listing_from_table(table.read_table(ctx.out_fs, join(run_dir, outputs.SOURCE)))
        data = ctx.out_fs.cat_file(join(run_dir, manifest["files"]["checkpoint"]))
    except FileNotFoundError:
        return None
    return PreviousRun(run_id, manifest, listing, data, checkpoint.from_bytes(data))


def _probe_model(ctx: RunContext, objects: list[ObjectInfo]) -> ModelConfig:
    model = ctx.config.model
    if model.image_size is not None and model.channels is not None:
        return model
    with ctx.timed("probe"):
        probe = probe_corpus(ctx.src_fs, objects, ctx.config.ingest.max_image_pixels)
    return resolve_model_config(model, probe)


def plan_run(ctx: RunContext, objects: list[ObjectInfo]) -> RunPlan:
    """Retrain on everything, or reuse the published model and decode only what changed."""
    cfg = ctx.config
    with ctx.timed("plan"):
        previous = load_previous(ctx)
        diff = diff_listing(previous.listing, objects) if previous else None
        why_not = None
        if previous:
            why_not = compatible(cfg.model, cfg.ingest, previous.ckpt.model.arch, previous.ckpt.preprocess)
        retrain, reason = retrain_decision(cfg.train, diff, why_not)
    if retrain or previous is None:
        model = _probe_model(ctx, objects)
        spec = Preprocess(image_size=model.image_size, channels=model.channels,
                          resize=cfg.ingest.resize, max_image_pixels=cfg.ingest.max_image_pixels)
        return RunPlan(True, reason, model, spec, objects, objects, diff, previous)
    arch = previous.ckpt.model.arch
    model = cfg.model.model_copy(update={"dim": arch.dim, "image_size": arch.image_size,
                                         "channels": arch.channels, "width": arch.width,
                                         "blocks_per_stage": arch.blocks_per_stage})
    return RunPlan(False, reason, model, previous.ckpt.preprocess, [*diff.new, *diff.changed],
                   objects, diff, previous)


def decode_source(ctx: RunContext, plan: RunPlan) -> DecodedCorpus:
    """Decode the objects the plan names into cached uint8 shards (reused after a crash)."""
    ing = ctx.config.ingest
    with ctx.timed("decode"), tqdm(total=len(plan.to_decode), desc="decode", unit="img", disable=None) as bar:
        return decode_corpus(plan.to_decode, ctx.src_fs, plan.spec, ctx.work_dir,
                             ing.shard_size, ing.read_batch, ing.workers, bar.update)


def pretrain(ctx: RunContext, corpus: DecodedCorpus, plan: RunPlan) -> checkpoint.Checkpoint:
    """Train on every decoded image (or reuse the published model, as planned) and write the
    checkpoint into the run folder."""
    if not plan.retrain and plan.previous is not None:
        with ctx.timed("pretrain"):
            write_bytes_atomic(ctx.out_fs, ctx.out(outputs.CHECKPOINT), plan.previous.checkpoint_bytes)
        return plan.previous.ckpt
    if len(corpus) == 0:
        raise AeError(f"source {redact_url(ctx.config.source)!r}: none of its "
                      f"{len(corpus.rejects)} objects could be decoded as an image; see the rejects")
    model = plan.model
    arch = AEArch(dim=model.dim, image_size=model.image_size, channels=model.channels,
                  width=model.width, blocks_per_stage=model.blocks_per_stage)
    with ctx.timed("pretrain"), tqdm(desc="pretrain", unit="epoch", disable=None) as bar:
        def on_epoch(rec: dict) -> None:
            bar.update(1)
            bar.set_postfix(train=f"{rec['train_mse']:.5f}", val=f"{rec['val_mse'] or 0:.5f}")
        result = train_autoencoder(corpus.pixels(), arch, ctx.config.train, on_epoch)
        extra = {"train": result.summary(), "run_id": ctx.run_id}
        data, version = checkpoint.to_bytes(result.model, corpus.spec, extra)
        write_bytes_atomic(ctx.out_fs, ctx.out(outputs.CHECKPOINT), data)
    return checkpoint.Checkpoint(result.model, corpus.spec, version, extra)


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
    """Rows of the previous run's table `name` whose objects are unchanged."""
    if plan.retrain or plan.previous is None or plan.diff is None:
        return None
    prev = table.read_table(ctx.out_fs, join(outputs.run_path(ctx.out_root, plan.previous.run_id),
                                             plan.previous.manifest["files"][name]))
    keep = pa.array([o.key for o in plan.diff.unchanged], pa.string())
    return prev.filter(pc.is_in(prev.column("key"), value_set=keep))


def _merge(carried: pa.Table | None, fresh: pa.Table) -> pa.Table:
    if carried is None or carried.num_rows == 0:
        return fresh
    merged = pa.concat_tables([carried.cast(fresh.schema), fresh]).sort_by("key")
    return merged.replace_schema_metadata(fresh.schema.metadata)


def encode_corpus(ctx: RunContext, corpus: DecodedCorpus, ckpt: checkpoint.Checkpoint, plan: RunPlan) -> Encoded:
    """Embed the decoded images, merge carried-over rows, and write the run's three tables."""
    pixels = corpus.pixels()
    with ctx.timed("encode"), tqdm(total=len(pixels), desc="encode", unit="img", disable=None) as bar:
        emb, err = encode_pixels(ckpt.model, pixels, ctx.config.encode.batch_size, bar.update)
        meta = {"model_version": ckpt.version, "dim": ckpt.model.arch.dim,
                "image_size": ckpt.preprocess.image_size, "channels": ckpt.preprocess.channels,
                "resize": ckpt.preprocess.resize, "run_id": ctx.run_id, "metric": "l2",
                "recon_error": "mean squared error per pixel on [0,1] at the model's input size"}
        embeddings = _merge(_carried(ctx, plan, "embeddings"), table.embeddings_table(corpus.images, emb, err, meta))
        rejects = _merge(_carried(ctx, plan, "rejects"), table.rejects_table(corpus.rejects))
        table.write_table(ctx.out_fs, ctx.out(outputs.EMBEDDINGS), embeddings)
        table.write_table(ctx.out_fs, ctx.out(outputs.REJECTS), rejects)
        table.write_table(ctx.out_fs, ctx.out(outputs.SOURCE), source_table(plan.objects))
    with ctx.timed("quality"):
        if plan.retrain or plan.previous is None:
            quality = pca_comparison(pixels, err, ckpt.model.arch.dim, seed=ctx.config.train.seed)
        else:  # the model is unchanged: its comparison with PCA stands, measured when it was trained
            quality = {**plan.previous.manifest.get("quality", {}), "measured_in_run": plan.previous.run_id}
    reasons = pc.value_counts(rejects.column("reason")).to_pylist() if rejects.num_rows else []
    return Encoded(table.embeddings_matrix(embeddings), embeddings.num_rows, rejects.num_rows,
                   {r["values"]: r["counts"] for r in reasons}, len(pixels), quality)


def build_index(ctx: RunContext, encoded: Encoded) -> dict:
    """Build and write the FAISS index; measure that each sampled row finds itself."""
    with ctx.timed("index"):
        idx = ae_index.build_index(encoded.embeddings, ctx.config.index)
        write_bytes_atomic(ctx.out_fs, ctx.out(outputs.INDEX), ae_index.to_bytes(idx))
        hit_rate = ae_index.self_hit_rate(idx, encoded.embeddings)
    return {"kind": ctx.config.index.kind, "metric": ctx.config.index.metric, "ntotal": int(idx.ntotal),
            "ids": "row position in embeddings.parquet", "self_hit_rate": hit_rate}


def publish_run(ctx: RunContext, plan: RunPlan, ckpt: checkpoint.Checkpoint, encoded: Encoded,
                index_info: dict) -> dict:
    """Write the manifest, point OUTPUT/LATEST at this run, prune old runs. Returns the manifest."""
    manifest = {
        "format": "ae-embed-run/1", "run_id": ctx.run_id, "started_at": ctx.started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "source": redact_url(ctx.config.source), "output": redact_url(ctx.config.output),
        "model_version": ckpt.version, "dim": ckpt.model.arch.dim,
        "image_size": ckpt.preprocess.image_size, "channels": ckpt.preprocess.channels,
        "rows": encoded.rows, "rejected": encoded.rejected, "rejects_by_reason": encoded.rejects_by_reason,
        "changes": {**plan.counts(), "encoded": encoded.encoded,
                    "previous_run": plan.previous.run_id if plan.previous else None},
        "files": {"embeddings": outputs.EMBEDDINGS, "rejects": outputs.REJECTS, "index": outputs.INDEX,
                  "checkpoint": outputs.CHECKPOINT, "source": outputs.SOURCE},
        "index": index_info, "quality": encoded.quality, "train": ckpt.extra.get("train", {}),
        "timings_s": dict(ctx.timings), "config": ctx.config.model_dump(mode="json"),
        "versions": _versions(),
    }
    manifest["config"]["source"], manifest["config"]["output"] = manifest["source"], manifest["output"]
    write_bytes_atomic(ctx.out_fs, ctx.out(outputs.MANIFEST), json.dumps(manifest, indent=2).encode())
    outputs.publish(ctx.out_fs, ctx.out_root, ctx.run_id)
    manifest["pruned_runs"] = outputs.prune_runs(ctx.out_fs, ctx.out_root, ctx.config.publish.keep_runs, ctx.run_id)
    shutil.rmtree(ctx.work_dir, ignore_errors=True)  # the pixel cache is only for resuming this run
    manifest["published_url"] = display_url(ctx.out_fs, ctx.run_dir)
    return manifest


def _versions() -> dict:
    import faiss
    import pyarrow
    import torch

    return {"ae_core": ae_core.__version__, "torch": torch.__version__, "faiss": faiss.__version__,
            "pyarrow": pyarrow.__version__}
