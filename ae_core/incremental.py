"""Incremental runs: what changed in SOURCE since the published run, and whether to retrain.

Each run stores its source listing (key, size, tag, and for local files stat: inode and
status-change time) as `source.parquet`. The next run compares the current listing with it: only
new and changed objects are decoded and encoded when the model is reused; unchanged rows are
carried over and rows of deleted objects dropped. Pure functions.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa

from ae_core.config import IngestConfig, ModelConfig, TrainConfig
from ae_core.decode import Preprocess
from ae_core.errors import AeError
from ae_core.model import AEArch
from ae_core.storage import ObjectInfo, unversioned

SOURCE_SCHEMA = pa.schema([("key", pa.string()), ("size", pa.int64()), ("tag", pa.string()), ("stat", pa.string())])


@dataclass(frozen=True)
class SourceDiff:
    new: tuple[ObjectInfo, ...]
    changed: tuple[ObjectInfo, ...]
    unchanged: tuple[ObjectInfo, ...]
    deleted: tuple[str, ...]
    retried: tuple[ObjectInfo, ...] = ()  # unchanged, but their last read failed: read again
    # same size and tag, but another file or rewritten in place (its stat differs): read again
    rechecked: tuple[ObjectInfo, ...] = ()

    def counts(self) -> dict[str, int]:
        return {"new": len(self.new), "changed": len(self.changed),
                "unchanged": len(self.unchanged), "deleted": len(self.deleted), "retried": len(self.retried),
                "rechecked": len(self.rechecked)}

    @property
    def churn(self) -> int:
        return len(self.new) + len(self.changed) + len(self.deleted)


def source_table(objects: Sequence[ObjectInfo]) -> pa.Table:
    return pa.table({"key": [o.key for o in objects], "size": [o.size for o in objects],
                     "tag": [o.tag for o in objects], "stat": [o.stat or None for o in objects]},
                    schema=SOURCE_SCHEMA)


def listing_from_table(table: pa.Table) -> dict[str, tuple[int, str, str | None]]:
    """key -> (size, tag, stat); stat is None where it was not recorded (remote stores, and
    tables written before it was)."""
    stats = table.column("stat").to_pylist() if "stat" in table.column_names else [None] * table.num_rows
    return {k: (s, t, st) for k, s, t, st in zip(table.column("key").to_pylist(), table.column("size").to_pylist(),
                                                 table.column("tag").to_pylist(), stats)}


def diff_listing(previous: Mapping[str, tuple[int, str, str | None]], current: Sequence[ObjectInfo],
                 read_failed: Collection[str] = ()) -> SourceDiff:
    """An object is unchanged when its size and listing tag (ETag, or mtime) are both the same.
    An unchanged object in `read_failed` (its read failed last time: a throttled request, a
    network error, a permission since fixed; or it was over a pixel limit since changed) is
    `retried`, not carried over as a reject. A local file with the same size and mtime whose
    stat (inode, status-change time) differs from the recorded one is `rechecked`: read again,
    since it may be another file (swapped in by `mv`, copied with its mtime kept); but not
    counted as churn, since a corpus copied to another disk has every file's stat changed. An
    object whose old or new tag carries no version (`storage.unversioned`) is `rechecked` too."""
    new, changed, unchanged, retried, rechecked = [], [], [], [], []
    for o in current:
        before = previous.get(o.key)
        if before is None:
            new.append(o)
        elif before[:2] != (o.size, o.tag):
            # a tag that says nothing of the version (an http listing's, a zip member's before
            # their tags had one): read again, but not churn, or every such run would retrain
            (rechecked if unversioned(before[1]) or unversioned(o.tag) else changed).append(o)
        elif o.key in read_failed:
            retried.append(o)
        elif len(before) > 2 and before[2] and o.stat and before[2] != o.stat:
            rechecked.append(o)
        else:
            unchanged.append(o)
    seen = {o.key for o in current}
    deleted = tuple(sorted(k for k in previous if k not in seen))
    return SourceDiff(tuple(new), tuple(changed), tuple(unchanged), deleted, tuple(retried), tuple(rechecked))


def compatible(model: ModelConfig, ingest: IngestConfig, arch: AEArch, spec: Preprocess) -> str | None:
    """Why the previous model cannot serve the requested settings, or None when it can."""
    wanted = {"dim": model.dim, "width": model.width, "blocks_per_stage": model.blocks_per_stage,
              "image_size": model.image_size, "channels": model.channels}
    for name, value in wanted.items():
        if value is not None and getattr(arch, name) != value:
            return f"{name} changed ({getattr(arch, name)} -> {value})"
    if ingest.resize != spec.resize:
        return f"resize changed ({spec.resize} -> {ingest.resize})"
    return None


def anomaly_mismatch(anomaly_steps: int, published_steps: int | None, published_models: bool) -> str | None:
    """Why the previous model cannot give the anomaly scores asked for, or None: it was trained
    without fold models (`published_steps`, the anomaly_steps it was trained with, is 0) and
    this run wants them. (A model whose corpus left a fold empty has none either, but was asked
    for them: retraining would change nothing.) Pure."""
    if anomaly_steps > 0 and not published_models and published_steps == 0:
        return f"anomaly scores asked for (anomaly_steps {anomaly_steps}), but it was trained without (anomaly_steps 0)"
    return None


def retrain_decision(train: TrainConfig, diff: SourceDiff | None, incompatible: str | None) -> tuple[bool, str]:
    """(retrain?, why) from the policy, the source's churn and the previous model's fitness."""
    if diff is None:
        return True, "no previous run to reuse"
    if train.retrain == "always":
        return True, "retrain=always"
    if incompatible and train.retrain == "never":
        raise AeError(f"retrain=never, but the published model does not fit this run's settings: {incompatible} "
                      "(a setting left out counts at its default); pass the published model's value "
                      "(`ae info OUTPUT` shows them) to reuse it, or retrain (retrain=auto or always)")
    if incompatible:
        return True, f"the previous model does not fit: {incompatible}"
    if train.retrain == "never":
        return False, "retrain=never"
    previous_total = (len(diff.unchanged) + len(diff.changed) + len(diff.deleted) + len(diff.retried)
                      + len(diff.rechecked))
    fraction = diff.churn / max(1, previous_total)
    # new objects count too, so against a small published run the share can pass 100%
    what = (f"{diff.churn} new, changed or deleted objects, {fraction:.0%} of the published run's "
            f"{previous_total}")
    if fraction > train.retrain_fraction:
        return True, f"{what} (> {train.retrain_fraction:.0%})"
    return False, f"{what} (<= {train.retrain_fraction:.0%})"
