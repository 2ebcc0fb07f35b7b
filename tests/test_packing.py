"""Bit packing: lossless round trips, the documented word layout, PackedTensor storage."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitq_jax import packing
from splitq_jax.packing import nbytes, pack, pack_quantized, unpack, unpack_dequantize
from splitq_jax import quant
from splitq_jax.quant import dequantize

# One compile per case instead of one per op (speed only; quant.py's eager path is tested in
# test_quant.py).
quantize = jax.jit(quant.quantize, static_argnames=("bits", "symmetric", "group_size"))

WORDS = {"uint8": jnp.uint8, "uint32": jnp.uint32}
# values per word, as the module docstring's table states
CAPACITY = {("uint8", 2): 4, ("uint8", 3): 2, ("uint8", 4): 2, ("uint8", 8): 1,
            ("uint32", 2): 16, ("uint32", 3): 10, ("uint32", 4): 8, ("uint32", 8): 4}


def _values(rng, bits, signed, shape):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    return rng.integers(lo, hi, size=shape, dtype=np.int32)


@pytest.mark.parametrize("word,bits", sorted(CAPACITY))
def test_values_per_word(word, bits):
    assert packing.values_per_word(bits, WORDS[word]) == CAPACITY[(word, bits)]


@pytest.mark.parametrize("bits,word,signed", itertools.product([2, 3, 4, 8], WORDS, [False, True]))
def test_round_trip(bits, word, signed):
    rng = np.random.default_rng(bits * 7 + signed)
    c = CAPACITY[(word, bits)]
    lo = -(2 ** (bits - 1)) if signed else 0
    every = np.arange(lo, lo + 2**bits, dtype=np.int32)
    # Exhaustive: every value of the width, rolled so that each lands in several slot positions,
    # with a ragged tail (2^b + 5 is never a whole number of words).
    exhaustive = np.stack([np.roll(every, k) for k in range(3)])
    exhaustive = np.concatenate([exhaustive, exhaustive[:, :5]], axis=-1)
    cases = [
        exhaustive,
        _values(rng, bits, signed, (c,)),  # exactly one word (a single value for 8-bit uint8)
        _values(rng, bits, signed, (2, 3, 2 * c + 1)),  # leading axes, one value past a word
    ]

    # One compile for all shapes of this combination (eager pack/unpack is covered elsewhere).
    @jax.jit
    def round_trip(qs):
        words = [pack(q, bits, WORDS[word], signed=signed) for q in qs]
        return words, [unpack(w, bits, q.shape[-1], WORDS[word], signed=signed) for w, q in zip(words, qs)]

    all_words, all_back = round_trip(cases)
    for q, words, back in zip(cases, all_words, all_back):
        shape = q.shape
        assert words.dtype == np.dtype(word)
        assert words.shape == shape[:-1] + (-(-shape[-1] // c),)
        assert words.shape[-1] == packing.packed_length(shape[-1], bits, WORDS[word])
        assert back.dtype == jnp.int32 and back.shape == shape
        np.testing.assert_array_equal(np.asarray(back), np.asarray(q))
    assert set(np.unique(exhaustive).tolist()) == set(every.tolist())


def test_empty_last_axis():
    words = pack(np.zeros((3, 0), np.int32), 4, jnp.uint32)
    assert words.shape == (3, 0)
    assert unpack(words, 4, 0).shape == (3, 0)


def test_padding_is_zero():
    words = np.asarray(pack(np.array([7, 7, 7]), 3, jnp.uint32))
    assert words.tolist() == [7 | 7 << 3 | 7 << 6]  # slots 3..9 and bits 30-31 stay 0
    words = np.asarray(pack(np.array([-1, -1, -1]), 3, jnp.uint8, signed=True))
    assert words.tolist() == [0b111111, 0b000111]  # bits 6-7 unused; pad slot is 0


def test_known_words():
    # little-endian within the word: value k occupies bits [k*b, (k+1)*b)
    assert int(pack(np.arange(1, 9), 4, jnp.uint32)[0]) == 0x87654321
    assert np.asarray(pack(np.arange(1, 9), 4, jnp.uint8)).tolist() == [0x21, 0x43, 0x65, 0x87]
    assert int(pack(np.array([1, 2, 3, 0]), 2, jnp.uint8)[0]) == 0b00_11_10_01
    sixteen = np.array([1, 2, 3, 0, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 0, 2])
    assert int(pack(sixteen, 2, jnp.uint32)[0]) == 0x8000FF39
    assert int(pack(np.array([5, 3]), 3, jnp.uint8)[0]) == 5 | 3 << 3
    tens = np.array([1, 2, 3, 4, 5, 6, 7, 0, 1, 2])
    assert int(pack(tens, 3, jnp.uint32)[0]) == sum(int(v) << (3 * k) for k, v in enumerate(tens))
    assert int(pack(tens, 3, jnp.uint32)[0]) == 0b010_001_000_111_110_101_100_011_010_001
    assert int(pack(np.array([1, 2, 3, 4]), 8, jnp.uint32)[0]) == 0x04030201
    assert int(pack(np.array([200]), 8, jnp.uint8)[0]) == 200
    # signed: two's-complement low bits
    assert int(pack(np.array([-1, 2]), 4, jnp.uint8, signed=True)[0]) == 0x2F
    assert int(pack(np.array([-8, 7, -1, 0]), 4, jnp.uint32, signed=True)[0]) == 0x0F78
    assert int(pack(np.array([-2, 1, -1, 0]), 2, jnp.uint8, signed=True)[0]) == 0b00_11_01_10
    assert int(pack(np.array([-4, 3]), 3, jnp.uint8, signed=True)[0]) == 0b011_100
    assert int(pack(np.array([-128]), 8, jnp.uint8, signed=True)[0]) == 0x80
    # and the inverse from a hand-written word
    np.testing.assert_array_equal(
        np.asarray(unpack(jnp.array([0xF78], jnp.uint32), 4, 3, signed=True)), [-8, 7, -1]
    )


def test_device_input_and_jit():
    q = jax.device_put(_values(np.random.default_rng(1), 4, True, (4, 3, 16)))
    back = unpack(pack(q, 4, jnp.uint32, signed=True), 4, 16, signed=True)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(q))
    bits, word = 3, jnp.uint32
    f = jax.jit(lambda q: pack(q, bits, word, signed=True))
    g = jax.jit(lambda w: unpack(w, bits, 45, signed=True))
    q = _values(np.random.default_rng(0), bits, True, (4, 45))
    np.testing.assert_array_equal(np.asarray(g(f(q))), q)
    # Under tracing out-of-range values are not checked (documented): only the low bits are kept.
    masked = jax.jit(lambda q: pack(q, 2, jnp.uint8))(np.array([5]))
    np.testing.assert_array_equal(np.asarray(masked), [1])


@pytest.mark.parametrize("bits", [1, 5, 6, 7, 16, 3.0, True, None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bit width"):
        pack(np.zeros(4, np.int32), bits)
    with pytest.raises(ValueError, match="bit width"):
        unpack(jnp.zeros(4, jnp.uint8), bits, 4)


@pytest.mark.parametrize("word", [jnp.int8, jnp.uint16, jnp.int32, jnp.float32, "uint64", "nope"])
def test_bad_word_dtype(word):
    with pytest.raises(ValueError, match="word dtype"):
        pack(np.zeros(4, np.int32), 4, word)


def test_unpack_checks_words():
    words = pack(np.zeros(10, np.int32), 4, jnp.uint8)  # 5 words
    with pytest.raises(ValueError, match="dtype"):
        unpack(words, 4, 10, jnp.uint32)
    with pytest.raises(ValueError, match="n=12"):
        unpack(words, 4, 12)
    np.testing.assert_array_equal(np.asarray(unpack(words, 4, 9)), 0)  # 9 values need 5 words too


@pytest.mark.parametrize(
    "q,bits,signed",
    [([0, 4], 2, False), ([-1, 0], 4, False), ([0, 16], 4, False), ([8], 4, True), ([-9], 4, True),
     ([-5], 3, True), ([256], 8, False), ([-129], 8, True)],
)
def test_out_of_range(q, bits, signed):
    with pytest.raises(ValueError, match="out of range"):
        pack(np.array(q, np.int32), bits, signed=signed)


def test_float_input_rejected():
    with pytest.raises(ValueError, match="integer"):
        pack(np.array([1.0, 2.0]), 4)


# ----------------------------------------------------------------------------- PackedTensor


QCASES = [
    # (bits, symmetric, shape, group_size, word)
    (4, True, (64, 96), None, "uint8"),
    (4, False, (64, 96), 32, "uint32"),
    (3, True, (2, 5, 64), None, "uint32"),
    (3, False, (48, 64), 32, "uint8"),
    (2, True, (32, 96), 32, "uint8"),
    (2, False, (3, 7, 40), None, "uint32"),
    (8, True, (16, 64), 32, "uint32"),
    (8, False, (16, 64), None, "uint8"),
]


@pytest.mark.parametrize("bits,symmetric,shape,gs,word", QCASES)
def test_packed_tensor_round_trip(bits, symmetric, shape, gs, word):
    rng = np.random.default_rng(bits)
    x = jnp.asarray(rng.standard_t(df=4, size=shape).astype(np.float32))
    p = quantize(x, bits, symmetric=symmetric, group_size=gs)
    t = pack_quantized(p, bits, symmetric, shape, group_size=gs, word_dtype=WORDS[word])
    c = CAPACITY[(word, bits)]
    n_groups = 1 if gs is None else shape[-1] // gs
    stat = shape[:-1] if gs is None else shape[:-1] + (n_groups,)
    assert t.qvalue.shape == shape[:-1] + (-(-shape[-1] // c),) and t.qvalue.dtype == np.dtype(word)
    assert t.scale.shape == stat and t.scale.dtype == jnp.float32
    if symmetric:
        assert t.zero_point is None
    else:
        assert t.zero_point.shape == stat and t.zero_point.dtype == jnp.uint8
    out = unpack_dequantize(t)
    assert out.shape == shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dequantize(p, shape)))
    assert nbytes(t) == t.qvalue.size * t.qvalue.dtype.itemsize + 4 * int(np.prod(stat)) + (
        0 if symmetric else int(np.prod(stat))
    )


def test_packed_tensor_is_a_pytree_and_jits():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32))
    p = quantize(x, 3, symmetric=False, group_size=32)
    t = pack_quantized(p, 3, False, x.shape, group_size=32, word_dtype=jnp.uint32)
    leaves, treedef = jax.tree_util.tree_flatten(t)
    assert len(leaves) == 3  # qvalue, scale, zero_point; metadata is static
    t2 = jax.tree_util.tree_unflatten(treedef, leaves)
    meta = (t2.bits, t2.shape, t2.symmetric, t2.group_size, t2.word_dtype)
    assert meta == (3, (8, 64), False, 32, "uint32")
    out = jax.jit(unpack_dequantize)(t)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dequantize(p, x.shape)))
    # symmetric: zero_point is None and drops out of the leaves
    ts = pack_quantized(quantize(x, 4), 4, True, x.shape)
    assert len(jax.tree_util.tree_leaves(ts)) == 2
    # packing itself traces (no concrete range checks under jit)
    tj = jax.jit(lambda p: pack_quantized(p, 3, False, (8, 64), 32, jnp.uint32))(p)
    np.testing.assert_array_equal(np.asarray(tj.qvalue), np.asarray(t.qvalue))


def test_nbytes_documented_example():
    # 4-bit symmetric per-row weights (256, 512) in uint8: 256 * 512 / 2 bytes of words
    # + one float32 scale per row.
    w = jnp.asarray(np.random.default_rng(0).normal(size=(256, 512)).astype(np.float32))
    t = pack_quantized(quantize(w, 4), 4, True, w.shape)
    assert t.qvalue.nbytes == 65536
    assert nbytes(t) == 65536 + 256 * 4
    # asymmetric, groups of 128: + one uint8 zero point per group
    pa = quantize(w, 4, symmetric=False, group_size=128)
    ta = pack_quantized(pa, 4, False, w.shape, group_size=128)
    assert nbytes(ta) == 65536 + 256 * 4 * 4 + 256 * 4
    # 3-bit: uint32 stores 10 per word (52 words per 512-row), uint8 2 per byte
    t3 = pack_quantized(quantize(w, 3), 3, True, w.shape, word_dtype=jnp.uint32)
    assert t3.qvalue.nbytes == 256 * 52 * 4
    t3b = pack_quantized(quantize(w, 3), 3, True, w.shape, word_dtype=jnp.uint8)
    assert t3b.qvalue.nbytes == 256 * 256


def test_scale_dtype():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32))
    p = quantize(w, 4)
    t = pack_quantized(p, 4, True, w.shape, scale_dtype=jnp.bfloat16)
    assert t.scale.dtype == jnp.bfloat16 and nbytes(t) == 4 * 32 + 4 * 2
    ref = np.asarray(dequantize(p, w.shape))
    np.testing.assert_allclose(np.asarray(unpack_dequantize(t)), ref, rtol=1e-2)
    assert unpack_dequantize(t, jnp.bfloat16).dtype == jnp.bfloat16


def test_pack_quantized_checks():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32))
    p = quantize(w, 4, symmetric=False)
    with pytest.raises(ValueError, match="shape"):
        pack_quantized(p, 4, False, (4, 32))
    with pytest.raises(ValueError, match="shape"):
        pack_quantized(p, 4, False, w.shape, group_size=32)  # p was not grouped
    with pytest.raises(ValueError, match="group_size"):
        pack_quantized(p, 4, False, w.shape, group_size=48)
    with pytest.raises(ValueError, match="out of range"):
        pack_quantized(p, 2, False, w.shape)  # 4-bit integers do not fit in 2 bits
    with pytest.raises(ValueError, match="zero_point"):
        pack_quantized(p, 4, True, w.shape)  # asymmetric params claimed symmetric
    with pytest.raises(ValueError, match="bit width"):
        pack_quantized(quantize(w, 5), 5, True, w.shape)
    with pytest.raises(ValueError, match="word dtype"):
        pack_quantized(p, 4, False, w.shape, word_dtype=jnp.int8)
