"""Writing checkpoints in formats other tools load (compressed-tensors for transformers and vLLM)."""
