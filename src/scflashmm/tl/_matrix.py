"""Reading the matrix of an AnnData for :func:`scflashmm.tl.flashmm_de`.

The layer, the raw-counts heuristic, the location of a non-finite value, and the progress bar
of the pass over the cells.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

    from .._core.sumstats import NonFiniteError


def get_matrix(adata: AnnData, layer: str | None) -> tuple[Any, str]:
    if layer is None:
        if adata.X is None:
            msg = "adata.X is None: pass layer=... to choose the matrix to fit."
            raise ValueError(msg)
        return adata.X, "adata.X"
    if layer not in adata.layers:
        avail = ", ".join(repr(k) for k in adata.layers) or "none"
        msg = f"adata has no layer {layer!r}; layers: {avail}."
        raise ValueError(msg)
    return adata.layers[layer], f"adata.layers[{layer!r}]"


def is_csc(Y: Any) -> bool:
    """Whether ``Y`` is CSC (in memory or backed), which the pass reads by blocks of genes."""
    return getattr(Y, "format", None) == "csc"


def _materialize(block: Any) -> Any:
    """Return a block of ``Y`` as numpy or scipy sparse (a dask block is computed here)."""
    if sparse.issparse(block) or isinstance(block, np.ndarray):
        return block
    if hasattr(block, "compute"):
        return _materialize(block.compute())
    return np.asarray(block)


#: stored values inspected for the raw-counts warning (a bounded cost per fit)
_COUNTS_SAMPLE = 2_000_000


def _sample_values(Y: Any) -> np.ndarray:
    """Return the stored values of the first cells (genes, for CSC), at most ``_COUNTS_SAMPLE``."""
    n, m = Y.shape
    if is_csc(Y):
        block = Y[:, : max(1, _COUNTS_SAMPLE // n)]
    else:
        block = Y[: max(1, _COUNTS_SAMPLE // m)]
    block = _materialize(block)
    return np.asarray(block.data if sparse.issparse(block) else block)


def looks_like_counts(Y: Any) -> bool:
    """Whether the stored values of the first cells (genes, for CSC) are integers >= 0, not all 0.

    Reads at most ``_COUNTS_SAMPLE`` values, separately from the pass.
    """
    values = _sample_values(Y)
    if values.dtype.kind not in "biuf" or not values.size:
        return False
    if values.dtype.kind == "f" and not (values == np.round(values)).all():  # also NaN
        return False
    return bool(values.min() >= 0 and values.max() > 0)


def has_non_integers(Y: Any) -> bool:
    """Whether some stored value of the first cells (genes, for CSC) is not an integer."""
    values = _sample_values(Y)
    if values.dtype.kind != "f" or not values.size:
        return False
    return bool((values != np.round(values)).any())


def check_backed_view(adata: AnnData) -> None:
    """Refuse a view of a backed AnnData before any work, saying what to do instead."""
    if adata.isbacked and adata.is_view:
        msg = (
            "adata is a view of a backed AnnData (e.g. bk[cells] or bk[:, genes]); anndata "
            "cannot write results into it. Load the selection with adata.to_memory() (it "
            "reads only the selected rows and columns), or fit the whole backed AnnData and "
            "subset the results."
        )
        raise ValueError(msg)


def nonfinite_error(
    exc: NonFiniteError, Y: Any, source: str, obs_names: pd.Index, var_names: pd.Index
) -> ValueError:
    """Name the cell and gene of a non-finite value, reading the range reported again."""
    if exc.start is None:
        return ValueError(f"{source}: {exc}")
    if exc.axis == 0:
        block, row0, col0 = Y[exc.start : exc.stop], exc.start, 0
    else:
        block, row0, col0 = Y[:, exc.start : exc.stop], 0, exc.start
    block = _materialize(block)
    if sparse.issparse(block):
        coo = sparse.coo_matrix(block)
        i = int(np.flatnonzero(~np.isfinite(coo.data))[0])
        r, c = int(coo.row[i]), int(coo.col[i])
    else:
        r, c = np.argwhere(~np.isfinite(np.asarray(block, dtype=float)))[0]
    msg = (
        f"{source} contains NaN or infinite values, e.g. cell "
        f"{obs_names[row0 + r]!r}, gene {var_names[col0 + c]!r}."
    )
    return ValueError(msg)


class ProgressBar:
    """``progress(done, total)`` for :func:`summary_stats` and :func:`lmm`, updating a tqdm bar.

    The bar is made at the first report, when the total is known; by default it is shown only
    on a terminal and when that report is not already the last (more than one chunk).
    """

    def __init__(self, show: bool | None, unit: str, desc: str = "flashmm pass") -> None:
        self.show, self.unit, self.desc = show, unit, desc
        self.bar: Any = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            show = self.show
            if show is None:
                show = done < total and sys.stderr.isatty()
            if not show:  # tqdm is imported only for a bar shown (no TqdmWarning otherwise)
                self.bar = False
                return
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit=self.unit, desc=self.desc, leave=False)
        if self.bar is False:
            return
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None and self.bar is not False:
            self.bar.close()
