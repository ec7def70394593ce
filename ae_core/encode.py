"""Batch encoding: embeddings and per-image reconstruction error from one forward pass."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ae_core.model import ConvAutoencoder


def inference_copy(model: ConvAutoencoder) -> ConvAutoencoder:
    """The same function, cheaper to evaluate: a copy in eval mode with every BatchNorm that
    follows a convolution folded into that convolution's weights, in channels-last layout.
    Outputs agree with the model's to float rounding (~1e-8 on [0, 1] pixels); measured on 2
    cores, 1.7-1.8x the throughput of the model as trained."""
    fast = ConvAutoencoder(model.arch).to(next(model.parameters()).device)  # no copy of .grad
    fast.load_state_dict(model.state_dict())
    fast.eval()
    for seq in [m for m in fast.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(bn, nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
                seq[i + 1] = nn.Identity()
    return fast.to_channels_last()


@torch.inference_mode()
def encode_pixels(model: ConvAutoencoder, pixels: np.ndarray, batch_size: int = 512,
                  on_batch: Callable[[int], None] = lambda n: None) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, H, W) uint8 -> embeddings (N, dim) float32 and recon_error (N,) float32.

    recon_error is the mean squared error per pixel between the image and its reconstruction,
    on the [0, 1] scale at the model's input size: the image's anomaly score.
    """
    model.eval()
    fast = inference_copy(model)
    device = next(model.parameters()).device
    n = len(pixels)
    emb = np.empty((n, model.arch.dim), np.float32)
    err = np.empty(n, np.float32)
    for start in range(0, n, batch_size):
        chunk = np.require(pixels[start:start + batch_size], requirements=["C", "W"])  # torch warns on read-only
        x = torch.from_numpy(chunk).to(device).float().div_(255.0)
        z, recon = fast(x.contiguous(memory_format=torch.channels_last))
        emb[start:start + len(x)] = z.float().cpu().numpy()
        err[start:start + len(x)] = ((recon.float() - x) ** 2).mean(dim=(1, 2, 3)).cpu().numpy()
        on_batch(len(x))
    return emb, err


def anomaly_fold(key: str) -> int:
    """The fold (0 or 1) of an image, from its key alone: stable across runs and machines. Pure."""
    return hashlib.blake2b(key.encode(), digest_size=1).digest()[0] & 1


def folds_of(keys: Sequence[str]) -> np.ndarray:
    return np.fromiter((anomaly_fold(k) for k in keys), np.int8, len(keys))


def anomaly_scores(fold_models: Sequence[ConvAutoencoder], pixels: np.ndarray, folds: np.ndarray,
                   batch_size: int = 512) -> np.ndarray:
    """Held-out reconstruction error: an image of fold f is scored by the model trained on fold
    1 - f only, so the score is never lowered by the model having memorised that image.

    fold_models[k] was trained on the images of fold k (ae_core.train.train_fold_models).
    """
    out = np.empty(len(pixels), np.float32)
    for fold in (0, 1):
        rows = np.flatnonzero(folds == fold)
        if len(rows):
            out[rows] = encode_pixels(fold_models[1 - fold], pixels[rows], batch_size)[1]
    return out
