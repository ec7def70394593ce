"""Encoding throughput: the product's encode stage against the notebook loop, same model.

    .venv/bin/python bench/encode_bench.py [--source ../shared/data/mnist-test] [--photos 1000] [--repeats 3]

The notebook loop: a Dataset that opens each file with Pillow, a DataLoader with no workers and
batch 512, the model's forward pass in fp32 under no_grad, embeddings and per-image error kept.
The product: `encode_pixels` (BatchNorm folded into the convolutions, channels-last, fp32,
inference mode) on the uint8 cache, and the same with the cache's decoding included (what a run
pays for images it has not seen). The script prints how far apart the two pipelines' numbers
are: on the digits (already at the model's size) they agree to float rounding; the photos differ
more because the two resize differently (the product decodes JPEG in draft mode and resizes
bilinearly, Pillow's plain `resize` is bicubic on the full image). Medians over --repeats.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ae_core.decode import Preprocess  # noqa: E402
from ae_core.encode import encode_pixels  # noqa: E402
from ae_core.ingest import decode_corpus  # noqa: E402
from ae_core.model import AEArch, ConvAutoencoder  # noqa: E402
from ae_core.storage import list_objects  # noqa: E402
from ae_core.train import set_threads  # noqa: E402
from bench.common import machine, median_time, table  # noqa: E402
from bench.naive import PerFileDataset  # noqa: E402

BATCH = 512


@torch.no_grad()
def naive_encode(model: ConvAutoencoder, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    arch = model.arch
    embs, errs = [], []
    for x in torch.utils.data.DataLoader(PerFileDataset(paths, arch.image_size, arch.channels), batch_size=BATCH):
        z, r = model(x)
        embs.append(z.numpy())
        errs.append(((r - x) ** 2).mean(dim=(1, 2, 3)).numpy())
    return np.concatenate(embs), np.concatenate(errs)


def compare(source: str, image_size: int, channels: int, repeats: int) -> list[dict]:
    fs = fsspec.filesystem("file")
    objects = sorted(list_objects(fs, source), key=lambda o: o.key)
    spec = Preprocess(image_size, channels)
    torch.manual_seed(0)
    model = ConvAutoencoder(AEArch(32, image_size, channels)).eval()
    paths = [o.path for o in objects]

    def decode_and_encode():
        with tempfile.TemporaryDirectory() as work:
            return encode_pixels(model, decode_corpus(objects, fs, spec, work).pixels(), BATCH)

    with tempfile.TemporaryDirectory() as work:
        pixels = decode_corpus(objects, fs, spec, work).pixels()
        naive_s = median_time(lambda: naive_encode(model, paths), repeats)
        cached_s = median_time(lambda: encode_pixels(model, pixels, BATCH), repeats)
        both_s = median_time(decode_and_encode, repeats)
        (e0, r0), (e1, r1) = naive_encode(model, paths), encode_pixels(model, pixels, BATCH)
    agree = f"largest difference from the notebook's: embedding {np.abs(e0 - e1).max():.1e}, error {np.abs(r0 - r1).max():.1e}"
    n, what = len(objects), f"{len(objects)} images at {image_size}x{image_size}x{channels}"
    return [
        {"corpus": what, "pipeline": "notebook: Pillow per file, DataLoader(num_workers=0), fp32 forward",
         "images_per_s": n / naive_s, "ratio": 1.0},
        {"corpus": what, "pipeline": "product: encode_pixels on the uint8 cache", "images_per_s": n / cached_s,
         "ratio": naive_s / cached_s},
        {"corpus": what, "pipeline": f"product: decode into the cache, then encode ({agree})",
         "images_per_s": n / both_s, "ratio": naive_s / both_s},
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist-test"))
    p.add_argument("--photos", type=int, default=1000, help="also on this many JPEG photos at 64x64x3 (0 = skip)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    set_threads()
    t0 = time.perf_counter()
    rows = compare(args.source, 28, 1, args.repeats)
    if args.photos:
        from bench.ingest_bench import make_photos

        rows += compare(make_photos(args.photos), 64, 3, args.repeats)
    print(f"machine: {machine()}; default model (dim 32, width 32, one residual block per stage); "
          f"batch {BATCH}; median of {args.repeats}; {time.perf_counter() - t0:.0f} s in all\n")
    print(table(rows))


if __name__ == "__main__":
    main()
