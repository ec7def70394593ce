"""The `pretrain-and-embed` flow: list -> plan -> decode -> pretrain -> encode -> index -> publish.

Each task is one call into `ae_core.pipeline`; no torch, FAISS or Arrow logic lives here.
Tasks pass in-process objects (pixels, models), so caching by inputs is off for all of them;
the tasks that talk to the stores over the network retry.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ae_core import pipeline
from flows.credentials import s3_options_from_block
from ae_core.config import (EncodeConfig, IndexConfig, IngestConfig, ModelConfig, PublishConfig,
                            RunConfig, TrainConfig)

_io = {"cache_policy": NO_CACHE, "retries": 2, "retry_delay_seconds": 5}
list_task = task(pipeline.list_source, name="list", **_io)
plan_task = task(pipeline.plan_run, name="plan", **_io)
decode_task = task(pipeline.decode_source, name="decode", **_io)
pretrain_task = task(pipeline.pretrain, name="pretrain", cache_policy=NO_CACHE)
encode_task = task(pipeline.encode_corpus, name="encode", cache_policy=NO_CACHE)
index_task = task(pipeline.build_index, name="index", cache_policy=NO_CACHE)
publish_task = task(pipeline.publish_run, name="publish", **_io)


@flow(name="pretrain-and-embed", log_prints=False)
def pretrain_and_embed(source: str, output: str, ingest: IngestConfig = IngestConfig(),
                       model: ModelConfig = ModelConfig(), train: TrainConfig = TrainConfig(),
                       encode: EncodeConfig = EncodeConfig(), index: IndexConfig = IndexConfig(),
                       publish: PublishConfig = PublishConfig(), work_dir: str | None = None,
                       aws_credentials_block: str | None = None) -> dict:
    """Pretrain an autoencoder on every image under SOURCE and publish embeddings to OUTPUT.

    `aws_credentials_block` names a prefect-aws AwsCredentials block for s3:// URLs; without it
    the AWS variables, profiles and fsspec's configuration apply.
    """
    config = RunConfig(source=source, output=output, ingest=ingest, model=model, train=train,
                       encode=encode, index=index, publish=publish, work_dir=work_dir)
    options = s3_options_from_block(aws_credentials_block) if aws_credentials_block else None
    ctx = pipeline.prepare_run(config, options)
    logger = get_run_logger()
    logger.info("run %s: %s -> %s", ctx.run_id, pipeline.redact_url(source), pipeline.redact_url(output))
    objects = list_task(ctx)
    plan = plan_task(ctx, objects)
    logger.info("plan: %s", plan.counts())
    corpus = decode_task(ctx, plan)
    ckpt = pretrain_task(ctx, corpus, plan)
    encoded = encode_task(ctx, corpus, ckpt, plan)
    index_info = index_task(ctx, encoded)
    manifest = publish_task(ctx, plan, ckpt, encoded, index_info)
    logger.info("published run %s: %d rows, %d rejected", ctx.run_id, manifest["rows"], manifest["rejected"])
    return manifest
