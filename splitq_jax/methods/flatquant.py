"""FlatQuant: a learned Kronecker transform and clipping per linear-group input.

``X P`` with ``P = diag(c) (P1 kron P2)`` and ``P^-1 W^T`` replace ``X`` and ``W^T`` (Sun et al.,
2024); ``P1``, ``P2``, ``c`` and the clipping logits of weights and activations are trained per
block to match the full-precision block output (AdamW, cosine schedule, normalised MSE). The
transform's diagonal folds into the preceding norm; the Kronecker factors stay online.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitq_jax.config import MethodConfig
from splitq_jax.methods.transform import TransformMethod, TransformSpec


@dataclass(frozen=True, kw_only=True)
class FlatQuantConfig(TransformSpec):
    """The transform, its start and what is learned, and the per-block training recipe."""

    # transform (spec Eq. 2, 15)
    rotation_init: str = "random"  # "random" orthogonal factors or "identity"
    diag_init: str = "smooth"  # "smooth" (SmoothQuant-style c) or "ones"
    smooth_alpha: float = 0.3
    learn_transform: bool = True  # train P1, P2
    learn_diag: bool = True  # train c
    learn_clip: bool = True  # train weight / activation clipping logits
    # per-block training
    epochs: int = 15
    batch_size: int = 4
    lr: float = 5e-3  # transforms, scales, gates
    clip_lr: float = 5e-2  # clipping logits
    weight_decay: float = 0.01
    final_lr_ratio: float = 1e-3
    normalize_loss: bool = True  # loss / stop_gradient(loss)
    loss_text_weight: float = 1.0  # per-token modality weights of the block MSE
    loss_vision_weight: float = 1.0
    block_inputs: str = "fp"  # "fp" or "quantized" outputs of the previous block
    weight_solver: str = "rtn"  # main weights rounded to nearest, or by "gptq" (methods/gptq/backend.py)

    method = "flatquant"

    def engine_config(self) -> MethodConfig:
        return self._engine("flatquant")


METHOD = TransformMethod("flatquant", FlatQuantConfig, "learned Kronecker transform + clipping")
