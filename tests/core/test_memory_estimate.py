"""The memory guard's estimate against its calibration (docs/guarantees.md, Memory).

The peaks were measured by ``benchmarks/bench_fit_memory.py`` (peak RSS of
``summary_stats`` + ``lmm`` in a fresh process, above the RSS with the data loaded); the test
checks that the formula stays within a factor of two of them, without measuring again.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scflashmm._core.checks import fit_memory_bytes, memory_layout
from scflashmm._random_terms import random_design

MB = 2**20

#: (n, p, levels, slope columns, q, genes, n_jobs, k, measured peak in MB[, dense structured])
CALIBRATION = [
    (30_000, 3, [2_000], 0, 2_000, 200, 2, 1, 211),
    (30_000, 3, [4_000], 0, 4_000, 100, 2, 1, 778),
    (30_000, 3, [400, 200], 0, 600, 50, 1, 2, 149),
    (30_000, 3, [400, 200], 0, 600, 50, 2, 2, 160),
    (30_000, 3, [1_000, 200], 0, 1_200, 10, 2, 2, 304),
    (30_000, 3, [300, 150, 50], 0, 500, 50, 1, 3, 144),
    (30_000, 3, [300, 150, 50], 0, 500, 50, 2, 3, 162),
    (30_000, 3, [200], 200, 400, 100, 1, 1, 139),
    (30_000, 3, [200], 200, 400, 100, 2, 1, 139),
    (30_000, 3, [450], 450, 900, 20, 2, 1, 316),
    (30_000, 3, [600], 600, 1_200, 20, 2, 1, 426),
    (30_000, 3, [300, 100], 0, 400, 50, 1, 2, 81),
    (30_000, 3, [300, 100], 0, 400, 50, 2, 2, 96),
    (30_000, 3, [600, 200], 0, 800, 20, 2, 2, 190),
    (30_000, 3, [150, 50], 150, 350, 50, 2, 2, 211, True),  # dense structured solver
]


@pytest.mark.parametrize("case", CALIBRATION, ids=lambda c: f"q{c[4]}-k{c[7]}-jobs{c[6]}")
def test_estimate_is_within_a_factor_of_two_of_the_measured_peak(case):
    n, p, levels, slopes, q, m, jobs, k, measured, *dense = case
    estimate = fit_memory_bytes(
        n, p, q, m, k, n_jobs=jobs, levels=levels, continuous=slopes, structured_dense=any(dense)
    )
    assert 0.5 <= estimate / (measured * MB) <= 2


def test_memory_layout():
    assert memory_layout([30, 5]) == {"levels": [30, 5], "continuous": 0}
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"g": rng.integers(0, 7, 100).astype(str), "x": rng.normal(size=100)})
    rd = random_design("(1 + x | g) + (0 + x | g)", obs)
    layout = memory_layout([t.q for t in rd.structure.terms], rd.structure)
    # two slope columns per level; one grouping factor: the block solver, not the dense one
    assert layout == {"levels": [7, 7], "continuous": 14, "structured_dense": False}
    obs["h"] = rng.integers(0, 3, 100).astype(str)
    rd = random_design("(1 + x | g) + (1 | h)", obs)
    layout = memory_layout([t.q for t in rd.structure.terms], rd.structure)
    assert layout == {"levels": [7, 3], "continuous": 7, "structured_dense": True}


def test_estimate_grows_with_q_squared_and_threads():
    one = fit_memory_bytes(30_000, 2, 15_000, 1_000, 1, n_jobs=2)
    assert one > 6 * 8 * 15_000**2  # solver, statistics and plan each hold q x q arrays
    many = fit_memory_bytes(30_000, 2, 3_000, 100, 2, n_jobs=8)
    assert many > fit_memory_bytes(30_000, 2, 3_000, 100, 2, n_jobs=1) + 6 * 8 * 3_000**2
