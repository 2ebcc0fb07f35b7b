"""The deliverable, which knows no method: the folded block format and what runs it.

* :mod:`~splitq_jax.quantized.schema`: :class:`InferenceSpec` (all that inference reads) and the
  folded block schema with its validator;
* :mod:`~splitq_jax.quantized.fold`: the one canonical fold every method goes through (pack the
  weights, fold diagonals into norms, drop identity transforms) and the fake-quant folded forward;
* :mod:`~splitq_jax.quantized.codec`: folded trees <-> flat arrays plus a JSON structure;
* :mod:`~splitq_jax.quantized.export`: atomic, checksummed checkpoints (orbax arrays + manifest)
  and per-block resume points;
* :mod:`~splitq_jax.quantized.qlinear`: the integer XLA path of a folded group.

Nothing here imports a method, the calibration engine or optax.
"""
