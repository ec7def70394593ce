"""Scaling: wall time per image and peak memory of `ae run` at 10,000 and at 100,000 images.

    .venv/bin/python bench/scaling_bench.py [--source ../shared/data/mnist-test] [--sizes 10000,100000] [--epochs 5]

The larger corpus is made from the shared images with small transforms (shifts of up to 2 pixels
and rotations of up to 10 degrees, seeded), written once as PNG files under --cache. Both runs use
the same fixed number of epochs, so the per-image time compares the pipeline's own cost rather
than the training budget (with default settings a 100,000-image run stops at the 5-minute budget,
which makes its per-image time look better than it is).

Memory is sampled every 0.1 s over the whole process tree of `ae run` (the CLI, its decode
worker processes): the table gives the peak of the tree's summed RSS and the peak of its largest
process. Each `ae run` is a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, table  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def build_corpus(source: str, dest: Path, n: int) -> Path:
    """`n` images: the source's own first, then seeded shifted/rotated copies. Reused if complete."""
    names = sorted(os.listdir(source))
    done = dest.with_name(dest.name + ".complete")  # beside the corpus, not an object in it
    if done.exists() and done.read_text() == str(n):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        copy, j = divmod(i, len(names))
        name = names[j]
        img = Image.open(os.path.join(source, name))
        if copy:
            dx, dy = rng.integers(-2, 3, size=2)
            img = img.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR,
                             translate=(int(dx), int(dy)))
        img.save(dest / f"{copy:02d}-{name}")
    done.write_text(str(n))
    return dest


def _tree_rss(root: int) -> tuple[int, int]:
    """(summed RSS, largest RSS) in bytes over `root` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, largest, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
        total, largest = total + rss, max(largest, rss)
    return total, largest


def run_ae(source: Path, out: str, epochs: int) -> dict:
    cmd = [str(Path(sys.executable).parent / "ae"), "run", str(source), out, "--epochs", str(epochs), "--json"]
    peak = {"tree": 0, "largest": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample() -> None:
        while proc.poll() is None:
            tree, largest = _tree_rss(proc.pid)
            peak["tree"], peak["largest"] = max(peak["tree"], tree), max(peak["largest"], largest)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"ae run failed:\n{stderr[-2000:]}")
    manifest = json.loads(stdout)
    return {"seconds": seconds, "rows": manifest["rows"], "peak_tree": peak["tree"], "peak_largest": peak["largest"],
            "stages": manifest["timings_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist-test"))
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ae-bench-corpora"),
                   help="where the enlarged corpora are written (kept for reruns)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        corpus = build_corpus(args.source, Path(args.cache) / f"{Path(args.source).name}-{n}", n)
        with tempfile.TemporaryDirectory() as out:
            r = run_ae(corpus, os.path.join(out, "o"), args.epochs)
        rows.append({"images": r["rows"], "wall_s": r["seconds"], "ms_per_image": 1000 * r["seconds"] / r["rows"],
                     "peak_rss_mb_tree": r["peak_tree"] / 2**20, "peak_rss_mb_largest": r["peak_largest"] / 2**20,
                     "stages_s": ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())})
    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["ms_per_image"] / base["ms_per_image"]
        r["rss_ratio"] = r["peak_rss_mb_tree"] / base["peak_rss_mb_tree"]
    print(f"machine: {machine()}; corpora from {args.source}; ae run --epochs {args.epochs}; "
          f"ratios against the first size\n")
    print(table([{k: r[k] for k in ("images", "wall_s", "ms_per_image", "time_ratio", "peak_rss_mb_tree",
                                    "rss_ratio", "peak_rss_mb_largest")} for r in rows]))
    print()
    for r in rows:
        print(f"{r['images']} images, stages: {r['stages_s']}")


if __name__ == "__main__":
    main()
