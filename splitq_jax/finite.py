"""Finiteness checks: no NaN or infinity ever reaches a saved block or checkpoint.

A diverged calibration (a learning rate far too high), an overflowing model or bad calibration
data can all leave NaNs in a block's state while the run itself goes on; these checks stop the run
at the first such tree and name where the value sits.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from splitq_jax.errors import NonFiniteError


def path_str(path) -> str:
    """``(DictKey('attn_in'), GetAttrKey('scale'))`` -> ``"attn_in/scale"``."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return "/".join(parts)


def first_nonfinite(tree: Any) -> str | None:
    """The path (``"group/leaf/..."``) of the first floating leaf of ``tree`` holding a NaN or an
    infinity, or None when every floating leaf is finite. Integer leaves are always finite."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if leaf is None or not hasattr(leaf, "dtype"):
            continue
        if not np.issubdtype(np.dtype(leaf.dtype), np.inexact):
            continue
        if not bool(np.isfinite(np.asarray(leaf)).all()):
            return path_str(path)
    return None


def check_finite(tree: Any, what: str, cause: str = "") -> None:
    """Raise :class:`NonFiniteError` naming ``what``, the offending leaf's path and ``cause``."""
    where = first_nonfinite(tree)
    if where is not None:
        raise NonFiniteError(f"{what} holds non-finite values (at {where}); "
                             + (cause or "nothing was saved"))
