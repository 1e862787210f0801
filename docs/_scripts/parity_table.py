"""Measure the agreement of scflashmm with FLASHMM 1.3.0 on the reference cases.

Prints the Markdown table of docs/parity.md. For each quantity and case, the entries whose
FLASHMM value is at least 1e-3 times the largest absolute value of that quantity in the case
are compared by relative difference; the others (values near 0, where a relative difference
measures round-off of a cancellation, not disagreement) by their absolute difference divided
by that largest value. Each column is the maximum over all cases and genes. Fixed effects are
also compared in units of their standard error, and p-values on the -log10 scale.

    python docs/_scripts/parity_table.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from _reference import (  # noqa: E402
    CASES,
    comparable_genes,
    genes_first,
    lmm_fit_case,
    load_case,
)

CUTOFF = 1e-3

QUANTITIES = {
    "coef": "coef.csv",
    "se": "se.csv",
    "t": "t.csv",
    "theta": "theta.csv",
    "se_theta": "se_theta.csv",
    "logLik": "logLik.csv",
    "cov": "cov.csv",
    "RE": "RE.csv",
    "FIM_beta": "FIM_beta.csv",
    "FIM_theta": "FIM_theta.csv",
}


def fit_case(case):
    """Fit a reference case as FLASHMM was called (warnings are expected for some cases)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lmm_fit_case(case)


def main() -> None:
    """Print the table."""
    rel = {q: 0.0 for q in QUANTITIES}
    absdiff = {q: 0.0 for q in QUANTITIES}
    cases = {q: 0 for q in QUANTITIES}
    p_log = 0.0
    coef_se = 0.0
    niter_equal = True
    for name in CASES:
        case = load_case(name)
        fit = fit_case(case)
        keep = comparable_genes(case)
        pairs = {
            "coef": (fit.coef, genes_first(case["coef"])),
            "se": (fit.se, genes_first(case["se"])),
            "t": (fit.t, genes_first(case["t"])),
            "theta": (fit.theta, genes_first(case["theta"])),
            "se_theta": (fit.se_theta, genes_first(case["se_theta"])),
            "logLik": (fit.logLik, case["logLik"].to_numpy().ravel()),
            "cov": (fit.cov, case["cov"]),
        }
        if "RE" in case:
            pairs["RE"] = (fit.re, genes_first(case["RE"]))
        if "FIM_beta" in case:
            pairs["FIM_beta"] = (fit.fim_beta, case["FIM_beta"])
            pairs["FIM_theta"] = (fit.fim_theta, case["FIM_theta"])
        for q, (ours, theirs) in pairs.items():
            ours, theirs = np.asarray(ours)[keep], np.asarray(theirs)[keep]
            scale = np.nanmax(np.abs(theirs))
            big = np.abs(theirs) >= CUTOFF * scale
            diff = np.abs(ours - theirs)
            rel[q] = max(rel[q], float(np.nanmax(diff[big] / np.abs(theirs[big]))))
            if (~big).any():
                absdiff[q] = max(absdiff[q], float(np.nanmax(diff[~big])) / scale)
            cases[q] += 1
        se = genes_first(case["se"])[keep]
        coef_se = max(
            coef_se, float(np.nanmax(np.abs(fit.coef[keep] - genes_first(case["coef"])[keep]) / se))
        )
        lp = np.abs(np.log10(fit.p[keep]) - np.log10(genes_first(case["p"])[keep]))
        p_log = max(p_log, float(np.nanmax(lp)))
        niter_equal &= bool((fit.niter[keep] == case["niter"].to_numpy().ravel()[keep]).all())

    print("| quantity | cases | max relative difference | near 0: max abs. difference / scale |")
    print("|---|---|---|---|")
    for q in QUANTITIES:
        near0 = f"{absdiff[q]:.1e}" if absdiff[q] else "-"
        print(f"| {q} | {cases[q]} | {rel[q]:.1e} | {near0} |")
    print(f"| coef, in standard errors | {len(CASES)} | {coef_se:.1e} (absolute) | - |")
    print(f"| -log10 p | {len(CASES)} | {p_log:.1e} (absolute) | - |")
    print(f"| niter | {len(CASES)} | {'identical' if niter_equal else 'DIFFERENT'} | - |")


if __name__ == "__main__":
    main()
