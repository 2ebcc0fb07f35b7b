"""The activation stage of a split linear group in one Pallas kernel: main-path mask or gather,
Kronecker transform and quantization, outlier gathers with their transforms, and the CWS / MAC
down-projections with their re-quantization: every operand of the split GEMMs."""

from splitq_jax.pallas.act_pack.api import act_pack, kernel_path
from splitq_jax.pallas.act_pack.kernel import act_pack_pallas
from splitq_jax.pallas.act_pack.reference import ActPacked, OutlierGroup, act_pack_xla

__all__ = ["ActPacked", "OutlierGroup", "act_pack", "act_pack_pallas", "act_pack_xla",
           "kernel_path"]
