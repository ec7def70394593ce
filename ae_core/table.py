"""The Parquet tables: embeddings (one row per embedded image) and rejects (one row per failure).

The embedding column is a fixed_size_list<float32>[dim] built directly in pyarrow, so readers
(pandas, DuckDB, Polars) see one fixed-width vector per row. Row i of the embedding table is id i
of the FAISS index.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from ae_core.errors import AeError
from ae_core.storage import is_local, write_bytes_atomic

METADATA_KEY = b"ae_embed"

REJECTS_SCHEMA = pa.schema([
    ("key", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
    ("size_bytes", pa.int64()), ("fingerprint", pa.string()),
])


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])


def embeddings_table(images: Sequence[dict], emb: np.ndarray, recon_error: np.ndarray,
                     metadata: dict, anomaly_score: np.ndarray | None = None) -> pa.Table:
    """Build the table; `metadata` (model version, dim, input size, channels...) goes in the schema."""
    if not (len(images) == len(emb) == len(recon_error)):
        raise ValueError("images, embeddings and errors differ in length")
    cols = {
        "key": pa.array([i["key"] for i in images], pa.string()),
        "embedding": embedding_array(np.asarray(emb).reshape(len(images), emb.shape[-1])),
        "recon_error": pa.array(np.asarray(recon_error, np.float32), pa.float32()),
        "anomaly_score": (pa.array(np.asarray(anomaly_score, np.float32), pa.float32())
                          if anomaly_score is not None else pa.nulls(len(images), pa.float32())),
        "width": pa.array([i["width"] for i in images], pa.int32()),
        "height": pa.array([i["height"] for i in images], pa.int32()),
        "size_bytes": pa.array([i["size_bytes"] for i in images], pa.int64()),
        "fingerprint": pa.array([i["fingerprint"] for i in images], pa.string()),
        "mode": pa.array([i["mode"] for i in images], pa.string()),
        "format": pa.array([i["format"] for i in images], pa.string()),
    }
    table = pa.table(cols)
    flat = {k.encode(): str(v).encode() for k, v in metadata.items() if not isinstance(v, (dict, list))}
    return table.replace_schema_metadata({**flat, METADATA_KEY: json.dumps(metadata).encode()})


def rejects_table(rejects: Sequence[dict]) -> pa.Table:
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in REJECTS_SCHEMA} for r in rejects],
                                schema=REJECTS_SCHEMA)


def write_table(fs: AbstractFileSystem, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes_atomic(fs, path, buf.getvalue())


_RANGE = 16 << 20  # bytes per ranged read of a remote table
_TAIL = 64 << 10  # first guess at a remote footer's size


def _arrow_file(fs: AbstractFileSystem, path: str) -> pa.NativeFile:
    """The file as an Arrow-native file, never a Python file object.

    Arrow reads a Python file on its IO threads, and each read's buffer, a Python object, is
    released on that thread later; a short command (`ae neighbours`) can be exiting by then, the
    thread cannot take the GIL of a finalizing interpreter, and the process aborts ("terminate
    called without an active exception": ~1 run in 4 with pq.read_table on a Python file, ~1 in
    150 under load with ParquetFile read on the calling thread; core dumps show the IO thread
    in PyBuffer's destructor). A local file is opened by Arrow itself; a remote one is read
    whole into memory Arrow allocated."""
    if is_local(fs):
        return pa.OSFile(fs._strip_protocol(path), "rb")
    size = fs.size(path)  # ranged reads: the peak is the file plus one range
    return _arrow_reader(size, (fs.cat_file(path, start=s, end=min(size, s + _RANGE)) for s in range(0, size, _RANGE)))


def _arrow_reader(size: int, parts: Iterable[bytes]) -> pa.BufferReader:
    """`parts`, in order, copied into one buffer of `size` bytes that Arrow allocated."""
    buf = pa.allocate_buffer(size)
    view, pos = memoryview(buf).cast("B"), 0
    for part in parts:
        view[pos:pos + len(part)] = part
        pos += len(part)
    return pa.BufferReader(buf)


def _footer(fs: AbstractFileSystem, path: str) -> pa.NativeFile:
    """A remote Parquet file's footer only (metadata and schema), as an Arrow buffer laid out
    like the end of the file: what pq.read_schema reads."""
    size = fs.size(path)
    tail = fs.cat_file(path, start=max(0, size - _TAIL), end=size)
    need = int.from_bytes(tail[-8:-4], "little") + 8 if len(tail) >= 8 and tail[-4:] == b"PAR1" else 0
    if need > len(tail) and need <= size:
        tail = fs.cat_file(path, start=size - need, end=size)
    return _arrow_reader(len(tail), [tail])


def read_table(fs: AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet table (only `columns`, if given) through fsspec, decoded on this thread,
    from an Arrow-native file (see _arrow_file)."""
    with _arrow_file(fs, path) as f, pq.ParquetFile(f) as pf:
        missing = [c for c in columns or [] if c not in pf.schema_arrow.names]
        if missing:  # ParquetFile.read would silently leave them out
            raise AeError(f"table {path!r} has no column {', '.join(map(repr, missing))}; it was written "
                          "by an incompatible version: run `ae run` again to rewrite it")
        return pf.read(columns=columns, use_threads=False)


def read_schema(fs: AbstractFileSystem, path: str) -> pa.Schema:
    with (_arrow_file(fs, path) if is_local(fs) else _footer(fs, path)) as f:
        return pq.read_schema(f)


def read_num_rows(fs: AbstractFileSystem, path: str) -> int:
    """A Parquet file's row count, from its footer alone."""
    with (_arrow_file(fs, path) if is_local(fs) else _footer(fs, path)) as f:
        return pq.read_metadata(f).num_rows


def table_metadata(table: pa.Table) -> dict:
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def embeddings_matrix(table: pa.Table) -> np.ndarray:
    """The embedding column as a (rows, dim) float32 array, without copying through Python lists."""
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
