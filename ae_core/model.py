"""The convolutional autoencoder: pure torch modules, no I/O.

Encoder: stride-2 conv stages (each followed by residual blocks) while the feature map is even
and larger than 8 pixels, then a Linear layer to the `dim`-wide bottleneck. There is no
full-resolution stem: on CPU it costs about 4x the training throughput for little gain.
Decoder: the mirror image (Linear, then transposed-conv stages), ending in a sigmoid so the
output lies in [0, 1] like the input pixels. SiLU rather than GELU: same quality, ~30% faster on CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

_MAX_WIDTH = 256
_MIN_FEATURE_MAP = 8  # stop downsampling at this side; deeper maps lose spatial detail for no gain


@dataclass(frozen=True)
class AEArch:
    """The exact shape of a built model; stored in every checkpoint as plain values."""

    dim: int
    image_size: int
    channels: int
    width: int = 32
    blocks_per_stage: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def feature_sizes(image_size: int) -> list[int]:
    """Side of the input, then of the feature map after each stride-2 stage."""
    sizes = [image_size]
    while sizes[-1] % 2 == 0 and sizes[-1] > _MIN_FEATURE_MAP:
        sizes.append(sizes[-1] // 2)
    return sizes


def stage_widths(width: int, n_stages: int) -> list[int]:
    return [min(width * 2**i, _MAX_WIDTH) for i in range(n_stages)]


class _FlattenOrder(torch.autograd.Function):
    """Copy a channels-last feature map to NCHW order for the Linear layer (the order every
    checkpoint's weights assume), and hand the gradient back channels-last, so the activation
    before it sees one layout forwards and backwards. Mixed layouts take PyTorch's strided
    elementwise path: measured on 2 cores, ~15% of a training step."""

    @staticmethod
    def forward(ctx, f: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return f.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad.contiguous(memory_format=torch.channels_last)


# For each output phase a (row or column parity) of a 4x4, stride-2, padding-1 transposed
# convolution, the kernel row (in the kernel padded by one on each side) that a 3x3 window's
# offset d = 0, 1, 2 meets; the padding rows are zeros, the taps that phase never uses.
_PHASE_TAPS = torch.tensor([[a + 4 - 2 * d for d in range(3)] for a in range(2)])


class OutputConvTranspose2d(nn.ConvTranspose2d):
    """The decoder's last layer (4x4, stride 2, padding 1, to the image's 1 or 3 channels), with
    the same weights and function as nn.ConvTranspose2d. With `subpixel` set (and that shape),
    it runs as a 3x3 convolution to 4x the channels (one per output phase, its kernel gathered
    from this one's) and a pixel shuffle: oneDNN runs a transposed convolution with so few
    output channels at ~20 GFLOP/s. Exact up to float summation order (1e-15 in float64,
    tests/test_model.py)."""

    subpixel = False

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - nn.ConvTranspose2d's
        super().__init__(*args, **kwargs)
        shape = (self.kernel_size, self.stride, self.padding, self.output_padding, self.dilation, self.groups)
        self._phases_fit = shape == ((4, 4), (2, 2), (1, 1), (0, 0), (1, 1), 1)  # the only shape rewritten

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if not (self.subpixel and self._phases_fit) or output_size is not None:
            return super().forward(x, output_size)
        w = nn.functional.pad(self.weight, (1, 1, 1, 1))  # (in, out, 6, 6)
        k = w[:, :, _PHASE_TAPS[:, :, None, None], _PHASE_TAPS[None, None, :, :]]  # in, out, a, dy, b, dx
        k = k.permute(1, 2, 4, 0, 3, 5).reshape(4 * self.out_channels, self.in_channels, 3, 3)
        bias = None if self.bias is None else self.bias.repeat_interleave(4)
        return nn.functional.pixel_shuffle(nn.functional.conv2d(x, k, bias, padding=1), 2)


def _norm_act(ch: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(ch), nn.SiLU()]


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1, bias=False), *_norm_act(ch),
            nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch),
        )
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class Encoder(nn.Module):
    def __init__(self, arch: AEArch) -> None:
        super().__init__()
        sizes = feature_sizes(arch.image_size)
        widths = stage_widths(arch.width, len(sizes) - 1)
        layers: list[nn.Module] = []
        c_in = arch.channels
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, stride=2, padding=1, bias=False), *_norm_act(w)]
            layers += [ResBlock(w) for _ in range(arch.blocks_per_stage)]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.to_code = nn.Linear(widths[-1] * sizes[-1] ** 2, arch.dim)
        self.channels_last = False  # set by ConvAutoencoder.to_channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if self.channels_last and torch.is_grad_enabled():
            f = _FlattenOrder.apply(f)
        return self.to_code(torch.flatten(f, 1))


class Decoder(nn.Module):
    def __init__(self, arch: AEArch) -> None:
        super().__init__()
        sizes = feature_sizes(arch.image_size)
        widths = stage_widths(arch.width, len(sizes) - 1)
        self.shape = (widths[-1], sizes[-1], sizes[-1])
        self.channels_last = False  # a plain attribute: the layout is not part of the weights
        self.from_code = nn.Linear(arch.dim, widths[-1] * sizes[-1] ** 2)
        layers: list[nn.Module] = [nn.SiLU()]
        for i in range(len(widths) - 1, -1, -1):
            layers += [ResBlock(widths[i]) for _ in range(arch.blocks_per_stage)]
            if i > 0:
                layers += [nn.ConvTranspose2d(widths[i], widths[i - 1], 4, stride=2, padding=1, bias=False),
                           *_norm_act(widths[i - 1])]
        layers += [OutputConvTranspose2d(widths[0], arch.channels, 4, stride=2, padding=1), nn.Sigmoid()]
        self.features = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_code(z).view(-1, *self.shape)
        if self.channels_last:  # match the kernels' layout (ConvAutoencoder.to_channels_last)
            h = h.contiguous(memory_format=torch.channels_last)
        return self.features(h)


class ConvAutoencoder(nn.Module):
    """Input and output: float tensors (N, channels, image_size, image_size) in [0, 1]."""

    def __init__(self, arch: AEArch) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.decoder(z)

    def to_channels_last(self) -> ConvAutoencoder:
        """Kernels in channels-last layout, and the decoder's first feature map made to match
        (the Linear layer's output is NCHW). Returns self. Inputs should be channels-last too.
        The CPU's layout (train.training_layout), so the output layer runs as a sub-pixel
        convolution here too: 1.17x the training images/s of the width-16 plain model on
        28x28 digits, 1.08x the default model's, 1.02x on 64x64 photos (bench/train_bench.py)."""
        self.encoder.channels_last = self.decoder.channels_last = True
        for layer in self.decoder.modules():
            if isinstance(layer, OutputConvTranspose2d):  # measured on CPU only; GPUs keep cuDNN's
                layer.subpixel = layer.weight.device.type == "cpu"
        return self.to(memory_format=torch.channels_last)
