"""The :class:`SummaryStats` container and its ``.npz`` file format.

For ``y = X beta + Z b + e`` and a cells x genes response ``Y`` the statistics are

    XX = X'X (p, p)   XY = X'Y (p, m)   ZX = Z'X (q, p)   ZY = Z'Y (q, m)
    ZZ = Z'Z (q, q)   Ynorm = column sums of Y * Y (m,)   n = number of cells

All are sums over cells, so statistics of disjoint sets of cells add up
(:meth:`SummaryStats.__add__`). :func:`scflashmm.summary_stats` computes them.

A response with a large mean against its spread (e.g. ``y + 1e5``) loses digits in ``Ynorm``
and in ``y'Ry = Ynorm - XY' (X'X)^-1 XY``. For dense input the pass therefore also keeps the
statistics of a shifted response ``y - c`` (:class:`Shifted`, a shift ``c`` per gene), from
which :meth:`SummaryStats.centred` rebuilds exactly what the solver needs (docs/model.md,
Offsets).
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
from ._options import RANK_RTOL

#: The statistics proper; other fields of :class:`SummaryStats` are optional metadata.
ARRAY_FIELDS = ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm")
_NAME_FIELDS = ("feature_names", "covariate_names", "z_names", "component_names")
_SHIFTED_FIELDS = ("c", "XY", "ZY", "Ynorm", "Ysum", "X1", "Z1")
#: 1: the statistics and names; 2: also the shifted statistics (optional ``shifted_*`` arrays).
_FORMAT_VERSION = 2
#: Relative tolerance of the check that :attr:`SummaryStats.shifted` matches the statistics
#: (far above rounding, far below any real change of ``XY``, ``ZY`` or ``Ynorm``).
_SHIFT_RTOL = 1e-8
#: Share of the constant below which a column's part of it (in ``X a = 1``) is rounding noise.
_NEGLIGIBLE = 1e-10


@dataclass(frozen=True, eq=False)
class Shifted:
    """Statistics of a shifted response ``Y - 1 c'`` (a shift ``c_g`` per gene).

    With ``Ys = Y - 1 c'``: ``c`` (m,), ``XY = X'Ys`` (p, m), ``ZY = Z'Ys`` (q, m),
    ``Ynorm`` the squared norms of ``Ys`` (m,), ``Ysum = 1'Ys`` (m,), ``X1 = X'1`` (p,) and
    ``Z1 = Z'1`` (q,). The statistics of ``Y`` follow: ``X'Y = XY + X1 c'``, ``Z'Y = ZY +
    Z1 c'`` and ``|y|^2 = Ynorm + c (2 Ysum + n c)``; the shifted ones are accurate when the
    mean of a gene is large against its spread, where those of ``Y`` lose digits.
    """

    c: np.ndarray
    XY: np.ndarray
    ZY: np.ndarray
    Ynorm: np.ndarray
    Ysum: np.ndarray
    X1: np.ndarray
    Z1: np.ndarray

    def rebased(self, c: np.ndarray, n: int) -> Shifted:
        """Return the same statistics for the shift ``c`` instead of ``self.c`` (``n`` cells)."""
        delta = np.asarray(c, dtype=np.float64) - self.c
        if not delta.any():
            return self
        return Shifted(
            c=np.asarray(c, dtype=np.float64),
            XY=self.XY - np.outer(self.X1, delta),
            ZY=self.ZY - np.outer(self.Z1, delta),
            Ynorm=self.Ynorm - delta * (2 * self.Ysum - n * delta),
            Ysum=self.Ysum - n * delta,
            X1=self.X1,
            Z1=self.Z1,
        )

    def __add__(self, other: Shifted) -> Shifted:
        return Shifted(
            **{name: getattr(self, name) + getattr(other, name) for name in _SHIFTED_FIELDS[1:]},
            c=self.c,
        )


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
    shifted
        Optional statistics of the shifted response ``Y - 1 c'`` (:class:`Shifted`; kept by
        :func:`scflashmm.summary_stats` for dense input), from which :meth:`centred` gives
        accurate statistics for the fit when a gene's mean is large against its spread. When
        given, they must match ``XY``, ``ZY`` and ``Ynorm`` (to rounding).

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
    shifted: Shifted | None = field(default=None, kw_only=True)

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
        if self.shifted is not None:
            self._check_shifted(p, q, m)

    def _check_shifted(self, p: int, q: int, m: int) -> None:
        """Check the shapes of :attr:`shifted` and that it matches ``XY``, ``ZY``, ``Ynorm``."""
        sh = self.shifted
        if not isinstance(sh, Shifted):
            msg = f"SummaryStats.shifted must be a Shifted or None, got {type(sh).__name__}."
            raise TypeError(msg)
        expected = {"c": (m,), "XY": (p, m), "ZY": (q, m), "Ynorm": (m,), "Ysum": (m,)}
        expected |= {"X1": (p,), "Z1": (q,)}
        for name, shape in expected.items():
            if np.shape(getattr(sh, name)) != shape:
                actual = np.shape(getattr(sh, name))
                msg = f"SummaryStats.shifted.{name} has shape {actual}, expected {shape}."
                raise ValueError(msg)
        c = sh.c
        with np.errstate(over="ignore", invalid="ignore"):
            checks = {
                "XY": (
                    self.XY,
                    sh.XY + np.outer(sh.X1, c),
                    np.abs(sh.XY) + np.outer(np.abs(sh.X1), np.abs(c)),
                ),
                # column sums only: no (q, m) temporaries for a large q
                "ZY": (
                    self.ZY.sum(axis=0),
                    sh.ZY.sum(axis=0) + sh.Z1.sum() * c,
                    np.sqrt(q * np.einsum("qm,qm->m", sh.ZY, sh.ZY))  # >= the sums of |ZY|
                    + np.abs(sh.Z1).sum() * np.abs(c),
                ),
                "Ynorm": (
                    self.Ynorm,
                    sh.Ynorm + c * (2 * sh.Ysum + self.n * c),
                    sh.Ynorm + np.abs(c) * (2 * np.abs(sh.Ysum) + self.n * np.abs(c)),
                ),
            }
            for name, (value, rebuilt, size) in checks.items():
                bad = ~(np.abs(value - rebuilt) <= _SHIFT_RTOL * (size + np.abs(value)))
                if bad.any() and np.isfinite(value[bad]).all():
                    msg = (
                        f"SummaryStats.shifted does not match {name} (the statistics of Y - c "
                        f"must be those of the same cells and genes): change both together, "
                        "or pass shifted=None."
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
        shifted = None
        if self.shifted is not None and other.shifted is not None:
            shifted = self.shifted + other.shifted.rebased(self.shifted.c, other.n)
        return SummaryStats(**arrays, n=self.n + other.n, **meta, shifted=shifted)

    def centred(self) -> tuple[SummaryStats, np.ndarray | None]:
        """Statistics for the fit, accurate for a large mean, and the offset of the coefficients.

        When the constant lies in the span of ``X`` (an intercept, or the indicators of a
        factor: ``X a = 1``) and :attr:`shifted` is set, a gene's fit of ``y`` is that of
        ``y - c X a``, which is the shifted response ``y - c``: the same residuals, variance
        components, standard errors, t (of the coefficients not moved) and log-likelihood,
        and coefficients smaller by ``c a``. Returns the statistics of ``y - c`` (without
        names or :attr:`shifted`) and the offset ``c a'`` (genes, p) to add to their
        coefficients; otherwise ``(self, None)``.

        The constant is in the span when ``[X 1]`` is rank deficient by the rank check of the
        fixed design (relative tolerance ``RANK_RTOL`` on the column-scaled cross products).
        """
        sh = self.shifted
        if sh is None or not sh.c.any():
            return self, None
        a = _constant_coefficients(self.XX, sh.X1, self.n)
        if a is None:
            return self, None
        stats = SummaryStats(self.XX, sh.XY, self.ZX, sh.ZY, self.ZZ, sh.Ynorm, self.n, d=self.d)
        return stats, np.outer(sh.c, a)

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
        if self.shifted is not None:
            for name in _SHIFTED_FIELDS:
                payload[f"shifted_{name}"] = np.asarray(getattr(self.shifted, name))
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
            shifted = [f"shifted_{name}" for name in _SHIFTED_FIELDS]
            if any(key in keys for key in shifted):
                if not all(key in keys for key in shifted):
                    msg = f"{where!r} is not a SummaryStats file (incomplete shifted statistics)."
                    raise ValueError(msg)
                meta["shifted"] = Shifted(
                    **{k[8:]: np.array(npz[k], dtype=np.float64) for k in shifted}
                )
            n = int(npz["n"])
        return cls(**arrays, n=n, **meta)


def _constant_coefficients(XX: np.ndarray, X1: np.ndarray, n: int) -> np.ndarray | None:
    """Return ``a`` with ``X a = 1`` if the constant is in the span of ``X``, else None.

    ``[X 1]'[X 1]`` is built from ``X'X``, ``X'1`` and ``n``, scaled to unit diagonal; the
    constant is in the span when its smallest eigenvalue is at most ``RANK_RTOL`` times the
    largest (the rank check of the fixed design) while ``X'X`` alone passes that check.
    """
    p = XX.shape[0]
    gram = np.empty((p + 1, p + 1))
    gram[:p, :p], gram[:p, p], gram[p, :p], gram[p, p] = XX, X1, X1, n
    scale = np.sqrt(np.diag(gram))
    if not (np.all(np.isfinite(gram)) and np.all(scale > 0)):
        return None
    corr = gram / np.outer(scale, scale)
    values = np.linalg.eigvalsh(corr)
    inner = np.linalg.eigvalsh(corr[:p, :p])
    if values[0] > RANK_RTOL * values[-1] or inner[0] <= RANK_RTOL * inner[-1]:
        return None
    a = np.linalg.solve(XX, X1)
    # a column that carries less than _NEGLIGIBLE of the constant (|a_j| |x_j| / |1|) is
    # rounding noise of the solve (about eps cond(X'X)): exactly 0, so that its coefficient
    # gets no offset at all (an offset c a_j would move it by c times that noise)
    a[np.abs(a) * scale[:p] <= _NEGLIGIBLE * np.sqrt(n)] = 0.0
    return a
