"""Numeric core: numpy/scipy only (no anndata, no pandas).

Modules in the order the data flow (docs/model.md has the mathematics):

- :mod:`.sumstats`: the entry point :func:`summary_stats`, one pass over the cells, built from
  :mod:`.checks` (input checks), :mod:`.sources` (reading ``Y`` by blocks), :mod:`.plan`
  (which design columns are summed by pattern), :mod:`.blocks` (one block -> partial
  statistics), :mod:`.passes` (threads or Dask) and :mod:`.stats` (the :class:`SummaryStats`
  container and its file format);
- :mod:`.fit`: :func:`lmm` and :class:`LMMFit`: checks (:mod:`._options`), reduction by the
  fixed effects, a kernel from :mod:`.kernels` (one module per kernel behind the
  ``Kernel`` interface), Fisher scoring (:mod:`.scoring`, or :mod:`.boundary` over nonnegative
  variance components), Satterthwaite df (:mod:`.satterthwaite`), Kenward-Roger adjusted
  covariance and df (:mod:`.kenward_roger`), tests (:mod:`.inference`);
- :mod:`._threads`: core count, BLAS limit and the ordered thread map shared by both.
"""
