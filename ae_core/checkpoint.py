"""Checkpoints: weights plus the exact architecture and preprocessing, loadable with weights_only.

The model version is a digest of the checkpoint's bytes, so every table and index that names it
points at exactly one set of weights.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import torch

from ae_core.decode import Preprocess
from ae_core.model import AEArch, ConvAutoencoder

FORMAT = "ae-embed-checkpoint/1"


@dataclass
class Checkpoint:
    model: ConvAutoencoder
    preprocess: Preprocess
    version: str
    extra: dict


def to_bytes(model: ConvAutoencoder, preprocess: Preprocess, extra: dict | None = None) -> tuple[bytes, str]:
    """Serialise (plain tensors, dicts, numbers and strings only) and return (bytes, version)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "arch": model.arch.to_dict(), "preprocess": preprocess.to_dict(),
               "state_dict": state, "extra": extra or {}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    return data, "ae-" + hashlib.sha256(data).hexdigest()[:12]


def from_bytes(data: bytes, device: str | torch.device = "cpu") -> Checkpoint:
    """Load with weights_only=True: no arbitrary pickle is ever executed."""
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} checkpoint (format={payload.get('format')!r})")
    model = ConvAutoencoder(AEArch(**payload["arch"]))
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    version = "ae-" + hashlib.sha256(data).hexdigest()[:12]
    return Checkpoint(model, Preprocess(**payload["preprocess"]), version, payload.get("extra", {}))
