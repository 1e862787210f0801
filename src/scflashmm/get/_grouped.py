"""The results of a fit with ``groupby``: which key holds a group's fit, and the tidy table.

:func:`scflashmm.tl.flashmm_de` with ``groupby`` writes each group's fit as an ordinary fit
under the key ``f"{key}:{group}"`` and a record of the groups under ``uns[key]``
(``groupby``, ``groups``, ``group_keys``, ``skipped`` ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData


def grouped_info(adata: AnnData, key: str) -> Mapping[str, Any] | None:
    """Return ``uns[key]`` if it is the record of a fit with ``groupby``, else None."""
    uns = getattr(adata, "uns", None)  # not an AnnData: the caller's checks say so
    info = uns.get(key) if isinstance(uns, Mapping) else None
    if isinstance(info, Mapping) and "group_keys" in info:
        return info
    return None


def group_keys(adata: AnnData, key: str, group: str | Sequence[str] | None) -> dict[str, str]:
    """``{group: key of its fit}`` for the groups asked (all fitted groups for None)."""
    info = grouped_info(adata, key)
    if info is None:
        if group is None:
            return {}
        msg = (
            f"group={group!r} was given, but the fit under key {key!r} is not grouped: run "
            f"flashmm_de(..., groupby=..., key_added={key!r})."
        )
        raise ValueError(msg)
    names = [str(g) for g in info["groups"]]
    keys = dict(zip(names, (str(k) for k in info["group_keys"]), strict=True))
    if group is None:
        return keys
    asked = [group] if isinstance(group, str) else [str(g) for g in group]
    skipped = dict(zip(info.get("skipped", []), info.get("skipped_reasons", []), strict=False))
    out = {}
    for g in asked:
        if g in keys:
            out[g] = keys[g]
        elif g in skipped:
            msg = f"Group {g!r} of {info['groupby']!r} was not fit: {skipped[g]}."
            raise ValueError(msg)
        else:
            msg = f"{g!r} is not a group of {info['groupby']!r}; the groups fit are {names}."
            raise ValueError(msg)
    return out


def resolve_key(adata: AnnData, key: str, group: str | None) -> str:
    """Return the key of one fit: ``key``, or the key of ``group`` of a grouped fit."""
    info = grouped_info(adata, key)
    if info is None:
        group_keys(adata, key, group)  # raises if a group was given
        return key
    if group is None or not isinstance(group, str):
        msg = (
            f"The fit under key {key!r} has one model per group of {info['groupby']!r}: pass "
            f"group= one of {[str(g) for g in info['groups']]}."
        )
        raise ValueError(msg)
    return group_keys(adata, key, group)[group]


def grouped_df(
    adata: AnnData,
    *,
    key: str,
    group: str | Sequence[str] | None,
    term: str | Sequence[str] | None,
    contrast: str | Sequence[str] | None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Tidy tables of the groups asked, concatenated, with a first column ``group``.

    Each group's table is :func:`scflashmm.get.flashmm_df` of its fit (Benjamini-Hochberg
    within each group and term). With ``group=None``, groups whose design has none of the
    asked terms (e.g. a factor level absent from the group) are left out.
    """
    from ._flashmm_df import flashmm_df

    keys = group_keys(adata, key, group)
    tables, errors = [], []
    for name, sub in keys.items():
        try:
            table = flashmm_df(adata, key=sub, term=term, contrast=contrast, **kwargs)
        except ValueError as exc:
            if group is not None:
                raise
            errors.append(f"{name!r}: {exc}")
            continue
        table.insert(0, "group", name)
        tables.append(table)
    if not tables:
        msg = f"No group has the terms asked. {'; '.join(errors)}"
        raise ValueError(msg)
    out = pd.concat(tables, ignore_index=True)
    out["group"] = pd.Categorical(out["group"], categories=list(keys))
    return out
