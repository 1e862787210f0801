"""Reliability: outputs never replace inputs, writes are atomic, corrupt or non-canonical
sparse matrices never crash the interpreter or give silently wrong statistics, and every CLI
error is one line (docs/guarantees.md)."""

from __future__ import annotations

import os
import shutil

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scflashmm as sfm
from scflashmm.cli import main


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory):
    """A small CSR count data set in an h5ad file."""
    adata = sfm.datasets.simulate_rnaseq(
        n_genes=12, n_cells=300, n_samples=6, n_clusters=2, n_de_genes=2, seed=5
    )
    path = tmp_path_factory.mktemp("rel") / "d.h5ad"
    adata.write_h5ad(path)
    return path


def _de(path, *extra):
    return ["de", str(path), "--fixed", "~0+cls", "--random", "sam", "--counts", *extra]


# ---------------------------------------------------------------- outputs that are inputs


@pytest.mark.parametrize("backed", [False, True])
def test_out_is_input_refused(small_h5ad, tmp_path, capsys, backed):
    path = tmp_path / "in.h5ad"
    shutil.copy(small_h5ad, path)
    before = path.read_bytes()
    assert main(_de(path, "--out", str(path), *(["--backed"] if backed else []))) == 1
    assert "is the input file" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_hard_link_to_input_refused(small_h5ad, tmp_path, capsys):
    path, link = tmp_path / "in.h5ad", tmp_path / "link.h5ad"
    shutil.copy(small_h5ad, path)
    os.link(path, link)
    argv = _de(path, "--out", str(tmp_path / "r.csv"), "--write-h5ad", str(link))
    assert main(argv) == 1
    assert "is the input file" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_two_outputs_same_file_refused(small_h5ad, tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert main(_de(small_h5ad, "--out", str(out), "--write-h5ad", str(out))) == 1
    assert "name the same file" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------- atomic writes


def _fail_after_writing(monkeypatch, module, name):
    """Make ``module.name`` write a little and then fail as on a full disk."""
    original = getattr(module, name)

    def broken(self, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, name, broken)
    return original


@pytest.mark.parametrize("what", ["csv", "h5ad"])
def test_full_disk_leaves_no_partial_output(small_h5ad, tmp_path, capsys, monkeypatch, what):
    out, out_h5ad = tmp_path / "r.csv", tmp_path / "r.h5ad"
    out.write_text("previous\n")
    if what == "csv":
        _fail_after_writing(monkeypatch, pd.DataFrame, "to_csv")
    else:
        _fail_after_writing(monkeypatch, ad.AnnData, "write_h5ad")
    assert main(_de(small_h5ad, "--out", str(out), "--write-h5ad", str(out_h5ad))) == 1
    assert "No space left on device" in capsys.readouterr().err
    # the CSV is the previous file (csv case) or the new complete one (h5ad case)
    assert out.read_text() == "previous\n" if what == "csv" else len(pd.read_csv(out)) == 24
    assert not out_h5ad.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]  # no temporary left


def test_interrupt_removes_temporary(tmp_path):
    from scflashmm._core import _atomic

    target = tmp_path / "x.csv"
    with pytest.raises(KeyboardInterrupt), _atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_swallowed_interrupt_is_raised(tmp_path):
    import signal

    from scflashmm._core import _atomic

    target = tmp_path / "x.csv"
    with pytest.raises(KeyboardInterrupt), _atomic.atomic_path(target) as tmp:
        tmp.write_text("whole")
        try:  # a library that swallows the interrupt
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
    assert list(tmp_path.iterdir()) == []


def test_summary_stats_save_atomic_and_load_closes(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    stats = sfm.summary_stats(np.ones((5, 1)), rng.random((5, 3)), np.eye(5)[:, :2])
    path = tmp_path / "s.npz"
    stats.save(path)
    good = path.read_bytes()

    def broken(fh, **payload):
        fh.write(b"PK\x03\x04partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="No space"):
        stats.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]
    truncated = tmp_path / "t.npz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable SummaryStats file"):
        sfm.SummaryStats.load(truncated)  # filterwarnings=error: a leaked handle would fail


def test_backed_write_h5ad_keeps_x_on_disk(small_h5ad, tmp_path, monkeypatch):
    def no_loading(self, *args, **kwargs):
        raise AssertionError("to_memory called")

    monkeypatch.setattr(ad.AnnData, "to_memory", no_loading)
    out, out_h5ad = tmp_path / "r.csv", tmp_path / "r.h5ad"
    assert main(_de(small_h5ad, "--backed", "--out", str(out), "--write-h5ad", str(out_h5ad))) == 0
    back = ad.read_h5ad(out_h5ad)
    ref = ad.read_h5ad(small_h5ad)
    sfm.tl.flashmm_de(ref, "~0+cls", "sam", is_counts=True)
    np.testing.assert_allclose(back.varm["flashmm_coef"], ref.varm["flashmm_coef"])
    assert (back.X != ref.X).nnz == 0
    assert back.uns["flashmm"]["x_columns"].tolist() == ["cls[1]", "cls[2]"]


# ---------------------------------------------------------------- corrupt sparse matrices


@pytest.mark.parametrize("value", [2_000_000_000, 12, -1])
@pytest.mark.parametrize("backed", [False, True])
def test_corrupt_index_is_an_error(small_h5ad, tmp_path, value, backed):
    path = tmp_path / "bad.h5ad"
    shutil.copy(small_h5ad, path)
    with h5py.File(path, "r+") as f:
        f["X/indices"][5] = value
    adata = ad.read_h5ad(path, backed="r" if backed else None)
    try:
        with pytest.raises(ValueError, match=rf"index {value} outside 0\.\.11") as info:
            sfm.tl.flashmm_de(adata, "~0+cls", "sam", is_counts=True)
        if backed:
            assert str(path) in str(info.value)
    finally:
        if backed:
            adata.file.close()


def test_corrupt_index_cli_one_line(small_h5ad, tmp_path, capsys):
    path = tmp_path / "bad.h5ad"
    shutil.copy(small_h5ad, path)
    with h5py.File(path, "r+") as f:
        f["X/indices"][0] = 2_000_000_000
    assert main(_de(path, "--backed", "--out", str(tmp_path / "r.csv"))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt" in err


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_corrupt_indptr_is_an_error(fmt):
    Y = sp.random(6, 4, density=0.5, format=fmt, random_state=0)
    bad = Y.copy()
    bad.indptr = bad.indptr.copy()
    bad.indptr[2] = bad.indptr[-1] + 5
    with pytest.raises(ValueError, match="indptr"):
        sfm.summary_stats(np.ones((6, 1)), bad, np.eye(6)[:, :3])


# ---------------------------------------------------------------------- duplicate entries


def test_duplicates_summed_in_memory():
    Y = sp.csr_matrix((np.array([1.0, 1.0]), np.array([0, 0]), np.array([0, 2, 2])), shape=(2, 1))
    stats = sfm.summary_stats(np.ones((2, 1)), Y, np.eye(2))
    assert stats.Ynorm[0] == 4.0
    counts = sfm.summary_stats(np.ones((2, 1)), Y, np.eye(2), is_counts=True)
    np.testing.assert_allclose(counts.XY[0, 0], np.log2(3.0))


@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize("backed", [False, True])
def test_duplicates_summed_every_path(tmp_path, fmt, backed):
    rng = np.random.default_rng(1)
    n, m = 60, 5
    dense = rng.poisson(1.0, (n, m)).astype(float)
    coo = sp.coo_matrix(dense)
    # split every stored value into two duplicate entries, in shuffled order
    order = rng.permutation(2 * coo.nnz)
    rows = np.concatenate([coo.row, coo.row])[order]
    cols = np.concatenate([coo.col, coo.col])[order]
    vals = np.concatenate([coo.data / 2, coo.data / 2])[order]
    major, minor = (rows, cols) if fmt == "csr" else (cols, rows)
    sort = np.argsort(major, kind="stable")
    indptr = np.searchsorted(major[sort], np.arange((n if fmt == "csr" else m) + 1))
    cls = sp.csr_matrix if fmt == "csr" else sp.csc_matrix
    Y = cls((vals[sort], minor[sort], indptr), shape=(n, m))
    assert not Y.has_canonical_format
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    Z = np.eye(6)[rng.integers(0, 6, n)]
    expected = sfm.summary_stats(X, dense, Z, is_counts=True)
    if backed:
        path = tmp_path / "dup.h5ad"
        with h5py.File(path, "w") as f:
            g = f.create_group("X")
            g.attrs["encoding-type"] = f"{fmt}_matrix"
            g.attrs["encoding-version"] = "0.1.0"
            g.attrs["shape"] = (n, m)
            g["data"], g["indices"], g["indptr"] = Y.data, Y.indices, Y.indptr
        with h5py.File(path, "r") as f:
            got = sfm.summary_stats(X, f["X"], Z, is_counts=True, chunk_size=17)
    else:
        got = sfm.summary_stats(X, Y, Z, is_counts=True, chunk_size=17)
    for name in ("XY", "ZY", "Ynorm"):
        np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=1e-12)


def test_compressed_csv_output(small_h5ad, tmp_path):
    out = tmp_path / "r.csv.gz"
    assert main(_de(small_h5ad, "--out", str(out))) == 0
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip, inferred from the name as before
    assert len(pd.read_csv(out)) == 24
