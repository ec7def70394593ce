"""The `pretrain-stage` flow: the pretrain stage alone, deployed on a GPU work pool.

`pretrain-and-embed` stages the decoded pixels in its run folder and calls this flow's deployment
through `run_deployment`; this flow trains (on CUDA when the worker has it) and writes the
checkpoint into the same run folder.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from ae_core import pipeline
from ae_core.errors import AeError
from flows.credentials import s3_options_from_block


@flow(name="pretrain-stage", log_prints=False)
def pretrain_stage(run_url: str, run_id: str, aws_credentials_block: str | None = None) -> str:
    """Train on the pixels staged in `run_url` and write model.pt there; returns the model version."""
    options = s3_options_from_block(aws_credentials_block) if aws_credentials_block else None
    try:
        version = pipeline.pretrain_from_stage(run_url, run_id, options)
    except AeError as err:
        if err.transient:  # the parent reads an AeError in this run's message as "do not retry"
            raise RuntimeError(str(err)) from err
        raise
    get_run_logger().info("pretrained %s for run %s", version, run_id)
    return version
