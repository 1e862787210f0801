"""Command line: ``scflashmm demo``, ``scflashmm de INPUT.h5ad ...``, ``scflashmm refit ...``.

``scflashmm demo`` simulates a multi-sample, multi-cell-type data set with known DE genes,
fits FLASHMM's model to every gene, prints the top genes per cell type and how many true DE
genes were found, and writes the tidy result table to a CSV file when asked (``--out FILE``).

``scflashmm de`` fits a model to an h5ad file and writes the tidy table (one row per gene and
design column or contrast) to a CSV file, or to stdout with ``--out -`` (the one-line summary
then goes to stderr); ``--term`` keeps only the design columns that match. Mistakes in the
input (a missing column, a bad formula, an unreadable file ...) print one line on stderr and
exit with status 1.

``scflashmm refit`` tests new contrasts, or refits with another method, df, ``--nonnegative``
or ``--moderate``, from the summary statistics that ``de --write-h5ad`` stored: no pass over
the cells.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path
from typing import Any, get_args

from ._core._atomic import atomic_path
from ._core._options import DfMethod, Method, check_positive_float, check_positive_int
from ._results import DEFAULT_KEY

__all__ = ["main"]

PROG = "scflashmm"
#: The model of ``scflashmm demo``.
DEMO_FIXED = "~0+log(libsize)+cls+cls:trt"


class UserError(Exception):
    """A mistake in the command's input: reported in one line, without a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``scflashmm`` command.

    Parameters
    ----------
    argv
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    The exit status: 0 on success, 1 on an error, 2 on bad usage (from argparse), 130 on
    an interrupt. Every error is reported on one line of stderr, without a traceback (set
    the environment variable ``SCFLASHMM_TRACEBACK=1`` to see one for an unexpected error).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    with _one_line_warnings():
        try:
            args.run(args)
        except (UserError, ValueError, KeyError, OSError, TypeError) as exc:
            text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            print(f"{PROG}: error: {_one_line(text)}", file=sys.stderr)
            return 1
        except RecursionError:
            print(f"{PROG}: error: an expression is nested too deeply.", file=sys.stderr)
            return 1
        except MemoryError as exc:
            print(f"{PROG}: error: out of memory ({exc or 'MemoryError'}).", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # a bug, not a user error: still one line (see docstring)
            if os.environ.get("SCFLASHMM_TRACEBACK"):
                raise
            text = _one_line(str(exc)) or type(exc).__name__
            print(
                f"{PROG}: error: {type(exc).__name__}: {text} (unexpected: please report it; "
                "set SCFLASHMM_TRACEBACK=1 to see where)",
                file=sys.stderr,
            )
            return 1
    return 0


def _one_line(text: str) -> str:
    """Return a message on one line (a multi-line message is joined with ' | ')."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


@contextmanager
def _one_line_warnings():
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{PROG}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Single-cell differential expression with linear mixed models fit from "
        "summary statistics (the FLASHMM method).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,de,refit}")
    _add_demo_parser(sub)
    _add_de_parser(sub)
    _add_refit_parser(sub)
    return parser


def _add_demo_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="simulate a data set with known DE genes, fit it and report what was found",
        description="Simulate counts for several samples, cell types and two treatments with a "
        "few cell-type-specific DE genes, fit ~0+log(libsize)+cls+cls:trt with a random "
        "intercept per sample to log2(1 + counts), and report the top genes per cell type and "
        "the recovery of the true DE genes.",
    )
    demo.add_argument("--n-genes", type=int, default=2000, help="genes (default 2000)")
    demo.add_argument("--n-cells", type=int, default=20000, help="cells (default 20000)")
    demo.add_argument("--n-samples", type=int, default=25, help="samples (default 25)")
    demo.add_argument("--n-clusters", type=int, default=10, help="cell types (default 10)")
    demo.add_argument("--n-de-genes", type=int, default=60, help="true DE genes (default 60)")
    demo.add_argument("--seed", type=int, default=2024, help="random seed (default 2024)")
    demo.add_argument("--fdr", type=float, default=0.05, help="FDR level (default 0.05)")
    demo.add_argument("--top", type=int, default=3, help="genes shown per cell type (3)")
    demo.add_argument(
        "--out",
        metavar="FILE",
        help="write the tidy table to this CSV file ('-': stdout); default: print its head only",
    )
    demo.set_defaults(run=_run_demo)


def _add_de_parser(sub: Any) -> None:
    de = sub.add_parser(
        "de",
        help="fit a linear mixed model to every gene of an h5ad file",
        description="Fit y = X beta + Z b + e to every gene of INPUT.h5ad and write the tidy "
        "table (variable, contrast, log_fc, sd, t_value, p_value, adj_p_value, converged).",
    )
    de.add_argument("input", metavar="INPUT.h5ad", help="AnnData file, cells x genes")
    de.add_argument(
        "--fixed", required=True, help="fixed-effects formula over obs, e.g. '~0+cls+cls:trt'"
    )
    de.add_argument(
        "--random",
        required=True,
        action="append",
        help="random term: an obs column (one intercept per level) or a formula such as "
        "'~0+sam'; repeat for more variance components",
    )
    de.add_argument("--layer", help="layer to fit (default X)")
    de.add_argument("--counts", action="store_true", help="the data are counts: fit log2(1 + y)")
    de.add_argument(
        "--contrast",
        action="append",
        default=[],
        metavar="NAME=EXPR",
        help="contrast over the design columns, e.g. 'BvsA=cls[1]:trt[T.B] - cls[2]:trt[T.B]'; "
        "repeatable",
    )
    _add_model_options(de, defaults=True)
    de.add_argument("--max-iter", type=int, default=50, help="default 50")
    de.add_argument("--epsilon", type=float, default=1e-5, help="default 1e-5")
    de.add_argument("--chunk-size", type=int, help="cells per chunk (default 10000)")
    de.add_argument(
        "--n-jobs", type=int, help="threads (default: the CPUs available); results do not change"
    )
    de.add_argument("--key", default=DEFAULT_KEY, help="key_added for the results")
    _add_table_options(de)
    de.add_argument("--write-h5ad", metavar="OUT.h5ad", help="also write the AnnData with results")
    de.add_argument(
        "--backed", action="store_true", help="open INPUT backed: stream X from disk in chunks"
    )
    de.set_defaults(run=_run_de)


# -------------------------------------------------------------------------------------- de


def _add_table_options(parser: argparse.ArgumentParser) -> None:
    """Add --out (a CSV file, or '-' for stdout) and --term (filter of the design columns)."""
    parser.add_argument(
        "--out",
        required=True,
        metavar="RESULTS.csv",
        help="tidy table (CSV); '-' writes it to stdout (the summary then goes to stderr)",
    )
    parser.add_argument(
        "--term",
        action="append",
        default=[],
        metavar="PATTERN",
        help="report only the design columns matching PATTERN (an exact name, a substring or "
        "a regular expression, e.g. ':trt'); repeatable; contrasts given with --contrast "
        "are always reported (default: every design column)",
    )


def _table(adata: Any, args: argparse.Namespace, contrast_names: list[str]) -> Any:
    """Return the tidy table: the design columns (all, or those matching --term), contrasts."""
    from . import get

    if args.term:
        term: list[str] | None = list(args.term)
    elif contrast_names:
        term = [str(c) for c in adata.uns[args.key]["x_columns"]]
    else:
        term = None
    return get.flashmm_df(adata, key=args.key, term=term, contrast=contrast_names or None)


def _summary_file(out: str | None) -> Any:
    """Where the summary lines go: stderr when the table goes to stdout."""
    return sys.stderr if out == "-" else sys.stdout


def _parse_contrasts(items: list[str]) -> dict[str, str] | None:
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        name, sep, expr = item.partition("=")
        if not sep or "(" in name:  # no name: an expression (cond(trt="B") holds '=' too)
            name, expr = item, item
        name, expr = name.strip(), expr.strip()
        if not name or not expr:
            msg = f"--contrast {item!r}: expected NAME=EXPRESSION."
            raise UserError(msg)
        if name in out:
            msg = f"--contrast: the name {name!r} is used twice."
            raise UserError(msg)
        out[name] = expr
    return out


def _run_de(args: argparse.Namespace) -> None:
    path = _check_de_paths(args)
    contrasts = _parse_contrasts(args.contrast)
    adata = _read_h5ad(path, backed=args.backed)
    try:
        seconds = _fit_de(adata, args, contrasts)
        _write_de(adata, args, contrasts, seconds)
    finally:
        if adata.isbacked:
            adata.file.close()


def _check_de_paths(args: argparse.Namespace) -> Path:
    """Return the input path, after checking it exists and the outputs can be written.

    No output may be the input (also through a hard or symbolic link) or another output.
    """
    path = Path(args.input)
    if not path.is_file():
        msg = f"input file {str(path)!r} does not exist."
        raise UserError(msg)
    outputs = [("--out", args.out), ("--write-h5ad", args.write_h5ad)]
    _check_outputs(
        [(o, v) for o, v in outputs if v and v != "-"], inputs=[("the input file", path)]
    )
    return path


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` are the same file: same inode if both exist, else same path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _check_outputs(
    outputs: list[tuple[str, str]], *, inputs: Sequence[tuple[str, Path]] = ()
) -> None:
    """Refuse an output that is an input or another output, or whose folder is missing."""
    for i, (option, value) in enumerate(outputs):
        for what, source in inputs:
            if _same_file(value, source):
                msg = f"{option} {value!r} is {what}: it would be overwritten; choose another file."
                raise UserError(msg)
        for other, other_value in outputs[:i]:
            if _same_file(value, other_value):
                msg = f"{option} and {other} name the same file {value!r}; choose two files."
                raise UserError(msg)
        target = Path(value)
        if target.is_dir():
            msg = f"{option}: {value!r} is a directory, not a file."
            raise UserError(msg)
        if not target.resolve().parent.is_dir():
            msg = f"{option}: the directory of {value!r} does not exist."
            raise UserError(msg)


def _write_csv(table: Any, path: str) -> None:
    """Write a table to CSV atomically (never a truncated file, even on a full disk).

    ``"-"`` writes it to stdout.
    """
    if path == "-":
        table.to_csv(sys.stdout, index=False)
        return
    # the temporary file keeps the suffix, from which pandas infers compression (.gz ...)
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        table.to_csv(tmp, index=False)


def _read_h5ad(path: Path, *, backed: bool) -> Any:
    import anndata as ad

    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # h5py/anndata raise many kinds for a file that is not h5ad
        msg = f"cannot read {str(path)!r} as an h5ad file ({type(exc).__name__}: {exc})."
        raise UserError(msg) from exc


def _fit_de(adata: Any, args: argparse.Namespace, contrasts: dict[str, str] | None) -> float:
    """Fit every gene as asked on the command line; return the seconds taken."""
    from . import tl

    start = time.perf_counter()
    tl.flashmm_de(
        adata,
        args.fixed,
        args.random if len(args.random) > 1 else args.random[0],
        layer=args.layer,
        is_counts=args.counts,
        contrasts=contrasts,
        **_model_options(args),
        max_iter=args.max_iter,
        epsilon=args.epsilon,
        key_added=args.key,
        chunk_size=args.chunk_size,
        n_jobs=args.n_jobs,
    )
    return time.perf_counter() - start


def _write_de(
    adata: Any, args: argparse.Namespace, contrasts: dict[str, str] | None, seconds: float
) -> None:
    """Write the tidy table (and the AnnData when asked) and say what was done."""
    table = _table(adata, args, list(contrasts or ()))
    _write_csv(table, args.out)
    info = adata.uns[args.key]
    say = _summary_file(args.out)
    print(
        f"Fitted {adata.n_vars} genes x {adata.n_obs} cells in {seconds:.1f} s "
        f"({info['n_nonconverged']} not converged, {info['n_degenerate']} not fittable); "
        f"wrote {len(table)} rows to {'stdout' if args.out == '-' else args.out}",
        file=say,
    )
    if args.write_h5ad:
        _write_h5ad(adata, args.write_h5ad, key=args.key)
        print(f"Wrote the AnnData with results to {args.write_h5ad}", file=say)


def _write_h5ad(adata: Any, path: str, *, key: str) -> None:
    """Write the AnnData with the results of fit ``key`` atomically.

    A backed AnnData is not loaded: its file is copied and the results (``varm`` tables and
    ``uns[key]``) are written into the copy.
    """
    with atomic_path(path, suffix=".h5ad") as tmp:
        if not adata.isbacked:
            adata.write_h5ad(tmp)
            return
        import h5py
        from anndata.io import write_elem

        shutil.copyfile(adata.filename, tmp)
        with h5py.File(tmp, "r+") as f:
            varm = f.require_group("varm")
            for name in list(varm.keys()):  # e.g. tables of an earlier fit under this key
                if name not in adata.varm:
                    del varm[name]
            for name in adata.uns[key]["varm_keys"]:
                if name in varm:
                    del varm[name]
                write_elem(varm, name, adata.varm[name])
            uns = f.require_group("uns")
            if key in uns:
                del uns[key]
            write_elem(uns, key, adata.uns[key])


# ---------------------------------------------------------------------- model options, refit


def _add_model_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Add --method, --df, --nonnegative, --moderate (``defaults=False``: None, the fit's)."""
    keep = "default: the fit's"
    parser.add_argument(
        "--method",
        choices=get_args(Method),
        default="REML" if defaults else None,
        help="default REML" if defaults else keep,
    )
    parser.add_argument(
        "--df",
        choices=get_args(DfMethod),
        default="satterthwaite" if defaults else None,
        help="df of the t tests that are not moderated: residual (n - p, FLASHMM), "
        "satterthwaite or kenward-roger; " + ("default satterthwaite" if defaults else keep),
    )
    parser.add_argument(
        "--nonnegative",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="variance components >= 0 as lme4 (singular fits flagged); "
        + ("default: on for lme4-style terms such as '(1 | sam)', else off" if defaults else keep),
    )
    parser.add_argument(
        "--moderate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="empirical-Bayes moderation of the between-sample variance (one random term); "
        + ("default: on with one random term" if defaults else keep)
        + ". FLASHMM's exact numbers: --no-moderate --df residual",
    )


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "method": args.method,
        "df": args.df,
        "nonnegative": args.nonnegative,
        "moderate": args.moderate,
    }


def _add_refit_parser(sub: Any) -> None:
    refit = sub.add_parser(
        "refit",
        help="test new contrasts or refit an h5ad written by 'de --write-h5ad', without the cells",
        description="Refit the model stored in INPUT.h5ad (by 'scflashmm de --write-h5ad') from "
        "its summary statistics, with new contrasts or another method, df, --nonnegative or "
        "--moderate, and write the tidy table. No pass over the cells.",
    )
    refit.add_argument("input", metavar="INPUT.h5ad", help="AnnData with a stored fit")
    refit.add_argument(
        "--contrast",
        action="append",
        default=[],
        metavar="NAME=EXPR",
        help="contrast over the design columns; repeatable (default: the fit's contrasts)",
    )
    _add_model_options(refit, defaults=False)
    refit.add_argument("--key", default=DEFAULT_KEY, help="key of the stored fit")
    _add_table_options(refit)
    refit.add_argument("--write-h5ad", metavar="OUT.h5ad", help="also write the refit AnnData")
    refit.set_defaults(run=_run_refit)


def _run_refit(args: argparse.Namespace) -> None:
    from . import tl

    path = Path(args.input)
    if not path.is_file():
        msg = f"input file {str(path)!r} does not exist."
        raise UserError(msg)
    for option, value in (("--out", args.out), ("--write-h5ad", args.write_h5ad)):
        if value and value != "-" and not Path(value).resolve().parent.is_dir():
            msg = f"{option}: the directory of {value!r} does not exist."
            raise UserError(msg)
    if args.write_h5ad and Path(args.write_h5ad).resolve() == path.resolve():
        msg = "--write-h5ad must not overwrite the input file."
        raise UserError(msg)
    contrasts = _parse_contrasts(args.contrast)
    adata = _read_h5ad(path, backed=False)
    start = time.perf_counter()
    tl.flashmm_refit(adata, key=args.key, contrasts=contrasts, **_model_options(args))
    seconds = time.perf_counter() - start
    info = adata.uns[args.key]
    names = [str(c) for c in info["contrast_names"]]
    table = _table(adata, args, names)
    _write_csv(table, args.out)
    say = _summary_file(args.out)
    print(
        f"Refit {adata.n_vars} genes from their summary statistics in {seconds:.1f} s "
        f"({info['n_nonconverged']} not converged); wrote {len(table)} rows to "
        f"{'stdout' if args.out == '-' else args.out}",
        file=say,
    )
    if args.write_h5ad:
        adata.write_h5ad(args.write_h5ad)
        print(f"Wrote the AnnData with results to {args.write_h5ad}", file=say)


# ------------------------------------------------------------------------------------ demo


#: rows of the tidy table that ``scflashmm demo`` prints without ``--out``
DEMO_HEAD = 5


def _run_demo(args: argparse.Namespace) -> None:
    _check_demo_args(args)
    # with '--out -' the table alone goes to stdout, the report to stderr
    with redirect_stdout(sys.stderr) if args.out == "-" else nullcontext():
        adata = _simulate(args)
        treated = str(adata.uns["simulate_rnaseq"]["treatment"])
        _fit_demo(adata)
        table = _treatment_effects(adata, treated)
        _print_top(table, treated, args.top)
        _print_recovery(table, adata, args.fdr)
    tidy = table.drop(columns=["cell_type", "true_de"])
    if args.out is None:
        print(f"\nThe tidy table ({len(tidy)} rows; --out FILE writes it to a CSV file):")
        print(tidy.head(DEMO_HEAD).to_string(index=False))
        return
    _write_csv(tidy, args.out)
    if args.out != "-":
        print(f"Wrote the tidy table ({len(tidy)} rows) to {args.out}")


def _check_demo_args(args: argparse.Namespace) -> None:
    if args.out is not None and args.out != "-":
        _check_outputs([("--out", args.out)])
    for name in ("n_genes", "n_cells", "n_samples", "n_clusters", "top"):
        check_positive_int(getattr(args, name), f"--{name.replace('_', '-')}")
    if not check_positive_float(args.fdr, "--fdr") < 1:
        msg = "--fdr must be between 0 and 1."
        raise UserError(msg)


def _simulate(args: argparse.Namespace) -> Any:
    from . import datasets

    start = time.perf_counter()
    adata = datasets.simulate_rnaseq(
        n_genes=args.n_genes,
        n_cells=args.n_cells,
        n_samples=args.n_samples,
        n_clusters=args.n_clusters,
        n_de_genes=args.n_de_genes,
        seed=args.seed,
    )
    simulated = time.perf_counter() - start
    treated = str(adata.uns["simulate_rnaseq"]["treatment"])
    control = [str(t) for t in adata.obs["trt"].cat.categories if str(t) != treated]
    print(
        f"Simulated {adata.n_obs:,} cells x {adata.n_vars:,} genes in {simulated:.1f} s: "
        f"{adata.obs['sam'].nunique()} samples, {adata.obs['cls'].nunique()} cell types, "
        f"treatment {treated} vs {', '.join(control)}, {int(adata.var['is_de'].sum())} true "
        "DE genes (each in one cell type)."
    )
    return adata


def _fit_demo(adata: Any) -> None:
    from . import tl

    print(f"Model: {DEMO_FIXED}, random intercept per sample; REML on log2(1 + counts).")
    start = time.perf_counter()
    tl.flashmm_de(adata, DEMO_FIXED, "sam", is_counts=True, key_added=DEFAULT_KEY)
    info = adata.uns[DEFAULT_KEY]
    print(
        f"Fit all genes in {time.perf_counter() - start:.1f} s "
        f"({info['n_nonconverged']} not converged, {info['n_degenerate']} not fittable)."
    )


def _treatment_effects(adata: Any, treated: str) -> Any:
    """Tidy table of the ``cls[k]:trt[T.<treated>]`` columns, with cell type and truth."""
    from . import get

    suffix = f":trt[T.{treated}]"
    x_columns = [str(c) for c in adata.uns[DEFAULT_KEY]["x_columns"]]
    terms = [c for c in x_columns if c.startswith("cls[") and c.endswith(suffix)]
    table = get.flashmm_df(adata, key=DEFAULT_KEY, term=terms)
    table["cell_type"] = table["contrast"].str.slice(4, -len(suffix) - 1)
    truth = _true_de(adata)
    table["true_de"] = [
        (g, c) in truth for g, c in zip(table["variable"], table["cell_type"], strict=True)
    ]
    return table


def _true_de(adata: Any) -> set[tuple[str, str]]:
    """Return the simulated DE genes as (gene, cell type) pairs."""
    var = adata.var
    de = var["is_de"].to_numpy(dtype=bool)
    return {(g, str(c)) for g, c in zip(var.index[de], var["de_cluster"][de], strict=True)}


def _print_top(table: Any, treated: str, top: int) -> None:
    import numpy as np
    import pandas as pd
    from natsort import natsorted

    print(f"\nTop {top} genes per cell type (effect of {treated} in that cell type):")
    rows = table.groupby("cell_type", sort=False).head(top)
    # cell types in natural order (1, 2, ..., 10), each type's genes kept in table order
    order = pd.Categorical(rows["cell_type"], categories=natsorted(rows["cell_type"].unique()))
    rows = rows.iloc[np.argsort(order.codes, kind="stable")]
    shown = rows.assign(
        log2FC=rows["log_fc"].map("{:+.2f}".format),
        p=rows["p_value"].map("{:.1e}".format),
        FDR=rows["adj_p_value"].map("{:.1e}".format),
        true_DE=np.where(rows["true_de"], "yes", "-"),
    )[["cell_type", "variable", "log2FC", "p", "FDR", "true_DE"]]
    shown = shown.rename(columns={"cell_type": "cell type", "variable": "gene"})
    print(shown.to_string(index=False))


def _print_recovery(table: Any, adata: Any, fdr: float) -> None:
    n_true = len(_true_de(adata))
    hits = table[table["adj_p_value"] < fdr]
    found = int(hits["true_de"].sum())
    false = len(hits) - found
    print(
        f"\nAt FDR < {fdr:g}: {found} of {n_true} true DE genes found in their cell "
        f"type; {false} false discover{'y' if false == 1 else 'ies'} "
        f"(of {len(hits)} discoveries)."
    )


if __name__ == "__main__":
    sys.exit(main())
