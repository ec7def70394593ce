"""The naive reference the benchmarks compare against: a torch Dataset that opens and decodes
each file with Pillow on every access, as a notebook would."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class PerFileDataset(torch.utils.data.Dataset):
    """Decode the file again on every access: gray, resized, float32 in [0, 1], (1, size, size)."""

    def __init__(self, paths: list[str], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = Image.open(self.paths[i]).convert("L").resize((self.size, self.size))
        return torch.from_numpy(np.asarray(img, np.float32) / 255.0)[None]
