"""A flow run whose encode stage fails on its first attempt: Prefect retries the flow run, which
resumes in the same run folder and does not train the model again."""

from __future__ import annotations

import pytest

import ae_core.pipeline as pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_encode_failure_retry_does_not_retrain(prefect_harness, mnist_subset, tmp_path, monkeypatch):
    from flows.pretrain_and_embed import pretrain_and_embed

    trainings, encodings = [], []
    real_train, real_encode = pipeline.train_autoencoder, pipeline.encode_pixels

    def counting_train(*args, **kwargs):
        trainings.append(1)
        return real_train(*args, **kwargs)

    def failing_once(*args, **kwargs):
        encodings.append(1)
        if len(encodings) == 1:
            raise ConnectionError("injected: the store went away during encoding")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train_autoencoder", counting_train)
    monkeypatch.setattr(pipeline, "encode_pixels", failing_once)
    flow = pretrain_and_embed.with_options(retries=1, retry_delay_seconds=0)
    from ae_core.config import TrainConfig
    manifest = flow(source=str(mnist_subset), output=str(tmp_path / "out"), train=TrainConfig(epochs=2))
    assert len(encodings) >= 2  # the first attempt failed in encode, the retry encoded
    assert len(trainings) == 1  # ...without training again
    assert manifest["train"]["resumed_from_stage"] is True
    assert manifest["rows"] == 300
    runs = list((tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name == manifest["run_id"]  # the retry resumed in the same folder
