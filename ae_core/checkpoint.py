"""Checkpoints: weights plus the exact architecture and preprocessing, loadable with weights_only.

The model version is a digest of the checkpoint's bytes, so every table and index that names it
points at exactly one set of weights.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import torch

from ae_core.decode import Preprocess
from ae_core.encode import CALIBRATION_LEVELS, valid_quantiles
from ae_core.model import AEArch, ConvAutoencoder

FORMAT = "ae-embed-checkpoint/1"


@dataclass
class Checkpoint:
    model: ConvAutoencoder
    preprocess: Preprocess
    version: str
    extra: dict
    # the two fold models behind anomaly_score (ae_core.encode.anomaly_scores); may be empty
    anomaly_models: list[ConvAutoencoder] = field(default_factory=list)
    # their held-out errors' quantiles, which put both halves on one scale (ae_core.encode.calibrate);
    # empty in a checkpoint written before calibration: its scores stay raw, like the rows it scored
    anomaly_quantiles: list[list[float]] = field(default_factory=list)


def _state(model: ConvAutoencoder) -> dict:
    # contiguous: the bytes (and so the model version) do not depend on the layout it trained in
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def to_bytes(model: ConvAutoencoder, preprocess: Preprocess, extra: dict | None = None,
             anomaly_models: list[ConvAutoencoder] | None = None,
             anomaly_quantiles: list[list[float]] | None = None) -> tuple[bytes, str]:
    """Serialise (plain tensors, dicts, numbers and strings only) and return (bytes, version)."""
    payload = {"format": FORMAT, "arch": model.arch.to_dict(), "preprocess": preprocess.to_dict(),
               "state_dict": _state(model), "extra": extra or {},
               "anomaly_state_dicts": [_state(m) for m in anomaly_models or []],
               "anomaly_archs": [m.arch.to_dict() for m in anomaly_models or []],
               "anomaly_quantiles": [[float(q) for q in qs] for qs in anomaly_quantiles or []]}
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    return data, version_of(data)


def version_of(data: bytes) -> str:
    """The model version: a digest of the checkpoint's bytes."""
    return "ae-" + hashlib.sha256(data).hexdigest()[:12]


def read_checkpoint(fs, path: str) -> Checkpoint:  # noqa: ANN001 - an fsspec filesystem
    """The checkpoint file at `path` on `fs`, loaded on the CPU."""
    return from_bytes(fs.cat_file(path))


def from_bytes(data: bytes, device: str | torch.device = "cpu") -> Checkpoint:
    """Load with weights_only=True: no arbitrary pickle is ever executed."""
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} checkpoint (format={payload.get('format')!r})")
    models = []
    states = [payload["state_dict"], *payload.get("anomaly_state_dicts", [])]
    archs = [payload["arch"], *payload.get("anomaly_archs", [])]
    for state, arch in zip(states, archs, strict=True):
        model = ConvAutoencoder(AEArch(**arch))
        model.load_state_dict(state)
        models.append(model.to(device).eval())
    quantiles = payload.get("anomaly_quantiles", [])
    if quantiles and not valid_quantiles(quantiles):  # would score garbage, or fail mid-encode
        raise ValueError("the checkpoint's anomaly_quantiles are not two increasing lists of "
                         f"{len(CALIBRATION_LEVELS)} finite non-negative numbers")
    version = version_of(data)
    return Checkpoint(models[0], Preprocess(**payload["preprocess"]), version, payload.get("extra", {}), models[1:],
                      [[float(q) for q in qs] for qs in quantiles])
