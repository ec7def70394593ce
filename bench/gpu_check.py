"""GPU check of the training and encoding path, with the library directly (no Prefect needed):
trains the default model in bf16 and fp32, the anomaly fold models, and checks that a checkpoint
trained on the GPU gives the same recon_error and anomaly_score on the CPU.

    python bench/gpu_check.py --source ../shared/data/mnist-test   # or a .tar of that folder

Prints JSON (and writes it to $OUT/gpu_check.json when OUT is set). See docs/benchmarks.md.
"""
import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ae_core import checkpoint  # noqa: E402
from ae_core.config import TrainConfig  # noqa: E402
from ae_core.decode import Preprocess  # noqa: E402
from ae_core.encode import anomaly_scores, encode_pixels, folds_of  # noqa: E402
from ae_core.ingest import decode_corpus  # noqa: E402
from ae_core.model import AEArch  # noqa: E402
from ae_core.quality import pca_fits  # noqa: E402
from ae_core.storage import list_objects  # noqa: E402
from ae_core.train import train_autoencoder, train_fold_models  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist-test"))
    args = p.parse_args()
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    d = tempfile.mkdtemp()
    source = args.source
    if source.endswith(".tar"):
        with tarfile.open(source) as tar:
            tar.extractall(d, filter="data")
        source = os.path.join(d, os.listdir(d)[0])
    fs = fsspec.filesystem("file")
    objs = sorted(list_objects(fs, source), key=lambda o: o.key)
    t = time.perf_counter(); corpus = decode_corpus(objs, fs, Preprocess(28, 1), os.path.join(d, "work"))
    out["decode_s"] = round(time.perf_counter() - t, 2)
    px = np.asarray(corpus.pixels()); keys = [i["key"] for i in corpus.images]
    out["pca32_mse"] = pca_fits(px.reshape(len(px), -1).astype(np.float32) / 255, [32])[32][1]
    arch = AEArch(32, 28, 1)  # the default model shape for MNIST
    train_autoencoder(px[:1024], arch, TrainConfig(epochs=1))  # CUDA and cuDNN warm-up, not timed
    for name, cfg in [("bf16_20ep", TrainConfig(epochs=20, precision="bf16")), ("fp32_20ep", TrainConfig(epochs=20, precision="fp32")),
                      ("defaults", TrainConfig())]:
        t = time.perf_counter(); r = train_autoencoder(px, arch, cfg); secs = time.perf_counter() - t
        t = time.perf_counter(); emb, err = encode_pixels(r.model, px); enc = time.perf_counter() - t
        out[name] = {"device": r.device, "precision": r.precision, "epochs": len(r.history), "train_s": round(secs, 1),
                     "img_per_s": round(r.images_seen / secs), "encode_s": round(enc, 2), "mse": float(err.mean()),
                     "ratio_pca": float(err.mean()) / out["pca32_mse"]}
        print(name, out[name], flush=True)
    t = time.perf_counter(); folds = train_fold_models(px, folds_of(keys), arch, TrainConfig())
    out["fold_models_s"] = round(time.perf_counter() - t, 1)
    anom = anomaly_scores(folds, px, folds_of(keys))
    data, _ = checkpoint.to_bytes(r.model, Preprocess(28, 1), {}, folds)
    ck = checkpoint.from_bytes(data, "cpu")
    emb_c, err_c = encode_pixels(ck.model, px[:2000])
    out["cpu_vs_gpu_recon_error_max_abs_diff"] = float(np.abs(err_c - err[:2000]).max())
    out["cpu_vs_gpu_embedding_max_abs_diff"] = float(np.abs(emb_c - emb[:2000]).max())
    anom_c = anomaly_scores(ck.anomaly_models, px[:2000], folds_of(keys[:2000]))
    out["cpu_vs_gpu_anomaly_max_abs_diff"] = float(np.abs(anom_c - anom[:2000]).max())
    torch.backends.cudnn.allow_tf32 = False; torch.backends.cuda.matmul.allow_tf32 = False
    emb_n, err_n = encode_pixels(r.model, px[:2000])
    out["no_tf32_cpu_vs_gpu_recon_error_max_abs_diff"] = float(np.abs(err_c - err_n).max())
    print(json.dumps(out, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
