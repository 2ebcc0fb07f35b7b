"""Data-parallel calibration: one block's calibration samples spread over a ``("data",)`` mesh.

Every batch the engine feeds to a jitted program (the training step, the loss evaluation, the
statistics pass) goes through :func:`shard_batch`: its sample axis is split over the devices of
the active mesh, everything else is replicated, and XLA's SPMD partitioner inserts the reductions
(the loss's token-weighted mean, the gradient, the collectors' sums and maxima). No loss or
statistic code knows about devices, so the results are those of one device up to the order of
float additions::

    with sharding.data_parallel(4):          # or data_parallel(None): every device present
        result = cal.fit_block(params, data, cfg, bcfg)

A batch whose size the device count does not divide is padded with *masked* samples: copies of
its first sample whose tokens are all pad (modality 0, weight 0). Pad tokens count in no loss and
no statistic, so padding changes nothing but the shapes.

Outside :func:`data_parallel` (or with one device) :func:`shard_batch` returns its input: the
single-device path is the code as it was.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: F401  (Mesh re-exported)

from splitq_jax.errors import SplitqError
from splitq_jax.modality import PAD

AXIS = "data"

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("splitq_mesh", default=None)


class DeviceError(SplitqError):
    """A device request that the machine cannot serve (more devices than present, fewer than 1)."""


def data_mesh(devices: int | Mesh | Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``("data",)`` mesh over the first ``devices`` devices (``None``: all of them; a mesh
    is returned as it is).

    Raises:
      DeviceError: ``devices`` < 1 or more than ``jax.device_count()``.
    """
    if isinstance(devices, Mesh):
        return devices
    present = jax.devices()
    if devices is None:
        chosen = list(present)
    elif isinstance(devices, int):
        if devices < 1:
            raise DeviceError(f"--devices {devices}: give a device count of at least 1")
        if devices > len(present):
            raise DeviceError(
                f"--devices {devices} asks for {devices} devices but only {len(present)} "
                f"{present[0].platform} device(s) are present; use --devices {len(present)} or fewer "
                "(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before the start makes N devices)")
        chosen = list(present[:devices])
    else:
        chosen = list(devices)
    return Mesh(np.array(chosen), (AXIS,))


@contextlib.contextmanager
def data_parallel(devices: int | Mesh | Sequence[jax.Device] | None = None) -> Iterator[Mesh]:
    """Run the engine's batches on ``devices`` (a count, a mesh, devices, or ``None`` for all)."""
    mesh = data_mesh(devices)
    token = _MESH.set(mesh if mesh.size > 1 else None)
    try:
        yield mesh
    finally:
        _MESH.reset(token)


def current_mesh() -> Mesh | None:
    """The active data mesh, or ``None`` on the single-device path."""
    return _MESH.get()


def device_count() -> int:
    mesh = _MESH.get()
    return 1 if mesh is None else mesh.size


def _pad_masked(batch: NamedTuple, extra: int) -> NamedTuple:
    """``batch`` with ``extra`` copies of its first sample appended, every copied token pad."""
    fields = batch._asdict()
    out = {}
    for name, a in fields.items():
        if a is None:
            out[name] = None
            continue
        a = jnp.asarray(a)
        first = jnp.repeat(a[:1], extra, axis=0)
        if name == "modality":
            first = jnp.full_like(first, PAD)
        elif name == "weight":
            first = jnp.zeros_like(first)
        out[name] = jnp.concatenate([a, first], axis=0)
    return type(batch)(**out)


def shard_batch(batch: Any) -> Any:
    """Split a batch (a ``NamedTuple`` of ``(S, ...)`` arrays or ``None``, e.g. ``BlockData``) over
    the active mesh along the sample axis; padded with masked samples to a multiple of the device
    count. Unchanged on the single-device path."""
    mesh = _MESH.get()
    if mesh is None:
        return batch
    s = next(a for a in batch if a is not None).shape[0]
    extra = (-s) % mesh.size
    if extra:
        if getattr(batch, "modality", None) is None:
            raise DeviceError(f"a batch of {s} samples does not split over {mesh.size} devices and has no "
                              "modality codes to mask padding with; use a batch size that is a multiple of "
                              f"{mesh.size}")
        batch = _pad_masked(batch, extra)
    spec = NamedSharding(mesh, PartitionSpec(AXIS))
    return type(batch)(*(None if a is None else jax.device_put(a, spec) for a in batch))


def batches(data: Any, size: int) -> Iterator[Any]:
    """``data``'s consecutive batches of ``size`` samples (``data.batch(start, size)``, the last one
    possibly shorter), each through :func:`shard_batch`."""
    for start in range(0, data.x.shape[0], size):
        yield shard_batch(data.batch(start, size))


def replicate(tree: Any) -> Any:
    """Every array of ``tree`` on every device of the active mesh (unchanged without one)."""
    mesh = _MESH.get()
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


__all__ = ["AXIS", "DeviceError", "data_mesh", "data_parallel", "current_mesh", "device_count", "shard_batch",
           "batches", "replicate"]
