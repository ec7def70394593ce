"""A small real corpus that needs no download: scikit-learn's 1,797 handwritten digits as PNGs."""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image


def write_digits_corpus(folder: str) -> dict[str, int]:
    """Write each 8x8 digit (16 gray levels) as an 8-bit grayscale PNG, pixel for pixel.

    Labels go to `<folder>-labels.csv` beside the folder, never inside it: the pipeline is
    unsupervised, and a labels file inside would be read as an (invalid) image.
    Returns key -> label.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    os.makedirs(folder, exist_ok=True)
    labels: dict[str, int] = {}
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        key = f"{i:05d}.png"
        pixels = np.clip(np.round(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(os.path.join(folder, key))
        labels[key] = int(label)
    with open(folder.rstrip("/") + "-labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        writer.writerows(sorted(labels.items()))
    return labels
