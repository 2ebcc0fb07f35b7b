"""GPTQ, GPTAQ and VLM-PTQ: the Hessian-based weight methods.

* :mod:`~splitq_jax.methods.gptq.solver`: the numeric core on one linear (grid, damped inverse
  Cholesky, the column loop with GPTAQ's and VLM-PTQ's terms);
* :mod:`~splitq_jax.methods.gptq.config`: the three methods' options;
* :mod:`~splitq_jax.methods.gptq.method`: statistics per group input, the solve per linear, the fold.
"""
