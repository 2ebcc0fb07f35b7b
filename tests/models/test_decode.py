"""The one greedy decode loop (splitq_jax.models.decode) and its use by the models' ``generate``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from splitq_jax.modality import PAD, TEXT
from splitq_jax.models import llava, qwen2_5_vl
from splitq_jax.models.decode import greedy_generate, next_positions, prompt_valid


class _Emb:
    def __init__(self, modality_mask, position_ids):
        self.modality_mask, self.position_ids = jnp.asarray(modality_mask), jnp.asarray(position_ids)


def _scripted(rows: list[list[int]], vocab: int = 8):
    """A ``start`` whose logits pick ``rows[b][i]`` at step i, recording the positions it is fed."""
    seen = []

    def onehot(i):
        return jnp.asarray(np.eye(vocab, dtype=np.float32)[[r[i] for r in rows]])

    def start(valid):
        count = [0]

        def step(token, positions):
            seen.append((np.asarray(token)[:, 0].tolist(), np.asarray(positions)[:, 0].tolist()))
            count[0] += 1
            return onehot(count[0])

        return onehot(0), step

    return start, seen


def test_eos_fill_early_stop_and_positions():
    emb = _Emb([[PAD, TEXT, TEXT], [TEXT, TEXT, TEXT]], [[0, 0, 1], [0, 1, 2]])
    start, seen = _scripted([[3, 2, 5, 5, 5], [4, 4, 2, 6, 6]])
    out, logits = greedy_generate(emb, start, max_new_tokens=5, eos_token_id=2, return_logits=True)
    # row 0 stops at step 1 and is padded (no pad id given, no default: the first EOS id)
    np.testing.assert_array_equal(out, [[3, 2, 2, 2, 2], [4, 4, 2, 2, 2]])
    assert logits.shape == (2, 3, 8)  # every row done after step 2: three steps ran
    # generated tokens continue after each row's largest prompt position
    assert seen == [([3, 4], [2, 3]), ([2, 4], [3, 4])]


def test_default_pad_and_no_eos():
    emb = _Emb([[TEXT, TEXT]], [[[0, 1]], [[0, 5]], [[0, 1]]])  # M-RoPE (3, B, N): max over axes
    assert next_positions(emb.position_ids).tolist() == [6]
    start, _ = _scripted([[2, 7, 7]])
    out = greedy_generate(emb, start, max_new_tokens=3, eos_token_id=[2], default_pad_token_id=0)
    np.testing.assert_array_equal(out, [[2, 0, 0]])
    start, _ = _scripted([[2, 7, 1]])
    np.testing.assert_array_equal(greedy_generate(emb, start, max_new_tokens=3), [[2, 7, 1]])


def test_right_padding_is_refused():
    with pytest.raises(ValueError, match="left padding"):
        prompt_valid(np.array([[TEXT, PAD]]))


def _recomputed(forward, ids, mask, steps):
    """Greedy tokens by a full forward over the whole sequence at every step (no cache)."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    out = []
    for _ in range(steps):
        token = np.asarray(jnp.argmax(forward(ids, mask)[:, -1], axis=-1))
        out.append(token)
        ids = np.concatenate([ids, token[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_generate_equals_stepwise_full_forwards(family):
    """The cached loop of the models' ``generate`` picks the tokens that full forwards pick."""
    if family == "llava":
        model = llava.Llava(llava.get_config("llava-1.5-tiny"), rngs=nnx.Rngs(1))
        forward = lambda ids, mask: model(ids, None, mask)  # noqa: E731
        generate = lambda ids, mask, k: model.generate(ids, None, mask, max_new_tokens=k)  # noqa: E731
    else:
        model = qwen2_5_vl.Qwen2_5_VL(qwen2_5_vl.get_config("qwen2.5-vl-tiny"), rngs=nnx.Rngs(1))
        forward = lambda ids, mask: model(ids, None, None, mask)  # noqa: E731
        generate = lambda ids, mask, k: model.generate(ids, None, None, mask, max_new_tokens=k)  # noqa: E731
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 60, size=(2, 7))
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # left padding
    ids[0, :3] = 0
    got = generate(ids, mask, 5)
    np.testing.assert_array_equal(got, _recomputed(forward, ids, mask, 5))
