"""Plots of the results of :func:`scflashmm.tl.flashmm_de` (matplotlib only).

Each function reads the results through :func:`scflashmm.get.flashmm_df` (or ``adata.varm``),
draws into ``ax`` or a new figure, and follows scanpy's ``show``/``save`` conventions:
``show=None`` means ``scanpy.settings.autoshow``, and the axes are returned unless the
figure was shown.
"""

from ._qq import qq
from ._variance_components import variance_components
from ._volcano import volcano

__all__ = ["qq", "variance_components", "volcano"]
