"""Options of GPTQ, GPTAQ and VLM-PTQ (each a frozen config: the shared quantization spec plus
only its own knobs; every field is a command-line flag of the same name).

Defaults follow the reference code where it exists (IST-DASLab ``gptq``, the official GPTAQ code):
blocks of 128 columns, damping 0.01 of the mean Hessian diagonal, act-order off, true-sequential
on, GPTAQ's ``alpha = 0.25`` with the quantized values in the outer-block update. VLM-PTQ has no
public code; its unknowns are fields with these defaults (see ``method.py``):

* ``shift_scale`` 0.25: the target shift ``C`` carries GPTAQ's ``alpha`` (as the same lab's ResComp
  code computes it);
* ``mu_grid`` ``0,0.2,0.4,0.6,0.8,1``: six candidates (the paper's "about six per layer");
* the 2-bit and 3-bit weight-only settings use groups of 128 columns (the paper's 2-bit rows are
  per-group; 3-bit per-channel there, but group 128 is the common W3A16 baseline setting).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitq_jax.config import ConfigError, check_number
from splitq_jax.methods.base import QuantSpec

# Weight-only 2- and 3-bit settings default to groups of 128 input columns.
BIT_DEFAULTS = {(3, None): {"w_group_size": 128}, (2, None): {"w_group_size": 128}}
OUTER_UPDATES = ("quantized", "original")


@dataclass(frozen=True, kw_only=True)
class GptqConfig(QuantSpec):
    """GPTQ: per linear, the columns rounded one by one with the OBS error update under the
    input Hessian of the quantized path."""

    method = "gptq"

    block_size: int = 128  # columns per lazy-update block
    damp: float = 0.01  # relative damping of the Hessian diagonal (grown tenfold on a failed Cholesky)
    act_order: bool = False  # columns in order of decreasing Hessian diagonal
    static_groups: bool = False  # weight groups fitted on the original weights (needed with act-order)
    clip_search: bool = False  # per-row (per-group) MSE search of the clipping range
    true_sequential: bool = True  # q/k/v, then o, then gate/up, then down, each on the quantized earlier ones
    block_inputs: str = "quantized"  # block inputs: the quantized path (GPTQ) or "fp"
    batch_size: int = 4  # calibration samples per statistics pass

    def validate(self) -> None:
        if self.w_bits is None:
            raise ConfigError(f"{self.method} rounds weights: give a weight bit width (--bits w4a16, w3a16, w4a8, ...)")
        check_number("block_size", self.block_size, lo=1, integer=True)
        check_number("damp", self.damp, lo=0.0, hi=1.0)
        check_number("batch_size", self.batch_size, lo=1, integer=True)
        if self.block_inputs not in ("quantized", "fp"):
            raise ConfigError(f"block_inputs (--block-inputs) must be 'quantized' or 'fp', got {self.block_inputs!r}")
        if self.act_order and self.w_group_size is not None and not self.static_groups:
            raise ConfigError("act_order with weight groups needs --static-groups (the stored format keeps groups "
                              "of consecutive input channels)")


@dataclass(frozen=True, kw_only=True)
class GptaqConfig(GptqConfig):
    """GPTAQ: GPTQ toward the full-precision output ``W X~`` from quantized inputs ``X``."""

    method = "gptaq"

    alpha: float = 0.25  # weight of the cross-term correction P
    outer_update: str = "quantized"  # values of a block in the update right of it: "quantized" (official) or "original"

    def validate(self) -> None:
        super().validate()
        check_number("alpha", self.alpha, lo=0.0)
        if self.outer_update not in OUTER_UPDATES:
            raise ConfigError(f"outer_update (--outer-update) must be one of {', '.join(OUTER_UPDATES)}, "
                              f"got {self.outer_update!r}")
        if self.block_inputs != "quantized":
            raise ConfigError(f"{self.method} pairs full-precision and quantized-path inputs: --block-inputs "
                              "must be 'quantized'")


@dataclass(frozen=True, kw_only=True)
class VlmPtqConfig(GptaqConfig):
    """VLM-PTQ: GPTAQ with the closed-form target shift and a modality-weighted grid per layer."""

    method = "vlm-ptq"

    shift_scale: float = 0.25  # factor of the target shift C (0: off)
    mu_grid: str = "0,0.2,0.4,0.6,0.8,1"  # candidate vision weights mu of the channel importance

    @property
    def mus(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.mu_grid.split(","))

    def validate(self) -> None:
        super().validate()
        check_number("shift_scale", self.shift_scale, lo=0.0)
        try:
            mus = self.mus
        except ValueError:
            raise ConfigError(f"mu_grid (--mu-grid) must be comma-separated numbers in [0, 1], got {self.mu_grid!r}") from None
        if not mus or any(not 0.0 <= m <= 1.0 for m in mus):
            raise ConfigError(f"mu_grid (--mu-grid) must be comma-separated numbers in [0, 1], got {self.mu_grid!r}")


TOKEN_SELECTIONS = ("top", "resample")


@dataclass(frozen=True, kw_only=True)
class TlqConfig(GptqConfig):
    """TLQ, reconstructed (its paper's method section is not public; ``peer-methods.md`` 6.2):
    per-token importance from the whole-model gradient pass, a token-level calibration set
    (``token_selection``: the ``token_fraction`` most important tokens of the whole corpus, or as
    many draws with probability proportional to importance), and GPTQ per linear in forward order
    on the quantized path with activations quantized, under the importance-weighted Hessian."""

    method = "tlq"

    token_fraction: float = 0.5  # share of the corpus's non-pad tokens in the token-level set
    token_selection: str = "top"  # "top": the most important; "resample": draws by importance

    def validate(self) -> None:
        super().validate()
        check_number("token_fraction", self.token_fraction, lo=0.0, hi=1.0)
        if self.token_fraction <= 0.0:
            raise ConfigError(f"token_fraction (--token-fraction) must be above 0, got {self.token_fraction}")
        if self.token_selection not in TOKEN_SELECTIONS:
            raise ConfigError(f"token_selection (--token-selection) must be one of {', '.join(TOKEN_SELECTIONS)}, "
                              f"got {self.token_selection!r}")
        if self.block_inputs != "quantized" or not self.true_sequential:
            raise ConfigError("tlq calibrates each linear on the quantized path (quantization-exposed): keep "
                              "--block-inputs quantized and --true-sequential")


__all__ = ["BIT_DEFAULTS", "GptaqConfig", "GptqConfig", "TOKEN_SELECTIONS", "TlqConfig", "VlmPtqConfig"]
