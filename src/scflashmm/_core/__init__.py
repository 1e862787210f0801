"""Numeric core: numpy/scipy only (no anndata, no pandas)."""
