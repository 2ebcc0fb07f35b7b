"""Per-row fake quantization (``splitq_jax.quant.fake_quant``) as a Pallas kernel."""

from splitq_jax.pallas.fake_quant.api import fake_quant
from splitq_jax.pallas.fake_quant.kernel import fake_quant_pallas
from splitq_jax.pallas.fake_quant.reference import fake_quant_xla

__all__ = ["fake_quant", "fake_quant_pallas", "fake_quant_xla"]
