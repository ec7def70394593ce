"""The `pretrain-and-embed` flow: list -> decode -> pretrain -> encode -> index -> publish.

Each task is one call into `ae_core.pipeline`; no torch, FAISS or Arrow logic lives here.
Tasks pass in-process objects (pixels, models), so caching by inputs is off for all of them.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ae_core import pipeline
from ae_core.config import EncodeConfig, IndexConfig, IngestConfig, ModelConfig, RunConfig, TrainConfig

list_source = task(pipeline.list_source, name="list", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
choose_model = task(pipeline.choose_model, name="probe", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
decode = task(pipeline.decode_source, name="decode", cache_policy=NO_CACHE)
pretrain = task(pipeline.pretrain, name="pretrain", cache_policy=NO_CACHE)
encode = task(pipeline.encode_corpus, name="encode", cache_policy=NO_CACHE)
build_index = task(pipeline.build_index, name="index", cache_policy=NO_CACHE)
publish = task(pipeline.publish_run, name="publish", cache_policy=NO_CACHE)


@flow(name="pretrain-and-embed", log_prints=False)
def pretrain_and_embed(source: str, output: str, ingest: IngestConfig = IngestConfig(),
                       model: ModelConfig = ModelConfig(), train: TrainConfig = TrainConfig(),
                       encode_config: EncodeConfig = EncodeConfig(), index: IndexConfig = IndexConfig(),
                       work_dir: str | None = None) -> dict:
    """Pretrain an autoencoder on every image under SOURCE and publish embeddings to OUTPUT."""
    config = RunConfig(source=source, output=output, ingest=ingest, model=model, train=train,
                       encode=encode_config, index=index, work_dir=work_dir)
    ctx = pipeline.prepare_run(config)
    logger = get_run_logger()
    logger.info("run %s: %s -> %s", ctx.run_id, pipeline.redact_url(source), pipeline.redact_url(output))
    objects = list_source(ctx)
    resolved = choose_model(ctx, objects)
    corpus = decode(ctx, objects, resolved)
    ckpt = pretrain(ctx, corpus, resolved)
    encoded = encode(ctx, corpus, ckpt)
    index_info = build_index(ctx, encoded)
    manifest = publish(ctx, corpus, ckpt, encoded, index_info)
    logger.info("published run %s: %d rows, %d rejected", ctx.run_id, manifest["rows"], manifest["rejected"])
    return manifest
