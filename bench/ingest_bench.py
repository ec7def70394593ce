"""Ingest throughput (list, fetch, decode, preprocess) from a local folder and from an S3 server
(moto on loopback): the product's stage against a sequential fetch-then-decode loop (plain Pillow,
as a notebook would write it), and, for S3, against the raw concurrent fetch rate of the same
server (what the pipeline adds on top of I/O).

    .venv/bin/python bench/ingest_bench.py [--source ../shared/data/mnist-test] [--photos 1000] [--s3-objects 2000]

Two local corpora: the MNIST PNGs (28x28, ~300 bytes each) and --photos JPEG photographs cut from
the two real photos scikit-learn ships (random crops of 240x320 to 427x640 pixels at their native
resolution, quality 90, written once under the temp dir), preprocessed to 64x64 RGB.

moto is slow (~150 objects/s on 2 cores): the S3 figures test the pipeline's overhead against the
same server, not S3's speed. Medians over --repeats runs.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ae_core.decode import Preprocess  # noqa: E402
from ae_core.ingest import decode_corpus  # noqa: E402
from ae_core.storage import iter_batches, list_objects, open_store  # noqa: E402
from bench.common import machine, median_time, table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from moto_server import start_moto  # noqa: E402  (the tests' helper: moto's server on loopback)

SPEC = Preprocess(image_size=28, channels=1)
PHOTO_SPEC = Preprocess(image_size=64, channels=3)


def product(url: str, spec: Preprocess = SPEC) -> int:
    fs, root = open_store(url)
    objects = sorted(list_objects(fs, root), key=lambda o: o.key)
    with tempfile.TemporaryDirectory() as work:
        return len(decode_corpus(objects, fs, spec, work))


def sequential(url: str, spec: Preprocess = SPEC) -> int:
    """The notebook loop: fetch one object, decode it fully with Pillow, convert, resize."""
    fs, root = open_store(url)
    mode = "L" if spec.channels == 1 else "RGB"
    done = 0
    for o in sorted(list_objects(fs, root), key=lambda o: o.key):
        img = Image.open(io.BytesIO(fs.cat_file(o.path))).convert(mode).resize((spec.image_size,) * 2)
        np.asarray(img, np.uint8)
        done += 1
    return done


def path_loop(url: str, spec: Preprocess = SPEC) -> int:
    """The shortest notebook loop for a local folder: Pillow opens each path itself (no fsspec)."""
    root = url.removeprefix("file://")
    mode = "L" if spec.channels == 1 else "RGB"
    names = sorted(os.listdir(root))
    for name in names:
        np.asarray(Image.open(os.path.join(root, name)).convert(mode).resize((spec.image_size,) * 2), np.uint8)
    return len(names)


def local_rows(label: str, url: str, n: int, spec: Preprocess, repeats: int) -> list[dict]:
    """The two naive loops and the product on one local corpus, measured in turn."""
    seq = rate(sequential, url, n, repeats, spec)
    path = rate(path_loop, url, n, repeats, spec)
    prod = rate(product, url, n, repeats, spec)
    return [
        {"source": label, "pipeline": "sequential fetch-then-decode", "images_per_s": seq, "ratio": 1.0,
         "vs_path_loop": seq / path},
        {"source": label, "pipeline": "Pillow opens each path (no fsspec)", "images_per_s": path,
         "ratio": path / seq, "vs_path_loop": 1.0},
        {"source": label, "pipeline": "product ingest stage (decode_corpus)", "images_per_s": prod,
         "ratio": prod / seq, "vs_path_loop": prod / path},
    ]


def make_photos(n: int) -> str:
    """n JPEG crops of scikit-learn's two sample photographs, written once."""
    from sklearn.datasets import load_sample_images

    dest = Path(tempfile.gettempdir()) / f"ae-bench-photos-{n}"
    done = dest.with_name(dest.name + ".complete")  # beside the corpus, not an object in it
    if done.exists():
        return str(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = load_sample_images().images
    for i in range(n):
        src = images[i % len(images)]
        h = int(rng.integers(240, src.shape[0] + 1))
        w = min(src.shape[1], int(h * rng.uniform(1.2, 1.5)))
        y, x = int(rng.integers(0, src.shape[0] - h + 1)), int(rng.integers(0, src.shape[1] - w + 1))
        crop = src[y:y + h, x:x + w]
        Image.fromarray(crop[:, ::-1] if rng.random() < 0.5 else crop).save(dest / f"photo-{i:05d}.jpg", quality=90)
    done.write_text("")
    return str(dest)


def raw_concurrent_fetch(url: str, spec: Preprocess = SPEC) -> int:  # noqa: ARG001 - same signature as the others
    fs, root = open_store(url)
    paths = [o.path for o in list_objects(fs, root)]
    for batch in iter_batches(paths, 64):
        fs.cat(batch)
    return len(paths)


def rate(fn, url: str, n: int, repeats: int, spec: Preprocess = SPEC) -> float:
    return n / median_time(lambda: fn(url, spec), repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist-test"))
    p.add_argument("--s3-objects", type=int, default=2000)
    p.add_argument("--photos", type=int, default=1000, help="JPEG photos in the second local corpus (0 = skip)")
    p.add_argument("--large", default=str(Path(tempfile.gettempdir()) / "ae-bench-corpora/mnist-test-100000"),
                   help="a larger local corpus of the same kind, measured too if it exists "
                        "(bench/scaling_bench.py writes this one: 100,000 transformed MNIST digits)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    local_n = len(os.listdir(args.source))
    rows = local_rows("local folder", args.source, local_n, SPEC, args.repeats)
    if os.path.isdir(args.large):
        large_n = len(os.listdir(args.large))
        rows += local_rows(f"local folder ({large_n:,} PNGs)", args.large, large_n, SPEC, args.repeats)
    if args.photos:
        photos = make_photos(args.photos)
        rows += local_rows(f"local JPEG photos ({args.photos}, to 64x64x3)", photos, args.photos, PHOTO_SPEC, args.repeats)

    moto, endpoint = start_moto()
    try:
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("bench")
        names = sorted(os.listdir(args.source))[: args.s3_objects]
        fs.put([os.path.join(args.source, n) for n in names], [f"bench/src/{n}" for n in names])
        url, n = "s3://bench/src", len(names)
        raw = rate(raw_concurrent_fetch, url, n, args.repeats)
        seq = rate(sequential, url, n, args.repeats)
        prod = rate(product, url, n, args.repeats)
        rows += [
            {"source": f"moto S3 ({n} objects)", "pipeline": "raw concurrent fetch (fs.cat, 64 at a time)", "images_per_s": raw, "ratio": 1.0, "vs_path_loop": ""},
            {"source": f"moto S3 ({n} objects)", "pipeline": "sequential fetch-then-decode", "images_per_s": seq, "ratio": seq / raw, "vs_path_loop": ""},
            {"source": f"moto S3 ({n} objects)", "pipeline": "product ingest stage (decode_corpus)", "images_per_s": prod, "ratio": prod / raw, "vs_path_loop": ""},
        ]
    finally:
        moto.terminate()
        moto.wait(10)
    print(f"machine: {machine()}; {local_n} local images from {args.source} (to 28x28x1); "
          f"median of {args.repeats}; local ratios against the sequential fetch-then-decode loop (and, in "
          f"vs_path_loop, against Pillow opening each path itself), S3 ratios against raw fetch\n")
    print(table(rows))


if __name__ == "__main__":
    main()
