"""Quantization methods, one module each, behind one registry.

    from splitq_jax.methods import get_config, get_method, METHODS
    cfg = get_config("flatquant", "w4a4", epochs=3)     # a frozen FlatQuantConfig
    cfg.engine_config()                                 # what the calibration engine runs

``METHODS``: name -> :class:`~splitq_jax.methods.base.Method`; ``VARIANTS``: named presets of a
method (``flatquant+mocd``). See :mod:`splitq_jax.methods.base` for the shared pieces.
"""

# Registration order is the listing order (CLI choices, error messages): simplest method first.
from splitq_jax.methods import rtn, smoothquant, flatquant, splitq  # noqa: F401,I001
from splitq_jax.methods.base import (METHODS, VARIANTS, Method, QuantSpec, add_method_flags, config_from_args,
                                     get_config, get_method, method_name_from, names, read_config_file)

__all__ = ["METHODS", "VARIANTS", "Method", "QuantSpec", "add_method_flags", "config_from_args", "get_config",
           "get_method", "method_name_from", "names", "read_config_file"]
