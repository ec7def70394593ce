"""Measuring embeddings with labels kept outside the corpus: k-NN and linear-probe accuracy with
cross-validation, the autoencoder against PCA on the same preprocessed images, and the most
poorly reconstructed images (anomaly scores).
"""

from __future__ import annotations

import csv
import math
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ae_core import outputs, table
from ae_core.config import TrainConfig
from ae_core.errors import AeError, DecodeError
from ae_core.quality import error_ratio, heldout_comparison, pca_fits
from ae_core.storage import key_path, open_store, read_named_file, redact_url

KNN_K, FOLDS = 5, 5


def knn_accuracy(x: np.ndarray, y: np.ndarray, k: int = KNN_K, folds: int = FOLDS, seed: int = 0) -> float:
    """Mean accuracy of a k-nearest-neighbour classifier in stratified k-fold cross-validation."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    n_folds = _folds(y, folds)
    smallest_train = len(y) - math.ceil(len(y) / n_folds)  # rows left to fit on beside the largest fold
    if smallest_train < k:
        raise AeError(f"{k}-NN in {n_folds}-fold cross-validation needs at least {k} labelled rows to fit on "
                      f"in each fold; there are {len(y)} labelled rows: label more images")
    cv = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return float(cross_val_score(KNeighborsClassifier(n_neighbors=k), x, y, cv=cv, error_score="raise").mean())


def linear_probe_accuracy(x: np.ndarray, y: np.ndarray, folds: int = FOLDS, seed: int = 0) -> float:
    """Mean accuracy of standardised logistic regression in stratified k-fold cross-validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=_folds(y, folds), shuffle=True, random_state=seed)
    return float(cross_val_score(model, x, y, cv=cv, error_score="raise").mean())


def _folds(y: np.ndarray, folds: int) -> int:
    """The folds of stratified cross-validation: `folds`, or fewer when a label has fewer rows."""
    labels, counts = np.unique(y, return_counts=True)
    if len(labels) < 2:
        raise AeError(f"every labelled image has the same label ({str(labels[0])!r}); a classifier needs at least 2 labels")
    if counts.min() < 2:
        alone = [str(label) for label, n in zip(labels, counts) if n < 2]
        raise AeError(f"every label needs at least 2 labelled images for cross-validation; {len(alone)} "
                      f"ha{'s' if len(alone) == 1 else 've'} one ({', '.join(map(repr, alone[:5]))}"
                      f"{', ...' if len(alone) > 5 else ''}): label more images, or leave those labels out")
    return min(folds, int(counts.min()))


def read_labels(url: str, key_col: str, label_col: str) -> dict[str, str]:
    """key -> label from a CSV (any fsspec URL)."""
    data = read_named_file(url, "labels file", "give the CSV file")
    try:
        text = data.decode("utf-8-sig")  # -sig: Excel's "CSV UTF-8" starts with a BOM
    except UnicodeDecodeError as err:
        raise AeError(f"labels file {url!r} is not UTF-8 text ({err.reason} at byte {err.start}); "
                      "save it as a UTF-8 CSV") from err
    reader = csv.DictReader(text.splitlines())
    try:
        cols = [c for c in reader.fieldnames or [] if c is not None]
        if key_col not in cols or label_col not in cols:
            raise AeError(f"labels file {url!r} needs columns {key_col!r} and {label_col!r} "
                          f"(it has: {', '.join(cols) or 'none'}); pass --key-col / --label-col")
        # a blank label is no label: those rows count as without one, not as a class ""
        labels: dict[str, str] = {}
        first_line: dict[str, int] = {}
        for r in reader:
            label = (r[label_col] or "").strip()
            if not label:
                continue
            key = r[key_col]
            if key in labels and labels[key] != label:  # which one is right is not ours to guess
                raise AeError(f"labels file {url!r} gives {key_col} {key!r} two labels: {labels[key]!r} "
                              f"(line {first_line[key]}) and {label!r} (line {reader.line_num}); keep one")
            labels[key] = label
            first_line.setdefault(key, reader.line_num)
    except csv.Error as err:  # a field over the csv module's 128 KiB: not a labels file
        raise AeError(f"labels file {url!r} is not a CSV of {key_col},{label_col} rows ({err}, line "
                      f"{reader.line_num}); give the labels CSV") from err
    if not labels:
        raise AeError(f"labels file {url!r} has no row with a label in column {label_col!r}; "
                      "give a CSV with one row per labelled image")
    return labels


def label_of(labels: dict[str, str], key: str, shared_names: Collection[str] = ()) -> str | None:
    """A key's label: by the key itself, else by its file name (labels files often hold names),
    unless that name is in `shared_names` (the names several keys share: which of them a row
    names, the labels file cannot say)."""
    if key in labels:
        return labels[key]
    name = key.rsplit("/", 1)[-1]
    return None if name in shared_names else labels.get(name)


@dataclass
class Labelled:
    keys: list[str]
    x: np.ndarray
    y: np.ndarray
    unmatched_rows: int
    shared_name_rows: int = 0  # of the unmatched: a labels row names their file name, which other keys share


def shared_names(keys: Sequence[str]) -> set[str]:
    """File names that more than one key ends in (a/1.png and b/1.png). Pure."""
    names = Counter(k.rsplit("/", 1)[-1] for k in keys)
    return {n for n, count in names.items() if count > 1}


def match_labels(keys: Sequence[str], labels: dict[str, str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(positions of the keys that have a label, their labels, how many keys have none only
    because the labels file names their file name, which other keys share); AeError when no
    key has a label."""
    shared = shared_names(keys) & labels.keys()
    matched = [(i, lab) for i, lab in ((i, label_of(labels, k, shared)) for i, k in enumerate(keys)) if lab is not None]
    if not matched:
        raise AeError("no image key matches a key of the labels file; check --key-col"
                      + (" (file names shared by several keys match none: give whole keys)" if shared else ""))
    skipped = sum(1 for k in keys if k not in labels and k.rsplit("/", 1)[-1] in shared)
    return np.array([i for i, _ in matched]), np.array([lab for _, lab in matched]), skipped


def join_labels(tbl: pa.Table, labels: dict[str, str]) -> Labelled:
    """Rows of the embedding table whose key has a label (the key itself, or its file name)."""
    keys = tbl.column("key").to_pylist()
    rows, y, shared = match_labels(keys, labels)
    emb = table.embeddings_matrix(tbl)[rows]
    return Labelled([keys[i] for i in rows], emb, y, len(keys) - len(rows), shared)


def probe(output: str, labels_url: str, key_col: str = "filename", label_col: str = "label") -> dict:
    """Downstream accuracy of the published embeddings: k-NN and logistic regression, 5-fold CV."""
    pub = outputs.resolve(output)
    tbl = pub.load("embeddings", table.read_table, ["key", "embedding"])
    data = join_labels(tbl, read_labels(labels_url, key_col, label_col))
    return {"output": output, "run_id": pub.run_id, "model_version": pub.manifest["model_version"],
            "rows_labelled": len(data.keys), "rows_without_label": data.unmatched_rows,
            "rows_with_shared_name": data.shared_name_rows,
            "classes": int(len(np.unique(data.y))),
            f"knn{KNN_K}_accuracy": knn_accuracy(data.x, data.y),
            "logreg_accuracy": linear_probe_accuracy(data.x, data.y), "folds": _folds(data.y, FOLDS)}


def outliers(output: str, n: int = 20, by: str = "anomaly_score") -> list[dict]:
    """The n most anomalous images: highest `by`, either anomaly_score (reconstruction error under
    a model that never trained on the image; the default) or recon_error (the published model's
    own error, which is low for rare images it memorised). Tables written before anomaly_score
    existed, or without it, are ranked by recon_error."""
    return ranked_outliers(output, n, by)[1]


def ranked_outliers(output: str, n: int = 20, by: str = "anomaly_score") -> tuple[str, list[dict]]:
    """(the column the images were ranked by, outliers(output, n, by)): recon_error where `by`
    asks for anomaly scores the published table does not have, whatever n is."""
    if by not in ("anomaly_score", "recon_error"):
        raise AeError(f"--by {by!r}: choose anomaly_score or recon_error")
    pub = outputs.resolve(output)
    names = set(pub.load("embeddings", table.read_schema).names)
    cols = ["key", "recon_error"] + (["anomaly_score"] if "anomaly_score" in names else [])
    tbl = pub.load("embeddings", table.read_table, cols)
    if by == "anomaly_score" and ("anomaly_score" not in names or tbl.column("anomaly_score").null_count):
        by = "recon_error"
    order = pc.sort_indices(tbl, sort_keys=[(by, "descending"), ("key", "ascending")])
    worst = tbl.take(order.slice(0, min(n, len(order)))).to_pylist()  # arrow's lengths are int64
    return by, [{"rank": i + 1, "ranked_by": by, **row} for i, row in enumerate(worst)]


GRID_COLUMNS = 10  # images a band of the outliers picture holds, each captioned with its rank


def outlier_grid(output: str, keys: Sequence[str]) -> bytes:
    """A picture of the given keys above their reconstructions, read from the source again: bands
    of GRID_COLUMNS, each original captioned with its rank (#1 = the first key)."""
    from ae_core import checkpoint, report
    from ae_core.decode import decode_image, fingerprint

    if not keys:
        raise AeError("--grid: no images to draw (the table is empty, or -n is 0)")
    pub = outputs.resolve(output)
    ckpt = pub.load("checkpoint", checkpoint.read_checkpoint)
    tbl = pub.load("embeddings", table.read_table, ["key", "fingerprint"])
    prints = dict(zip(tbl.column("key").to_pylist(), tbl.column("fingerprint").to_pylist()))
    source = pub.manifest["source"]  # an absolute path for a local source (outputs.manifest_problem checks it)
    fs, root = open_store(source)
    pixels = []
    for key in keys:
        why = None
        try:
            data = fs.cat_file(key_path(fs, root, key))
            if fingerprint(data) != prints.get(key):
                why = f"it has changed since run {pub.run_id}"
            else:
                pixels.append(decode_image(data, pub.image_spec(ckpt.preprocess)).pixels)
        except (OSError, DecodeError) as err:
            why = f"it cannot be read there ({type(err).__name__}: {err})"
        if why:
            raise AeError(f"--grid shows the images from the source {source!r}, and {key!r}: {why}; "
                          "run `ae run` again, or leave out --grid")
    return report.reconstruction_grid(ckpt.model, np.stack(pixels), columns=GRID_COLUMNS,
                                      captions=[f"#{i + 1}" for i in range(len(keys))])


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def evaluate_corpus(source: str, labels_url: str, key_col: str, label_col: str, dims: Sequence[int],
                    train: TrainConfig | None = None, work_dir: str | None = None) -> list[dict]:
    """Train with the product's defaults once per dimension and compare with PCA and raw pixels
    on the same preprocessed images. Labels are used only to score the codes."""
    import tempfile

    from ae_core import pipeline
    from ae_core.config import ModelConfig, RunConfig
    from ae_core.encode import encode_pixels
    from ae_core.ingest import nothing_decoded
    from ae_core.model import AEArch
    from ae_core.train import split_indices, train_autoencoder

    train = train or TrainConfig()
    with tempfile.TemporaryDirectory() as scratch:
        ctx = pipeline.prepare_run(RunConfig(source=source, output=f"{scratch}/out", train=train,
                                             work_dir=work_dir or f"{scratch}/work"))
        plan = pipeline.plan_run(ctx, pipeline.list_source(ctx))
        corpus = pipeline.decode_source(ctx, plan)
        if len(corpus) == 0:
            raise nothing_decoded(redact_url(source), corpus.rejects, "nothing to evaluate")
        pixels = np.asarray(corpus.pixels())
    have, y, shared = match_labels([img["key"] for img in corpus.images], read_labels(labels_url, key_col, label_col))
    raw = pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0
    raw_knn = knn_accuracy(raw[have], y)
    pca = pca_fits(raw, dims)  # one SVD serves every dimension
    rows = []
    for dim in dims:
        model: ModelConfig = plan.model.model_copy(update={"dim": dim})
        arch = AEArch(dim=dim, image_size=model.image_size, channels=model.channels,
                      width=model.width, blocks_per_stage=model.blocks_per_stage)
        result, seconds = timed(train_autoencoder, pixels, arch, train)
        emb, err = encode_pixels(result.model, pixels)
        pca_codes, pca_err = pca[dim]
        # the same footing for both: images training held out, PCA fitted on the ones trained on
        held = heldout_comparison(pixels, err, dim, *split_indices(len(pixels), train.val_fraction, train.seed),
                                  seed=train.seed) or {}
        rows.append({
            "dim": dim, "images": len(pixels), "labelled": len(have), "with_shared_name": shared,
            "image_size": arch.image_size, "channels": arch.channels,
            "ae_mse": float(err.mean()), "pca_mse": pca_err, "ae_over_pca": error_ratio(float(err.mean()), pca_err),
            "heldout_images": held.get("images", 0), "heldout_ae_mse": held.get("ae_mse"),
            "heldout_pca_mse": held.get("pca_mse"), "heldout_ae_over_pca": held.get("ae_over_pca"),
            "knn_ae": knn_accuracy(emb[have], y), "knn_pca": knn_accuracy(pca_codes[have], y), "knn_raw": raw_knn,
            "logreg_ae": linear_probe_accuracy(emb[have], y), "logreg_pca": linear_probe_accuracy(pca_codes[have], y),
            "train_seconds": round(seconds, 1), "epochs_run": len(result.history),
        })
    return rows


def shared_name_note(count: int) -> str:
    """What `ae probe` and `ae evaluate` add after "N without a label" when labels by file name
    matched no key because other keys share that name ("" when none did)."""
    return (f"; {count} of them because their file name, which the labels file names, is shared by several "
            "keys: give whole keys there") if count else ""


def evaluation_markdown(source: str, rows: Sequence[dict]) -> str:
    head = ("| dim | images | input | AE MSE | PCA MSE | AE/PCA | AE/PCA held out | 5-NN AE | 5-NN PCA | 5-NN raw "
            "| logreg AE | logreg PCA | train s | epochs |")
    lines = [f"Evaluation of `{source}` (MSE per pixel on [0,1] at the model's input size, on all the images, "
             "most of which the model trained on; AE/PCA held out: on the images training held out, PCA fitted on "
             f"the rest; accuracies are means of {FOLDS}-fold cross-validation)", ""]
    if rows and rows[0]["labelled"] < rows[0]["images"]:
        r = rows[0]
        shared = shared_name_note(r["with_shared_name"])
        lines += [f"Accuracies are on the {r['labelled']} labelled images of {r['images']} "
                  f"({r['images'] - r['labelled']} {'has' if r['images'] - r['labelled'] == 1 else 'have'} no label{shared}); the errors on all of them.", ""]
    lines += [head, "|" + "---|" * 14]
    for r in rows:
        held = (f"{r['heldout_ae_over_pca']:.3f} ({r['heldout_images']} images)"
                if r.get("heldout_ae_over_pca") is not None else "-")
        lines.append(f"| {r['dim']} | {r['images']} | {r['image_size']}x{r['image_size']}x{r['channels']} "
                     f"| {r['ae_mse']:.5f} | {r['pca_mse']:.5f} | {'exact PCA' if r['ae_over_pca'] is None else format(r['ae_over_pca'], '.3f')} | {held} | {r['knn_ae']:.4f} "
                     f"| {r['knn_pca']:.4f} | {r['knn_raw']:.4f} | {r['logreg_ae']:.4f} | {r['logreg_pca']:.4f} "
                     f"| {r['train_seconds']} | {r['epochs_run']} |")
    return "\n".join(lines) + "\n"
