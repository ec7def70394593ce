"""The `pretrain-and-embed` flow: list -> plan -> decode -> pretrain -> encode -> index -> report
-> publish.

Each task is one call into `ae_core.pipeline`; no torch, FAISS or Arrow logic lives here.
Tasks pass in-process objects (pixels, models), so caching by inputs is off for all of them; the
tasks that talk to the stores retry. Stage results live in the run's folder in OUTPUT, so a retry
of the flow run (same run id) resumes: it finds the checkpoint and does not train again.
With `pretrain_deployment` set (a deployment of `pretrain-stage` on a GPU work pool), the pretrain
stage runs there as its own flow run; listing, decoding, encoding and indexing stay here.
"""

from __future__ import annotations

from contextlib import suppress

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

try:
    from prefect.utilities.annotations import opaque
except ImportError:  # older Prefect 3: quote skips the traversal too, but drops the dependency edge
    from prefect.utilities.annotations import quote as opaque

from ae_core import outputs, pipeline
from ae_core.config import (EncodeConfig, IndexConfig, IngestConfig, ModelConfig, PublishConfig,
                            RunConfig, TrainConfig)
from ae_core.errors import AeError
from ae_core.storage import display_url
from ae_core.train import parse_device, pick_device
from flows.credentials import s3_options_from_block

def _unless_ae_error(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn
    """Retry a stage that failed on the store (a network error, throttling), not one that stopped
    with an AeError: a wrong setting or a verdict on the data, which the same inputs give again."""
    try:
        state.result()
    except AeError as err:
        return err.transient
    except BaseException:  # noqa: BLE001 - anything else may be transient
        pass
    return True


def _no_flow_retry() -> None:
    """Set this flow run's retries to 0 (Prefect's flows have no retry condition, and its server
    schedules the retry when the run fails): for an AeError, which a retry would only repeat
    after the delay (a one-line error took 20-40 s with the stage and flow retries). Best
    effort: if the API call fails, the run is retried as before, and the AeError still stands."""
    run = flow_run.get_id()
    if run is None or flow_run.get_flow_name() != FLOW_NAME:  # called as .fn() inside another flow
        return
    try:
        with get_client(sync_client=True) as client:
            policy = client.read_flow_run(run).empirical_policy
            client.update_flow_run(run, empirical_policy=policy.model_copy(update={"retries": 0}))
    except Exception as err:  # noqa: BLE001 - never hide the AeError behind an API error
        get_run_logger().warning("could not turn off the retry of flow run %s: %s", run, err)


_io = {"cache_policy": NO_CACHE, "retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": _unless_ae_error}
list_task = task(pipeline.list_source, name="list", **_io)
plan_task = task(pipeline.plan_run, name="plan", **_io)
decode_task = task(pipeline.decode_source, name="decode", **_io)
pretrain_task = task(pipeline.pretrain, name="pretrain", cache_policy=NO_CACHE)
encode_task = task(pipeline.encode_corpus, name="encode", cache_policy=NO_CACHE)
index_task = task(pipeline.build_index, name="index", cache_policy=NO_CACHE)
report_task = task(pipeline.draw_report, name="report", cache_policy=NO_CACHE)
publish_task = task(pipeline.publish_run, name="publish", **_io)
REJECTS_IN_ARTIFACT = 500


STAGE_FLOW = "pretrain-stage"  # flows/pretrain_stage.py
STAGE_REFUSAL = "AeError"  # how a failed stage's message names an AeError that a retry would repeat


def check_pretrain_deployment(name: str) -> None:
    """Refuse, before anything is read or written, a pretrain_deployment that names no
    deployment, or one of another flow: run_deployment found out only after decoding and
    staging the pixels, and a deployment of this flow waited forever on the concurrency slot
    its own parent held."""
    from prefect.exceptions import ObjectNotFound

    fix = (f"deploy flows/pretrain_stage.py:pretrain_stage on the GPU pool (README, Run on a schedule) "
           f"and name it as {STAGE_FLOW}/<deployment>, or leave pretrain_deployment unset to train here")
    if name.count("/") != 1 or not all(name.split("/")):
        raise AeError(f"pretrain_deployment {name!r} is not <flow>/<deployment>; {fix}")
    with get_client(sync_client=True) as client:
        try:
            flow_name = client.read_flow(client.read_deployment_by_name(name).flow_id).name
        except ObjectNotFound as err:
            raise AeError(f"pretrain_deployment {name!r}: no such deployment on this Prefect server; {fix}") from err
    if flow_name != STAGE_FLOW:
        raise AeError(f"pretrain_deployment {name!r} runs flow {flow_name!r}, not {STAGE_FLOW!r}; {fix}")


@task(name="pretrain-on-pool", cache_policy=NO_CACHE)
def pretrain_on_pool(ctx: pipeline.RunContext, corpus, plan: pipeline.RunPlan, deployment: str,
                     aws_credentials_block: str | None) -> None:
    """Stage the pixels in the run folder and run the pretrain stage's deployment; it writes the
    checkpoint that the local pretrain task then picks up."""
    if not plan.retrain or ctx.out_fs.exists(ctx.out(outputs.CHECKPOINT)):
        return  # reused model, or an earlier attempt's stage already wrote it
    pipeline.check_vectors(ctx, corpus, plan)  # as a local pretrain does, before the stage starts for nothing
    pipeline.stage_pixels(ctx, corpus, plan)
    child = run_deployment(deployment, timeout=None, parameters={
        "run_url": display_url(ctx.out_fs, ctx.run_dir), "run_id": ctx.run_id,
        "aws_credentials_block": aws_credentials_block})
    if child.state is not None and child.state.is_completed():
        return
    state = child.state.name if child.state else "unknown"
    why = (child.state.message or "") if child.state else ""
    if child.state is not None and child.state.is_failed() and f"{STAGE_REFUSAL}: " in why:
        # the stage refused its inputs (a device its worker lacks, a bad setting): the same inputs
        # give the same refusal, so this run stops here, not retried, and its staged pixels go
        with suppress(OSError):  # best effort: a later published run's pruning deletes this run's folder
            pipeline.remove_stage(ctx)
        raise AeError(f"pretrain stage {deployment!r} (flow run {child.id}) refused: "
                      f"{why.split(f'{STAGE_REFUSAL}: ', 1)[1]}")
    raise RuntimeError(f"pretrain stage {deployment!r} ended {state} (flow run {child.id})"
                       + (f": {why}" if why else ""))


@task(name="artifacts", cache_policy=NO_CACHE)
def publish_artifacts(ctx: pipeline.RunContext, manifest: dict) -> None:
    """The run report in the Prefect UI: the markdown summary and a table of the rejects, and in
    the log what the clean-up after publishing could not delete. The run is published by now: an
    error here (the API unreachable) is a warning, not a failed run, which Prefect would retry."""
    from ae_core.report import summary_markdown

    for line in manifest.get("cleanup_warnings", []):
        get_run_logger().warning(line)

    try:
        pictures = {title: display_url(ctx.out_fs, ctx.out(name))
                    for title, name in manifest["files"]["pictures"].items()}
        create_markdown_artifact(summary_markdown(manifest, pictures), key="ae-run-report",
                                 description=f"pretrain-and-embed run {ctx.run_id}")
        rejects = pipeline.read_rejects(ctx, REJECTS_IN_ARTIFACT)
        create_table_artifact(rejects or [{"key": "", "reason": "no rejects", "detail": ""}],
                              key="ae-run-rejects", description=f"rejected objects (first {REJECTS_IN_ARTIFACT})")
    except Exception as err:  # noqa: BLE001 - the published run stands whatever went wrong here
        get_run_logger().warning("run %s is published, but its report artifacts could not be created: %s",
                                 ctx.run_id, err)


def _run_id() -> str | None:
    """Stable across retries of one flow run, so a retry resumes in the same run folder."""
    if flow_run.id is None:
        return None
    start = flow_run.scheduled_start_time
    return f"{start:%Y%m%dT%H%M%SZ}-{flow_run.id.replace('-', '')[:8]}"


FLOW_NAME = "pretrain-and-embed"


@flow(name=FLOW_NAME, log_prints=False, retries=1, retry_delay_seconds=10)
def pretrain_and_embed(source: str, output: str, ingest: IngestConfig = IngestConfig(),
                       model: ModelConfig = ModelConfig(), train: TrainConfig = TrainConfig(),
                       encode: EncodeConfig = EncodeConfig(), index: IndexConfig = IndexConfig(),
                       publish: PublishConfig = PublishConfig(), work_dir: str | None = None,
                       aws_credentials_block: str | None = None,
                       pretrain_deployment: str | None = None) -> dict:
    """Pretrain an autoencoder on every image under SOURCE and publish embeddings to OUTPUT.

    `aws_credentials_block` names a prefect-aws AwsCredentials block for s3:// URLs; without it
    the AWS variables, profiles and fsspec's configuration apply. `pretrain_deployment` (for
    example "pretrain-stage/gpu") runs the pretrain stage on that deployment's work pool.
    """
    try:
        return _run(RunConfig(source=source, output=output, ingest=ingest, model=model, train=train,
                              encode=encode, index=index, publish=publish, work_dir=work_dir),
                    aws_credentials_block, pretrain_deployment)
    except AeError as err:
        if not err.transient:
            _no_flow_retry()
        raise


def _run(config: RunConfig, aws_credentials_block: str | None, pretrain_deployment: str | None) -> dict:
    options = s3_options_from_block(aws_credentials_block) if aws_credentials_block else None
    ctx = pipeline.prepare_run(config, options, run_id=_run_id())
    pipeline.mark_cache_in_use(ctx)
    logger = get_run_logger()
    done = pipeline.published_manifest(ctx)
    if done is not None:  # a retry of a flow run that failed after it published: its files stand
        logger.info("run %s was published by an earlier attempt of this flow run; nothing to redo", ctx.run_id)
        # the clean-up that attempt may not have reached; the cache is claimed first, so one that
        # a live run of the same pair holds is never deleted under it
        done = {**done, **pipeline.after_publishing(pipeline.claim_work_dir(ctx))}
        publish_artifacts(ctx, done)
        return done
    if pretrain_deployment:
        check_pretrain_deployment(pretrain_deployment)
    logger.info("run %s: %s -> %s", ctx.run_id, pipeline.redact_url(config.source), pipeline.redact_url(config.output))
    # Stage results are passed `opaque`: Prefect records the dependency but does not walk every
    # element looking for futures (on 10,000 images that walk cost ~5 s per run).
    objects = opaque(list_task(ctx))
    plan = opaque(plan_task(ctx, objects))
    logger.info("plan: %s", plan.unwrap().counts())
    if plan.unwrap().retrain:  # stops the run now, not after decoding (a reused model needs no device)
        if pretrain_deployment:  # trained on the pool's worker: only the name can be checked here
            parse_device(config.train.device)
        else:  # trained here: a device this machine lacks
            pick_device(config.train.device)
    # the pixel cache is held from here: a run refused while it listed or planned leaves none
    ctx = pipeline.claim_work_dir(ctx)
    corpus = opaque(decode_task(ctx, plan))
    if pretrain_deployment:
        pretrain_on_pool(ctx, corpus, plan, pretrain_deployment, aws_credentials_block)
    ckpt = opaque(pretrain_task(ctx, corpus, plan))
    encoded = opaque(encode_task(ctx, corpus, ckpt, plan))
    index_info = index_task(ctx, encoded)
    pictures = report_task(ctx, corpus, ckpt, plan, encoded)
    manifest = publish_task(ctx, plan, ckpt, encoded, index_info, pictures)
    publish_artifacts(ctx, manifest)
    logger.info("published run %s: %d rows, %d rejected", ctx.run_id, manifest["rows"], manifest["rejected"])
    return manifest
