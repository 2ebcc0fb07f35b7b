"""TLQ, reconstructed: the documented reading of ``peer-methods.md`` section 6.2 (the paper's
method section and code are not public; every choice below is ours and is named as such).

1. **Token importance** (from the whole-model gradient pass shared with MBQ,
   :mod:`splitq_jax.calib.gradients`): token ``t``'s importance for layer ``l`` is
   ``g[t, l] = mean over o_proj, down_proj of mean_c |dL/dy[t, c]|`` of the answer loss.
2. **Token-level calibration set**: one set for the whole corpus, chosen on the importance summed
   over layers after scaling each layer's to mean 1 (so no layer dominates): ``top`` keeps the
   ``token_fraction`` most important non-pad tokens; ``resample`` draws as many tokens with
   probability proportional to importance (with replacement, ``seed``), a token counting as often
   as it is drawn.
3. **Quantization-exposed layer-wise calibration**: GPTQ per linear in forward order (q/k/v, o,
   gate/up, down), each on the inputs of the quantized path (earlier blocks quantized, earlier
   groups of the block quantized, activations quantized at ``a_bits``), under the weighted Hessian
   ``H = sum_t w_t x_t x_t^T`` with ``w_t`` = the layer's importance of token ``t`` (floored at its
   median over the set, scaled to mean 1 over the set) times its multiplicity in the set: the
   importance-weighted output error.

The block losses in the report are unweighted (every non-pad token), as for every method.
Multi-device: the statistics are sums over tokens (the sharding issue's data-parallel path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from splitq_jax.calib import gradients as gr
from splitq_jax.methods.base import ModelPass
from splitq_jax.methods.gptq.config import BIT_DEFAULTS, TlqConfig
from splitq_jax.methods.gptq.method import HessianMethod


def token_set(importance: np.ndarray, valid: np.ndarray, cfg: TlqConfig) -> np.ndarray:
    """``(S, N)`` multiplicity of each token in the token-level set, from ``importance (S, L, N)``."""
    per_layer = importance / np.maximum(importance.sum(axis=(0, 2), keepdims=True) / max(valid.sum(), 1), 1e-30)
    score = np.where(valid, per_layer.sum(axis=1), 0.0).reshape(-1)
    n = valid.sum()
    k = max(1, int(round(cfg.token_fraction * n)))
    count = np.zeros(score.shape, np.float32)
    if cfg.token_selection == "top":
        count[np.argsort(-score, kind="stable")[:k]] = 1.0
    else:
        p = score / score.sum() if score.sum() > 0 else valid.reshape(-1) / n
        np.add.at(count, np.random.default_rng(cfg.seed).choice(score.size, size=k, p=p), 1.0)
    return count.reshape(valid.shape)


def layer_weights(importance: np.ndarray, count: np.ndarray) -> list[np.ndarray]:
    """Per layer ``(S, N)``: importance floored at its median over the set (our choice, as MBQ
    floors its ratios: a token whose output cannot reach the loss in this layer, e.g. a vision
    token in the last layer, would otherwise drop out of the Hessian), scaled to mean 1 over the
    set, times multiplicity."""
    out = []
    inside = count > 0
    for layer in range(importance.shape[1]):
        g = importance[:, layer]
        g = np.maximum(g, np.median(g[inside])) if inside.any() else g
        mean = (g * count).sum() / max(count.sum(), 1e-30)
        out.append((count * g / max(mean, 1e-30)).astype(np.float32))
    return out


@dataclass(frozen=True)
class TokenWeightedHessianMethod(HessianMethod):
    """TLQ: see the module docstring."""

    def model_pass(self, model: Any, stream: Any, cfg: TlqConfig, *, work_dir: Any = None, resume: bool = False,
                   on_sample: Any = None) -> ModelPass:
        result = gr.cached_gradient_pass(model, stream, work_dir=work_dir, resume=resume, on_sample=on_sample)
        importance = gr.token_importance(result)
        valid = np.asarray(stream.modality) != 0
        count = token_set(importance, valid, cfg)
        weights = layer_weights(importance, count)
        record = {"kind": "gradients", "taps": list(result.taps), "mean_loss": float(result.losses.mean()),
                  "tokens_in_set": int(count.sum()), "distinct_tokens_in_set": int((count > 0).sum()),
                  "tokens": int(valid.sum()), "fallbacks": [result.fallback] if result.fallback else []}
        return ModelPass([{"weight": jnp.asarray(w)} for w in weights], record)


TLQ = TokenWeightedHessianMethod("tlq", TlqConfig, "reconstructed: gradient token importance, token-level set, "
                                 "quantization-exposed weighted GPTQ", bit_defaults=BIT_DEFAULTS,
                                 default_bits="w3a16")

__all__ = ["TLQ", "TokenWeightedHessianMethod", "layer_weights", "token_set"]
