"""Helpers shared by the kernel tests (``tests/pallas``) and benchmarks: test data and the CUDA
lowering check that runs on a CPU-only machine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Custom-call target of a Pallas kernel lowered with the Triton backend.
TRITON_CALL = "__gpu$xla.gpu.triton"


def export_cuda(f, *avals) -> jax.export.Exported:
    """Lower ``jax.jit(f)`` for CUDA on any machine (a CPU-only jaxlib suffices).

    Each Pallas kernel becomes a ``__gpu$xla.gpu.triton`` custom call carrying the kernel's Triton
    IR; producing it runs the whole Pallas -> Triton lowering, so kernels that only interpret mode
    accepts (``jnp.round``, non-power-of-two tiles, value slicing, ...) fail here. The Triton call
    has no export compatibility guarantee, hence the disabled safety check. What is *not* checked:
    Triton's own TTIR -> PTX compilation, which XLA runs when the module is compiled on a GPU.
    """
    return jax.export.export(
        jax.jit(f),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*avals)


def triton_ir(f, *avals) -> list[str]:
    """Textual Triton IR (TTIR) of every Pallas kernel in ``jax.jit(f)`` lowered for CUDA.

    Works on a CPU-only machine. Feed a module to Triton's own compiler to go on to PTX/cubin
    offline, e.g. ``triton.compile(path_to_ttir_file, target=GPUTarget("cuda", 90, 32))``.
    Hooks a private JAX function (``jax._src.pallas.triton``), so it may need updating with JAX.
    """
    from jax._src.pallas.triton import pallas_call_registration as reg

    modules: list[str] = []
    original = reg.lowering.lower_jaxpr_to_triton_module

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = spy
    try:
        export_cuda(f, *avals)
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = original
    return modules


def random_rows(rows: tuple[int, ...], d: int, seed: int = 0, dtype=jnp.float32):
    """Heavy-tailed activations-like data ``rows + (d,)`` (numpy RNG: no per-shape jit) and the
    generator, for further draws."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3.0, (*rows, d)) * 2.0 + 0.3  # offset: asymmetric rows are not centred
    return jnp.asarray(x, jnp.float32).astype(dtype), rng


def random_clip(kind: str | None, rows: tuple[int, ...], rng: np.random.Generator):
    """Clipping logits: None, ``"scalar"`` (activations) or ``"row"`` (one pair per row); drawn
    from well below ``CLIP_INIT`` up to it, so clipping is active on some rows."""
    if kind is None:
        return None
    shape = () if kind == "scalar" else rows
    return {k: jnp.asarray(rng.uniform(-1.0, 5.0, shape), jnp.float32) for k in ("max", "min")}


def tie_rows() -> tuple[jax.Array, jax.Array]:
    """``(1, 16)`` rows whose ``x / scale`` lands exactly on .5 ties, for 4-bit quantizers.

    Symmetric: amax 7, scale ``7 * fl(1/7) == 1.0``. Asymmetric: range 15, scale
    ``15 * fl(1/15) == 1.0`` and zero point ``round(7.5) == 8`` (a tie itself).
    """
    sym = [7, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 4.5, -6.5, 0, -0.0, 5.5, -7, 6.5]
    asym = [7.5, -7.5, 0.5, 1.5, -0.5, -1.5, 2.5, -2.5, 6.5, -6.5, 3.5, 4.5, 0, 1, -1, 5.5]
    return jnp.asarray([sym], jnp.float32), jnp.asarray([asym], jnp.float32)


def time_fn(f, *args, warmup: int = 2, iters: int = 20) -> float:
    """Median wall time of ``f(*args)`` in microseconds (compiled first, results awaited)."""
    import time

    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def extreme_rows(d: int, seed: int = 0) -> jax.Array:
    """``(8, d)`` float32 rows at the edges of the quantizer's range (see :mod:`splitq_jax.quant`):
    an ordinary row, the same row times ``2^-110`` (tiny) and ``2^120`` (huge, spans beyond the
    float range), rows at +-the float32 maximum, an all-zero row, a row below the scale floor with
    denormals, and a row of ``1e-12`` values."""
    rng = np.random.default_rng(seed)
    base = np.clip(rng.standard_t(3.0, d) * 2.0 + 0.3, -60.0, 60.0).astype(np.float32)
    big = float(np.finfo(np.float32).max)
    rows = np.zeros((8, d), np.float32)
    rows[0] = base
    rows[1] = base * np.float32(2.0**-110)
    rows[2] = base * np.float32(2.0**120)
    rows[3] = np.where(np.arange(d) % 2 == 0, big, -big)
    rows[3, 1::3] = big / 3
    # rows[4]: all zero
    rows[5] = np.resize(np.array([2.2e-38, -1.9e-38, 1e-40, -1e-45, 0.0], np.float32), d)
    rows[6] = rng.uniform(-1e-12, 3e-12, d).astype(np.float32)
    rows[7] = np.where(np.arange(d) % 3 == 0, big, -0.5 * big)
    return jnp.asarray(rows)
