"""What running a quantized checkpoint needs to know, and nothing about how it was made.

:class:`InferenceSpec` is the only setting the inference path (``runtime``, ``qlinear``, the
folded block forward) reads. A checkpoint's manifest stores it under ``"inference"``, apart from
the method's configuration (provenance), so a checkpoint written by a method this version does not
know still loads and runs as long as its folded blocks use the stored format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from splitq_jax.modality import TEXT_TOKENS
from splitq_jax.quant import check_bits

MAIN_PATHS = ("masked", "gathered")


@dataclass(frozen=True, kw_only=True)
class InferenceSpec:
    """Bit widths of weights and activations (None: float), their symmetry, how the main group's
    input is formed (``main_path``: full width with outlier columns zeroed, or gathered) and which
    tokens count as text for text-only branches (``text_tokens``)."""

    w_bits: int | None
    a_bits: int | None
    w_symmetric: bool = True
    a_symmetric: bool = True
    main_path: str = "masked"
    text_tokens: str = "non_vision"

    def __post_init__(self) -> None:
        check_bits(self.w_bits)
        check_bits(self.a_bits)
        if self.main_path not in MAIN_PATHS:
            raise ValueError(f"unknown main_path {self.main_path!r}: choose one of {', '.join(MAIN_PATHS)}")
        if self.text_tokens not in TEXT_TOKENS:
            raise ValueError(f"unknown text_tokens {self.text_tokens!r}: choose one of {', '.join(TEXT_TOKENS)}")

    @property
    def bits(self) -> str:
        return f"w{self.w_bits or 16}a{self.a_bits or 16}"

    @classmethod
    def of(cls, cfg: Any) -> "InferenceSpec":
        """The spec of any configuration carrying these fields (an engine or method config)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InferenceSpec":
        """From a manifest's ``"inference"`` entry, or from an older manifest's method config (its
        other keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
