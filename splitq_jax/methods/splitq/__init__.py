"""SplitQ: modality-decoupled outlier channels (MOCD) with their own transforms, plus learned
low-rank branches (CWS on the weights, MAC on text tokens), on FlatQuant's transform and recipe.

* :mod:`~splitq_jax.methods.splitq.mocd`: MOCD's channel selection (Eq. 4-12) and its streamed
  statistics;
* :mod:`~splitq_jax.methods.splitq.split_linear`: the split group and its CWS / MAC branches
  (Eq. 6, 13-21), the transform engine's group (FlatQuant is the setting without split and
  branches, RTN and SmoothQuant settings without learned parts);
* :mod:`~splitq_jax.methods.splitq.config`: the method's options and named component variants;
* :mod:`~splitq_jax.methods.splitq.method`: its registry entry.

Names are imported on first use (PEP 562): the transform engine imports ``split_linear`` from
here, and the registry entry imports the engine, so an eager package would be a cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"METHOD": "method", "SplitqConfig": "config", "VARIANTS": "config", "BIT_DEFAULTS": "config"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
