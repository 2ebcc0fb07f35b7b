"""Pallas kernels (Triton backend on GPU, interpreter on CPU), one folder per op.

Each op has a public function with ``implementation=None | "xla" | "pallas"`` (None: Pallas on
GPU, XLA elsewhere), a plain XLA reference with the same semantics, and the kernel.
"""

from splitq_jax.pallas.act_pack import act_pack
from splitq_jax.pallas.fake_quant import fake_quant
from splitq_jax.pallas.quantize_pack import quantize_pack
from splitq_jax.pallas.split_gemm import split_gemm

__all__ = ["act_pack", "fake_quant", "quantize_pack", "split_gemm"]
