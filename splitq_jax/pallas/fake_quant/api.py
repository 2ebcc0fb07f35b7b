"""Public fake-quant op: ``implementation=None | "xla" | "pallas"``, differentiable either way."""

from __future__ import annotations

import functools

import jax

from splitq_jax.pallas import _common as C
from splitq_jax.pallas.fake_quant.kernel import fake_quant_pallas
from splitq_jax.pallas.fake_quant.reference import fake_quant_xla
from splitq_jax.quant import check_bits


def _reference(x, clip, bits, symmetric):
    return fake_quant_xla(x, bits, symmetric=symmetric, clip=clip)


def _kernel(x, clip, bits, symmetric, block_rows, interpret):
    rows = x.shape[:-1]
    sig_max, sig_min = C.clip_factors(clip, rows)
    y = fake_quant_pallas(
        x.reshape(-1, x.shape[-1]),
        sig_max,
        sig_min,
        bits=bits,
        symmetric=symmetric,
        block_rows=block_rows,
        interpret=interpret,
    )
    return y.reshape(x.shape)


# Forward: the kernel. Backward: the VJP of the XLA reference (STE w.r.t. x, exact gradient w.r.t.
# the clipping logits through the un-detached scale), recomputed from the saved inputs.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _fake_quant_pallas_diff(x, clip, bits, symmetric, block_rows, interpret):
    return _kernel(x, clip, bits, symmetric, block_rows, interpret)


def _fwd(x, clip, bits, symmetric, block_rows, interpret):
    return _kernel(x, clip, bits, symmetric, block_rows, interpret), (x, clip)


def _bwd(bits, symmetric, block_rows, interpret, res, g):
    x, clip = res
    _, vjp = jax.vjp(lambda x_, c_: _reference(x_, c_, bits, symmetric), x, clip)
    return vjp(g)


_fake_quant_pallas_diff.defvjp(_fwd, _bwd)


@functools.partial(jax.jit, static_argnames=("bits", "symmetric", "block_rows", "interpret"))
def _fake_quant_pallas_jit(x, clip, *, bits, symmetric, block_rows, interpret):
    return _fake_quant_pallas_diff(x, clip, bits, symmetric, block_rows, interpret)


def fake_quant(
    x: jax.Array,
    bits: int | None,
    *,
    symmetric: bool = True,
    clip: dict[str, jax.Array] | None = None,
    group_size: int | None = None,
    implementation: str | None = None,
    block_rows: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-row fake quantization (quantize-dequantize along the last axis), equal to
    :func:`splitq_jax.quant.fake_quant` in value and gradient.

    Args:
      x: ``(..., d)`` float32 / bfloat16 / float16; one set of statistics per leading index.
      bits: 2..8, or None (identity).
      symmetric, clip, group_size: as in :func:`splitq_jax.quant.fake_quant`; the kernel takes
        per-row or scalar clipping logits, and ``group_size`` always runs the XLA reference.
      implementation: ``"pallas"`` (kernel), ``"xla"`` (reference) or None: Pallas on GPU, XLA
        elsewhere.
      block_rows: rows per kernel program (power of two), None for the default.
      interpret: Pallas interpreter; default on when not running on a GPU.
    """
    check_bits(bits)
    impl = C.resolve_implementation(implementation)
    if bits is None:
        return x
    if impl == "xla" or group_size is not None or x.size == 0:
        return fake_quant_xla(x, bits, symmetric=symmetric, clip=clip, group_size=group_size)
    if block_rows is not None:
        C.check_block_rows(block_rows)
    return _fake_quant_pallas_jit(
        x,
        clip,
        bits=bits,
        symmetric=bool(symmetric),
        block_rows=block_rows,
        interpret=C.resolve_interpret(interpret),
    )
