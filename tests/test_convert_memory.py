"""The streaming checkpoint reader behind the converters' memory bound (bench/convert_memory.py):
plain reads give what safetensors gives, into buffers that jax on CPU adopts without a copy, and
the benchmark's synthetic checkpoint converts and restores bit for bit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from splitq_jax.models.converters import checkpoints
from splitq_jax.models.converters.hf import _to_jax, aligned_empty, open_checkpoint
from splitq_jax.models.converters.qwen2_5_vl import map_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import convert_memory as bench  # noqa: E402

TINY_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 bos_token_id=1, eos_token_id=2, image_token_id=60, video_token_id=61, vision_start_token_id=62,
                 vision_end_token_id=63)
TINY_VISION = dict(hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, in_chans=3, patch_size=14,
                   temporal_patch_size=2, spatial_merge_size=2, window_size=112)


def test_reader_matches_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((7, 5)).astype(np.float32),
        "bf16": rng.standard_normal((3, 4, 5)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal((9,)).astype(np.float16),
        "i64": rng.integers(-5, 5, (2, 3)),
        "u8": rng.integers(0, 255, (11,), dtype=np.uint8),
        "bool": rng.random((4, 4)) > 0.5,
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = open_checkpoint(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        for name in tensors:
            ours, ref = ckpt.get(name), f.get_tensor(name)
            assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
            np.testing.assert_array_equal(ours, ref)
            assert ours.flags.c_contiguous and (ours.size == 0 or ours.ctypes.data % 64 == 0), name
    streamed = dict(ckpt.items())
    assert streamed.keys() == tensors.keys()
    for name, arr in streamed.items():
        np.testing.assert_array_equal(arr, tensors[name])
    assert [k for k, _ in ckpt.items({"bf16", "u8"})] == sorted(["bf16", "u8"], key=list(streamed).index)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="zero-copy adoption is an XLA:CPU property")
def test_aligned_arrays_are_adopted_not_copied():
    arr = aligned_empty((64, 48), ml_dtypes.bfloat16)
    arr[...] = 1.5
    x = _to_jax(arr, arr.dtype)
    assert x.unsafe_buffer_pointer() == arr.ctypes.data  # no second copy of the tensor
    y = _to_jax(arr, np.dtype(np.float32))  # a cast is a new (aligned, adopted) buffer
    assert y.dtype == jnp.float32 and float(y[0, 0]) == 1.5


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_synthetic_checkpoint_converts_bit_exact(tmp_path, dtype):
    """The benchmark's generator, at toy widths and in 3 shards, through scripts/convert.py's path."""
    hf = tmp_path / "hf"
    bench.write_checkpoint(hf, 2, 3, "bfloat16", 60_000, text=TINY_TEXT, vision=TINY_VISION)
    assert len(json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(hf.glob("*.safetensors"))) >= 3
    report = checkpoints.convert(hf, tmp_path / "out", dtype=dtype)
    model, _, family = checkpoints.load_checkpoint(report["out"])
    assert family == "qwen2_5_vl"
    shapes = bench.tensor_shapes(2, 3, TINY_TEXT, TINY_VISION)
    assert report["num_params"] == sum(int(np.prod(s)) for s in shapes.values())
    params = {tuple(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    for name, ref in open_checkpoint(hf).items():
        got = np.asarray(params[map_key(name)[0]])
        assert got.dtype == np.dtype(dtype), name
        np.testing.assert_array_equal(got.reshape(ref.shape), ref.astype(got.dtype))
