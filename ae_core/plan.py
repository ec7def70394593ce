"""Choosing the model's input from the corpus: a small I/O probe, then pure decisions.

The probe reads a sample of objects spread evenly over the listing and records each one's size
and whether its content is grayscale. The decisions are pure functions tested as tables.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from fsspec.spec import AbstractFileSystem

from ae_core.config import ModelConfig
from ae_core.decode import Preprocess, decode_image, read_header
from ae_core.errors import DecodeError
from ae_core.ingest import byte_batches, read_objects
from ae_core.storage import ObjectInfo

PROBE_SAMPLE = 128  # objects read to choose size and channels; enough for a stable median
_PROBE_BATCH = 64  # objects read at once (concurrently from S3), and at most ingest.BATCH_BYTES
MIN_IMAGE_SIZE = 16  # smaller inputs leave no room for two stride-2 stages
MAX_AUTO_IMAGE_SIZE = 64  # auto choice caps here: larger inputs cost CPU time, not embedding quality
_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_GRAY_TOLERANCE = 3.0  # mean |R-G|+|G-B| levels still counted as gray (JPEG chroma noise)


@dataclass(frozen=True)
class CorpusProbe:
    sampled: int
    decodable: int
    sides: tuple[int, ...]  # min(width, height) of each decodable sample
    grayscale: tuple[bool, ...]


def probe_sample(objects: Sequence[ObjectInfo], n: int = PROBE_SAMPLE) -> list[ObjectInfo]:
    """Up to n objects spread evenly over the (key-sorted) listing. Pure."""
    ordered = sorted(objects, key=lambda o: o.key)
    if len(ordered) <= n:
        return ordered
    step = len(ordered) / n
    return [ordered[int(i * step)] for i in range(n)]


def _is_gray_content(data: bytes, max_pixels: int) -> bool:
    thumb = decode_image(data, Preprocess(image_size=16, channels=3, max_image_pixels=max_pixels)).pixels.astype(np.int16)
    spread = np.abs(thumb[0] - thumb[1]).mean() + np.abs(thumb[1] - thumb[2]).mean()
    return bool(spread <= _GRAY_TOLERANCE)


def probe_corpus(fs: AbstractFileSystem, objects: Sequence[ObjectInfo], max_pixels: int) -> CorpusProbe:
    sample = probe_sample(objects)
    sides, gray = [], []
    for batch in byte_batches(sample, _PROBE_BATCH):
        _probe_batch(read_objects(fs, batch, max_pixels), batch, max_pixels, sides, gray)
    return CorpusProbe(len(sample), len(sides), tuple(sides), tuple(gray))


def _probe_batch(got: dict, batch: list[ObjectInfo], max_pixels: int, sides: list[int], gray: list[bool]) -> None:
    for o in batch:
        data = got.get(o.path)
        if not isinstance(data, (bytes, bytearray)):
            continue
        try:
            head = read_header(bytes(data), max_pixels)
            if head.mode in _GRAY_MODES:  # decoded too: a truncated file's header alone set the size
                decode_image(bytes(data), Preprocess(image_size=16, channels=1, max_image_pixels=max_pixels))
                is_gray = True
            else:
                is_gray = _is_gray_content(bytes(data), max_pixels)
        except DecodeError:
            continue
        sides.append(min(head.width, head.height))
        gray.append(is_gray)


def choose_image_size(median_side: float) -> int:
    """The largest multiple of 4 not above the images' median short side, within [16, 64]. Pure."""
    size = int(median_side) // 4 * 4
    return max(MIN_IMAGE_SIZE, min(MAX_AUTO_IMAGE_SIZE, size))


def choose_channels(grayscale: Sequence[bool]) -> int:
    """1 when every sampled image is grayscale in content, else 3. Pure."""
    return 1 if grayscale and all(grayscale) else 3


def resolve_model_config(model: ModelConfig, probe: CorpusProbe | None) -> ModelConfig:
    """Fill the fields the user left as None from the probe; the user's choices always win."""
    if model.image_size is not None and model.channels is not None:
        return model
    if probe is None or probe.decodable == 0:
        return model.model_copy(update={"image_size": model.image_size or 32, "channels": model.channels or 3})
    size = model.image_size or choose_image_size(statistics.median(probe.sides))
    channels = model.channels or choose_channels(probe.grayscale)
    return model.model_copy(update={"image_size": size, "channels": channels})
