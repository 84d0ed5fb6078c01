"""Read W&B offline run files back without a network, for the tests of ``experiments.tracking``.

Tests only: a user uploads offline runs with ``wandb sync``; we check what the tracker wrote.
"""
from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from experiments.tracking import ID_FILE

# --- offline reader -------------------------------------------------------------------------------
# wandb 0.31 ships no Python reader (the old wandb.sdk.internal.datastore is gone; the writer lives
# in the Go binary wandb-core). The format is unchanged: a 7-byte file header (b":W&B", magic 0xBEE1,
# version 0), then LevelDB-log style chunks in 32 KiB blocks: <crc32:u32><len:u16><type:u8><data>,
# type 1=full, 2=first, 3=middle, 4=last; crc32 covers the type byte then the data; a block tail
# shorter than a chunk header is zero padding. Each assembled record is a wandb_internal_pb2.Record.
_BLOCK, _HDR = 32768, 7
_FILE_HDR = struct.Struct("<4sHB")
_CHUNK_HDR = struct.Struct("<IHB")


def _records(path: Path) -> Iterator[Any]:
    """Decode the protobuf records of one ``.wandb`` file; a truncated tail (killed job) ends it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if len(data) < _HDR:  # killed before the header was flushed
        return
    if _FILE_HDR.unpack_from(data) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B v0 transaction log (unexpected header {data[:7]!r})")
    pos, parts = _HDR, []
    while True:
        if _BLOCK - pos % _BLOCK < _HDR:
            pos += _BLOCK - pos % _BLOCK
        if pos + _HDR > len(data):
            return
        crc, n, kind = _CHUNK_HDR.unpack_from(data, pos)
        chunk = data[pos + _HDR:pos + _HDR + n]
        if pos % _BLOCK + _HDR + n > _BLOCK:  # chunks never cross blocks: a garbled length
            raise ValueError(f"{path}: corrupt record at byte {pos} (length {n} crosses a block)")
        if kind == 0 or len(chunk) < n:  # preallocated zeros or a partly written last chunk
            return
        if kind > 4 or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: corrupt record at byte {pos} (type {kind}, bad checksum)")
        pos += _HDR + n
        parts = [chunk] if kind in (1, 2) else parts + [chunk]
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            yield rec


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _value(item: Any) -> Any:
    """JSON-decode an item; HistoryItem also has typed fields (unused by 0.31's writer)."""
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value") if "value" in type(item).DESCRIPTOR.oneofs_by_name else None
    if kind is None or kind == "none":
        return None
    return json.loads(item.json) if kind == "json" else getattr(item, kind)


def _run_files(run_dir: Path, wandb_dir: Path | None) -> list[Path]:
    """The run's ``.wandb`` files (offline and online run folders), oldest run first."""
    run_dir = Path(run_dir)
    root = Path(wandb_dir) if wandb_dir else run_dir
    id_file = run_dir / ID_FILE
    pattern = f"run-{id_file.read_text().strip()}.wandb" if id_file.is_file() else "run-*.wandb"
    files = [p for sub in ("offline-run-*", "run-*") for p in (root / "wandb").glob(f"{sub}/{pattern}")]
    if not files:
        raise FileNotFoundError(f"no W&B run files {root}/wandb/*run-*/{pattern}")

    def started(p: Path) -> tuple[float, str]:
        for rec in _records(p):
            if rec.HasField("run"):
                return rec.run.start_time.seconds + rec.run.start_time.nanos * 1e-9, p.parent.name
        return p.stat().st_mtime, p.parent.name

    return sorted(set(files), key=started)


def _keep(key: str, internal: bool) -> bool:
    return internal or key == "_step" or not key.startswith("_")


def read_offline_metrics(run_dir: Path, wandb_dir: Path | None = None,
                         include_internal: bool = False) -> list[dict[str, Any]]:
    """History rows logged for ``run_dir``, across resumed segments, in logging order.

    Values are JSON-decoded; ``_step`` is kept, other ``_``-keys (``_timestamp``, ``_runtime``)
    only with ``include_internal``. ``wandb_dir`` is ``LoggerConfig.dir`` if one was set. Steps
    re-logged after a resume appear again (rows are not deduplicated).
    """
    rows = []
    for path in _run_files(run_dir, wandb_dir):
        for rec in _records(path):
            if rec.HasField("history"):
                rows.append({k: _value(i) for i in rec.history.item
                             if _keep(k := _key(i), include_internal)})
    return rows


def read_offline_summary(run_dir: Path, wandb_dir: Path | None = None,
                         include_internal: bool = False) -> dict[str, Any]:
    """The final run summary (automatic last-values plus :meth:`Tracker.summary`) for ``run_dir``."""
    summary: dict[str, Any] = {}
    for path in _run_files(run_dir, wandb_dir):
        for rec in _records(path):
            if rec.HasField("summary"):
                for item in rec.summary.update:
                    summary[_key(item)] = _value(item)
                for item in rec.summary.remove:
                    summary.pop(_key(item), None)
    return {k: v for k, v in summary.items() if _keep(k, include_internal)}


def _media_file(run_dir: Path, key: str, kind: str, wandb_dir: Path | None) -> Path:
    """The file of the last media object of type ``kind`` (``table-file``, ``image-file``) logged
    under ``key``: the history row holds a reference (nested keys key/_type, key/path, ...) to a
    file in the run folder's ``files/``."""
    found = None
    for path in _run_files(run_dir, wandb_dir):
        for rec in _records(path):
            if rec.HasField("history"):
                ref = {k[len(key) + 1:]: _value(i) for i in rec.history.item if (k := _key(i)).startswith(key + "/")}
                if ref:
                    found = (path.parent, ref)
    if found is None:
        raise KeyError(f"nothing logged under {key!r} for {run_dir}")
    folder, ref = found
    if not isinstance(ref, dict) or ref.get("_type") != kind:
        raise ValueError(f"{key!r} is not a {kind} ({ref!r})")
    return folder / "files" / ref["path"]


def read_offline_table(run_dir: Path, key: str, wandb_dir: Path | None = None) -> dict[str, Any]:
    """The last ``wandb.Table`` logged under ``key``: ``{"columns": [...], "data": [[...], ...]}``."""
    table = json.loads(_media_file(run_dir, key, "table-file", wandb_dir).read_text())
    return {"columns": table["columns"], "data": table["data"]}


def read_offline_image(run_dir: Path, key: str, wandb_dir: Path | None = None) -> bytes:
    """The bytes of the last ``wandb.Image`` logged under ``key`` (a PNG)."""
    return _media_file(run_dir, key, "image-file", wandb_dir).read_bytes()
