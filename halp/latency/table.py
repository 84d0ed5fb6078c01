"""The latency lookup table file: entries, their spread, and the setting that makes them valid.

One self-describing JSON file::

    {"format": "halp-latency-table", "version": 1,
     "meta": {setting, device, versions, protocol, model, input_shape, created, shard},
     "units": {unit key: unit spec}, "layers": {layer: unit key},
     "groups": {group id: {"width": N, "step": S, "staircase": P}},
     "calibration": {"dense_ms": ..., "spread": ...},
     "entries": {unit key: [[c_in, c_out, ms, spread, samples, conv_ms], ...]}}

``ms`` times the whole unit (conv + BN + activation); ``conv_ms`` the conv alone. Tables made for
the reference HALP code (a pickled ``{"{batch}_{cin}_{cout}_{fmap}_{k}_{stride}_{groups}": ms}``)
can be imported and exported (:func:`from_reference`, :meth:`LatencyTable.to_reference`).
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..fileio import atomic_write, atomic_write_text
from .backends import running_versions
from .units import UnitSpec

LUT_FORMAT = "halp-latency-table"
LUT_VERSION = 1
# Setting fields that must match for a table to be used; anything else is informational.
SETTING_FIELDS = ("backend", "batch", "threads", "memory_format", "dtype", "allocator")


@dataclass
class Entry:
    ms: float
    spread: float = 0.0
    samples: int = 0
    conv_ms: float | None = None

    def to_row(self, cin: int, cout: int) -> list:
        # full float precision: an imported reference table must export back unchanged
        return [cin, cout, self.ms, round(self.spread, 5), self.samples, self.conv_ms]


@dataclass
class LatencyTable:
    meta: dict
    units: dict[str, UnitSpec] = field(default_factory=dict)
    entries: dict[str, dict[tuple[int, int], Entry]] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)
    groups: dict[str, dict] = field(default_factory=dict)
    calibration: dict | None = None

    # ------------------------------------------------------------------ basics
    @property
    def n_points(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def spreads(self) -> list[float]:
        return [e.spread for v in self.entries.values() for e in v.values()]

    def add(self, key: str, spec: UnitSpec, cin: int, cout: int, entry: Entry) -> None:
        self.units.setdefault(key, spec)
        self.entries.setdefault(key, {})[(cin, cout)] = entry

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {"format": LUT_FORMAT, "version": LUT_VERSION, "meta": self.meta,
                "units": {k: u.to_dict() for k, u in sorted(self.units.items())},
                "layers": self.layers, "groups": self.groups, "calibration": self.calibration,
                "entries": {k: [e.to_row(ci, co) for (ci, co), e in sorted(v.items())]
                            for k, v in sorted(self.entries.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        if not isinstance(d, dict) or d.get("format") != LUT_FORMAT:
            raise ValueError("not a halp latency table (missing format 'halp-latency-table')")
        if d.get("version") != LUT_VERSION:
            raise ValueError(f"latency table version {d.get('version')} is not supported "
                             f"(this halp reads version {LUT_VERSION})")
        units = {k: UnitSpec.from_dict(u) for k, u in d["units"].items()}
        entries: dict[str, dict[tuple[int, int], Entry]] = {}
        for k, rows in d["entries"].items():
            if k not in units:
                raise ValueError(f"entries for unknown unit {k!r}")
            entries[k] = {(int(r[0]), int(r[1])): Entry(float(r[2]), float(r[3]), int(r[4]),
                                                         None if r[5] is None else float(r[5]))
                          for r in rows}
        return cls(dict(d["meta"]), units, entries, dict(d.get("layers", {})),
                   dict(d.get("groups", {})), d.get("calibration"))

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic write: a crash leaves the old file (or none), never half a table."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=None, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latency table {path} does not exist (build one with `halp lut build`)")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"corrupt latency table {path}: {type(e).__name__}: {e}") from None

    # ------------------------------------------------------------------ validity
    def check_setting(self, setting: dict, device_name: str, allow_mismatch: bool = False,
                      override: str = "--allow-lut-mismatch", rebuild: str = "rebuild it here with `halp lut build`",
                      versions: dict | None = None) -> list[str]:
        """Differences between this table's setting and ``setting`` (and the device: the CPU's or
        the GPU's name, and the library versions: kernels change between releases); raises unless
        ``allow_mismatch``.

        ``override`` names the switch that sets ``allow_mismatch`` in the caller's interface, and
        ``rebuild`` how to get a valid table there, for the message. ``versions`` are the running
        library versions (default: this torch, and for a ``torch-cuda`` setting its CUDA and cuDNN).
        A version the table does not record (built before halp recorded it) is not refused for;
        a warning says that torch's cannot be checked."""
        ours = self.meta.get("setting", {})
        diffs = [f"{k}: table {ours.get(k)!r}, now {setting.get(k)!r}"
                 for k in SETTING_FIELDS if ours.get(k) != setting.get(k)]
        dev = self.meta.get("device", {}).get("name")
        if dev != device_name:
            diffs.append(f"device: table {dev!r}, now {device_name!r}")
        recorded = self.meta.get("versions") or {}
        running = running_versions(str(setting.get("backend"))) if versions is None else versions
        if "torch" in running and "torch" not in recorded:
            warnings.warn(f"the latency table records no torch version (built before halp recorded it?): cannot "
                          f"check that it was measured with this torch {running['torch']}", stacklevel=2)
        diffs += [f"{k}: table {recorded[k]!r}, now {v!r}" for k, v in running.items()
                  if k in recorded and recorded[k] != v]
        if diffs and not allow_mismatch:
            raise ValueError("latency table was measured in another setting (" + "; ".join(diffs) +
                             f"); {rebuild}, or override the check ({override}) if you know it transfers")
        return diffs

    # ------------------------------------------------------------------ reference format
    def to_reference(self) -> dict[str, float]:
        """``{"{batch}_{cin}_{cout}_{fmap}_{k}_{stride}_{groups}": ms}`` with conv-only times."""
        batch = int(self.meta.get("setting", {}).get("batch", 1))
        out: dict[str, float] = {}
        for key, rows in self.entries.items():
            u = self.units[key]
            if u.kind != "conv":
                continue
            if u.kernel[0] != u.kernel[1] or u.stride[0] != u.stride[1] or u.input_hw[0] != u.input_hw[1]:
                continue  # the reference key has one number each for kernel, stride and fmap
            for (cin, cout), e in rows.items():
                ms = e.conv_ms if e.conv_ms is not None else (e.ms if not u.fused else None)
                if ms is None:
                    continue
                ref = f"{batch}_{cin}_{cout}_{u.input_hw[0]}_{u.kernel[0]}_{u.stride[0]}_{cin if u.depthwise else 1}"
                out.setdefault(ref, ms)
        return out

    def save_reference(self, path: str | os.PathLike) -> Path:
        data = self.to_reference()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                pickle.dump(data, f)
        return atomic_write(path, write)


def from_reference(data: dict[str, float], device_name: str = "unknown (imported)",
                   threads: int | None = None) -> LatencyTable:
    """A table from the reference HALP pickle's dict. Units are conv-only, padding k//2."""
    batch = None
    table = LatencyTable(meta={})
    for ref, ms in data.items():
        try:
            b, cin, cout, fmap, k, stride, groups = (int(p) for p in str(ref).split("_"))
        except ValueError:
            raise ValueError(f"reference key {ref!r} is not '{{batch}}_{{cin}}_{{cout}}_{{fmap}}_"
                             "{kernel}_{stride}_{groups}'") from None
        if batch is None:
            batch = b
        elif b != batch:
            raise ValueError(f"reference table mixes batch sizes {batch} and {b}")
        depthwise = groups > 1
        if depthwise and not groups == cin == cout:
            raise ValueError(f"reference key {ref!r}: grouped convs other than depthwise are not supported")
        spec = UnitSpec("conv", (k, k), (stride, stride), (k // 2, k // 2), (1, 1), depthwise, False, (fmap, fmap))
        table.add(spec.key, spec, cin, cout, Entry(float(ms), conv_ms=float(ms)))
    table.meta = {"setting": {"backend": "reference", "batch": batch or 1, "threads": threads,
                              "memory_format": "contiguous", "dtype": "float32"},
                  "device": {"name": device_name}, "source": "reference-pickle"}
    return table


def load_reference(path: str | os.PathLike, **kw) -> LatencyTable:
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)  # the reference format is a pickle: only load files you trust
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"corrupt reference pickle {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not the reference dict")
    return from_reference(data, **kw)


# meta fields that differ between the parts of one build
PER_PART = ("shard", "created", "wall_s", "host", "points", "noisy")


def _combine(values: list):
    """One field of the parts' ``points`` / ``noisy`` meta: counts add, limits are the largest."""
    if all(type(v) is int for v in values):
        return sum(values)
    if all(type(v) is float for v in values):
        return max(values)
    if all(isinstance(v, list) for v in values):
        return [x for v in values for x in v]
    return next((v for v in values if v is not None), None)


def merge(parts: list[LatencyTable], allow_partial: bool = False) -> LatencyTable:
    """Join shards of one build. Their settings, model and device must match; shards disjoint."""
    if not parts:
        raise ValueError("nothing to merge")
    base = parts[0]

    def sig(t: LatencyTable) -> dict:
        return {k: v for k, v in t.meta.items() if k not in PER_PART}
    shards = set()
    out = LatencyTable(meta={k: v for k, v in base.meta.items() if k != "shard"}, layers=dict(base.layers),
                       groups=dict(base.groups), calibration=base.calibration)
    for t in parts:
        if sig(t) != sig(base):
            diff = sorted(k for k in set(sig(t)) | set(sig(base)) if sig(t).get(k) != sig(base).get(k))
            raise ValueError(f"cannot merge tables built differently (they differ in: {', '.join(diff)})")
        sh = t.meta.get("shard")
        if sh:
            if (sh["index"], sh["count"]) in shards:
                raise ValueError(f"shard {sh['index']}/{sh['count']} given twice")
            shards.add((sh["index"], sh["count"]))
        for key, rows in t.entries.items():
            for pt, e in rows.items():
                if pt in out.entries.get(key, {}):
                    raise ValueError(f"parts overlap at {key} {pt}: were they built with the same --shard?")
                out.add(key, t.units[key], pt[0], pt[1], e)
    for k in ("points", "noisy"):  # counts add up over the parts
        if all(isinstance(t.meta.get(k), dict) for t in parts):
            out.meta[k] = {f: _combine([t.meta[k].get(f) for t in parts]) for f in base.meta[k]}
    counts = {c for _, c in shards}
    if len(counts) > 1:
        raise ValueError(f"parts come from different shard counts: {sorted(counts)}")
    if counts and not allow_partial:
        n = counts.pop()
        missing = sorted(set(range(n)) - {i for i, _ in shards})
        if missing:
            raise ValueError(f"missing shard(s) {', '.join(f'{i}/{n}' for i in missing)}; "
                             "merge all parts or pass --allow-partial")
    return out
