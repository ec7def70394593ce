"""A flow run whose encode stage fails on its first attempt: Prefect retries the flow run, which
resumes in the same run folder and does not train the model again."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

import ae_core.pipeline as pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _count_listings(monkeypatch) -> list[int]:
    """A list that gains an item each time the source is listed (the pipeline's first read)."""
    listings: list[int] = []
    real_list = pipeline.list_objects

    def counting_list(*args, **kwargs):
        listings.append(1)
        return real_list(*args, **kwargs)

    monkeypatch.setattr(pipeline, "list_objects", counting_list)
    return listings


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


def test_an_ae_error_is_not_retried_by_the_stage_or_the_flow(prefect_harness, mnist_subset, tmp_path, monkeypatch):
    """An AeError (a wrong setting, a verdict on the data) stops the run at once: a retry of the
    stage or of the flow run would only give the same error after the delays."""
    from ae_core.config import IngestConfig
    from ae_core.errors import AeError
    from flows.pretrain_and_embed import pretrain_and_embed

    listings = _count_listings(monkeypatch)
    import flows.pretrain_and_embed as flows_module
    monkeypatch.setattr(flows_module, "list_task", flows_module.list_task.with_options(retry_delay_seconds=0))
    flow = pretrain_and_embed.with_options(retries=1, retry_delay_seconds=0)
    with pytest.raises(AeError, match="no objects matching"):
        flow(source=str(mnist_subset), output=str(tmp_path / "out"), ingest=IngestConfig(include=["*.jpg"]))
    assert len(listings) == 1
    assert not (tmp_path / "out").exists()

    # if turning the flow's retry off fails, the AeError still stands (and the run is retried)
    def no_api(*args, **kwargs):
        raise ConnectionError("injected: the API is away")

    listings.clear()
    monkeypatch.setattr(flows_module, "get_client", no_api)
    with pytest.raises(AeError, match="no objects matching"):
        flow(source=str(mnist_subset), output=str(tmp_path / "out"), ingest=IngestConfig(include=["*.jpg"]))
    assert len(listings) == 2
    monkeypatch.undo()
    monkeypatch.setattr(flows_module, "list_task", flows_module.list_task.with_options(retry_delay_seconds=0))

    def unreachable(*args, **kwargs):  # a transient AeError is retried like any other error
        listings.append(1)
        raise AeError("source: cannot reach the store (injected)", transient=True)

    listings.clear()
    monkeypatch.setattr(pipeline, "list_objects", unreachable)
    with pytest.raises(AeError, match="cannot reach"):
        flow(source=str(mnist_subset), output=str(tmp_path / "out3"))
    assert len(listings) == 6

    def failing_list(*args, **kwargs):  # anything else is retried: the stage, then the flow run
        listings.append(1)
        raise ConnectionError("injected: the store went away")

    listings.clear()
    monkeypatch.setattr(pipeline, "list_objects", failing_list)
    with pytest.raises(ConnectionError):
        flow(source=str(mnist_subset), output=str(tmp_path / "out2"))
    assert len(listings) == 6  # 3 tries of the stage, in each of 2 flow attempts


def test_wrong_arguments_the_flow_alone_sees_stop_it_before_anything_is_read(prefect_harness, mnist_subset, tmp_path,
                                                                             monkeypatch):
    """An empty SOURCE or OUTPUT (fsspec's working directory: a worker's checkout), a
    pretrain_deployment that does not exist or runs another flow: each one line, before listing;
    a device this machine lacks, before decoding. Before, the first ran to the end on the wrong
    folder, and the others were found only after decoding (the wrong flow waited forever on its
    parent's concurrency slot)."""
    from ae_core.config import TrainConfig
    from ae_core.errors import AeError
    from flows.pretrain_and_embed import pretrain_and_embed

    listings = _count_listings(monkeypatch)
    out = tmp_path / "out"
    flow = pretrain_and_embed.with_options(retries=0)
    pretrain_and_embed.to_deployment(name="not-a-stage").apply()
    cases = [({"source": ""}, "source is empty"), ({"output": " "}, "output is empty"),
             ({"pretrain_deployment": "pretrain-stage/nope"}, "'pretrain-stage/nope': no such deployment"),
             ({"pretrain_deployment": "nope"}, "is not <flow>/<deployment>"),
             ({"pretrain_deployment": "pretrain-and-embed/not-a-stage"},
              "runs flow 'pretrain-and-embed', not 'pretrain-stage'")]
    for args, message in cases:
        with pytest.raises(AeError, match=re.escape(message)):
            flow(**{"source": str(mnist_subset), "output": str(out), **args})
    assert listings == [] and not out.exists()
    # a device this machine lacks, where this run would train: once planned, before decoding
    decodes = []
    monkeypatch.setattr(pipeline, "decode_corpus", lambda *a, **k: decodes.append(1))
    with pytest.raises(AeError, match=re.escape("device 'cuda:99'")):
        flow(source=str(mnist_subset), output=str(out), train=TrainConfig(device="cuda:99"))
    assert decodes == [] and not out.exists()
    # trained on a GPU pool: whether its worker has the device is the stage's to say, but a name
    # that is no torch device stops the run here, before decoding (before: after decoding and
    # staging the pixels, and the flow run retried)
    from flows.pretrain_stage import pretrain_stage

    pretrain_stage.to_deployment(name="gpu").apply()
    with pytest.raises(AeError, match=re.escape("device 'gpu' is not a torch device")):
        flow(source=str(mnist_subset), output=str(out), train=TrainConfig(device="gpu"),
             pretrain_deployment="pretrain-stage/gpu")
    assert decodes == [] and not out.exists()


def test_a_retry_after_publishing_leaves_the_published_run_as_it_is(prefect_harness, mnist_subset, tmp_path,
                                                                    monkeypatch):
    """Before: a failure after the run was published (its UI artifacts, say) retried the flow
    run, which planned against itself and rewrote the published table, index and manifest in
    place, with an image added meanwhile, a manifest that named itself as its previous run."""
    import shutil

    import flows.pretrain_and_embed as flows_module
    from ae_core.config import TrainConfig

    source = tmp_path / "src"
    shutil.copytree(mnist_subset, source)
    real_artifacts, artifact_calls, table_artifacts = flows_module.publish_artifacts, [], []

    def failing_once(*args, **kwargs):
        artifact_calls.append(1)
        if len(artifact_calls) == 1:  # published by now; the source changes before the retry
            shutil.copy(source / "00000.png", source / "new.png")
            raise ConnectionError("injected: the API went away after publishing")
        return real_artifacts(*args, **kwargs)

    def no_table_artifact(*args, **kwargs):
        table_artifacts.append(1)
        raise ConnectionError("injected: the API is away")

    monkeypatch.setattr(flows_module, "publish_artifacts", failing_once)
    monkeypatch.setattr(flows_module, "create_table_artifact", no_table_artifact)
    flow = flows_module.pretrain_and_embed.with_options(retries=1, retry_delay_seconds=0)
    out = tmp_path / "out"
    manifest = flow(source=str(source), output=str(out), train=TrainConfig(epochs=1, anomaly_steps=0))
    assert len(artifact_calls) == 2  # the retry happened...
    assert table_artifacts == [1]  # ...and the artifacts' own failure there was only a warning
    (run,) = (out / "runs").iterdir()
    stored = json.loads((run / "manifest.json").read_text())
    assert manifest["run_id"] == stored["run_id"] == run.name == (out / "LATEST").read_text().strip()
    assert stored["rows"] == manifest["rows"] == 300 and stored["changes"]["previous_run"] is None
    assert stored["train"]["epochs_run"] == 1 and pq.read_table(run / "embeddings.parquet").num_rows == 300
