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

from splitq_jax.methods.base import Method, QuantSpec, option_names
from splitq_jax.methods.registry import (METHODS, VARIANTS, add_method_flags, calibrate_block, config_from_args,
                                         fold_block, get_config, get_method, method_name_from, method_of, names,
                                         option_owners, read_config_file)

__all__ = ["METHODS", "VARIANTS", "Method", "QuantSpec", "add_method_flags", "calibrate_block", "config_from_args",
           "fold_block", "get_config", "get_method", "method_name_from", "method_of", "names", "option_names",
           "option_owners", "read_config_file"]
