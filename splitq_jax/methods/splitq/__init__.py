"""SplitQ: modality-decoupled outlier channels (MOCD) with their own transforms, plus learned
low-rank branches (CWS on the weights, MAC on text tokens), on FlatQuant's transform and recipe.

The numeric parts live in :mod:`splitq_jax.mocd` (channel selection) and
:mod:`splitq_jax.split_linear` (the split group and its branches); this package holds the method's
configuration and its named component variants.
"""

from splitq_jax.methods.transform import TransformMethod
from splitq_jax.methods.splitq.config import BIT_DEFAULTS, VARIANTS, SplitqConfig

METHOD = TransformMethod("splitq", SplitqConfig, "FlatQuant + MOCD channel split + CWS/MAC branches", bit_defaults=BIT_DEFAULTS)

__all__ = ["METHOD", "SplitqConfig", "VARIANTS"]
