"""Training throughput: the product's loop on the cached uint8 pixels against the notebook loop a
user would otherwise write (a Dataset that opens each file with Pillow on every epoch, a
DataLoader with no workers, float32 tensors), with the same model, optimiser and batch size.

    .venv/bin/python bench/train_bench.py [--source ../shared/data/mnist-test] [--epochs 3]

Prints images/s of both (median over epochs) and their ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ae_core.config import TrainConfig  # noqa: E402
from ae_core.decode import Preprocess  # noqa: E402
from ae_core.ingest import decode_corpus  # noqa: E402
from ae_core.model import AEArch, ConvAutoencoder  # noqa: E402
from ae_core.storage import list_objects  # noqa: E402
from ae_core.train import set_threads, train_autoencoder  # noqa: E402
from bench.common import machine, table  # noqa: E402
from bench.naive import PerFileDataset  # noqa: E402

BATCH = 128


def naive_epochs(paths: list[str], arch: AEArch, epochs: int) -> list[float]:
    torch.manual_seed(0)
    model = ConvAutoencoder(arch)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loader = torch.utils.data.DataLoader(PerFileDataset(paths, arch.image_size), batch_size=BATCH,
                                         shuffle=True, num_workers=0)
    rates = []
    for _ in range(epochs):
        t0, seen = time.perf_counter(), 0
        for x in loader:
            loss = torch.nn.functional.mse_loss(model(x)[1], x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(x)
        rates.append(seen / (time.perf_counter() - t0))
    return rates


def product_epochs(pixels: np.ndarray, arch: AEArch, epochs: int) -> list[float]:
    cfg = TrainConfig(epochs=epochs, batch_size=BATCH, val_fraction=0.0, max_minutes=60)
    result = train_autoencoder(pixels, arch, cfg)
    times = [h["seconds"] for h in result.history]
    per_epoch = np.diff([0.0] + times)
    return [len(pixels) / t for t in per_epoch]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist-test"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=28)
    args = p.parse_args()
    set_threads()
    fs = fsspec.filesystem("file")
    objects = sorted(list_objects(fs, args.source), key=lambda o: o.key)
    arch = AEArch(dim=32, image_size=args.image_size, channels=1)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        corpus = decode_corpus(objects, fs, Preprocess(args.image_size, 1), work)
        decode_s = time.perf_counter() - t0
        pixels = np.asarray(corpus.pixels())
    naive = statistics.median(naive_epochs([o.path for o in objects], arch, args.epochs))
    product = statistics.median(product_epochs(pixels, arch, args.epochs))
    print(f"machine: {machine()}; {len(objects)} images from {args.source}; model {arch}; batch {BATCH}; "
          f"median over {args.epochs} epochs\n")
    print(table([
        {"pipeline": "naive: Pillow per file per epoch, DataLoader(num_workers=0)", "images_per_s": naive, "ratio": 1.0},
        {"pipeline": f"product: uint8 cache (decoded once in {decode_s:.1f} s)", "images_per_s": product,
         "ratio": product / naive},
    ]))


if __name__ == "__main__":
    main()
