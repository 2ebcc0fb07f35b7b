"""Quantization methods, one module each, behind one registry.

    from splitq_jax.methods import get_config, get_method, METHODS
    cfg = get_config("flatquant", "w4a4", epochs=3)     # a frozen FlatQuantConfig
    cfg.engine_config()                                 # what the calibration engine runs

``METHODS``: name -> :class:`~splitq_jax.methods.base.Method`; ``VARIANTS``: named presets of a
method (``flatquant+mocd``). :mod:`~splitq_jax.methods.base` holds the shared pieces,
:mod:`~splitq_jax.methods.registry` the listing and the command-line front end.
"""

from splitq_jax.methods.base import Method, QuantSpec, option_names
from splitq_jax.methods.registry import (METHODS, VARIANTS, add_method_flags, config_from_args, get_config,
                                         get_method, method_name_from, names, option_owners, read_config_file)

__all__ = ["METHODS", "VARIANTS", "Method", "QuantSpec", "add_method_flags", "config_from_args", "get_config",
           "get_method", "method_name_from", "names", "option_names", "option_owners", "read_config_file"]
