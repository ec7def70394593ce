"""The pipeline's stages as plain functions: list, decode, pretrain, encode, index, publish.

`flows/pretrain_and_embed.py` wraps each as a Prefect task and only orders them. Every stage
writes inside OUTPUT/runs/<run-id>/; only `publish_run` touches OUTPUT/LATEST, and it runs last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from fsspec.spec import AbstractFileSystem
from tqdm.auto import tqdm

import ae_core
from ae_core import checkpoint, index as ae_index, outputs, table
from ae_core.config import ModelConfig, RunConfig
from ae_core.decode import Preprocess
from ae_core.encode import encode_pixels
from ae_core.errors import AeError
from ae_core.ingest import DecodedCorpus, corpus_summary, decode_corpus
from ae_core.model import AEArch
from ae_core.plan import probe_corpus, resolve_model_config
from ae_core.quality import pca_comparison
from ae_core.storage import ObjectInfo, display_url, join, list_objects, open_store, same_or_inside, write_bytes_atomic
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


def prepare_run(config: RunConfig, run_id: str | None = None) -> RunContext:
    """Open both stores and check them; writes nothing."""
    src_fs, src_root = open_store(config.source)
    out_fs, out_root = open_store(config.output)
    if same_or_inside(out_fs, out_root, src_fs, src_root):
        raise AeError(f"output {redact_url(config.output)!r} lies inside source "
                      f"{redact_url(config.source)!r}; choose an output outside the source so "
                      "results are never read back as images")
    if not src_fs.isdir(src_root):
        what = "a file, not a folder" if src_fs.exists(src_root) else "missing"
        raise AeError(f"source {redact_url(config.source)!r} is {what}; give the folder or prefix "
                      "that holds the images")
    if out_fs.exists(out_root) and not out_fs.isdir(out_root):
        raise AeError(f"output {redact_url(config.output)!r} is a file; give a folder or prefix")
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


def choose_model(ctx: RunContext, objects: list[ObjectInfo]) -> ModelConfig:
    """Fill input size and channels from a probe of the corpus unless the user gave them."""
    model = ctx.config.model
    if model.image_size is not None and model.channels is not None:
        return model
    with ctx.timed("probe"):
        probe = probe_corpus(ctx.src_fs, objects, ctx.config.ingest.max_image_pixels)
    return resolve_model_config(model, probe)


def preprocess_for(ctx: RunContext, model: ModelConfig) -> Preprocess:
    return Preprocess(image_size=model.image_size, channels=model.channels,
                      resize=ctx.config.ingest.resize, max_image_pixels=ctx.config.ingest.max_image_pixels)


def decode_source(ctx: RunContext, objects: list[ObjectInfo], model: ModelConfig) -> DecodedCorpus:
    ing = ctx.config.ingest
    with ctx.timed("decode"), tqdm(total=len(objects), desc="decode", unit="img", disable=None) as bar:
        return decode_corpus(objects, ctx.src_fs, preprocess_for(ctx, model), ctx.work_dir,
                             ing.shard_size, ing.read_batch, ing.workers, bar.update)


def pretrain(ctx: RunContext, corpus: DecodedCorpus, model: ModelConfig) -> checkpoint.Checkpoint:
    """Train on every decoded image and write the checkpoint into the run folder."""
    if len(corpus) == 0:
        raise AeError(f"source {redact_url(ctx.config.source)!r}: none of its "
                      f"{len(corpus.rejects)} objects could be decoded as an image; see the rejects")
    arch = AEArch(dim=model.dim, image_size=model.image_size, channels=model.channels,
                  width=model.width, blocks_per_stage=model.blocks_per_stage)
    tc = ctx.config.train
    with ctx.timed("pretrain"), tqdm(desc="pretrain", unit="epoch", disable=None) as bar:
        def on_epoch(rec: dict) -> None:
            bar.update(1)
            bar.set_postfix(train=f"{rec['train_mse']:.5f}", val=f"{rec['val_mse'] or 0:.5f}")
        result = train_autoencoder(corpus.pixels(), arch, tc, on_epoch)
        data, version = checkpoint.to_bytes(result.model, corpus.spec, {"train": result.summary()})
        write_bytes_atomic(ctx.out_fs, ctx.out(outputs.CHECKPOINT), data)
    return checkpoint.Checkpoint(result.model, corpus.spec, version, {"train": result.summary()})


@dataclass
class Encoded:
    embeddings: np.ndarray
    recon_error: np.ndarray
    quality: dict


def encode_corpus(ctx: RunContext, corpus: DecodedCorpus, ckpt: checkpoint.Checkpoint) -> Encoded:
    """Embed every decoded image; write the embedding and rejects tables into the run folder."""
    pixels = corpus.pixels()
    with ctx.timed("encode"), tqdm(total=len(pixels), desc="encode", unit="img", disable=None) as bar:
        emb, err = encode_pixels(ckpt.model, pixels, ctx.config.encode.batch_size, bar.update)
        meta = {"model_version": ckpt.version, "dim": ckpt.model.arch.dim,
                "image_size": ckpt.preprocess.image_size, "channels": ckpt.preprocess.channels,
                "resize": ckpt.preprocess.resize, "run_id": ctx.run_id, "metric": "l2",
                "recon_error": "mean squared error per pixel on [0,1] at the model's input size"}
        table.write_table(ctx.out_fs, ctx.out(outputs.EMBEDDINGS), table.embeddings_table(corpus.images, emb, err, meta))
        table.write_table(ctx.out_fs, ctx.out(outputs.REJECTS), table.rejects_table(corpus.rejects))
    with ctx.timed("quality"):
        quality = pca_comparison(pixels, err, ckpt.model.arch.dim, seed=ctx.config.train.seed)
    return Encoded(emb, err, quality)


def build_index(ctx: RunContext, encoded: Encoded) -> dict:
    """Build and write the FAISS index; measure that each sampled row finds itself."""
    with ctx.timed("index"):
        idx = ae_index.build_index(encoded.embeddings, ctx.config.index)
        write_bytes_atomic(ctx.out_fs, ctx.out(outputs.INDEX), ae_index.to_bytes(idx))
        hit_rate = ae_index.self_hit_rate(idx, encoded.embeddings)
    return {"kind": ctx.config.index.kind, "metric": ctx.config.index.metric, "ntotal": int(idx.ntotal),
            "ids": "row position in embeddings.parquet", "self_hit_rate": hit_rate}


def publish_run(ctx: RunContext, corpus: DecodedCorpus, ckpt: checkpoint.Checkpoint,
                encoded: Encoded, index_info: dict) -> dict:
    """Write the manifest, then point OUTPUT/LATEST at this run. Returns the manifest."""
    summary = corpus_summary(corpus)
    manifest = {
        "format": "ae-embed-run/1", "run_id": ctx.run_id, "started_at": ctx.started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "source": redact_url(ctx.config.source), "output": redact_url(ctx.config.output),
        "model_version": ckpt.version, "dim": ckpt.model.arch.dim,
        "image_size": ckpt.preprocess.image_size, "channels": ckpt.preprocess.channels,
        "rows": summary["images"], "rejected": summary["rejected"],
        "rejects_by_reason": summary["rejects_by_reason"],
        "files": {"embeddings": outputs.EMBEDDINGS, "rejects": outputs.REJECTS,
                  "index": outputs.INDEX, "checkpoint": outputs.CHECKPOINT},
        "index": index_info, "quality": encoded.quality, "train": ckpt.extra.get("train", {}),
        "timings_s": dict(ctx.timings), "config": ctx.config.model_dump(mode="json"),
        "versions": _versions(),
    }
    manifest["config"]["source"], manifest["config"]["output"] = manifest["source"], manifest["output"]
    write_bytes_atomic(ctx.out_fs, ctx.out(outputs.MANIFEST), json.dumps(manifest, indent=2).encode())
    outputs.publish(ctx.out_fs, ctx.out_root, ctx.run_id)
    shutil.rmtree(ctx.work_dir, ignore_errors=True)  # the pixel cache is only for resuming this run
    manifest["published_url"] = display_url(ctx.out_fs, ctx.run_dir)
    return manifest


def _versions() -> dict:
    import faiss
    import pyarrow
    import torch

    return {"ae_core": ae_core.__version__, "torch": torch.__version__, "faiss": faiss.__version__,
            "pyarrow": pyarrow.__version__}
