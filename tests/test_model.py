"""The autoencoder: shapes, finite outputs, gradients everywhere, and it can learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ae_core import checkpoint
from ae_core.decode import Preprocess
from ae_core.model import AEArch, ConvAutoencoder, feature_sizes
from conftest import MNIST


@pytest.mark.parametrize("size,expected", [(16, [16, 8]), (28, [28, 14, 7]), (32, [32, 16, 8]),
                                           (64, [64, 32, 16, 8]), (96, [96, 48, 24, 12, 6]),
                                           (60, [60, 30, 15])])
def test_feature_sizes(size, expected):
    assert feature_sizes(size) == expected


@pytest.mark.parametrize("arch", [AEArch(32, 28, 1), AEArch(16, 64, 3, width=8), AEArch(8, 16, 1, blocks_per_stage=0)])
def test_shapes_range_and_gradients(arch):
    torch.manual_seed(0)
    model = ConvAutoencoder(arch)
    x = torch.rand(4, arch.channels, arch.image_size, arch.image_size)
    z, y = model(x)
    assert z.shape == (4, arch.dim)
    assert y.shape == x.shape
    assert torch.isfinite(z).all() and torch.isfinite(y).all()
    assert y.min() >= 0 and y.max() <= 1
    ((y - x) ** 2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_overfits_one_small_batch_of_real_digits():
    torch.manual_seed(0)
    pixels = np.stack([np.asarray(Image.open(MNIST / f"{i:05d}.png")) for i in range(16)])
    x = torch.from_numpy(pixels[:, None].astype(np.float32) / 255.0)
    model = ConvAutoencoder(AEArch(32, 28, 1))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    first = None
    for _ in range(150):
        loss = ((model(x)[1] - x) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = loss.item()
    assert final < 0.01 < first
    assert final < first / 10


def test_checkpoint_round_trip_is_exact_and_weights_only():
    torch.manual_seed(1)
    model = ConvAutoencoder(AEArch(8, 16, 1)).eval()
    spec = Preprocess(image_size=16, channels=1)
    data, version = checkpoint.to_bytes(model, spec, {"note": "x"})
    loaded = checkpoint.from_bytes(data)
    assert loaded.version == version and version.startswith("ae-")
    assert loaded.preprocess == spec and loaded.extra == {"note": "x"}
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded.model(x)[0])


def test_checkpoint_carries_the_anomaly_fold_models_with_their_own_shape():
    torch.manual_seed(2)
    model = ConvAutoencoder(AEArch(8, 16, 1, blocks_per_stage=1)).eval()
    folds = [ConvAutoencoder(AEArch(8, 16, 1, blocks_per_stage=0)).eval() for _ in range(2)]
    quantiles = [[0.01 * i for i in range(1, 20)], [0.02 * i for i in range(1, 20)]]
    data, _ = checkpoint.to_bytes(model, Preprocess(16, 1), {}, folds, quantiles)
    loaded = checkpoint.from_bytes(data)
    assert [m.arch for m in loaded.anomaly_models] == [f.arch for f in folds]
    assert loaded.anomaly_quantiles == quantiles
    assert checkpoint.from_bytes(checkpoint.to_bytes(model, Preprocess(16, 1), {}, folds)[0]).anomaly_quantiles == []
    for bad in ([[0.1] * 19], [[0.2, 0.1] + [0.3] * 17, [0.1] * 19], [[float("nan")] * 19, [0.1] * 19]):
        with pytest.raises(ValueError, match="anomaly_quantiles"):  # damaged or edited: not scored with
            checkpoint.from_bytes(checkpoint.to_bytes(model, Preprocess(16, 1), {}, folds, bad)[0])
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        for original, back in zip(folds, loaded.anomaly_models):
            assert torch.equal(original(x)[1], back(x)[1])
    assert checkpoint.from_bytes(checkpoint.to_bytes(model, Preprocess(16, 1))[0]).anomaly_models == []


def test_calibration_puts_both_halves_on_one_scale_and_keeps_their_order():
    from ae_core.encode import CALIBRATION_LEVELS, calibrate, median_ratio

    rng = np.random.default_rng(0)
    # one fold model reconstructs twice as badly as the other: raw, every top score is its half's
    a = rng.lognormal(-5, 0.4, 2000)
    b = 2 * rng.lognormal(-5, 0.4, 2000)
    a[7] = 20 * np.median(a)  # a real outlier, in the better model's half
    qa, qb = (list(np.quantile(x, CALIBRATION_LEVELS)) for x in (a, b))
    raw_top = np.argsort(-np.concatenate([a, b]))[:100]
    assert (raw_top >= 2000).sum() > 95
    ca, cb = calibrate(a, qa, qb), calibrate(b, qb, qa)
    top = np.argsort(-np.concatenate([ca, cb]))[:100]
    assert 35 <= (top >= 2000).sum() <= 65  # binomial(100, 0.5): about 50
    assert top[0] == 7  # the outlier stays first, far above the bulk
    # beyond the last quantile the ratio to it is kept exactly (so about the ratio to the median too)
    assert ca[7] / calibrate(np.array([qa[-1]]), qa, qb)[0] == pytest.approx(a[7] / qa[-1], rel=1e-5)
    assert ca[7] / np.median(ca) == pytest.approx(a[7] / np.median(a), rel=0.05)
    for raw, cal in ((a, ca), (b, cb)):  # increasing: the order within a half is kept
        assert (np.diff(cal[np.argsort(raw, kind="stable")]) >= 0).all()
    assert np.median(ca) == pytest.approx(np.median(cb), rel=0.02)
    assert median_ratio([qa, qb]) == pytest.approx(2.0, rel=0.05) and median_ratio([]) is None
    # alike models: nothing to correct; the map is continuous at the outer quantiles
    assert np.allclose(calibrate(a, qa, qa), a, rtol=1e-6)
    edge = np.array([qa[0], qa[-1]])
    assert np.allclose(calibrate(edge * (1 - 1e-9), qa, qb), calibrate(edge * (1 + 1e-9), qa, qb), rtol=1e-6)
    # identical images (every quantile tied, even at 0): finite and increasing
    n = len(CALIBRATION_LEVELS)
    flat = calibrate(np.array([0.0, 0.0, 0.5]), [0.0] * n, [0.2] * n)
    assert np.isfinite(flat).all() and flat[2] > flat[0]
    # the other model reproduces a share of its half exactly (quantiles of 0): this half's order
    # is kept (before: every error below the first positive knot, or all of them, became 0)
    errs = np.array([0.0, 0.001, 0.005, 0.01, 0.03, 0.5, 1.0])
    own = list(np.linspace(0.01, 0.1, n))
    for other in ([0.0] * 5 + list(np.linspace(0.01, 0.1, n - 5)), [0.0] * (n - 1) + [0.1]):
        mapped = calibrate(errs, own, other)
        assert np.isfinite(mapped).all() and (np.diff(mapped) > 0).all(), mapped
        # one common scale: the other half, mapped the other way, meets this one at each level
        # where its quantile is not tied with a lower one (a tied value maps to the lowest)
        lv = [i for i in range(n) if other[i] > 0 and (i == 0 or other[i] > other[i - 1])]
        assert np.allclose(calibrate(np.array(other)[lv], other, own), calibrate(np.array(own)[lv], own, other))
    assert np.array_equal(calibrate(errs, own, [0.0] * n), errs.astype(np.float32))  # no scale to share: raw


def test_fold_models_train_on_their_own_fold_only():
    from ae_core.config import TrainConfig
    from ae_core.encode import CALIBRATION_LEVELS, anomaly_quantiles, anomaly_scores, calibrate, folds_of
    from ae_core.train import train_fold_models

    rng = np.random.default_rng(0)
    keys = [f"img-{i:03d}.png" for i in range(64)]
    folds = folds_of(keys)
    assert set(folds.tolist()) == {0, 1} and folds_of(keys).tolist() == folds.tolist()  # stable
    # fold 0 holds dark images, fold 1 bright ones: each model only knows its own kind
    pixels = np.where(folds[:, None, None, None] == 0, rng.integers(0, 40, (64, 1, 16, 16)),
                      rng.integers(215, 256, (64, 1, 16, 16))).astype(np.uint8)
    models = train_fold_models(pixels, folds, AEArch(4, 16, 1), TrainConfig(anomaly_steps=60, batch_size=16))
    assert len(models) == 2 and all(m.arch.blocks_per_stage == 0 for m in models)
    held_out = anomaly_scores(models, pixels, folds)
    swapped = anomaly_scores(models[::-1], pixels, folds)  # each image by the model that saw its fold
    assert (held_out > swapped).all()
    quantiles = anomaly_quantiles(models, pixels, folds)  # model k's errors on fold 1 - k
    for k in (0, 1):
        rows = folds == 1 - k
        assert np.allclose(quantiles[k], np.quantile(held_out[rows].astype(np.float64), CALIBRATION_LEVELS), rtol=1e-5)
    # a sample of the half, evenly spread, when the half is larger than `sample`
    few = anomaly_quantiles(models, pixels, folds, sample=5)
    for k in (0, 1):
        rows = np.flatnonzero(folds == 1 - k)
        picked = held_out[rows[np.linspace(0, len(rows) - 1, 5).round().astype(int)]]
        assert np.allclose(few[k], np.quantile(picked.astype(np.float64), CALIBRATION_LEVELS), rtol=1e-5)
    calibrated = anomaly_scores(models, pixels, folds, quantiles=quantiles)
    for f in (0, 1):  # each half mapped by its own scorer's quantiles
        rows = folds == f
        assert np.allclose(calibrated[rows], calibrate(held_out[rows], quantiles[1 - f], quantiles[f]))
    assert np.median(calibrated[folds == 0]) == pytest.approx(np.median(calibrated[folds == 1]), rel=0.05)
    assert train_fold_models(pixels, folds, AEArch(4, 16, 1), TrainConfig(anomaly_steps=0)) == []
    from ae_core.train import train_fold_results

    # no early stopping on the training loss here (patience): only the steps or the time may end them
    done = train_fold_results(pixels, folds, AEArch(4, 16, 1), TrainConfig(anomaly_steps=60, batch_size=16,
                                                                            patience=10**9))
    assert [r.steps for r in done] == [60, 60] and {r.stop_reason for r in done} == {"epochs"}  # 2 batches an epoch
    cut = train_fold_results(pixels, folds, AEArch(4, 16, 1), TrainConfig(anomaly_steps=10**6, batch_size=16,
                                                                           max_minutes=0.01, patience=10**9))
    assert [r.stop_reason for r in cut] == ["max_minutes"] * 2 and all(0 < r.steps < 10**6 for r in cut), \
        [(r.steps, r.stop_reason) for r in cut]
    from ae_core.errors import AeError

    # a fold model that diverges says it is one (before: "diverged at epoch 4" of a 3-epoch run)
    with pytest.raises(AeError, match=r"anomaly-score model 1 of 2 \(trained on half of the images, for "
                                      r"--anomaly-steps 60, \d+ epochs\): training diverged at epoch"):
        train_fold_results(pixels, folds, AEArch(4, 16, 1), TrainConfig(anomaly_steps=60, batch_size=16, lr=1e30))


@pytest.mark.parametrize("arch", [AEArch(32, 28, 1), AEArch(16, 64, 3, width=8), AEArch(8, 16, 1, blocks_per_stage=0)])
def test_encoding_with_batchnorm_folded_matches_the_model_as_trained(arch):
    from ae_core.encode import encode_pixels, inference_copy

    torch.manual_seed(0)
    model = ConvAutoencoder(arch)
    with torch.no_grad():  # running statistics and affine parameters far from their initial values
        for _ in range(3):
            model(torch.rand(64, arch.channels, arch.image_size, arch.image_size) * 2)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    px = np.random.default_rng(0).integers(0, 256, (40, arch.channels, arch.image_size, arch.image_size), dtype=np.uint8)
    x = torch.from_numpy(px).float() / 255
    with torch.no_grad():
        z, y = model(x)
    emb, err = encode_pixels(model, px, batch_size=16)
    assert np.allclose(emb, z.numpy(), atol=1e-4, rtol=1e-4)
    assert np.allclose(err, ((y - x) ** 2).mean(dim=(1, 2, 3)).numpy(), atol=1e-6)
    fast = inference_copy(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the model itself is untouched


@pytest.mark.parametrize("arch", [AEArch(32, 28, 1), AEArch(16, 32, 3, width=8), AEArch(8, 16, 1, blocks_per_stage=0)])
def test_channels_last_training_layout_computes_the_same_function_and_gradients(arch):
    """Training on CPU runs channels-last (ae_core.train.training_layout); the flatten before the
    bottleneck must keep the NCHW order every checkpoint assumes, forwards and backwards."""
    torch.manual_seed(0)
    plain = ConvAutoencoder(arch).train()
    last = ConvAutoencoder(arch).train()
    last.load_state_dict(plain.state_dict())
    last = last.to_channels_last()
    x = torch.rand(8, arch.channels, arch.image_size, arch.image_size)
    seen = {}  # the layouts the channels-last model actually ran in

    def watch_gradient(mod, args, out) -> None:
        out.register_hook(lambda grad: seen.__setitem__("encoder grad", grad))

    last.encoder.features.register_forward_hook(watch_gradient)
    last.decoder.features.register_forward_pre_hook(lambda mod, args: seen.__setitem__("decoder input", args[0]))
    outs = []
    for model, inp in ((plain, x), (last, x.contiguous(memory_format=torch.channels_last))):
        z, y = model(inp)
        ((y - inp) ** 2).mean().backward()
        outs.append((z.detach(), y.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (z0, y0, g0), (z1, y1, g1) = outs
    for what, t in seen.items():  # one layout per activation, forwards and backwards
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous(), what
    assert torch.allclose(z0, z1, atol=1e-5) and torch.allclose(y0, y1, atol=1e-6)
    for name, grad in g0.items():
        assert torch.allclose(grad, g1[name], rtol=1e-4, atol=1e-6), name
    # a checkpoint trained channels-last loads into a plain model and computes the same
    reloaded = ConvAutoencoder(arch).train()
    reloaded.load_state_dict(last.state_dict())
    assert torch.allclose(reloaded(x)[1], y1, atol=1e-6)


@pytest.mark.parametrize("c_in, c_out, side, bias", [(16, 1, 14, True), (32, 3, 32, True), (8, 2, 5, False)])
def test_the_output_layer_as_a_subpixel_convolution_is_the_same_function(c_in, c_out, side, bias):
    from ae_core.model import OutputConvTranspose2d

    torch.manual_seed(0)
    layer = OutputConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=bias).double()
    x = torch.randn(3, c_in, side, side, dtype=torch.float64, requires_grad=True)
    results = []
    for subpixel in (False, True):
        layer.subpixel = subpixel
        y = layer(x)
        grad_out = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        results.append((y, *torch.autograd.grad((y * grad_out).sum(), [x, *layer.parameters()])))
    assert results[0][0].shape == (3, c_out, 2 * side, 2 * side)
    for plain, sub in zip(*results):
        assert torch.allclose(plain, sub, atol=1e-12, rtol=0)
    # the layout CPU training uses turns it on; a state dict loads either way
    model = ConvAutoencoder(AEArch(8, 16, 1, width=8, blocks_per_stage=0)).to_channels_last()
    assert [m.subpixel for m in model.modules() if isinstance(m, OutputConvTranspose2d)] == [True]
    loaded = ConvAutoencoder(AEArch(8, 16, 1, width=8, blocks_per_stage=0)).load_state_dict(model.state_dict())
    assert not loaded.missing_keys and not loaded.unexpected_keys


def test_a_time_budget_spent_mid_epoch_stops_training_there():
    """An epoch longer than --max-minutes stopped only at its end: the rest trained at learning
    rate 0 (on a large corpus, most of the run)."""
    from ae_core.config import TrainConfig
    from ae_core.train import train_autoencoder

    pixels = np.random.default_rng(0).integers(0, 256, (4000, 1, 28, 28), dtype=np.uint8)
    result = train_autoencoder(pixels, AEArch(8, 28, 1), TrainConfig(epochs=3, batch_size=16, max_minutes=0.005,
                                                                   val_fraction=0.0, device="cpu"))
    assert result.stop_reason == "max_minutes" and len(result.history) == 1 and result.history[0]["partial"]
    assert 0 < result.images_seen < len(pixels)  # stopped inside the first epoch
    assert np.isfinite(result.history[0]["train_mse"])
