"""Flax NNX ports of the vision-language models the project quantizes.

``ops`` holds the shared transformer math, ``layers`` the NNX decoder modules (whose block body is
``splitq_jax.block``'s), ``decode`` the one greedy decode loop and ``family`` the registry of what
differs between the families; then one module per model family.
"""
