"""Anomaly scores on real corpora with intruders of another kind mixed in: where the intruders
rank, and whether the two halves of the corpus (scored by two fold models) share one scale.

    .venv/bin/python bench/anomaly_bench.py [--data ../shared/data] [--max-minutes 5] [--only NAME]

Each corpus is built from the shared data (MNIST digits and COIL-20 photos, the labels unused),
then `ae run` runs on it with default settings in a fresh process. From its table and model:
- the intruders' ranks by `anomaly_score` (calibrated, as published), by the fold models' raw
  held-out errors (recomputed from the checkpoint, before calibration) and by `recon_error`;
- the top 50 by each score: how many come from half 1 (`anomaly_fold(key) == 0`, the images
  fold model 2 scores), against that half's share of the corpus (a fair score draws the top 50
  from the halves in proportion).
`--max-minutes` below the default cuts the fold models short at different steps, as a busy
machine does: the case where the raw halves drift furthest apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ae_core import checkpoint, query  # noqa: E402
from ae_core.decode import decode_image  # noqa: E402
from ae_core.encode import encode_pixels, folds_of  # noqa: E402
from bench.common import machine, table  # noqa: E402

TOP = 50


def corpora(data: Path) -> dict[str, tuple[list[Path], list[Path], str]]:
    """name -> (base images, intruders, a prefix for the intruders' names): fixed selections, so
    every run builds the same corpora. The halves follow a hash of the key: a prefix puts the
    same intruders into other halves."""
    digits = sorted((data / "mnist-test").iterdir())
    photos = sorted((data / "coil20").iterdir())
    photo = {p.name: p for p in photos}
    return {
        "300 digits + 5 photos (pose 0; tests/test_quality_cli.py)": (
            digits[:300], [photo[f"obj{i}__0.png"] for i in (3, 7, 11, 15, 19)], ""),
        "the same, photos renamed x-*": (digits[:300], [photo[f"obj{i}__0.png"] for i in (3, 7, 11, 15, 19)], "x-"),
        "300 other digits + 5 photos (pose 36)": (
            digits[300:600], [photo[f"obj{i}__36.png"] for i in (1, 5, 9, 13, 17)], ""),
        "2,000 digits + 10 photos": (digits[1000:3000], [photo[f"obj{i}__{5 * i}.png"] for i in range(1, 11)], ""),
        "360 photos + 5 digits": (photos[::4], digits[:5], ""),
        "COIL-20, all 1,440 photos": (photos, [], ""),
    }


def build(folder: Path, base: list[Path], intruders: list[Path], prefix: str) -> list[str]:
    folder.mkdir(parents=True)
    for p in base:
        shutil.copy(p, folder / p.name)
    for p in intruders:
        shutil.copy(p, folder / f"{prefix}{p.name}")
    return [f"{prefix}{p.name}" for p in intruders]


def ranks(keys: np.ndarray, score: np.ndarray) -> dict[str, int]:
    order = np.argsort(-score, kind="stable")
    return {k: r + 1 for r, k in enumerate(keys[order])}


def measure(name: str, base: list[Path], intruders: list[Path], prefix: str, work: Path, max_minutes: float) -> dict:
    src, out = work / "src", work / "out"
    odd = build(src, base, intruders, prefix)
    ae = Path(sys.executable).parent / "ae"
    proc = subprocess.run([str(ae), "run", str(src), str(out), "--max-minutes", str(max_minutes), "--json"],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"ae run on {name} failed:\n{proc.stderr[-2000:]}")
    info = query.info(str(out))
    df = pd.read_parquet(info["embeddings"])
    ckpt = checkpoint.from_bytes(Path(info["checkpoint"]).read_bytes())
    keys = df["key"].to_numpy()
    folds = folds_of(list(keys))
    pixels = np.stack([decode_image((src / k).read_bytes(), ckpt.preprocess).pixels for k in keys])
    raw = np.empty(len(keys), np.float32)
    for f in (0, 1):  # the fold model that never trained on the image, before calibration
        rows = np.flatnonzero(folds == f)
        raw[rows] = encode_pixels(ckpt.anomaly_models[1 - f], pixels[rows])[1]
    scores = {"anomaly_score": df["anomaly_score"].to_numpy(), "raw held-out": raw,
              "recon_error": df["recon_error"].to_numpy()}
    share = float((folds == 0).mean())
    train = json.loads(proc.stdout)["train"] if proc.stdout.strip().startswith("{") else {}
    row = {"corpus": name, "images": len(keys), "fold steps": "/".join(map(str, train.get("anomaly_steps_run", []))),
           f"half 1's share of top {TOP} (fair)": f"{round(share * TOP)}"}
    for label, s in scores.items():
        top = np.argsort(-s, kind="stable")[:TOP]
        row[f"by {label}: top {TOP} from half 1"] = int((folds[top] == 0).sum())
    for label, s in scores.items():
        r = ranks(keys, s)
        row[f"intruder ranks by {label}"] = ", ".join(map(str, sorted(r[k] for k in odd))) or "-"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--max-minutes", type=float, default=5.0)
    ap.add_argument("--only", help="run the corpora whose name contains this text")
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "mnist-test").is_dir() or not (data / "coil20").is_dir():
        raise SystemExit(f"--data {args.data!r} holds no mnist-test and coil20 folders; give ../shared/data")
    rows = []
    with tempfile.TemporaryDirectory(prefix="anomaly-bench-") as tmp:
        for i, (name, (base, intruders, prefix)) in enumerate(corpora(data).items()):
            if args.only and args.only not in name:
                continue
            rows.append(measure(name, base, intruders, prefix, Path(tmp) / str(i), args.max_minutes))
            print(f"{name}: done", file=sys.stderr, flush=True)
    print(f"machine: {machine()}; ae run defaults, --max-minutes {args.max_minutes:g}\n")
    print(table(rows))


if __name__ == "__main__":
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
