"""scflashmm.pl: each plot rendered to PNG with Agg; the axes hold what they should."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pytest
import scanpy as sc
from matplotlib.colors import to_rgba
from scipy import sparse

import scflashmm as sfm
from scflashmm import ConvergenceWarning, DegenerateFeatureWarning
from scflashmm.pl._qq import inflation
from scflashmm.pl._utils import COLOR_DOWN, COLOR_NS, COLOR_UP, readable_term

TERM = "cls[1]:trt[T.B]"
CONTRASTS = {"mean_trt": "(cls[1]:trt[T.B] + cls[2]:trt[T.B])/2"}


@pytest.fixture(scope="module")
def fitted():
    adata = sfm.datasets.simulate_rnaseq(
        n_genes=120,
        n_cells=1500,
        n_samples=10,
        n_clusters=2,
        n_de_genes=12,
        minbeta=1,
        maxbeta=2,
        seed=5,
    )
    X = adata.X.tolil()
    X[:, 0] = 0  # an all-zero gene: NaN results, not drawn
    adata.X = sparse.csr_matrix(X)
    rng = np.random.default_rng(0)
    batch = {s: f"b{rng.integers(3)}" for s in adata.obs["sam"].cat.categories}
    adata.obs["batch"] = adata.obs["sam"].map(batch).astype("category")
    with pytest.warns(DegenerateFeatureWarning):
        sfm.tl.flashmm_de(
            adata,
            "~0+log(libsize)+cls+cls:trt",
            "sam",
            is_counts=True,
            contrasts=CONTRASTS,
            moderate=False,
            df="residual",
            store_cov=True,  # new contrasts in the plots
        )
    # batch has no effect in the simulation: a few genes stop at the boundary without converging
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", DegenerateFeatureWarning)
        sfm.tl.flashmm_de(
            adata, "~0+log(libsize)+cls+cls:trt", ["sam", "batch"], is_counts=True, key_added="two"
        )
    return adata


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def render(ax, tmp_path, name="plot.png"):
    path = tmp_path / name
    ax.figure.savefig(path, dpi=60)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def colours(collection):
    return {tuple(np.round(c, 6)) for c in collection.get_facecolors()}


def rgba(color):
    return tuple(np.round(to_rgba(color), 6))


# --------------------------------------------------------------------------------------------
# volcano
# --------------------------------------------------------------------------------------------


def test_volcano_points_colours_labels(fitted, tmp_path):
    table = sfm.get.flashmm_df(fitted, term=TERM)
    ax = sfm.pl.volcano(fitted, TERM, show=False)
    render(ax, tmp_path)
    rest, up, down = ax.collections
    fit_ok = table["p_value"].notna()
    assert fit_ok.sum() == len(fitted.var_names) - 1  # the all-zero gene is NaN
    assert len(rest.get_offsets()) + len(up.get_offsets()) + len(down.get_offsets()) == fit_ok.sum()

    sig = table[table["adj_p_value"] < 0.05]
    assert len(sig) > 0
    assert len(up.get_offsets()) == (sig["log_fc"] > 0).sum()
    assert len(down.get_offsets()) == (sig["log_fc"] < 0).sum()
    assert colours(up) == {rgba(COLOR_UP)}
    assert colours(down) == {rgba(COLOR_DOWN)}
    assert colours(rest) == {rgba(COLOR_NS)}
    # the up points are exactly the significant genes with a positive estimate
    expected = sig[sig["log_fc"] > 0]
    np.testing.assert_allclose(np.sort(up.get_offsets()[:, 0]), np.sort(expected["log_fc"]))
    np.testing.assert_allclose(
        np.sort(up.get_offsets()[:, 1]), np.sort(-np.log10(expected["p_value"].to_numpy()))
    )

    labels = [t.get_text() for t in ax.texts]
    assert labels == list(sig["variable"].head(10))
    assert ax.get_title().splitlines()[0] == "trt B vs A in cls 1"
    assert ax.get_xlabel() == "log_fc: difference of mean log2(1 + counts)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        f"not significant ({len(rest.get_offsets())})",
        f"up ({len(up.get_offsets())})",
        f"down ({len(down.get_offsets())})",
    ]
    # dashed line at the largest significant p-value
    (hline,) = ax.get_lines()
    assert hline.get_ydata()[0] == pytest.approx(-np.log10(sig["p_value"].max()))


def test_volcano_lfc_and_label_top(fitted):
    table = sfm.get.flashmm_df(fitted, term=TERM)
    ax = sfm.pl.volcano(fitted, TERM, lfc=1.0, label_top=2, fdr=0.1, show=False)
    _, up, down = ax.collections
    sig = table[(table["adj_p_value"] < 0.1) & (table["log_fc"].abs() >= 1.0)]
    assert len(up.get_offsets()) + len(down.get_offsets()) == len(sig)
    assert [t.get_text() for t in ax.texts] == list(sig["variable"].head(2))
    xs = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":")
    assert xs == [-1.0, 1.0]


def test_volcano_nothing_significant(fitted):
    ax = sfm.pl.volcano(fitted, TERM, fdr=1e-300, show=False)
    _, up, down = ax.collections
    assert len(up.get_offsets()) == len(down.get_offsets()) == 0
    assert not ax.texts and not ax.get_lines()


@pytest.mark.parametrize(
    "term", ["mean_trt", "cls[2]:trt[T.B] - cls[1]:trt[T.B]", "cls\\[2\\]:trt"]
)
def test_volcano_contrasts_and_patterns(fitted, term, tmp_path):
    ax = sfm.pl.volcano(fitted, term, show=False)
    render(ax, tmp_path)
    assert sum(len(c.get_offsets()) for c in ax.collections) == fitted.n_vars - 1


def test_volcano_into_given_axes(fitted):
    _, axs = plt.subplots(1, 2)
    assert sfm.pl.volcano(fitted, TERM, ax=axs[1], show=False) is axs[1]
    assert len(axs[0].collections) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"term": "nope"}, ValueError, "Unknown term 'nope'"),
        ({"term": ":trt"}, ValueError, "matches 2 design columns"),
        ({"term": TERM, "key": "missing"}, KeyError, "No flashmm results under key 'missing'"),
        ({"term": TERM, "fdr": 0}, ValueError, "fdr must be in"),
        ({"term": TERM, "lfc": -1}, ValueError, "lfc must be"),
        ({"term": TERM, "label_top": 1.5}, ValueError, "label_top"),
    ],
)
def test_volcano_errors(fitted, kwargs, error, match):
    with pytest.raises(error, match=match.replace("[", r"\[")):
        sfm.pl.volcano(fitted, **kwargs, show=False)


def test_volcano_new_contrast_with_satterthwaite_df_says_why(fitted):
    satt = fitted[:, 1:].copy()
    sfm.tl.flashmm_de(
        satt,
        "~0+log(libsize)+cls+cls:trt",
        "sam",
        is_counts=True,
        df="satterthwaite",
        moderate=False,
    )
    ax = sfm.pl.volcano(satt, TERM, show=False)
    assert sum(len(c.get_offsets()) for c in ax.collections) == satt.n_vars
    with pytest.raises(ValueError, match=r"flashmm_de\(contrasts=\.\.\.\)"):
        sfm.pl.volcano(satt, "cls[2]:trt[T.B] - cls[1]:trt[T.B]", show=False)


def test_not_an_anndata():
    with pytest.raises(TypeError, match="must be an AnnData"):
        sfm.pl.volcano(np.zeros((2, 2)), TERM)


# --------------------------------------------------------------------------------------------
# show / save as scanpy
# --------------------------------------------------------------------------------------------


@pytest.fixture
def scanpy_settings():
    """Restore scanpy's settings afterwards (they are class properties: no monkeypatch)."""
    saved = {name: getattr(sc.settings, name) for name in ("figdir", "autoshow", "autosave")}
    yield sc.settings
    for name, value in saved.items():
        setattr(sc.settings, name, value)


def test_show_and_save_follow_scanpy(fitted, tmp_path, monkeypatch, scanpy_settings):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    scanpy_settings.figdir = tmp_path
    scanpy_settings.autoshow = True
    assert sfm.pl.volcano(fitted, TERM) is None  # show=None -> settings.autoshow
    assert shown == [1]
    scanpy_settings.autoshow = False
    assert sfm.pl.qq(fitted, TERM) is not None
    assert shown == [1]

    ax = sfm.pl.qq(fitted, TERM, save="_trt.pdf")
    assert (tmp_path / "qq_trt.pdf").read_bytes()[:4] == b"%PDF"
    assert not plt.fignum_exists(ax.figure.number)  # saved figures are closed, as in scanpy
    sfm.pl.variance_components(fitted, save=True)
    ext = sc.settings.file_format_figs
    assert (tmp_path / f"variance_components{sc.settings.plot_suffix}.{ext}").exists()


# --------------------------------------------------------------------------------------------
# qq
# --------------------------------------------------------------------------------------------


def test_qq_points_band_and_labels(fitted, tmp_path):
    ax = sfm.pl.qq(fitted, ":trt", show=False)
    render(ax, tmp_path)
    band, *points = ax.collections
    terms = ["cls[1]:trt[T.B]", "cls[2]:trt[T.B]"]
    assert len(points) == 2
    m = fitted.n_vars - 1
    for coll, term in zip(points, terms, strict=True):
        xy = coll.get_offsets()
        assert len(xy) == m
        p = np.sort(fitted.varm["flashmm_p"][term].dropna().to_numpy())
        np.testing.assert_allclose(xy[:, 1], -np.log10(p))
        np.testing.assert_allclose(xy[:, 0], -np.log10((np.arange(1, m + 1) - 0.5) / m))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    lam = [inflation(fitted.varm["flashmm_p"][t].dropna().to_numpy()) for t in terms]
    assert legend == [
        "95% band",
        f"trt B vs A in cls 1 (λ = {lam[0]:.2f})",
        f"trt B vs A in cls 2 (λ = {lam[1]:.2f})",
    ]
    # the band contains the diagonal
    (diag,) = ax.get_lines()
    assert diag.get_linestyle() == "--"
    verts = band.get_paths()[0].vertices
    assert verts[:, 1].min() <= 0.01 and verts[:, 1].max() > verts[:, 0].max()


def test_qq_default_terms_and_no_band(fitted):
    ax = sfm.pl.qq(fitted, band=0, show=False)
    expected = [*fitted.uns["flashmm"]["x_columns"], "mean_trt"]
    legend = [t.get_text().rsplit(" (λ = ", 1)[0] for t in ax.get_legend().get_texts()]
    assert legend == [readable_term(t, {"trt": ["A", "B"]}) for t in expected]
    assert len(ax.collections) == len(expected)


def test_qq_errors(fitted):
    with pytest.raises(ValueError, match="Unknown term 'nope'"):
        sfm.pl.qq(fitted, ["cls[1]:trt[T.B]", "nope"], show=False)
    with pytest.raises(KeyError, match="No flashmm results"):
        sfm.pl.qq(fitted, key="missing", show=False)
    with pytest.raises(ValueError, match="band must be"):
        sfm.pl.qq(fitted, band=1, show=False)
    with pytest.raises(ValueError, match="term is empty"):
        sfm.pl.qq(fitted, [], show=False)


# --------------------------------------------------------------------------------------------
# variance components
# --------------------------------------------------------------------------------------------


def test_variance_components_one_term(fitted, tmp_path):
    ax = sfm.pl.variance_components(fitted, bins=25, show=False)
    render(ax, tmp_path)
    assert len(ax.patches) == 25
    assert sum(p.get_height() for p in ax.patches) == fitted.n_vars - 1
    theta = fitted.varm["flashmm_theta"].dropna()
    share = theta["sam"] / theta.sum(axis=1)
    (label,) = [t.get_text() for t in ax.get_legend().get_texts()]
    assert label == f"sam (median {share.median():.2f})"
    (median,) = ax.get_lines()
    assert median.get_xdata()[0] == pytest.approx(share.median())


def test_variance_components_two_terms(fitted, tmp_path):
    ax = sfm.pl.variance_components(fitted, key="two", bins=10, show=False)
    render(ax, tmp_path)
    assert len(ax.patches) == 20
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [lab.split(" ")[0] for lab in labels] == ["sam", "batch"]
    first = {p.get_facecolor() for p in ax.patches[:10]}
    second = {p.get_facecolor() for p in ax.patches[10:]}
    assert len(first) == len(second) == 1 and first != second


def test_variance_components_errors(fitted):
    with pytest.raises(KeyError, match="No flashmm results under key 'nope'"):
        sfm.pl.variance_components(fitted, key="nope", show=False)
    with pytest.raises(ValueError, match="bins"):
        sfm.pl.variance_components(fitted, bins=0, show=False)


def test_plots_after_h5ad_round_trip_and_subsetting(fitted, tmp_path):
    fitted.write_h5ad(tmp_path / "fit.h5ad")
    back = ad.read_h5ad(tmp_path / "fit.h5ad")[:, 1:60]
    ax = sfm.pl.volcano(back, "mean_trt", show=False)
    assert sum(len(c.get_offsets()) for c in ax.collections) == 59
    assert len(sfm.pl.qq(back, TERM, show=False).collections) == 2
    sfm.pl.variance_components(back, show=False)


# --------------------------------------------------------------------------------------------
# readable names, the tidy table as input, labels, lambda
# --------------------------------------------------------------------------------------------

AB = {"trt": ["A", "B"], "cls": ["1", "2"]}
TIMES = "\N{MULTIPLICATION SIGN}"


@pytest.mark.parametrize(
    ("name", "levels", "expected"),
    [
        ("cls[1]:trt[T.B]", AB, "trt B vs A in cls 1"),
        ("cls[1]:trt[T.B]", None, "trt B vs reference in cls 1"),
        ("trt[T.B]", AB, "trt B vs A"),
        ("trt[T.B]:cls[1]", AB, "trt B vs A in cls 1"),
        ("cls[2]", AB, "cls 2"),
        ("cls[1]:batch[b2]", AB, "cls 1, batch b2"),
        ("log(libsize)", AB, "log(libsize)"),
        ("Intercept", AB, "Intercept"),
        ("age:trt[T.B]", AB, f"age {TIMES} (trt B vs A)"),
        ("cls[1]:age", AB, "age in cls 1"),
        ("trt[T.B]:cls[T.2]", AB, f"(trt B vs A) {TIMES} (cls 2 vs 1)"),
        ("`my var`[T.x y]", {"my var": ["w", "x y"]}, "my var x y vs w"),
        ("mean_trt", AB, "mean_trt"),  # a contrast's name
        ("cls[2]:trt[T.B] - cls[1]:trt[T.B]", AB, "cls[2]:trt[T.B] - cls[1]:trt[T.B]"),
        ("(cls[1]:trt[T.B] + cls[2]:trt[T.B])/2", AB, "(cls[1]:trt[T.B] + cls[2]:trt[T.B])/2"),
    ],
)
def test_readable_term(name, levels, expected):
    assert readable_term(name, levels) == expected


def test_inflation_factor():
    from scipy import stats

    # uniform p-values: lambda 1; chi-square statistics scaled by 1.5: lambda 1.5
    p = (np.arange(1, 100_001) - 0.5) / 100_000
    assert inflation(p) == pytest.approx(1.0, abs=1e-4)
    chi = stats.chi2.isf(p, 1) * 1.5
    assert inflation(stats.chi2.sf(chi, 1)) == pytest.approx(1.5, abs=1e-4)
    assert np.isnan(inflation(np.array([np.nan])))


def test_volcano_from_the_tidy_table(fitted):
    table = sfm.get.flashmm_df(fitted, term=TERM)
    ax = sfm.pl.volcano(table, show=False)
    ref = sfm.pl.volcano(fitted, TERM, show=False)
    for a, b in zip(ax.collections, ref.collections, strict=True):
        np.testing.assert_allclose(a.get_offsets(), b.get_offsets())
    assert [t.get_text() for t in ax.texts] == [t.get_text() for t in ref.texts]
    # the factor levels are unknown without the AnnData
    assert ax.get_title().splitlines()[0] == "trt B vs reference in cls 1"
    both = sfm.get.flashmm_df(fitted, term=":trt")
    ax = sfm.pl.volcano(both, "cls[2]:trt[T.B]", title="cls 2", show=False)
    assert ax.get_title() == "cls 2"
    with pytest.raises(ValueError, match="holds 2 contrasts"):
        sfm.pl.volcano(both, show=False)
    with pytest.raises(ValueError, match="not in the table's contrast column"):
        sfm.pl.volcano(both, "nope", show=False)
    with pytest.raises(ValueError, match="lacks the columns"):
        sfm.pl.volcano(both.drop(columns="p_value"), show=False)
    with pytest.raises(ValueError, match="term is required"):
        sfm.pl.volcano(fitted, show=False)


def test_qq_from_the_tidy_table(fitted):
    table = sfm.get.flashmm_df(fitted, term=":trt")
    ax = sfm.pl.qq(table, "cls[2]:trt[T.B]", show=False)
    ref = sfm.pl.qq(fitted, "cls[2]:trt[T.B]", show=False)
    np.testing.assert_allclose(ax.collections[1].get_offsets(), ref.collections[1].get_offsets())
    assert len(sfm.pl.qq(table, show=False).collections) == 3  # band + two terms
    with pytest.raises(ValueError, match="not in the table's contrast column"):
        sfm.pl.qq(table, "nope", show=False)


def test_volcano_labels_given_genes_and_do_not_overlap(fitted, tmp_path):
    table = sfm.get.flashmm_df(fitted, term=TERM).dropna(subset="p_value")
    quiet = list(table["variable"].iloc[-3:])  # the least significant genes
    ax = sfm.pl.volcano(fitted, TERM, label_top=12, genes=quiet, show=False)
    render(ax, tmp_path)
    labels = [t.get_text() for t in ax.texts]
    sig = table[table["adj_p_value"] < 0.05]
    assert labels == [*sig["variable"].head(12), *quiet]
    renderer = ax.figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    overlaps = sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert overlaps == 0
    with pytest.raises(ValueError, match="genes not in the results"):
        sfm.pl.volcano(fitted, TERM, genes=["nope"], show=False)
