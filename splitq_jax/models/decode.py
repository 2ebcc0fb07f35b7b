"""Greedy decoding: the one loop behind every ``generate`` (the Flax models' and the quantized runtime's).

A model supplies only how to run its decoder; the loop owns the rules every family shares::

    emb = model.embed(...)                      # hidden, position_ids, modality_mask
    tokens = greedy_generate(emb, start, max_new_tokens=8, eos_token_id=eos,
                             default_pad_token_id=model.config.pad_token_id)

``start(valid)`` runs the prompt (``valid: (B, N)`` bool, False at left padding) and returns the
last-position logits ``(B, vocab)`` and a ``step(token (B, 1), positions (B, 1)) -> (B, vocab)``
that feeds one generated token per row (with a KV cache, or by recomputing; the loop does not
care). The shared rules:

* prompts must be left-padded: the last column is a real token of every row;
* generated tokens continue after the largest position used so far (HF's rule; for 1-D positions
  that is the number of real prompt tokens, for M-RoPE ``rope_deltas`` included);
* the next token is the arg-max; once a row has emitted an EOS token it is filled with
  ``pad_token_id`` (default: the model's pad id, else the first EOS id), and decoding stops when
  every row is done (the remaining columns are padding; ``0`` without EOS ids).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax.modality import PAD

Step = Callable[[jax.Array, jax.Array], jax.Array]
Start = Callable[[np.ndarray], tuple[jax.Array, Step]]


def prompt_valid(modality_mask) -> np.ndarray:
    """``(B, N)`` modality codes -> ``(B, N)`` bool (False at padding); raises ``ValueError`` unless
    every row is left-padded (its last token real)."""
    valid = np.asarray(modality_mask) != PAD
    if not valid[:, -1].all():
        raise ValueError("generate() needs left padding: the last prompt token of every row must be real")
    return valid


def next_positions(position_ids) -> jax.Array:
    """The position of each row's first generated token, ``(B,)``: one past the largest prompt
    position, for 1-D ``(B, N)`` or M-RoPE ``(3, B, N)`` positions."""
    pos = jnp.asarray(position_ids)
    return jnp.max(pos, axis=(0, 2) if pos.ndim == 3 else 1) + 1


def cache_key_valid(valid: np.ndarray, max_new_tokens: int) -> jax.Array:
    """Which KV-cache slots hold real tokens once decoding is done: the prompt's ``valid (B, N)``
    followed by ``max_new_tokens`` generated slots, ``(B, N + max_new_tokens)`` bool. (A slot not
    written yet is never read: the causal mask stops at the query's own slot.)"""
    b = valid.shape[0]
    return jnp.asarray(np.concatenate([valid, np.ones((b, max_new_tokens), bool)], axis=1))


def greedy_generate(emb: Any, start: Start, *, max_new_tokens: int,
                    eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                    default_pad_token_id: int | None = None, return_logits: bool = False,
                    on_token: Callable[[np.ndarray], None] | None = None):
    """Greedy decoding of an embedded prompt (see the module docstring).

    Args:
      emb: the prompt as a model's ``embed`` returns it; ``modality_mask (B, N)`` and
        ``position_ids ((B, N) or (3, B, N))`` are read.
      start: ``valid (B, N) -> (logits (B, vocab), step)``; ``step(token (B, 1) int32,
        positions (B, 1) int32) -> logits (B, vocab)``.
      default_pad_token_id: the fill after EOS when ``pad_token_id`` is None (the model config's).
      on_token: called with each step's tokens ``(B,)`` as soon as they are chosen (streaming).
    Returns:
      the new tokens ``(B, max_new_tokens)`` int64; with ``return_logits`` also the logits that
      chose them, ``(B, steps, vocab)`` (``steps`` < ``max_new_tokens`` when every row stopped early).
    """
    valid = prompt_valid(emb.modality_mask)
    eos = () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())
    if eos and pad_token_id is None:
        pad_token_id = default_pad_token_id if default_pad_token_id is not None else eos[0]
    logits, step = start(valid)
    next_pos = next_positions(emb.position_ids)
    b = valid.shape[0]
    out = np.zeros((b, max_new_tokens), np.int64)
    chosen_by = []
    done = np.zeros((b,), bool)
    for i in range(max_new_tokens):
        chosen_by.append(logits)
        token = np.asarray(jnp.argmax(logits, axis=-1))
        if eos:
            token = np.where(done, pad_token_id, token)
            done |= np.isin(token, eos)
        out[:, i] = token
        if on_token is not None:
            on_token(token)
        if i + 1 == max_new_tokens or (eos and done.all()):
            out[:, i + 1:] = pad_token_id if eos else 0
            break
        logits = step(jnp.asarray(token)[:, None], (next_pos + i)[:, None])
    if return_logits:
        return out, np.stack([np.asarray(lg) for lg in chosen_by], axis=1)
    return out


__all__ = ["cache_key_valid", "greedy_generate", "next_positions", "prompt_valid"]
