"""The method-agnostic calibration engine: statistics of group inputs and the statistics pass.

* :mod:`splitq_jax.calib.collectors`: streaming, bounded-memory statistics of a group input
  (absmax / mean-abs, input Hessian, FP-vs-quantized cross term, per-modality diagonals).
* :mod:`splitq_jax.calib.stats`: one block's statistics pass (captures -> collectors, MOCD).

The per-block trainer of the transform methods is :mod:`splitq_jax.calibrate`; the whole-model
block stream is :mod:`splitq_jax.pipeline`.
"""
