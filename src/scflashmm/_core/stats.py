"""The :class:`SummaryStats` container and its ``.npz`` file format.

For ``y = X beta + Z b + e`` and a cells x genes response ``Y`` the statistics are

    XX = X'X (p, p)   XY = X'Y (p, m)   ZX = Z'X (q, p)   ZY = Z'Y (q, m)
    ZZ = Z'Z (q, q)   Ynorm = column sums of Y * Y (m,)   n = number of cells

All are sums over cells, so statistics of disjoint sets of cells add up
(:meth:`SummaryStats.__add__`). :func:`scflashmm.summary_stats` computes them.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_path

#: The statistics proper; other fields of :class:`SummaryStats` are optional metadata.
ARRAY_FIELDS = ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm")
_NAME_FIELDS = ("feature_names", "covariate_names", "z_names", "component_names")
_FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class SummaryStats:
    """Summary statistics of ``(X, Y, Z)`` over a set of cells.

    Attributes
    ----------
    XX, XY, ZX, ZY, ZZ
        Cross products ``X'X`` (p, p), ``X'Y`` (p, m), ``Z'X`` (q, p), ``Z'Y`` (q, m) and
        ``Z'Z`` (q, q).
    Ynorm
        Squared Euclidean norm of each gene over the cells (m,).
    n
        Number of cells.
    feature_names, covariate_names, z_names
        Optional names of the genes (m), of the columns of ``X`` (p) and of ``Z`` (q).
    d
        Optional sizes ``(q_1 .. q_k)`` of the random components (summing to q).
    component_names
        Optional names of the random components (k).

    Notes
    -----
    Statistics of disjoint sets of cells add up with ``a + b`` (names must agree where both
    have them). :meth:`save` and :meth:`load` keep statistics, with their metadata, in an
    ``.npz`` file, so that they can be fit again (:func:`scflashmm.lmm`) without the cells.
    """

    XX: np.ndarray
    XY: np.ndarray
    ZX: np.ndarray
    ZY: np.ndarray
    ZZ: np.ndarray
    Ynorm: np.ndarray
    n: int
    feature_names: tuple[str, ...] | None = field(default=None, kw_only=True)
    covariate_names: tuple[str, ...] | None = field(default=None, kw_only=True)
    z_names: tuple[str, ...] | None = field(default=None, kw_only=True)
    d: tuple[int, ...] | None = field(default=None, kw_only=True)
    component_names: tuple[str, ...] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        p, m = np.shape(self.XY)
        q = np.shape(self.ZY)[0]
        expected = {
            "XX": (p, p),
            "XY": (p, m),
            "ZX": (q, p),
            "ZY": (q, m),
            "ZZ": (q, q),
            "Ynorm": (m,),
        }
        for name, shape in expected.items():
            if np.shape(getattr(self, name)) != shape:
                actual = np.shape(getattr(self, name))
                msg = f"SummaryStats.{name} has shape {actual}, expected {shape}."
                raise ValueError(msg)
        sizes = {"feature_names": m, "covariate_names": p, "z_names": q}
        for name in _NAME_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                value = [value]
            value = tuple(str(v) for v in value)
            object.__setattr__(self, name, value)
            if name in sizes and len(value) != sizes[name]:
                msg = f"SummaryStats.{name} has {len(value)} names, expected {sizes[name]}."
                raise ValueError(msg)
        if self.d is not None:
            d = tuple(int(x) for x in np.atleast_1d(self.d))
            if sum(d) != q or any(x < 1 for x in d):
                msg = f"SummaryStats.d = {d} must be positive sizes summing to q = {q}."
                raise ValueError(msg)
            object.__setattr__(self, "d", d)
        if self.component_names is not None:
            k = 1 if self.d is None else len(self.d)
            if len(self.component_names) != k:
                msg = (
                    f"SummaryStats.component_names has {len(self.component_names)} names, "
                    f"expected one per random component ({k})."
                )
                raise ValueError(msg)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(n, p, q, m)``: cells, fixed-effect columns, random-effect columns, genes."""
        return self.n, self.XX.shape[0], self.ZZ.shape[0], self.Ynorm.shape[0]

    def __add__(self, other: SummaryStats) -> SummaryStats:
        if not isinstance(other, SummaryStats):
            return NotImplemented
        if self.shape[1:] != other.shape[1:]:
            msg = (
                "Cannot add summary statistics of shapes (n, p, q, m) "
                f"{self.shape} and {other.shape}."
            )
            raise ValueError(msg)
        meta = {}
        for name in (*_NAME_FIELDS, "d"):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None and b is not None and a != b:
                msg = f"Cannot add summary statistics with different {name}."
                raise ValueError(msg)
            meta[name] = a if a is not None else b
        arrays = {name: getattr(self, name) + getattr(other, name) for name in ARRAY_FIELDS}
        return SummaryStats(**arrays, n=self.n + other.n, **meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics and their metadata to an ``.npz`` file at ``path`` (as given).

        Read them back with :meth:`SummaryStats.load`. The file is written atomically: on
        any error or interrupt an existing file at ``path`` is left as it was.
        """
        payload: dict[str, np.ndarray] = {
            name: np.asarray(getattr(self, name)) for name in ARRAY_FIELDS
        }
        payload["n"] = np.asarray(self.n, dtype=np.int64)
        payload["format_version"] = np.asarray(_FORMAT_VERSION)
        for name in _NAME_FIELDS:
            value = getattr(self, name)
            if value is not None:
                payload[name] = np.asarray(value, dtype=np.str_)
        if self.d is not None:
            payload["d"] = np.asarray(self.d, dtype=np.int64)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SummaryStats:
        """Read statistics written by :meth:`SummaryStats.save`."""
        # the file is opened (and always closed) here, not by numpy, which keeps it open
        # when the zip directory is corrupt
        with open(Path(path), "rb") as fh:
            try:
                return cls._read(fh, os.fspath(path))
            except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as exc:
                if isinstance(exc, ValueError) and str(exc).startswith(repr(os.fspath(path))):
                    raise
                msg = f"{os.fspath(path)!r} is not a readable SummaryStats file ({exc})."
                raise ValueError(msg) from exc

    @classmethod
    def _read(cls, fh: Any, where: str) -> SummaryStats:
        npz = np.load(fh, allow_pickle=False)
        if not hasattr(npz, "files"):  # a plain .npy array
            msg = f"{where!r} is not a SummaryStats file (an array, not .npz)."
            raise ValueError(msg)
        with npz:
            keys = set(npz.files)
            missing = [name for name in (*ARRAY_FIELDS, "n") if name not in keys]
            if missing or "format_version" not in keys:
                absent = missing or ["format_version"]
                msg = f"{where!r} is not a SummaryStats file (missing {absent})."
                raise ValueError(msg)
            version = int(npz["format_version"])
            if version > _FORMAT_VERSION:
                msg = (
                    f"{where!r} has format version {version}; this scflashmm "
                    f"reads up to {_FORMAT_VERSION}."
                )
                raise ValueError(msg)
            arrays = {name: np.array(npz[name], dtype=np.float64) for name in ARRAY_FIELDS}
            meta: dict[str, Any] = {
                name: npz[name].tolist() for name in _NAME_FIELDS if name in keys
            }
            if "d" in keys:
                meta["d"] = npz["d"].tolist()
            n = int(npz["n"])
        return cls(**arrays, n=n, **meta)
