"""Training throughput: the product's loop on the cached uint8 pixels against the notebook loop a
user would otherwise write (a Dataset that opens each file with Pillow on every epoch, a
DataLoader with no workers, float32 tensors), with the same model, optimiser and batch size.

    .venv/bin/python bench/train_bench.py [--source ../shared/data/mnist-test] [--epochs 3] [--repeats 2] [--photos 1000]

With --photos N the same comparison runs a second time on N JPEG photographs (the ingest
benchmark's crops of scikit-learn's two sample photos, 240x320 to 427x640) at 64x64 RGB, where
decoding, not the model, is most of the naive loop's time.

Prints images/s of both (median over epochs) and their ratio, measured in the same run; a third
row runs the product's loop in fp32 (`--precision fp32`), which splits the gain between the
cache (no decoding per epoch) and bfloat16 arithmetic. With --repeats R the three loops run R
times in turn, so each repeat's ratio compares loops that ran minutes apart at most (the
machine's speed moves by a third from one minute to the next); the ratio printed is the median
of the R ratios, and each repeat's ratio is listed beside it. The first line gives this CPU's
bf16 and fp32 matrix-product rates: on digits the ratio is mostly arithmetic and tracks theirs.
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
    loader = torch.utils.data.DataLoader(PerFileDataset(paths, arch.image_size, arch.channels), batch_size=BATCH,
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


def product_epochs(pixels: np.ndarray, arch: AEArch, epochs: int, precision: str = "auto") -> list[float]:
    cfg = TrainConfig(epochs=epochs, batch_size=BATCH, val_fraction=0.0, max_minutes=60, precision=precision)
    result = train_autoencoder(pixels, arch, cfg)
    times = [h["seconds"] for h in result.history]
    per_epoch = np.diff([0.0] + times)
    return [len(pixels) / t for t in per_epoch]


def compare(source: str, image_size: int, channels: int, blocks: int, epochs: int, width: int = 32,
            repeats: int = 1) -> list[dict]:
    fs = fsspec.filesystem("file")
    objects = sorted(list_objects(fs, source), key=lambda o: o.key)
    arch = AEArch(dim=32, image_size=image_size, channels=channels, width=width, blocks_per_stage=blocks)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        corpus = decode_corpus(objects, fs, Preprocess(image_size, channels), work)
        decode_s = time.perf_counter() - t0
        pixels = np.asarray(corpus.pixels())
    runs: dict[str, list[float]] = {"naive": [], "product": [], "fp32": []}
    for _ in range(repeats):
        runs["naive"].append(statistics.median(naive_epochs([o.path for o in objects], arch, epochs)))
        runs["product"].append(statistics.median(product_epochs(pixels, arch, epochs)))
        runs["fp32"].append(statistics.median(product_epochs(pixels, arch, epochs, "fp32")))
    what = f"{len(objects)} images at {image_size}x{image_size}x{channels}"
    labels = {"naive": "naive: Pillow per file per epoch, DataLoader(num_workers=0)",
              "product": f"product: uint8 cache (decoded once in {decode_s:.1f} s), precision auto",
              "fp32": "product loop in fp32 (the cache's share of the gain)"}
    rows = []
    for name, rates in runs.items():
        ratios = [r / n for r, n in zip(rates, runs["naive"])]
        rows.append({"corpus": what, "pipeline": labels[name], "images_per_s": statistics.median(rates),
                     "ratio": statistics.median(ratios), "ratio_per_repeat": " ".join(f"{x:.2f}" for x in ratios)})
    return rows


def matmul_rates(n: int = 1024, reps: int = 20) -> dict[str, float]:
    """GFLOP/s of an n x n matrix product in bf16 and in fp32 on this CPU's torch threads: the
    ceiling bf16 arithmetic can lift a compute-bound loop by."""
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(n, n, dtype=dtype)
        for _ in range(3):
            a @ a
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ a
        out[str(dtype).removeprefix("torch.")] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist-test"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="run the three loops this many times in turn")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--blocks-per-stage", type=int, default=1, help="the model's residual blocks (1: the default)")
    p.add_argument("--width", type=int, default=32, help="channels of the first conv stage (32: the default)")
    p.add_argument("--photos", type=int, default=0, help="also compare on this many JPEG photos at 64x64x3 (0 = skip)")
    args = p.parse_args()
    set_threads()
    peaks = matmul_rates()
    rows = compare(args.source, args.image_size, 1, args.blocks_per_stage, args.epochs, args.width, args.repeats)
    if args.photos:
        from bench.ingest_bench import make_photos

        rows += compare(make_photos(args.photos), 64, 3, args.blocks_per_stage, args.epochs, args.width, args.repeats)
    print(f"machine: {machine()}; 1024x1024 matrix product: bf16 {peaks['bfloat16']:.0f} GFLOP/s, "
          f"fp32 {peaks['float32']:.0f} GFLOP/s ({peaks['bfloat16'] / peaks['float32']:.1f}x)")
    print(f"model: dim 32, width {args.width}, {args.blocks_per_stage} residual block(s) per stage; batch {BATCH}; "
          f"images/s: median over {args.epochs} epochs, then over {args.repeats} repeat(s); "
          f"ratio: median of the repeats' ratios\n")
    print(table(rows))


if __name__ == "__main__":
    main()
