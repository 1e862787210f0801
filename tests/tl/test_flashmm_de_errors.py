"""tl.flashmm_de: a clear error for each bad input, and the input left untouched."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _reference import case_adata
from scipy import sparse

import scflashmm as sfm


def _bad(kind: str):
    """(adata, args, kwargs) for one kind of bad input."""
    adata = case_adata("b")
    fixed, random, kw = "~0+log(libsize)+cls+cls:trt", "sam", {"is_counts": True}
    if kind == "missing_column":
        fixed = "~0+log(libsize)+cluster"
    elif kind == "nan_obs":
        adata.obs["libsize"] = adata.obs["libsize"].astype(float)
        adata.obs.iloc[7, adata.obs.columns.get_loc("libsize")] = np.nan
    elif kind == "nan_data":
        adata.X = adata.X.toarray()
        adata.X[11, 4] = np.nan
    elif kind in ("nan_data_csr", "nan_data_csc"):
        bad = sparse.lil_matrix(adata.X, dtype=float)
        bad[11, 4] = np.inf
        adata.X = bad.asformat(kind[-3:])
        kw["chunk_size"] = 97
    elif kind == "negative_counts":
        adata.X = adata.X.copy()
        adata.X.data[0] = -1
    elif kind == "one_level":
        adata.obs["one"] = "s1"
        random = "one"
    elif kind == "rank_deficient":
        fixed = "~log(libsize)+cls+trt+sam"
        random = "~0+cls"
    elif kind == "no_cells":
        adata = adata[:0].copy()
    elif kind == "no_genes":
        adata = adata[:, []].copy()
    elif kind == "syntax":
        fixed = "~0+log(libsize)+cls+"
    elif kind == "confounded":
        fixed = "~0+sam"
    elif kind == "layer":
        kw["layer"] = "counts"
    elif kind == "method":
        kw["method"] = "reml"
    elif kind == "theta0":
        kw["theta0"] = [1.0]
    elif kind == "contrast":
        kw["contrasts"] = {"x": "cls[1] - clsX"}
    elif kind == "contrast_slash":
        kw["contrasts"] = ["(cls[1] + cls[2])/2"]
    elif kind == "chunk_size":
        kw["chunk_size"] = 0
    return adata, (fixed, random), kw


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("missing_column", r"adata.obs has no column 'cluster' \(in the fixed formula\)"),
        ("nan_obs", r"adata.obs\['libsize'\].*1 missing value.*'Cell8'"),
        ("nan_data", r"adata.X contains NaN.*cell 'Cell12', gene 'Gene5'"),
        ("nan_data_csr", r"adata.X contains NaN.*cell 'Cell12', gene 'Gene5'"),
        ("nan_data_csc", r"adata.X contains NaN.*cell 'Cell12', gene 'Gene5'"),
        ("negative_counts", r"adata.X: .*negative values"),
        ("one_level", r"random term 'one' has a single level"),
        ("rank_deficient", r"rank deficient.*'trt\[T.B\]', 'sam\[T.B1\]'.*linearly dependent"),
        ("no_cells", "no cells"),
        ("no_genes", "zero genes selected"),
        ("syntax", r"Cannot parse the fixed formula '~0\+log\(libsize\)\+cls\+'"),
        ("confounded", "'sam' is confounded with the fixed effects"),
        ("layer", "no layer 'counts'"),
        ("method", "method must be .REML. or .ML."),
        ("theta0", r"theta0 must have k \+ 1 = 2 values"),
        ("contrast", "Unknown name 'clsX' in contrast"),
        ("contrast_slash", "cannot contain '/'"),
        ("chunk_size", "chunk_size must be a positive integer"),
    ],
)
def test_errors_leave_input_untouched(kind, match):
    adata, args, kw = _bad(kind)
    # an earlier fit under the same key must survive a failed refit
    adata.uns["flashmm"] = {"marker": 1}
    obs_before = adata.obs.copy()
    with pytest.raises(ValueError, match=match):
        sfm.tl.flashmm_de(adata, *args, **kw)
    assert adata.uns["flashmm"] == {"marker": 1}
    assert len(adata.varm) == 0
    pd.testing.assert_frame_equal(adata.obs, obs_before)


def test_copy_of_backed_is_refused(tmp_path):
    path = tmp_path / "a.h5ad"
    case_adata("a").write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        with pytest.raises(ValueError, match="copy=True is not supported for a backed"):
            sfm.tl.flashmm_de(backed, "~0+trt", "sam", copy=True)
    finally:
        backed.file.close()


def test_not_anndata():
    with pytest.raises(TypeError, match="must be an AnnData"):
        sfm.tl.flashmm_de(np.zeros((3, 3)), "~1", "sam")
