"""Does the model earn its keep? Its reconstruction error next to PCA's on the same images.

PCA with as many components as the embedding has dimensions is the optimal linear autoencoder,
so it is the baseline every run is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PCA_SAMPLE = 2000  # images; PCA on more adds seconds, not precision, to a per-run comparison
# PCA's error at or under this (per value, on [0, 1]) is float rounding: PCA reproduces the sample
# exactly, as it does any sample of at most dim + 1 images, and no ratio to it means anything.
PCA_EXACT_MSE = 1e-12


def error_ratio(ae_mse: float, pca_mse: float) -> float | None:
    """The autoencoder's error over PCA's, or None where PCA is exact (see PCA_EXACT_MSE). Pure."""
    return ae_mse / pca_mse if pca_mse > PCA_EXACT_MSE else None


def ratio_text(ratio: float | None) -> str:
    """'0.28x', or 'no ratio' with the reason."""
    return f"{ratio:.2f}x" if ratio is not None else "no ratio: PCA reproduces these images exactly"


def weak_model_hint(quality: dict, train: dict) -> str | None:
    """A line for the run's summary and report when the autoencoder reconstructs worse than PCA
    with as many components (its embeddings may then be weaker than PCA's), naming what to
    change; None otherwise. Pure."""
    ratio, measured = headline_ratio(quality)
    if ratio is None or ratio <= 1.0:
        return None
    stop = train.get("stop_reason")
    if stop == "max_minutes":
        fix = "training stopped at its time budget: raise --max-minutes"
    elif stop == "early_stopping":  # more epochs would not help: it stopped improving
        fix = "training stopped improving: try another --lr, or a larger model (--width, --blocks-per-stage)"
    elif stop == "epochs":  # it ran every epoch asked for: more time alone would not change it
        fix = "train longer (--epochs) or try another --lr"
    else:
        fix = "train longer (--epochs, --max-minutes) or try another --lr"
    reused = quality.get("measured_in_run")
    if reused:  # the published model, reused: settings reach it only when it is trained again
        fix += f", with --retrain always (this run reused the model trained in run {reused})"
    return (f"the autoencoder's reconstruction error is {ratio:.2f}x PCA's with as many components ({measured}), "
            f"so its embeddings may be weaker than PCA's; {fix}")


def anomaly_hint(train: dict, quality: dict | None = None) -> str | None:
    """A line for the run's summary and report when the two models behind anomaly_score stopped
    at their time budget before the steps asked for (their scores then rank less well); None
    otherwise. Pure."""
    planned, done = train.get("anomaly_steps"), train.get("anomaly_steps_run") or []
    if not planned or not done or min(done) >= planned or "max_minutes" not in (train.get("anomaly_stop_reasons") or []):
        return None
    fix = "raise --max-minutes"
    reused = (quality or {}).get("measured_in_run")
    if reused:  # their settings reach them only when the model is trained again
        fix += f", with --retrain always (this run reused the models trained in run {reused})"
    return (f"the two models behind anomaly_score stopped at their time budget (a quarter of --max-minutes "
            f"each) after {' and '.join(str(n) for n in done)} of {planned} steps, so anomaly_score may rank "
            f"less well; {fix}")


def run_notes(quality: dict, train: dict) -> list[str]:
    """The notes of a run's summary and report: a model weaker than PCA, anomaly-score models
    cut by their time budget."""
    notes = [weak_model_hint(quality, train) if quality.get("sample") else None, anomaly_hint(train, quality)]
    return [n for n in notes if n]


def _principal_axes(centred: np.ndarray) -> np.ndarray:
    """The rows of V^T of `centred`'s SVD (principal axes, largest first). LAPACK's divide and
    conquer SVD fails to converge on some matrices (it did on the demo's 95% of 1,797 digits,
    where the whole set converged): then the same axes from the eigenvectors of the smaller Gram
    matrix, which always converges: features x features when there are more images than
    features (its eigenvectors are the axes; ae evaluate's 10,000 images would make an images x
    images one of 800 MB), else images x images."""
    try:
        return np.linalg.svd(centred, full_matrices=False)[2]
    except np.linalg.LinAlgError:
        n, d = centred.shape
        values, vectors = np.linalg.eigh(centred.T @ centred if n > d else centred @ centred.T)
        keep = values > values.max(initial=0.0) * 1e-12
        values, vectors = values[keep][::-1], vectors[:, keep][:, ::-1]
        return vectors.T if n > d else (centred.T @ vectors / np.sqrt(values)).T


def pca_fits(x: np.ndarray, dims: Sequence[int]) -> dict[int, tuple[np.ndarray, float]]:
    """PCA fitted on x itself (as a linear autoencoder would be), for several component counts
    from one SVD: dim -> (codes, MSE per value). x is (n, features) float on [0, 1]."""
    x = x.astype(np.float64)
    centred = x - x.mean(axis=0)
    vt = _principal_axes(centred)
    out = {}
    for dim in dims:
        basis = vt[:min(dim, len(vt))]
        codes = centred @ basis.T
        out[dim] = (codes.astype(np.float32), float(((centred - codes @ basis) ** 2).mean()))
    return out


def pca_fit(x: np.ndarray, n_components: int) -> tuple[np.ndarray, float]:
    """PCA with one component count: (codes, MSE per value)."""
    return pca_fits(x, [n_components])[n_components]


def pca_mse(x: np.ndarray, n_components: int) -> float:
    """Mean squared error per value of x's reconstruction from its top principal components."""
    return pca_fit(x, n_components)[1]


HELDOUT_MIN = 10  # held-out images below which their mean error is too noisy to report (the count is shown)


def heldout_comparison(pixels: np.ndarray, recon_error: np.ndarray, dim: int, train_rows: np.ndarray,
                       val_rows: np.ndarray, seed: int = 0) -> dict | None:
    """Autoencoder vs PCA-`dim` on the images the autoencoder held out of its training, PCA
    fitted on (a seeded sample of) the images it trained on: the same footing for both. On
    the whole corpus the autoencoder is scored mostly on images it learned, and a small corpus
    trained long read as 0.26x PCA's error where held out it was 0.85x. None when fewer than
    HELDOUT_MIN images were held out."""
    if len(val_rows) < HELDOUT_MIN or len(train_rows) == 0:
        return None
    fit = np.sort(np.random.default_rng(seed).choice(train_rows, size=min(PCA_SAMPLE, len(train_rows)),
                                                     replace=False))
    x = np.asarray(pixels[fit], dtype=np.float64).reshape(len(fit), -1) / 255.0
    mean = x.mean(axis=0)
    basis = _principal_axes(x - mean)[:dim]
    if len(val_rows) > PCA_SAMPLE:  # a seeded sample, as for the fit: memory bounded whatever the corpus
        val_rows = np.random.default_rng(seed + 1).choice(val_rows, size=PCA_SAMPLE, replace=False)
    val_rows = np.sort(val_rows)
    v = np.asarray(pixels[val_rows], dtype=np.float64).reshape(len(val_rows), -1) / 255.0 - mean
    pca = float(((v - (v @ basis.T) @ basis) ** 2).mean())
    ae = float(np.mean(recon_error[val_rows]))
    return {"images": int(len(val_rows)), "ae_mse": ae, "pca_mse": pca, "ae_over_pca": error_ratio(ae, pca),
            "note": f"on the {len(val_rows)} images held out of training; PCA with {dim} components fitted "
                    f"on up to {PCA_SAMPLE} of the images trained on"}


def pca_comparison(pixels: np.ndarray, recon_error: np.ndarray, dim: int, seed: int = 0,
                   split: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Autoencoder vs PCA-`dim` reconstruction MSE per pixel on the same seeded sample, and,
    given the training split (train rows, held-out rows), on the held-out images (`heldout`)."""
    n = len(pixels)
    if n == 0:
        return {"sample": 0}
    heldout = heldout_comparison(pixels, recon_error, dim, *split, seed=seed) if split is not None else None
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(PCA_SAMPLE, n), replace=False))
    x = np.asarray(pixels[rows], dtype=np.float32).reshape(len(rows), -1) / 255.0
    ae = float(np.mean(recon_error[rows]))
    pca = pca_mse(x, dim)
    note = f"PCA with {dim} components fitted on the same sample"
    if error_ratio(ae, pca) is None:
        note += (f"; it reproduces this sample exactly (any {dim + 1} images or fewer, or images "
                 f"spanning at most {dim} directions), so there is no ratio")
    # "all" where the split held nothing out (a corpus too small for it), else "mostly"
    trained_on = "all" if split is not None and len(split[1]) == 0 else "mostly"
    out = {"sample": int(len(rows)), "ae_mse": ae, "pca_mse": pca, "ae_over_pca": error_ratio(ae, pca),
           "trained_on": trained_on, "note": note + f" ({trained_on} images the autoencoder trained on)"}
    if heldout is not None:
        out["heldout"] = heldout
    return out


def trained_on(quality: dict) -> str:
    """How much of the quality sample the autoencoder trained on: 'all' or 'mostly' (a manifest
    from before this was recorded: 'mostly'). Pure."""
    return "all" if quality.get("trained_on") == "all" else "mostly"


def _heldout(quality: dict) -> dict | None:
    """The manifest's held-out figure, or None where there is none or it is not well formed
    (a manifest from before it, or edited by hand). Pure."""
    held = quality.get("heldout")
    ok = (isinstance(held, dict) and isinstance(held.get("images"), int)
          and all(isinstance(held.get(k), (int, float)) for k in ("ae_mse", "pca_mse"))
          and isinstance(held.get("ae_over_pca"), (int, float, type(None))))
    return held if ok else None


def heldout_text(quality: dict) -> str | None:
    """'MSE 0.01676 vs PCA 0.01978 = 0.85x PCA's error, on 20 images held out of training', or
    None without a (well-formed) held-out figure. Pure."""
    held = _heldout(quality)
    if held is None:
        return None
    ratio = held["ae_over_pca"]
    versus = f" = {ratio:.2f}x PCA's error" if ratio is not None else f" ({ratio_text(None)})"
    return (f"MSE {held['ae_mse']:.5f} vs PCA {held['pca_mse']:.5f}{versus}, on {held['images']} images "
            "held out of training")


def headline_ratio(quality: dict) -> tuple[float | None, str]:
    """The ratio to judge the model by, and what it was measured on: held out when there is a
    held-out figure, else the whole sample's. Pure."""
    held = _heldout(quality)
    if held is not None:
        return held["ae_over_pca"], f"on {held['images']} images held out of training"
    return quality.get("ae_over_pca"), f"on {quality.get('sample')} images, {trained_on(quality)} trained on"
