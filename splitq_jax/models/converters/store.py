"""The converted-model checkpoint format: ``state/`` (orbax), ``config.json``, ``splitq_meta.json``.

Written by ``scripts/convert.py`` and the GGUF / assembled-model converters, read back by
:func:`load_checkpoint`. Kept apart from :mod:`splitq_jax.models.converters.checkpoints` (which resolves named
models through those converters) so that the converters can write checkpoints without importing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from splitq_jax.models.converters.hf import ConversionError, read_config
from splitq_jax.fsutil import OCDBT_FILE_BYTES, atomic_dir

STATE_DIR = "state"             # orbax StandardCheckpointer payload
CONFIG_FILE = "config.json"     # the source HF config, to rebuild the module
META_FILE = "splitq_meta.json"  # family, dtype, source
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`save_checkpoint`."""
    return (Path(path).expanduser() / META_FILE).is_file()


# --------------------------------------------------------------------------------------------
# orbax
# --------------------------------------------------------------------------------------------


def save_checkpoint(model: nnx.Module, out_dir: str | os.PathLike, *, family: str, hf_config: dict,
                    source: str, overwrite: bool = False, extra: Callable[[str], Any] | None = None) -> Path:
    """Write ``out_dir/{state/, config.json, splitq_meta.json}`` atomically.

    Everything goes into a temporary sibling directory that is renamed onto ``out_dir`` at the
    end, so an interrupted run never leaves a half-written checkpoint under that name.
    Refuses an existing ``out_dir`` unless ``overwrite``. ``extra(dir)``, if given, writes more
    files into the temporary directory before the rename (e.g. ``tokenizer.save_pretrained``).
    """
    import orbax.checkpoint as ocp

    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")

    with atomic_dir(out, replace=True) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
        # PyTreeCheckpointHandler writes what StandardCheckpointer reads, and takes the OCDBT file size.
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        try:
            checkpointer.save(tmp / STATE_DIR, args=ocp.args.PyTreeSave(
                nnx.state(model), ocdbt_target_data_file_size=OCDBT_FILE_BYTES))
        finally:
            checkpointer.close()
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        dtype = jax.tree.leaves(nnx.state(model))[0].dtype
        (tmp / META_FILE).write_text(json.dumps({"family": family, "dtype": jnp.dtype(dtype).name,
                                                 "source": source}, indent=2))
        if extra is not None:
            extra(str(tmp))
    return out


def load_checkpoint(ckpt_dir: str | os.PathLike, dtype=None):
    """``(model, config, family)`` from a directory written by :func:`save_checkpoint`.

    ``dtype`` (default: the saved one) casts the parameters on restore.
    """
    import orbax.checkpoint as ocp

    ckpt_dir = Path(ckpt_dir).expanduser().absolute()
    try:
        meta = json.loads((ckpt_dir / META_FILE).read_text())
    except FileNotFoundError as e:
        raise ConversionError(f"{ckpt_dir} is not a checkpoint written by scripts/convert.py (no {META_FILE})") from e
    hf_config = read_config(ckpt_dir)
    saved_dtype = DTYPES[meta["dtype"]]
    if meta["family"] == "llava":
        from splitq_jax.models.converters.llava import config_from_hf
        from splitq_jax.models.llava import abstract_model
    else:
        from splitq_jax.models.converters.qwen2_5_vl import config_from_hf
        from splitq_jax.models.qwen2_5_vl import abstract_model
    config = config_from_hf(hf_config)
    graphdef, abstract_state = nnx.split(abstract_model(config, saved_dtype))
    state = ocp.StandardCheckpointer().restore(ckpt_dir / STATE_DIR, abstract_state)
    if dtype is not None and jnp.dtype(dtype) != jnp.dtype(saved_dtype):
        state = jax.tree.map(lambda x: x.astype(dtype), state)
    return nnx.merge(graphdef, state), config, meta["family"]
