"""The run report: a markdown summary and three PNG pictures, drawn with Pillow.

- loss.png: training and held-out MSE per epoch (log scale);
- reconstructions.png: sample originals (top row) above the model's reconstructions;
- neighbours.png: a few sample images (left column) followed by their nearest neighbours.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ae_core.model import ConvAutoencoder
from ae_core.quality import heldout_text, run_notes, trained_on

TILE = 64  # pixels per image in the grids: small inputs (28x28) are scaled up to be seen
_PAD = 2
_CAPTION = 14  # height of a caption strip: Pillow's default font fits, whichever of its two it loads


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _tile(px: np.ndarray) -> Image.Image:
    """(C, H, W) uint8 -> an RGB tile of TILE x TILE."""
    arr = px[0] if px.shape[0] == 1 else px.transpose(1, 2, 0)
    img = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
    return img.resize((TILE, TILE), Image.Resampling.NEAREST)


def image_grid(rows: Sequence[Sequence[np.ndarray]], captions: Sequence[Sequence[str] | None] | None = None) -> bytes:
    """A grid of (C, H, W) uint8 images, one list per row; a row whose entry in `captions` is a
    list of strings gets a strip above it with one caption over each image."""
    captions = captions or [None] * len(rows)
    n_cols = max(len(r) for r in rows)
    step = TILE + _PAD
    tops, y = [], _PAD
    for caption in captions:
        y += _CAPTION if caption else 0
        tops.append(y)
        y += step
    canvas = Image.new("RGB", (n_cols * step + _PAD, y), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, caption, top in zip(rows, captions, tops):
        for x, px in enumerate(row):
            canvas.paste(_tile(px), (_PAD + x * step, top))
            if caption:
                draw.text((_PAD + x * step + 1, top - _CAPTION + 1), caption[x][:8], fill=(0, 0, 0))
    return _png(canvas)


@torch.no_grad()
def reconstructions(model: ConvAutoencoder, pixels: np.ndarray) -> np.ndarray:
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).float() / 255.0
    return (model(x)[1].clamp(0, 1) * 255 + 0.5).byte().cpu().numpy()


def reconstruction_grid(model: ConvAutoencoder, pixels: np.ndarray, columns: int | None = None,
                        captions: Sequence[str] | None = None) -> bytes:
    """Originals above their reconstructions, in bands of at most `columns` images (one band
    when None), each original under its caption when `captions` are given."""
    recon = reconstructions(model, pixels)
    columns = columns or max(len(pixels), 1)
    rows: list[list[np.ndarray]] = []
    row_captions: list[list[str] | None] = []
    for start in range(0, len(pixels), columns):
        rows += [list(pixels[start:start + columns]), list(recon[start:start + columns])]
        row_captions += [list(captions[start:start + columns]) if captions else None, None]
    return image_grid(rows, row_captions)


def loss_curve(history: Sequence[dict], width: int = 480, height: int = 300) -> bytes:
    """Train (blue) and held-out (orange) MSE per epoch on a log scale."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 15, 20, height - 35
    series = {"train": [h["train_mse"] for h in history],
              "val": [h["val_mse"] for h in history if h.get("val_mse") is not None]}
    values = [v for vs in series.values() for v in vs if v and v > 0]
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    if not values:
        return _png(img)
    lo, hi = math.log10(min(values)), math.log10(max(values))
    hi = hi if hi > lo else lo + 1
    n = max(len(history), 2)

    def xy(i: int, v: float) -> tuple[float, float]:
        return (left + (right - left) * i / (n - 1),
                bottom - (bottom - top) * (math.log10(max(v, 1e-12)) - lo) / (hi - lo))

    for name, colour in (("train", (31, 119, 180)), ("val", (255, 127, 14))):
        pts = [xy(i, v) for i, v in enumerate(series[name])]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            draw.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=colour)
    draw.text((left + 5, top + 4), "MSE per pixel (log): train blue, held-out orange", fill=(0, 0, 0))
    draw.text((4, top), f"{10 ** hi:.2g}", fill=(0, 0, 0))
    draw.text((4, bottom - 10), f"{10 ** lo:.2g}", fill=(0, 0, 0))
    draw.text((left, bottom + 8), "epoch 1", fill=(0, 0, 0))
    draw.text((right - 50, bottom + 8), f"epoch {len(history)}", fill=(0, 0, 0))
    return _png(img)


def _count(n: object, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def summary_markdown(m: dict, pictures: dict[str, str]) -> str:
    """The run's summary as markdown; `pictures` maps a title to a URL or relative path."""
    c, q, ix, t = m.get("changes", {}), m.get("quality", {}), m.get("index", {}), m.get("train", {})
    lines = [f"# Run {m['run_id']}", "", f"Source `{m['source']}` -> output `{m['output']}`, "
             f"model `{m['model_version']}` (dim {m['dim']}, input {m['image_size']}x{m['image_size']}"
             f"x{m['channels']}).", "", "## Images by outcome", "", "| outcome | count |", "|---|---|",
             f"| embedded (rows) | {m['rows']} |", f"| rejected | {m['rejected']} |"]
    lines += [f"| {k} | {c.get(k, 0)} |" for k in ("new", "changed", "unchanged", "deleted", "retried", "rechecked", "encoded")]
    lines += ["", f"Model {'retrained' if c.get('retrained') else 'reused'}: {c.get('retrain_reason')}."]
    if m.get("rejects_by_reason"):
        lines += ["", "## Rejects by reason", "", "| reason | count |", "|---|---|"]
        lines += [f"| {r} | {n} |" for r, n in sorted(m["rejects_by_reason"].items())]
    lines += ["", "## Quality", ""]
    if q.get("sample"):
        measured = f" (measured in run {q['measured_in_run']})" if q.get("measured_in_run") else ""
        lines += ["| model | reconstruction MSE per pixel |", "|---|---|",
                  f"| autoencoder | {q['ae_mse']:.5f} |", f"| PCA, {m['dim']} components | {q['pca_mse']:.5f} |",
                  "", (f"The autoencoder's error is {q['ae_over_pca']:.2f}x PCA's on the same {q['sample']} images, "
                       f"{trained_on(q)} images it trained on"
                       if q.get("ae_over_pca") is not None else
                       f"PCA with {m['dim']} components reproduces these {q['sample']} images exactly (as it does "
                       f"any {m['dim'] + 1} images or fewer), so there is no ratio to it")
                  + measured + "."]
        if held := heldout_text(q):  # the figure to judge the model by: neither model trained on these images
            lines += ["", f"**Held out** (not trained on, though early stopping chose the epoch by them): {held}"
                      + measured + "."]
    for note in run_notes(q, t):
        lines += ["", f"**Note:** {note[0].upper()}{note[1:]}."]
    exact = ix.get("recall_queries") == 0  # exact search: its recall is 1 by construction, not measured
    lines += ["", f"Index: {ix.get('kind')} ({ix.get('metric')}, {ix.get('reason')}), {ix.get('ntotal')} vectors; "
              + ("exact search, so recall@10 is 1 by construction (not measured)." if exact else
                 f"recall@10 against exact search {ix.get('recall_at_10', 0):.3f} on {ix.get('recall_queries')} "
                 f"held-out queries (floor {ix.get('recall_floor')}), rows finding themselves first "
                 f"{ix.get('self_hit_rate', 0):.3f}.")]
    if t.get("epochs_run") is not None:
        best = t.get("best_val_mse")
        best = f"{best:.5f}" if isinstance(best, float) else best  # None when nothing was held out
        lines += ["", f"Training: {_count(t.get('epochs_run'), 'epoch')} in {t.get('seconds')} s on "
                  f"{t.get('device')} ({t.get('stop_reason')}), best held-out MSE {best}."
                  + (f" Trained by run {t['resumed_from_run']}, which stopped before publishing; this run reused "
                     "the model it kept in the work dir." if t.get("resumed_from_run") else "")]
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in m.get("timings_s", {}).items()]
    lines += ["", "## Pictures", ""] + [f"![{title}]({url})" for title, url in pictures.items()]
    if not c.get("retrained"):
        trained = f"run {q['measured_in_run']}" if q.get("measured_in_run") else "the run that trained it"
        lines += ["", "This run reused the model, so it draws no nearest neighbours (only the images it decoded "
                  "are in memory)" + ("" if c.get("encoded") else ", and no reconstructions: it decoded no image")
                  + f"; {trained} drew them, if it is still kept under OUTPUT/runs."]
    return "\n".join(lines) + "\n"
