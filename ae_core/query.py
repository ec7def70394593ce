"""Reading a published result: what it holds, and nearest neighbours by key or by a new image."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from ae_core import index as ae_index, outputs, table
from ae_core.errors import AeError, DecodeError
from ae_core.storage import is_read_only, read_named_file, redact_url, utf8_key


def info(output: str) -> dict:
    """The published run's summary, with URLs that pandas, pyarrow and faiss can open."""
    pub = outputs.resolve(output)
    m = pub.manifest
    files = m["files"]
    # the URLs below are for scripts to open: each must be there (one listing of the run's
    # folder; on an http(s) store one HEAD each, as a server need not list its folders)
    kinds = ("embeddings", "rejects", "index", "checkpoint")
    if is_read_only(pub.fs):
        present = {files[kind] for kind in kinds if pub.fs.exists(pub.file(files[kind]))}
    else:
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in pub.fs.ls(pub.path, detail=False)}
    for kind in kinds:
        if files[kind] not in present:
            raise pub.missing(files[kind])
    # the tables' footers (a few KB each): a truncated table is named here, as the other
    # commands name it, not handed to a script as healthy (the index and model are checked by
    # the commands that load them)
    for kind, rows in (("embeddings", m["rows"]), ("rejects", m["rejected"])):
        found = pub.load(kind, table.read_num_rows)
        if found != rows:
            raise AeError(f"{pub.shown(files[kind])!r} holds {found} rows where its run's manifest says {rows}: "
                          f"it is not the run's own; {outputs.RERUN}")
    return {
        "output": output, "run_id": pub.run_id, "finished_at": m.get("finished_at"),
        "rows": m["rows"], "rejected": m["rejected"], "rejects_by_reason": m.get("rejects_by_reason", {}),
        "dim": m["dim"], "image_size": m["image_size"], "channels": m["channels"],
        # runs published before these were recorded: the settings they ran with
        "width": m.get("width", m.get("config", {}).get("model", {}).get("width")),
        "blocks_per_stage": m.get("blocks_per_stage", m.get("config", {}).get("model", {}).get("blocks_per_stage")),
        "model_version": m["model_version"],
        "embeddings": pub.url(files["embeddings"]), "rejects": pub.url(files["rejects"]),
        "index": pub.url(files["index"]), "checkpoint": pub.url(files["checkpoint"]),
        "manifest": pub.url(outputs.MANIFEST), "source": m.get("source"),
        "quality": m.get("quality", {}), "index_info": m.get("index", {}),
        "timings_s": m.get("timings_s", {}),
    }


@dataclass
class Neighbour:
    rank: int
    key: str
    distance: float
    row: int


def _load_index(pub: outputs.Published, rows: int, dim: int):
    """The run's index, checked against its table's `rows` and the queries' `dim`: an index, a
    table or a model from another run, put there by hand, would answer with wrong keys (or
    stop FAISS with a bare assertion)."""
    index = pub.load("index", ae_index.load)
    if (index.ntotal, index.d) != (rows, dim):
        raise AeError(f"{pub.shown(pub.manifest['files']['index'])!r} holds {index.ntotal} vectors of dim {index.d}, "
                      f"but the run's table has {rows} rows and its embeddings dim {dim}: the run's files are "
                      f"not all its own; {outputs.RERUN}")
    return index


def _keys(pub: outputs.Published):
    return pub.load("embeddings", table.read_table, ["key"]).column("key")


def _rank(dist: np.ndarray, ids: np.ndarray, keys, k: int, self_row: int | None) -> list[Neighbour]:
    """Nearest first. A key's own row is its nearest neighbour, at distance 0, by definition:
    float rounding in FAISS or exact duplicates must not push it down the list."""
    hits = [(float(d), int(i)) for d, i in zip(dist, ids) if i >= 0 and i != self_row]
    if self_row is not None:
        hits.insert(0, (0.0, self_row))
    return [Neighbour(r + 1, keys[i].as_py(), d, i) for r, (d, i) in enumerate(hits[:k])]


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # surrogates: bytes of a file name that is not UTF-8
        return False


def neighbours_of_key(output: str, key: str, k: int = 10) -> list[Neighbour]:
    pub = outputs.resolve(output)
    tbl = pub.load("embeddings", table.read_table, ["key", "embedding"])
    keys = tbl.column("key")
    # the key as the table spells it first; else a file name typed as it is on disk (not valid
    # UTF-8, or with a backslash the listing escapes): keyed as the listing keys it
    rows = pc.indices_nonzero(pc.equal(keys, key)).to_numpy() if key.isascii() or _is_utf8(key) else []
    if len(rows) == 0 and utf8_key(key) != key:
        key = utf8_key(key)
        rows = pc.indices_nonzero(pc.equal(keys, key)).to_numpy()
    for form in ("NFC", "NFD"):  # é typed as one character, stored as e and an accent (macOS), or back
        if len(rows) == 0 and unicodedata.normalize(form, key) != key:
            rows = pc.indices_nonzero(pc.equal(keys, unicodedata.normalize(form, key))).to_numpy()
            key = unicodedata.normalize(form, key) if len(rows) else key
    if len(rows) == 0:
        rejects = pub.load("rejects", table.read_table, ["key", "reason"])
        hit = rejects.filter(pc.equal(rejects.column("key"), key))
        if hit.num_rows:
            raise AeError(f"key {key!r} was rejected ({hit.column('reason')[0].as_py()}), so it has no embedding; "
                          f"see the rejects table (<ae info --json>.rejects)")
        raise AeError(f"key {key!r} is not in the table at {output!r}; list keys with "
                      f"pandas.read_parquet(<ae info --json>.embeddings).key")
    row = int(rows[0])
    query = table.embeddings_matrix(tbl.slice(row, 1))
    dist, ids = ae_index.search(_load_index(pub, len(keys), query.shape[1]), query, k + 1)
    return _rank(dist[0], ids[0], keys, k, row)


def neighbours_of_image(output: str, image_url: str, k: int = 10) -> list[Neighbour]:
    """Encode a new image with the published model and its preprocessing, then search."""
    from ae_core import checkpoint  # torch loads only when a new image must be encoded
    from ae_core.decode import decode_image
    from ae_core.encode import encode_pixels

    pub = outputs.resolve(output)
    ckpt = pub.load("checkpoint", checkpoint.read_checkpoint)
    shown = redact_url(image_url)
    data = read_named_file(image_url, "image", "give a path or URL of an image file")
    try:
        pixels = decode_image(data, pub.image_spec(ckpt.preprocess)).pixels[None]
    except DecodeError as err:
        raise AeError(f"image {shown!r} cannot be decoded ({err.reason}: {err.detail})") from err
    emb, _ = encode_pixels(ckpt.model, pixels)
    keys = _keys(pub)
    dist, ids = ae_index.search(_load_index(pub, len(keys), emb.shape[1]), emb, k)
    return _rank(dist[0], ids[0], keys, k, None)
