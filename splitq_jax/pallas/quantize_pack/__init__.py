"""Activation quantize-and-pack (``quant.quantize`` + ``packing.pack_quantized``) in Pallas."""

from splitq_jax.pallas.quantize_pack.api import quantize_pack
from splitq_jax.pallas.quantize_pack.kernel import quantize_pack_pallas
from splitq_jax.pallas.quantize_pack.reference import quantize_pack_xla

__all__ = ["quantize_pack", "quantize_pack_pallas", "quantize_pack_xla"]
