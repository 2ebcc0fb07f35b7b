"""The gradient pass against torch autograd of the HF transformers model: ``dL/dy`` at a linear's
output, by a forward hook that keeps that output's gradient, for the loss written here from the
HF logits (mean cross-entropy of the answer tokens, position t predicting token t + 1)."""

import numpy as np
import torch

from splitq_jax import pipeline
from splitq_jax.calib import gradients as gr

TAPS = ("v_proj", "o_proj", "down_proj")


def torch_answer_loss(logits: torch.Tensor, ids: np.ndarray, answer: np.ndarray) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, torch.tensor(ids[:, 1:, None], dtype=torch.int64))[..., 0]
    w = torch.tensor(answer[:, 1:], dtype=torch.float32)
    return (nll * w).sum() / w.sum()


def hf_tap_gradients(hf, layers, hf_kwargs: dict, ids: np.ndarray, answer: np.ndarray) -> dict:
    """``{(layer, tap): dL/dy (N, o)}`` from torch autograd, for every layer of ``layers`` (the HF
    decoder layers) and tap of :data:`TAPS`."""
    kept, hooks = {}, []
    for i, layer in enumerate(layers):
        mods = {"v_proj": layer.self_attn.v_proj, "o_proj": layer.self_attn.o_proj, "down_proj": layer.mlp.down_proj}
        for t, m in mods.items():
            def hook(_m, _inp, out, key=(i, t)):
                out.retain_grad()
                kept[key] = out
            hooks.append(m.register_forward_hook(hook))
    try:
        hf.zero_grad()
        logits = hf(**hf_kwargs).logits
        torch_answer_loss(logits, ids, answer).backward()
    finally:
        for h in hooks:
            h.remove()
    return {k: v.grad[0].numpy() for k, v in kept.items()}


def assert_gradients_match(model, family: str, batch: dict, hf, layers, hf_kwargs: dict, rtol: float = 1e-5):
    """Our pass (full gradients) on ``batch`` equals torch's at every tap of every layer to
    ``rtol`` of the largest magnitude, and the reduced pass is ``mean_c |dL/dy|`` of it."""
    stream = pipeline.embed_batches(model, [batch], family)
    ids, answer = np.asarray(batch["input_ids"]), np.asarray(batch["modality"]) == 3
    want = hf_tap_gradients(hf, layers, hf_kwargs, ids, answer)
    got = gr.gradient_pass(model, stream, taps=TAPS, full=True)
    reduced = gr.gradient_pass(model, stream, taps=TAPS)
    for (i, t), w in want.items():
        g = got[(0, i, t)]
        scale = np.abs(w).max()
        assert scale > 0
        assert np.abs(g - w).max() <= rtol * scale, (i, t, np.abs(g - w).max() / scale)
        np.testing.assert_allclose(reduced.magnitudes[0, i, TAPS.index(t)], np.abs(g).mean(-1), rtol=1e-5, atol=1e-12)
    return reduced
