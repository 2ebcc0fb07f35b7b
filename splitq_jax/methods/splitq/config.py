"""SplitQ's configuration: FlatQuant's transform and recipe, plus MOCD and the ACC branches.

Every [choice] point of ``shared/design/splitq-method.md`` is a field, so an ablation is a
``replace`` (or a flag) away. Component variants (the paper's ablation) are named presets.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitq_jax.config import MethodConfig
from splitq_jax.methods.flatquant import FlatQuantConfig


@dataclass(frozen=True, kw_only=True)
class SplitqConfig(FlatQuantConfig):
    """FlatQuant's fields, then MOCD's channel split (Eq. 4-14) and the CWS / MAC branches (Eq. 16-21)."""

    # channel split, MOCD
    selector: str = "mocd"  # "mocd", "none" (no split) or an ablation selector (mocd.SELECTORS)
    text_ratio: float = 0.02
    vision_ratio: float = 0.02
    n_clusters: int = 3  # K of Eq. 10
    instability: str = "kmeans"  # [choice] "kmeans" (Eq. 10) or "variance"
    empty_cluster: str = "farthest"  # k-means empty-cluster rule: "farthest" (sklearn) or "keep"
    kmeans_starts: int = 2  # k-means starts per channel, the lowest inertia kept
    outlier_init: str = "identity"  # [choice] P_t / P_v start: "identity" or "random"
    main_path: str = "masked"  # [choice] "masked" (full width, zeroed columns) or "gathered"
    mocd_o_proj: bool = False  # [choice] split o_proj's input too
    text_tokens: str = "non_vision"  # [choice] "non_vision" or "answer" tokens count as text
    # ACC branches
    cws: bool = True
    mac: bool = True
    cws_ratio: float = 0.02
    mac_ratio: float = 0.03
    mac_gate_init: float = 0.0  # [choice]
    learn_gates: bool = True  # False: frozen SVD branches (paper A.2 ablation)
    svd_of: str = "weight"  # [choice] SVD of W_m ("weight", Eq. 20) or of P0^-1 W_m ("transformed")

    method = "splitq"

    def engine_config(self) -> MethodConfig:
        return self._engine("splitq")


# W3A2 needs larger branch ranks (the paper's setting).
BIT_DEFAULTS = {(3, 2): {"cws_ratio": 0.03, "mac_ratio": 0.05}}

# SplitQ's components added to FlatQuant one at a time (the paper's component ablation).
VARIANTS = {
    "flatquant+mocd": {"cws": False, "mac": False},
    "flatquant+mocd+cws": {"mac": False},
}
