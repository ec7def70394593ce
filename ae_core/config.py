"""One typed, frozen config per stage.

These are pydantic models so that Prefect validates them as flow parameters when a run is
created, and so that every output can store the exact config that made it (`model_dump`).
`None` in a field means "choose from the corpus" (see `ae_core.plan.resolve_model_config`).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IngestConfig(_Frozen):
    """What to read from SOURCE and how to turn it into pixels."""

    include: list[str] = Field(default_factory=list, description="glob patterns on keys; empty = all")
    exclude: list[str] = Field(default_factory=list, description="glob patterns on keys to skip")
    max_image_pixels: int = Field(100_000_000, gt=0, description="larger images are rejected as bombs")
    resize: Literal["stretch", "crop", "pad"] = "stretch"
    shard_size: int = Field(2048, gt=0, description="images per decoded uint8 cache shard")
    read_batch: int = Field(64, gt=0, description="objects fetched concurrently in one batch")
    workers: int = Field(0, ge=0, description="decode processes; 0 = one per CPU core")


class ModelConfig(_Frozen):
    """The autoencoder's shape. `image_size`/`channels` None = chosen from the corpus."""

    dim: int = Field(32, gt=0, le=4096)
    image_size: int | None = Field(None, ge=16, le=512, multiple_of=4)
    channels: Literal[1, 3] | None = None
    width: int = Field(32, gt=0, le=256, description="channels of the first conv stage; doubles per stage, "
                       "up to 256")
    blocks_per_stage: int = Field(1, ge=0, description="residual blocks after each downsampling (0: "
                                  "plain conv stages, ~3x faster per epoch on CPU and a lower error "
                                  "within the same time, but 5-NN accuracy on MNIST fell from 0.972 "
                                  "to 0.963: docs/quality.md)")


class TrainConfig(_Frozen):
    """How the autoencoder is pretrained."""

    epochs: int | None = Field(None, gt=0, description="None = from corpus size: at least 20 "
                               "epochs and 1,500 optimizer steps, at most 500 epochs")
    max_minutes: float = Field(5.0, gt=0, allow_inf_nan=False, description="training stops after this wall time")
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0, allow_inf_nan=False, description="peak learning rate of AdamW")
    weight_decay: float = Field(1e-4, ge=0, allow_inf_nan=False)
    seed: int = Field(0, ge=0, lt=2**32, description="seeds the split, the shuffling and the weights")
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="held out for early stopping")
    patience: int = Field(10, ge=1, description="epochs without validation gain before stopping")
    augment: bool = Field(False, description="random shifts of up to 1/16 of the side (off: in "
                          "measurements it cost throughput and raised reconstruction error)")
    device: str = Field("auto", description="'auto' (CUDA when present), or a torch device: 'cpu', 'cuda', "
                        "'cuda:1', 'mps', 'xpu'...")

    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bfloat16 mixed precision (autocast, fp32 weights) where the "
        "device computes bf16 natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs), else fp32. "
        "Encoding and every reported error are computed in fp32")
    anomaly_steps: int = Field(300, ge=0, description="optimizer steps of each of the two fold "
                               "models behind anomaly_score (0 = no anomaly_score column)")
    retrain: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: retrain when there is no usable previous model, or when more "
        "than retrain_fraction of the corpus is new, changed or deleted since the published run")
    retrain_fraction: float = Field(0.2, ge=0, le=1)

    @field_validator("device", mode="before")
    @classmethod
    def _device_name(cls, value: object) -> object:
        """'CUDA' or ' cuda:1 ' as torch spells them; a name torch cannot take, with the fix."""
        if isinstance(value, str):
            value = value.strip().lower()
            if not re.fullmatch(r"[a-z_]+(:\d+)?", value):
                raise ValueError("give auto, cpu, cuda, cuda:N, or another torch device name (mps, xpu)")
        return value


class EncodeConfig(_Frozen):
    batch_size: int = Field(512, gt=0)


class IndexConfig(_Frozen):
    """FAISS index settings. Ids of the index are row positions in the embedding table."""

    kind: Literal["auto", "flat", "hnsw", "ivf", "ivfpq"] = Field(
        "auto", description="auto: exact search while it is fast enough, then HNSW, IVF or (under a "
        "tight budget) IVF-PQ with exact re-ranking by the memory budget (see ae_core.index.choose_index)")
    metric: Literal["l2"] = "l2"
    memory_budget_mb: int = Field(4096, gt=0, description="the loaded index must fit in this much "
                                  "memory (IVF-PQ's re-ranking vectors are memory-mapped from its file)")
    recall_floor: float = Field(0.95, ge=0, le=1, description="recall@10 against exact search below "
                                "which an approximate index is not published")
    recall_queries: int = Field(1000, gt=0, description="sampled rows used to measure recall")


class PublishConfig(_Frozen):
    """How results are published in OUTPUT."""

    keep_runs: int = Field(3, ge=1, description="finished runs kept under OUTPUT/runs (newest first)")


class RunConfig(_Frozen):
    """Everything one pipeline run needs. SOURCE and OUTPUT are fsspec URLs or plain paths."""

    source: str
    output: str
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    work_dir: str | None = Field(None, description="local scratch for the pixel cache; default: temp")
