"""MBQ on the scale search: the whole-model gradient pass before block 0, and per block the
token weights of the search loss.

* The pass (:func:`splitq_jax.calib.gradients.gradient_pass`, taps ``o_proj`` and ``down_proj``)
  gives per layer ``r = mean|dL/dy| over vision tokens / over answer tokens`` (per-sample means
  averaged over samples), floored at the median over layers: ``o_proj``'s for the attention
  groups, ``down_proj``'s for the MLP groups. It is saved as ``gradients.npz`` in the run's work
  directory before block 0 starts and reused by ``--resume``.
* The search loss weighs answer tokens 1, vision tokens ``rho``, every other token 0 (``mae``:
  MBQ's pooled sum; ``mse``: MBQ's per-modality means, ``1 / K_a`` and ``rho / K_v``). "Answer
  tokens" are the positions that predict an answer token
  (:func:`splitq_jax.calib.gradients.answer_mask`: MBQ's own mask, one position later, carries no
  gradient at all with one-token answers).
* Fallbacks, recorded in the manifest's ``model_pass``: data without answer tokens (plain text)
  takes every text token as an answer (the language-model loss); data without vision tokens has
  no vision weight to set (MBQ is then AWQ with the answer-weighted loss). The vision tower's own
  blocks (``--quantize-vision``) use AWQ's uniform weights: MBQ defines its weights for the
  language model only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from splitq_jax import calibrate as cal
from splitq_jax.calib import gradients as gr
from splitq_jax.calib.stats import token_weight
from splitq_jax.methods.awq import search
from splitq_jax.methods.awq.config import MbqConfig
from splitq_jax.methods.awq.method import ScaleSearchMethod
from splitq_jax.methods.base import ModelPass
from splitq_jax.modality import VISION

ATTENTION_GROUPS = ("attn_in", "attn_out")


@dataclass(frozen=True)
class BalancedScaleMethod(ScaleSearchMethod):
    """MBQ: see the module docstring."""

    def model_pass(self, model: Any, stream: Any, cfg: MbqConfig, *, work_dir: Any = None, resume: bool = False,
                   on_sample: Any = None) -> ModelPass | None:
        if not cfg.reweight:
            return None
        result = gr.cached_gradient_pass(model, stream, work_dir=work_dir, resume=resume, on_sample=on_sample)
        ratios, no_vision = gr.modality_ratios(result, np.asarray(stream.modality))
        attn, mlp = ratios[:, result.taps.index("o_proj")], ratios[:, result.taps.index("down_proj")]
        answer = jnp.asarray(result.answer)
        contexts = [{"attn": float(a), "mlp": float(m), "answer": answer} for a, m in zip(attn, mlp)]
        record = {"kind": "gradients", "taps": list(result.taps), "attention_ratio": attn.tolist(),
                  "mlp_ratio": mlp.tolist(), "mean_loss": float(result.losses.mean()),
                  "fallbacks": [f for f in (result.fallback, no_vision) if f]}
        return ModelPass(contexts, record)

    def token_weights(self, data: cal.BlockData, cfg: MbqConfig, sg: search.ScaleGroup, context: Any = None):
        if context is None:
            return token_weight(data)
        rho = context["attn"] if sg.group in ATTENTION_GROUPS else context["mlp"]
        answer = jnp.asarray(context["answer"], jnp.float32)
        vision = (jnp.asarray(data.modality) == VISION).astype(jnp.float32)
        if cfg.search_loss == "mse":  # per-modality means
            return answer / jnp.maximum(jnp.sum(answer), 1.0) + rho * vision / jnp.maximum(jnp.sum(vision), 1.0)
        return answer + rho * vision


MBQ = BalancedScaleMethod("mbq", MbqConfig, "AWQ's scale search weighted by modality from whole-model gradients",
                          default_bits="w3a16")

__all__ = ["BalancedScaleMethod", "MBQ"]
