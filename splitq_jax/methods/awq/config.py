"""Options of AWQ (a frozen config: the shared quantization spec plus only AWQ's own knobs; every
field is a command-line flag of the same name).

Defaults follow the reference code (``llm-awq``): weight-only W4 with groups of 128 columns and
asymmetric weights, a 20-point grid of ``alpha`` (0, 0.05, ..., 0.95), the clip search on (10
shrink ratios 1.00 ... 0.55 on 512 sub-sampled tokens, every linear but q/k), the inspected
module's mean squared error, next blocks on full-precision inputs. With activations quantized
(``--bits w4a8``) the weights default to one symmetric scale per output channel and activations
are quantized per token, symmetric (MBQ's W-A setting).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitq_jax.config import ConfigError, check_number
from splitq_jax.methods.base import QuantSpec

SEARCH_LOSSES = ("mse", "mae")
BLOCK_INPUTS = ("fp", "quantized")
# With activations quantized: per-channel symmetric weights (the runtime's per-token activations).
WA_DEFAULTS = {"w_symmetric": True, "w_group_size": None}


@dataclass(frozen=True, kw_only=True)
class AwqConfig(QuantSpec):
    """AWQ: per scale group a diagonal scale ``s = mean|x|^alpha`` (normalised by ``sqrt(max s *
    min s)``) searched on a grid, folded into the norm or linear that produces the group's input;
    then a per-(row, group) clipping ratio searched on sub-sampled tokens; then round to nearest."""

    method = "awq"

    w_symmetric: bool = False
    w_group_size: int | None = 128
    n_grid: int = 20  # alpha in {0, 1/n_grid, ..., (n_grid - 1)/n_grid}
    duo_scaling: bool = False  # AutoAWQ's s = mean|x|^alpha / mean|w~|^(1 - alpha)
    search_loss: str = "mse"  # error of the inspected module's output: "mse" or "mae"
    clip_search: bool = True  # per-(row, group) shrink of the weight range, all linears but q/k
    max_shrink: float = 0.5  # clip ratios 1 - i/n_grid for i < max_shrink * n_grid
    clip_tokens: int = 512  # tokens (evenly strided) the clip search scores on
    block_inputs: str = "fp"  # "fp" (AWQ) or "quantized": inputs from the quantized path (MBQ's distort)
    batch_size: int = 4  # calibration samples per search pass (the grid is one vmap inside it)

    def validate(self) -> None:
        if self.w_bits is None:
            raise ConfigError(f"{self.method} scales weights before rounding them: give a weight bit width "
                              "(--bits w4a16, w3a16, w4a8, ...)")
        check_number("n_grid", self.n_grid, lo=1, integer=True)
        check_number("max_shrink", self.max_shrink, lo=0.0, hi=1.0)
        check_number("clip_tokens", self.clip_tokens, lo=1, integer=True)
        check_number("batch_size", self.batch_size, lo=1, integer=True)
        if self.search_loss not in SEARCH_LOSSES:
            raise ConfigError(f"search_loss (--search-loss) must be one of {', '.join(SEARCH_LOSSES)}, "
                              f"got {self.search_loss!r}")
        if self.block_inputs not in BLOCK_INPUTS:
            raise ConfigError(f"block_inputs (--block-inputs) must be 'fp' or 'quantized', got {self.block_inputs!r}")

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(i / self.n_grid for i in range(self.n_grid))

    @property
    def clip_ratios(self) -> tuple[float, ...]:
        """Shrink ratios of the clip search, 1.0 first (so no clipping wins ties)."""
        return tuple(1.0 - i / self.n_grid for i in range(max(1, int(round(self.max_shrink * self.n_grid)))))




@dataclass(frozen=True, kw_only=True)
class MbqConfig(AwqConfig):
    """MBQ: AWQ's scale search with a modality-balanced loss: answer tokens weigh 1, vision tokens
    the layer's ratio ``mean|dL/dy| vision / mean|dL/dy| answer`` from a whole-model gradient pass
    (floored at the median over layers), other tokens 0. Defaults from MBQ's configs: W3A16 g128
    asymmetric, MAE, no clip search."""

    method = "mbq"

    search_loss: str = "mae"
    clip_search: bool = False
    reweight: bool = True  # modality-balanced token weights (False: AWQ's uniform weights)


__all__ = ["AwqConfig", "BLOCK_INPUTS", "MbqConfig", "SEARCH_LOSSES", "WA_DEFAULTS"]
