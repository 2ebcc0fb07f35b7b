"""SplitQ's registry entry: a setting of the transform engine with its own config and variants."""

from splitq_jax.methods.splitq.config import BIT_DEFAULTS, VARIANTS, SplitqConfig
from splitq_jax.methods.transform import TransformMethod

METHOD = TransformMethod("splitq", SplitqConfig, "FlatQuant + MOCD channel split + CWS/MAC branches",
                         bit_defaults=BIT_DEFAULTS)

__all__ = ["METHOD", "SplitqConfig", "VARIANTS"]
