"""Flax NNX ports of the vision-language models the project quantizes.

``layers`` holds the shared decoder building blocks; one module per model family.
"""
