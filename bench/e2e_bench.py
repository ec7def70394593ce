"""End to end: `ae run` on a folder against the notebook pipeline a user would otherwise write,
in the same process run, on the same images, for the same number of epochs.

    .venv/bin/python bench/e2e_bench.py [--source ../shared/data/mnist-test] [--epochs 20] [--repeats 1]

The notebook pipeline: a Dataset that opens each file with Pillow on every access, a DataLoader
with no workers, float32 tensors, a 3-layer stride-2 conv encoder to `dim` numbers and its
transposed-conv mirror, Adam at 1e-3, batch 128; then every file is opened again to encode it,
the embeddings go to Parquet and into an exact FAISS index. The product: the `ae` command in a
fresh process (Prefect's ephemeral mode included), with `--epochs` fixed to the same number.

Both report the reconstruction MSE per pixel on [0, 1] over every image (the product's from the
recon_error column of its table), so the speed ratio is read at the quality each reached. Medians over --repeats.

A last row runs the fast settings against a Prefect server that is already up (`infra/local.sh
server-start`, started before the clock, as a scheduled deployment's server is, and stopped after
that run): the same command without the ephemeral server's start. `--no-server` leaves it out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from bench.common import machine, table  # noqa: E402
from bench.naive import PerFileDataset  # noqa: E402
from moto_server import free_port  # noqa: E402  (the tests' helper: a free loopback port)

BATCH = 128


class NotebookAE(nn.Module):
    """3 stride-2 convs to `dim` numbers and back, as in the tutorials (28x28 -> 14 -> 7 -> 4)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                                 nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(128 * 16, dim))
        self.dec = nn.Sequential(nn.Linear(dim, 128 * 16), nn.ReLU(), nn.Unflatten(1, (128, 4, 4)),
                                 nn.ConvTranspose2d(128, 64, 3, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.enc(x)
        return z, self.dec(z)


def notebook_pipeline(source: str, out: str, epochs: int, dim: int, size: int) -> dict:
    t0 = time.perf_counter()
    names = sorted(os.listdir(source))
    paths = [os.path.join(source, n) for n in names]
    torch.manual_seed(0)
    model = NotebookAE(dim)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loader = torch.utils.data.DataLoader(PerFileDataset(paths, size), batch_size=BATCH, shuffle=True)
    for _ in range(epochs):
        for x in loader:
            loss = nn.functional.mse_loss(model(x)[1], x)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    embs, errs = [], []
    with torch.no_grad():
        for x in torch.utils.data.DataLoader(PerFileDataset(paths, size), batch_size=512):
            z, r = model(x)
            embs.append(z.numpy())
            errs.append(((r - x) ** 2).mean(dim=(1, 2, 3)).numpy())
    emb = np.concatenate(embs).astype(np.float32)
    err = np.concatenate(errs)
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim)
    pq.write_table(pa.table({"key": names, "embedding": col, "recon_error": err}), os.path.join(out, "emb.parquet"))
    index = faiss.IndexFlatL2(dim)
    index.add(emb)
    faiss.write_index(index, os.path.join(out, "index.faiss"))
    return {"seconds": time.perf_counter() - t0, "mse": float(err.mean())}


FAST = ["--blocks-per-stage", "0", "--width", "16", "--lr", "0.01", "--anomaly-steps", "0"]


@contextlib.contextmanager
def prefect_server() -> Iterator[dict]:
    """A Prefect server on a free loopback port with its own home, through infra/local.sh as the
    README starts one; yields the environment that points `ae` at it."""
    state = tempfile.mkdtemp(prefix="ae-bench-prefect-")
    env = {**os.environ, "AE_STATE_DIR": state, "AE_PREFECT_PORT": str(free_port()),
           "AE_BIN": str(Path(sys.executable).parent), "PREFECT_HOME": os.path.join(state, "home")}
    local = str(ROOT / "infra" / "local.sh")
    try:
        started = subprocess.run([local, "server-start"], env=env, capture_output=True, text=True, timeout=300)
        if started.returncode:
            log = Path(state, "server.log")
            raise SystemExit(f"prefect server did not start:\n{started.stderr[-2000:]}\n"
                             f"{log.read_text()[-3000:] if log.exists() else ''}")
        yield {**env, "PREFECT_API_URL": f"http://127.0.0.1:{env['AE_PREFECT_PORT']}/api"}
    finally:
        subprocess.run([local, "stop"], env=env, check=False, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def product_pipeline(source: str, out: str, epochs: int, dim: int, extra: list[str],
                     env: dict | None = None) -> dict:
    ae = Path(sys.executable).parent / "ae"
    t0 = time.perf_counter()
    proc = subprocess.run([str(ae), "run", source, out, "--epochs", str(epochs), "--dim", str(dim), "--json", *extra],
                          capture_output=True, text=True, check=False, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"ae run failed:\n{proc.stderr[-2000:]}")
    manifest = json.loads(proc.stdout)
    table_path = os.path.join(manifest["published_url"], manifest["files"]["embeddings"])
    mse = float(np.mean(pq.read_table(table_path, columns=["recon_error"]).column("recon_error").to_numpy()))
    return {"seconds": seconds, "mse": mse, "stages": manifest["timings_s"],
            "train": manifest["train"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist-test"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--image-size", type=int, default=28, help="input side of the notebook model (28 for MNIST)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-server", dest="server", action="store_false",
                   help="leave out the row against an already running Prefect server")
    args = p.parse_args()
    naive, product, fast, served = [], [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            naive.append(notebook_pipeline(args.source, out, args.epochs, args.dim, args.image_size))
        with tempfile.TemporaryDirectory() as out:
            product.append(product_pipeline(args.source, os.path.join(out, "o"), args.epochs, args.dim, []))
        with tempfile.TemporaryDirectory() as out:
            fast.append(product_pipeline(args.source, os.path.join(out, "o"), args.epochs, args.dim, FAST))
        if args.server:  # up only for its own row: its background services would load the others
            with prefect_server() as server_env, tempfile.TemporaryDirectory() as out:
                served.append(product_pipeline(args.source, os.path.join(out, "o"), args.epochs, args.dim,
                                               FAST, server_env))
    n_s = statistics.median(r["seconds"] for r in naive)
    p_s = statistics.median(r["seconds"] for r in product)
    f_s = statistics.median(r["seconds"] for r in fast)
    n_images = len(os.listdir(args.source))
    print(f"machine: {machine()}; {n_images} images from {args.source}; {args.epochs} epochs, dim {args.dim}; "
          f"median of {args.repeats}\n")
    print(table([
        {"pipeline": "notebook: Pillow per file per epoch, 3-conv AE, Adam, exact index", "wall_s": n_s,
         "recon_mse": f'{statistics.median(r["mse"] for r in naive):.5f}', "speedup": 1.0},
        {"pipeline": "product: ae run, default settings (fresh process, ephemeral Prefect)", "wall_s": p_s,
         "recon_mse": f'{statistics.median(r["mse"] for r in product):.5f}', "speedup": n_s / p_s},
        {"pipeline": "product: ae run " + " ".join(FAST), "wall_s": f_s,
         "recon_mse": f'{statistics.median(r["mse"] for r in fast):.5f}', "speedup": n_s / f_s},
        *([{"pipeline": "product: ae run " + " ".join(FAST) + ", Prefect server already running",
            "wall_s": (s_s := statistics.median(r["seconds"] for r in served)),
            "recon_mse": f'{statistics.median(r["mse"] for r in served):.5f}', "speedup": n_s / s_s}]
          if served else []),
    ]))
    for name, runs in (("default", product), ("fast", fast)):
        t = runs[-1]["train"]
        print(f"\n{name} stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in runs[-1]["stages"].items()))
        print(f"{name} training: {t.get('precision', 'fp32')}, {t.get('images_per_s')} images/s; "
              f"anomaly fold models {t.get('anomaly_seconds', 0)} s")


if __name__ == "__main__":
    main()
