"""The `scflashmm` command: demo, de, and one-line errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _reference import FIXED_B, TIDY_COLUMNS_COUNTS, case_adata

import scflashmm as sfm
from scflashmm.cli import main

FIXED, TIDY = FIXED_B, TIDY_COLUMNS_COUNTS


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo.csv"
    argv = ["demo", "--n-genes", "150", "--n-cells", "3000", "--n-clusters", "3"]
    argv += ["--n-samples", "10", "--n-de-genes", "9", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Top 3 genes per cell type" in text
    assert "true DE genes found in their cell type" in text
    table = pd.read_csv(out)
    assert list(table.columns) == TIDY
    assert set(table["contrast"]) == {f"cls[{k}]:trt[T.B]" for k in (1, 2, 3)}
    assert len(table) == 3 * 150


@pytest.mark.parametrize("backed", [False, True])
def test_de_matches_python_api(b_h5ad, tmp_path, capsys, backed):
    out, out_h5ad = tmp_path / "res.csv", tmp_path / "res.h5ad"
    argv = ["de", str(b_h5ad), "--fixed", FIXED, "--random", "sam", "--counts"]
    argv += ["--contrast", "BvsA=(cls[1]:trt[T.B] + cls[2]:trt[T.B])/2", "--out", str(out)]
    argv += ["--write-h5ad", str(out_h5ad)] + (["--backed"] if backed else [])
    assert main(argv) == 0
    assert "Fitted 50 genes x 1000 cells" in capsys.readouterr().out
    table = pd.read_csv(out)
    adata = case_adata("b")
    contrasts = {"BvsA": "(cls[1]:trt[T.B] + cls[2]:trt[T.B])/2"}
    sfm.tl.flashmm_de(adata, FIXED, "sam", is_counts=True, contrasts=contrasts)
    terms = list(adata.uns["flashmm"]["x_columns"])
    expected = sfm.get.flashmm_df(adata, term=terms, contrast="BvsA")
    pd.testing.assert_frame_equal(table, expected, rtol=1e-12, check_dtype=False)
    written = ad.read_h5ad(out_h5ad)
    np.testing.assert_allclose(written.varm["flashmm_coef"], adata.varm["flashmm_coef"])


def test_de_two_random_terms_and_ml(tmp_path):
    path, out = tmp_path / "d.h5ad", tmp_path / "res.csv"
    case_adata("d").write_h5ad(path)
    argv = ["de", str(path), "--fixed", FIXED, "--random", "sam", "--random", "~0+loc"]
    argv += ["--method", "ML", "--counts", "--out", str(out), "--chunk-size", "500"]
    assert main(argv) == 0
    adata = case_adata("d")
    sfm.tl.flashmm_de(adata, FIXED, ["sam", "~0+loc"], method="ML", is_counts=True)
    assert list(adata.varm["flashmm_theta"].columns) == ["sam", "loc", "residual"]
    table = pd.read_csv(out)
    pd.testing.assert_frame_equal(table, sfm.get.flashmm_df(adata), rtol=1e-10, check_dtype=False)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--fixed", "~0+clz", "--random", "sam"], "adata.obs has no column 'clz'"),
        (["--fixed", "~0+cls+", "--random", "sam"], "Cannot parse the fixed formula"),
        (["--fixed", "~0+cls", "--random", "donor"], "'donor' is not a column"),
        (["--fixed", "~0+cls", "--random", "sam", "--layer", "L"], "no layer 'L'"),
        (["--fixed", "~0+cls", "--random", "sam", "--contrast", "x=cls[9]"], "Unknown name"),
        (["--fixed", "~0+cls", "--random", "sam", "--contrast", "=cls[1]"], "NAME=EXPRESSION"),
    ],
)
def test_de_user_errors_one_line(b_h5ad, tmp_path, capsys, extra, match):
    assert main(["de", str(b_h5ad), *extra, "--out", str(tmp_path / "r.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("scflashmm: error: ")
    assert match in err[-1]
    assert not (tmp_path / "r.csv").exists()


def test_de_file_errors(tmp_path, capsys):
    bad = tmp_path / "not.h5ad"
    bad.write_text("hello")
    for path, match in ((tmp_path / "missing.h5ad", "does not exist"), (bad, "cannot read")):
        argv = ["de", str(path), "--fixed", "~1", "--random", "sam", "--out", "r.csv"]
        assert main(argv) == 1
        assert match in capsys.readouterr().err


def test_entry_point_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scflashmm.cli",
            "de",
            str(tmp_path / "x.h5ad"),
            "--fixed",
            "~1",
            "--random",
            "sam",
            "--out",
            str(tmp_path / "r.csv"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_de_satterthwaite(tmp_path):
    path, out = tmp_path / "b.h5ad", tmp_path / "res.csv"
    case_adata("b").write_h5ad(path)
    argv = [
        "de",
        str(path),
        "--fixed",
        FIXED,
        "--random",
        "sam",
        "--counts",
        "--df",
        "satterthwaite",
        "--no-moderate",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    adata = case_adata("b")
    sfm.tl.flashmm_de(adata, FIXED, "sam", is_counts=True, df="satterthwaite", moderate=False)
    table = pd.read_csv(out)
    pd.testing.assert_frame_equal(table, sfm.get.flashmm_df(adata), rtol=1e-10, check_dtype=False)
    assert (table["df"] < adata.uns["flashmm"]["df"]).any()


def test_refit_tests_a_new_contrast_without_the_cells(tmp_path, capsys):
    path, fitted, out = tmp_path / "b.h5ad", tmp_path / "fit.h5ad", tmp_path / "refit.csv"
    case_adata("b").write_h5ad(path)
    argv = ["de", str(path), "--fixed", FIXED, "--random", "sam", "--counts", "--no-moderate"]
    assert main([*argv, "--out", str(tmp_path / "fit.csv"), "--write-h5ad", str(fitted)]) == 0
    argv = ["refit", str(fitted), "--contrast", "d=cls[3]:trt[T.B] - cls[2]:trt[T.B]"]
    argv += ["--df", "residual", "--out", str(out)]
    assert main(argv) == 0
    assert "Refit 50 genes from their summary statistics" in capsys.readouterr().out
    adata = case_adata("b")
    contrasts = {"d": "cls[3]:trt[T.B] - cls[2]:trt[T.B]"}
    sfm.tl.flashmm_de(
        adata, FIXED, "sam", is_counts=True, moderate=False, df="residual", contrasts=contrasts
    )
    terms = list(adata.uns["flashmm"]["x_columns"])
    expected = sfm.get.flashmm_df(adata, term=terms, contrast="d")
    pd.testing.assert_frame_equal(pd.read_csv(out), expected, rtol=1e-10, check_dtype=False)


def test_refit_errors(tmp_path, capsys):
    path = tmp_path / "b.h5ad"
    case_adata("b").write_h5ad(path)  # no fit stored
    assert main(["refit", str(path), "--out", str(tmp_path / "r.csv")]) == 1
    assert "run scflashmm.tl.flashmm_de" in capsys.readouterr().err
    assert main(["refit", str(tmp_path / "no.h5ad"), "--out", str(tmp_path / "r.csv")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_de_model_options_reach_the_fit(tmp_path):
    path, out, out_h5ad = tmp_path / "b.h5ad", tmp_path / "res.csv", tmp_path / "res.h5ad"
    case_adata("b").write_h5ad(path)
    argv = ["de", str(path), "--fixed", FIXED, "--random", "sam", "--counts", "--out", str(out)]
    assert main([*argv, "--write-h5ad", str(out_h5ad)]) == 0
    params = ad.read_h5ad(out_h5ad).uns["flashmm"]["params"]
    # the calibrated defaults (docs/calibration.md)
    assert (params["moderate"], params["df"], params["nonnegative"]) == (
        True, "satterthwaite", False,
    )  # fmt: skip
    assert pd.read_csv(out)["df"].isna().all()
    argv += ["--no-moderate", "--df", "residual", "--write-h5ad", str(out_h5ad)]
    assert main(argv) == 0
    params = ad.read_h5ad(out_h5ad).uns["flashmm"]["params"]
    assert (params["moderate"], params["df"]) == (False, "residual")
