"""Polish of the command line and of the fit's messages: stdout output, filters, order, logs."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pandas as pd
import pytest
from _reference import FIXED_B, case_adata

import scflashmm as sfm
from scflashmm.cli import _print_top, main

CONTRAST = "BvsA=(cls[1]:trt[T.B] + cls[2]:trt[T.B])/2"


def _fit_b(**kwargs):
    adata = case_adata("b")
    sfm.tl.flashmm_de(adata, FIXED_B, "sam", is_counts=True, **kwargs)
    return adata


def test_out_dash_writes_the_table_to_stdout(b_h5ad, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["de", str(b_h5ad), "--fixed", FIXED_B, "--random", "sam", "--counts", "--out", "-"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "Fitted 50 genes x 1000 cells" in captured.err
    assert "wrote" in captured.err and "stdout" in captured.err
    assert list(tmp_path.iterdir()) == []  # no file named '-'
    table = pd.read_csv(io.StringIO(captured.out))
    expected = sfm.get.flashmm_df(_fit_b())
    pd.testing.assert_frame_equal(table, expected, rtol=1e-12, check_dtype=False)


def test_term_filters_the_table_and_contrasts_are_kept(b_h5ad, capsys):
    argv = ["de", str(b_h5ad), "--fixed", FIXED_B, "--random", "sam", "--counts"]
    argv += ["--contrast", CONTRAST, "--term", ":trt", "--out", "-"]
    assert main(argv) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    adata = _fit_b(contrasts=dict([CONTRAST.split("=", 1)]))
    expected = sfm.get.flashmm_df(adata, term=":trt", contrast="BvsA")
    pd.testing.assert_frame_equal(table, expected, rtol=1e-12, check_dtype=False)
    assert set(table["contrast"]) == {f"cls[{k}]:trt[T.B]" for k in (1, 2, 3, 4)} | {"BvsA"}


def test_refit_term_filter_to_stdout(tmp_path, capsys):
    path = tmp_path / "fit.h5ad"
    adata = _fit_b(store_stats=True)
    adata.write_h5ad(path)
    argv = ["refit", str(path), "--term", "cls[1]:trt[T.B]", "--out", "-"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "Refit 50 genes" in captured.err
    table = pd.read_csv(io.StringIO(captured.out))
    assert set(table["contrast"]) == {"cls[1]:trt[T.B]"}
    assert len(table) == 50


def test_demo_writes_no_file_unless_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--n-genes", "60", "--n-cells", "1500", "--n-clusters", "2"]
    argv += ["--n-samples", "6", "--n-de-genes", "4", "--seed", "3"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "The tidy table (120 rows; --out FILE writes it to a CSV file)" in text
    assert list(tmp_path.iterdir()) == []


def test_demo_natural_order_of_cell_types(capsys):
    types = ["1", "10", "11", "2", "3"]
    table = pd.DataFrame(
        {
            "cell_type": types,
            "variable": [f"g{t}" for t in types],
            "log_fc": 0.5,
            "p_value": 0.01,
            "adj_p_value": 0.02,
            "true_de": False,
        }
    )
    _print_top(table, "B", 1)
    lines = capsys.readouterr().out.strip().splitlines()[2:]
    assert [line.split()[0] for line in lines] == ["1", "2", "3", "10", "11"]


# ------------------------------------------------------------------------------ logging


@pytest.fixture
def scanpy_log(monkeypatch):
    """Scanpy's log at verbosity 'hint' (where "added ..." is shown), in a buffer."""
    import scanpy as sc

    buffer = io.StringIO()
    old_file, old_verbosity = sc.settings.logfile, sc.settings.verbosity
    sc.settings.logfile, sc.settings.verbosity = buffer, "hint"
    yield buffer
    sc.settings.logfile, sc.settings.verbosity = old_file, old_verbosity


def test_fit_is_logged_with_scanpy(scanpy_log):
    _fit_b()
    text = scanpy_log.getvalue()
    assert "fitting the mixed model" in text
    assert "finished" in text and "'flashmm_coef'" in text


def test_view_copy_is_logged_as_scanpy_does(scanpy_log):
    adata = case_adata("b")
    view = adata[adata.obs["cls"] != "4"]
    sfm.tl.flashmm_de(view, FIXED_B, "sam", is_counts=True)
    assert "Received a view of an AnnData. Making a copy." in scanpy_log.getvalue()
    assert not view.is_view and "flashmm" in view.uns


def test_duplicate_var_names_warn():
    adata = case_adata("b")
    adata.var_names = ["g0", "g0", *adata.var_names[2:]]
    with pytest.warns(UserWarning, match=r"var_names_make_unique\(\)"):
        sfm.tl.flashmm_de(adata, FIXED_B, "sam", is_counts=True)


def test_no_tqdm_without_a_bar():
    code = (
        "import sys, scflashmm as sfm\n"
        "a = sfm.datasets.simulate_rnaseq(n_genes=20, n_cells=400, n_de_genes=2, seed=1)\n"
        "sfm.tl.flashmm_de(a, '~0+cls', 'sam', is_counts=True, chunk_size=100)\n"
        "assert 'tqdm' not in sys.modules, 'tqdm imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_progress_while_fitting(capsys):
    adata = case_adata("b")
    calls = []
    design = sfm._design.make_design(adata.obs, FIXED_B, "sam")
    stats = sfm.summary_stats(design.X, adata.X, design.Z, is_counts=True)
    sfm.lmm(stats, n_jobs=1, progress=lambda done, total: calls.append((done, total)))
    done = [c[0] for c in calls]
    assert done == sorted(done) and calls[-1] == (stats.shape[3], stats.shape[3])
    sfm.tl.flashmm_de(adata, FIXED_B, "sam", is_counts=True, progress=True)
    assert "flashmm fit" in capsys.readouterr().err  # the bar of the fit, after the pass's
