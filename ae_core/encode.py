"""Batch encoding: embeddings and per-image reconstruction error from one forward pass."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ae_core.model import ConvAutoencoder


@torch.no_grad()
def encode_pixels(model: ConvAutoencoder, pixels: np.ndarray, batch_size: int = 512,
                  on_batch: Callable[[int], None] = lambda n: None) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, H, W) uint8 -> embeddings (N, dim) float32 and recon_error (N,) float32.

    recon_error is the mean squared error per pixel between the image and its reconstruction,
    on the [0, 1] scale at the model's input size: the image's anomaly score.
    """
    model.eval()
    device = next(model.parameters()).device
    n = len(pixels)
    emb = np.empty((n, model.arch.dim), np.float32)
    err = np.empty(n, np.float32)
    for start in range(0, n, batch_size):
        chunk = np.ascontiguousarray(pixels[start:start + batch_size])
        x = torch.from_numpy(chunk).to(device).float().div_(255.0)
        z, recon = model(x)
        emb[start:start + len(x)] = z.float().cpu().numpy()
        err[start:start + len(x)] = ((recon.float() - x) ** 2).mean(dim=(1, 2, 3)).cpu().numpy()
        on_batch(len(x))
    return emb, err
