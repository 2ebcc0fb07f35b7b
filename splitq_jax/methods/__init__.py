"""Quantization methods, one module each, behind one registry.

    from splitq_jax.methods import get_config, get_method, METHODS
    cfg = get_config("flatquant", "w4a4", epochs=3)     # a frozen FlatQuantConfig
    cfg.engine_config()                                 # what the transform engine runs
    result = calibrate_block(params, data, cfg, bcfg)   # the method's per-block step
    folded = fold_block(result, cfg, bcfg)              # the stored, method-agnostic format

``METHODS``: name -> :class:`~splitq_jax.methods.base.Method`; ``VARIANTS``: named presets of a
method (``flatquant+mocd``). :mod:`~splitq_jax.methods.base` holds the shared pieces,
:mod:`~splitq_jax.methods.registry` the listing and the command-line front end.
"""

from __future__ import annotations

import importlib
from typing import Any

_BASE = ("Method", "QuantSpec", "option_names")
_REGISTRY = ("METHODS", "VARIANTS", "add_method_flags", "calibrate_block", "config_from_args", "fold_block",
             "get_config", "get_method", "method_name_from", "method_of", "names", "option_owners",
             "read_config_file")

__all__ = sorted(_BASE + _REGISTRY)


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562): the transform engine imports modules of this package
    # (methods.splitq.split_linear), and the registry imports the engine.
    if name in _BASE or name in _REGISTRY:
        module = "splitq_jax.methods." + ("base" if name in _BASE else "registry")
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'splitq_jax.methods' has no attribute {name!r}")
