"""Device-agnostic, seeded training of the autoencoder on cached uint8 pixels.

The learning rate follows a warmup + cosine schedule over whichever budget runs out first,
epochs or wall-clock minutes, so a time-capped run still ends annealed. A held-out split drives
early stopping, and the best weights on it are the ones kept.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ae_core.config import TrainConfig
from ae_core.encode import inference_copy
from ae_core.errors import AeError
from ae_core.hardware import usable_cores
from ae_core.model import AEArch, ConvAutoencoder

MIN_EPOCHS, MAX_EPOCHS = 20, 500
MIN_STEPS = 1500  # optimizer steps; small corpora need many epochs to get there
_WARMUP = 0.03  # fraction of the budget spent warming the learning rate up
_MIN_VAL_CORPUS = 40  # below this every image trains; there is nothing to hold out


@dataclass
class TrainResult:
    model: ConvAutoencoder
    device: str
    epochs_planned: int = 0
    precision: str = "fp32"
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float | None = None
    stop_reason: str = "epochs"
    seconds: float = 0.0
    images_seen: int = 0
    steps: int = 0  # optimizer steps taken

    def summary(self) -> dict:
        return {"device": self.device, "precision": self.precision, "epochs_planned": self.epochs_planned, "epochs_run": len(self.history), "best_epoch": self.best_epoch,
                "best_val_mse": self.best_val_loss, "stop_reason": self.stop_reason,
                "seconds": round(self.seconds, 2),
                "images_per_s": round(self.images_seen / self.seconds, 1) if self.seconds else None,
                "history": self.history}


def parse_device(name: str) -> torch.device | None:
    """The device `name` names (None for 'auto'), without asking whether this machine has it:
    for a stage that trains on another machine (a GPU work pool)."""
    if name == "auto":
        return None
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise AeError(f"device {name!r} is not a torch device ({err}); use auto, cpu, cuda or cuda:N") from err


def pick_device(name: str = "auto") -> torch.device:
    """'auto' = CUDA when present, else CPU. A device torch cannot use here is an AeError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise AeError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s) on this machine; "
                      "use device auto or cpu")
    backend = getattr(torch.backends, device.type, None) if device.type == "mps" else getattr(torch, device.type, None)
    if device.type not in ("cpu", "cuda") and not (backend is not None and backend.is_available()):
        raise AeError(f"device {name!r}: no {device.type} device is available to torch here; use device auto or cpu")
    return device


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training, or None for plain fp32."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        # bf16 emulated on older CPUs is slower than fp32: use it only where oneDNN runs it natively
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return None


def set_threads() -> None:
    """Use every usable core for torch's intra-op pool (the default may be fewer inside containers)."""
    torch.set_num_threads(usable_cores())


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / held-out split. Pure."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if n >= _MIN_VAL_CORPUS else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def auto_epochs(n_train: int, batch_size: int) -> int:
    """Epochs when the user gives none: enough optimizer steps for small corpora. Pure."""
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    return max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch)))


def lr_at(progress: float, base_lr: float) -> float:
    """Linear warmup, then cosine decay to zero; progress in [0, 1]. Pure."""
    if progress < _WARMUP:
        return base_lr * (progress / _WARMUP)
    t = min(1.0, (progress - _WARMUP) / (1 - _WARMUP))
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to max_shift pixels, edges replicated (no wrap-around)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offs)])


def _to_float(batch: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
    return t.to(device, non_blocking=True).float().div_(255.0)


def training_layout(device: torch.device) -> torch.memory_format:
    """Channels-last on CPU: oneDNN's convolutions run on NHWC without reordering, 1.17-1.24x
    the training steps/s on 2 cores (bench/train_bench.py). Elsewhere PyTorch's default, the
    layout the GPU figures were measured with."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


@torch.no_grad()
def evaluate_mse(model: ConvAutoencoder, pixels: np.ndarray, device: torch.device, batch: int = 512) -> float:
    """Mean squared error per pixel on [0, 1], in eval mode (BatchNorm folded, as when encoding)."""
    model.eval()
    fast = inference_copy(model)
    total, count = 0.0, 0
    for start in range(0, len(pixels), batch):
        x = _to_float(pixels[start:start + batch], device)
        total += float(F.mse_loss(fast(x.contiguous(memory_format=torch.channels_last))[1], x, reduction="sum"))
        count += x.numel()
    return total / max(count, 1)


def _weights_sum(model: ConvAutoencoder) -> float:
    return float(sum(p.detach().float().sum() for p in model.parameters()))


def _check_finite(value: float, epoch: int, cfg: TrainConfig) -> None:
    """A diverged run (a learning rate too high) must stop: published, its NaN embeddings would
    replace a good run's, and every query on them would come back empty."""
    if not math.isfinite(value):
        raise AeError(f"training diverged at epoch {epoch} (loss or weights became {value}) with learning "
                      f"rate {cfg.lr:g}; lower --lr")


def train_autoencoder(pixels: np.ndarray, arch: AEArch, cfg: TrainConfig,
                      on_epoch: Callable[[dict], None] = lambda h: None,
                      rows: np.ndarray | None = None) -> TrainResult:
    """Train on (N, C, H, W) uint8 pixels (only `rows` of them, if given) and return the best
    model, in eval mode. Batches are gathered from `pixels` as they are needed: the training
    set is never copied."""
    rows = np.arange(len(pixels)) if rows is None else np.asarray(rows)
    if len(rows) == 0:
        raise ValueError("no decodable images to train on")
    set_threads()
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_idx, val_idx = split_indices(len(rows), cfg.val_fraction, cfg.seed)
    train_rows, val_px = rows[train_idx], pixels[rows[val_idx]]
    max_shift = max(1, arch.image_size // 16) if cfg.augment else 0

    layout = training_layout(device)
    model = ConvAutoencoder(arch).to(device)
    if layout == torch.channels_last:
        model.to_channels_last()
    # fused: one kernel per step for all parameters, not a dozen small ops per parameter; on 2
    # CPU cores 1.03-1.07x the training images/s (bench/train_bench.py). CPU only: measured there
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cpu" or None)
    epochs = cfg.epochs or auto_epochs(len(train_rows), cfg.batch_size)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total_steps, budget_s = steps_per_epoch * epochs, cfg.max_minutes * 60
    amp = pick_precision(cfg.precision, device)
    result = TrainResult(model, str(device), epochs_planned=epochs,
                         precision="bf16" if amp is torch.bfloat16 else "fp32")
    best_state, bad_epochs, step, t0 = None, 0, 0, time.perf_counter()

    for epoch in range(1, epochs + 1):
        model.train()
        order = train_rows[torch.randperm(len(train_rows), generator=gen).numpy()]
        loss_sum, seen, partial = 0.0, 0, False
        for start in range(0, len(order), cfg.batch_size):
            elapsed = time.perf_counter() - t0
            if elapsed >= budget_s and seen:  # spent mid-epoch: the rest would train at learning rate 0
                partial = True
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(max(step / total_steps, elapsed / budget_s), cfg.lr)
            x = random_shift(_to_float(pixels[np.sort(order[start:start + cfg.batch_size])], device), max_shift, gen)
            x = x.contiguous(memory_format=layout)
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                recon = model(x)[1]
            loss = F.mse_loss(recon.float(), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            _check_finite(value, epoch, cfg)
            loss_sum += value * len(x)
            seen += len(x)
            result.images_seen += len(x)
            step += 1
        val = evaluate_mse(model, val_px, device) if len(val_px) else None
        _check_finite(val if val is not None else _weights_sum(model), epoch, cfg)
        record = {"epoch": epoch, "train_mse": loss_sum / seen, "val_mse": val,
                  "seconds": round(time.perf_counter() - t0, 2), "lr": opt.param_groups[0]["lr"]}
        if partial:  # the time budget ran out inside it: train_mse is over the images it reached
            record["partial"] = True
        result.history.append(record)
        on_epoch(record)
        score = val if val is not None else record["train_mse"]
        if result.best_val_loss is None or score < result.best_val_loss:
            result.best_val_loss, result.best_epoch, bad_epochs = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        if bad_epochs >= cfg.patience:
            result.stop_reason = "early_stopping"
            break
        if time.perf_counter() - t0 >= budget_s:
            result.stop_reason = "max_minutes"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.seconds, result.steps = time.perf_counter() - t0, step
    return result


def train_fold_models(pixels: np.ndarray, folds: np.ndarray, arch: AEArch, cfg: TrainConfig) -> list[ConvAutoencoder]:
    """Two models, model k trained on the images of fold k only, for `cfg.anomaly_steps` steps
    each (and at most a quarter of the time budget each): the scorers of anomaly_score. They use
    plain conv stages (no residual blocks), ~3x cheaper than the published model's.
    Returns [] when anomaly scores are off or a fold is empty."""
    return [r.model for r in train_fold_results(pixels, folds, arch, cfg)]


def train_fold_results(pixels: np.ndarray, folds: np.ndarray, arch: AEArch, cfg: TrainConfig) -> list[TrainResult]:
    """train_fold_models, with each model's TrainResult: its steps and why it stopped (a model
    cut short by its time budget scores less well)."""
    rows = [np.flatnonzero(folds == k) for k in (0, 1)]
    if cfg.anomaly_steps == 0 or min(len(r) for r in rows) == 0:
        return []
    arch = AEArch(arch.dim, arch.image_size, arch.channels, arch.width, blocks_per_stage=0)
    results = []
    for k, idx in enumerate(rows):
        epochs = max(1, math.ceil(cfg.anomaly_steps / math.ceil(len(idx) / cfg.batch_size)))
        sub = cfg.model_copy(update={"epochs": epochs, "val_fraction": 0.0, "seed": cfg.seed + 1 + k,
                                     "max_minutes": cfg.max_minutes / 4})
        try:
            results.append(train_autoencoder(pixels, arch, sub, rows=idx))
        except AeError as err:  # before: "diverged at epoch 4" on a 3-epoch run, without saying which model
            raise AeError(f"anomaly-score model {k + 1} of 2 (trained on half of the images, for "
                          f"--anomaly-steps {cfg.anomaly_steps}, {epochs} epochs): {err}") from err
    return results
