"""Draw docs/_static/scaling.png (time against cells and genes) from docs/_data/scaling.csv.

The CSV holds the times measured by ``benchmarks/scaling.py`` (and, for R FLASHMM,
``benchmarks/flashmm_bench.R``) that docs/benchmarks.md reports; nothing is measured here::

    python docs/_scripts/scaling_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd

DOCS = Path(__file__).resolve().parents[1]


def main() -> None:
    """Run from the command line."""
    data = pd.read_csv(DOCS / "_data" / "scaling.csv")
    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    ours = data[data["tool"] == "scflashmm"]
    markers = {1000: "o", 2000: "s", 6000: "D"}
    for genes, group in ours.groupby("genes"):
        group = group.sort_values("cells")
        ax.plot(
            group["cells"],
            group["seconds"],
            marker=markers.get(int(genes), "o"),
            color="#1f77b4",
            lw=1,
            label=f"scflashmm, {int(genes):,} genes",
        )
    r = data[data["tool"] != "scflashmm"]
    ax.scatter(
        r["cells"], r["seconds"], marker="x", color="#d62728", label="R FLASHMM, 1,000 genes"
    )
    for _, row in data.iterrows():
        if row["input"] in ("backed h5ad", "sparse dgCMatrix", "dense matrix"):
            ax.annotate(
                row["input"],
                (row["cells"], row["seconds"]),
                xytext=(-8, 6) if row["input"] == "backed h5ad" else (6, -3),
                ha="right" if row["input"] == "backed h5ad" else "left",
                textcoords="offset points",
                fontsize="x-small",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000]
    ax.set_xticks(ticks, [f"{t // 1000:,}k" if t < 1_000_000 else "1M" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([0.3, 1, 3, 10, 30], ["0.3", "1", "3", "10", "30"])
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlim(10_000, 1_000_000)
    ax.set_ylim(0.2, 30)
    ax.set_xlabel("cells")
    ax.set_ylabel("seconds, data to results in varm")
    ax.set_title("flashmm_de end to end (2 shared cores)", fontsize="medium")
    ax.legend(fontsize="x-small", frameon=False, loc="upper left")
    ax.grid(True, which="major", lw=0.3, color="0.85")
    out = DOCS / "_static" / "scaling.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
