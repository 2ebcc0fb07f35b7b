"""The packed split GEMM: int8 or packed 4-bit-lane activations x packed low-bit weights, with the
outlier-group and low-rank branch products, the dequantizing epilogue and the bias in one Pallas
kernel."""

from splitq_jax.pallas.split_gemm.api import split_gemm
from splitq_jax.pallas.split_gemm.kernel import split_gemm_pallas
from splitq_jax.pallas.split_gemm.operands import (
    LANE_BITS,
    GemmWeight,
    QuantizedActs,
    act_lane_bits,
    folded_weights,
    gemm_weight,
    pack_acts,
    quantize_acts,
    quantized_acts,
)
from splitq_jax.pallas.split_gemm.reference import split_gemm_xla

__all__ = [
    "LANE_BITS",
    "GemmWeight",
    "QuantizedActs",
    "folded_weights",
    "act_lane_bits",
    "gemm_weight",
    "pack_acts",
    "quantize_acts",
    "quantized_acts",
    "split_gemm",
    "split_gemm_pallas",
    "split_gemm_xla",
]
