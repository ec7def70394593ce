"""The naive reference the benchmarks compare against: a torch Dataset that opens and decodes
each file with Pillow on every access, as a notebook would."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class PerFileDataset(torch.utils.data.Dataset):
    """Decode the file again on every access: gray (or RGB with channels=3), resized, float32 in
    [0, 1], (channels, size, size)."""

    def __init__(self, paths: list[str], size: int, channels: int = 1) -> None:
        self.paths, self.size, self.mode = paths, size, "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = Image.open(self.paths[i]).convert(self.mode).resize((self.size, self.size))
        arr = np.asarray(img, np.float32) / 255.0
        return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())
