"""compressed-tensors packing: hand-computed words, the format's own packer, and the weight
tensors of one linear against the format's decompressor."""

import numpy as np
import pytest

from splitq_jax import packing, quant
from splitq_jax.interop import compressed_tensors as ct

# Hand-computed: codes (unsigned, already offset) -> int32 words, little-endian bit stream.
#  8 bits: 4 values per word, value k in byte k.
#  4 bits: 8 per word, value k in nibble k.
#  2 bits: 16 per word.
#  3 bits: dense, 32 values -> 3 words; value 10 straddles words 0/1 (bits 30-32), value 21 words 1/2.
HAND = [
    (8, [1, 2, 3, 255], [0xFF030201 - (1 << 32)]),
    (8, [7, 0, 0, 0, 9], [7, 9]),
    (4, [1, 2, 3, 4, 5, 6, 7, 15], [0xF7654321 - (1 << 32)]),
    (4, [8, 8], [0x88]),
    (2, [1, 2, 3, 0] * 4, [0x39393939]),
    (2, [3] * 17, [-1, 3]),
    (3, [7] + [0] * 9 + [7], [0xC0000007 - (1 << 32), 1]),  # value 10 at bits 30..32: two low bits in word 0
    (3, [0] * 21 + [5], [0, 0x80000000 - (1 << 32), 2]),  # value 21 at bits 63..65: its low bit ends word 1
]


@pytest.mark.parametrize("bits,codes,words", HAND)
def test_pack_table(bits, codes, words):
    got = ct.pack_int32(np.array([codes]), bits)
    assert got.dtype == np.int32
    assert got.tolist() == [words]
    assert ct.unpack_int32(got, bits, len(codes)).tolist() == [codes]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 100])
def test_pack_equals_the_formats_packer(bits, n):
    torch = pytest.importorskip("torch")
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 1 << bits, size=(3, n))
    ref = helpers.pack_to_int32(torch.tensor(codes - (1 << (bits - 1)), dtype=torch.int8), bits).numpy()
    np.testing.assert_array_equal(ct.pack_int32(codes, bits), ref)
    # along dim 0 (zero points) by transposing
    ref0 = helpers.pack_to_int32(torch.tensor(codes.T - (1 << (bits - 1)), dtype=torch.int8), bits,
                                 packed_dim=0).numpy()
    np.testing.assert_array_equal(np.ascontiguousarray(ct.pack_int32(codes, bits).T), ref0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_linear_tensors_decompress_to_our_weights(bits, symmetric, group_size):
    """The format's own decompressor gives back exactly what our packed weight dequantizes to."""
    torch = pytest.importorskip("torch")
    cq = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    rng = np.random.default_rng(bits)
    w = rng.normal(size=(24, 48)).astype(np.float32)
    p = quant.quantize(w, bits, symmetric=symmetric, group_size=group_size)
    t = packing.pack_quantized(p, bits, symmetric, w.shape, group_size, word_dtype="uint32")
    ours = np.asarray(packing.unpack_dequantize(t))
    tensors = ct.linear_tensors(t)
    assert tensors["weight_packed"].shape == (24, -(-48 * bits // 32))
    assert tensors["weight_scale"].shape == (24, 1 if group_size is None else 48 // group_size)
    assert ("weight_zero_point" in tensors) == (not symmetric)
    if not symmetric:
        assert tensors["weight_zero_point"].shape == (-(-24 * bits // 32), tensors["weight_scale"].shape[1])
    scheme = cq.QuantizationScheme(targets=["Linear"], weights=cq.QuantizationArgs(
        **ct.weight_args(bits, symmetric, group_size)))
    state = {k: torch.tensor(v) for k, v in tensors.items()}
    back = PackedQuantizationCompressor.decompress(state, scheme)["weight"].numpy()
    np.testing.assert_array_equal(back, ours)


def test_config_is_accepted_by_the_formats_validator():
    pytest.importorskip("compressed_tensors")
    for a in (None, 4, 8):
        for g in (None, 32):
            ct.validate(ct.quantization_config(w_bits=4, w_symmetric=g is None, group_size=g, a_bits=a,
                                               ignore=("lm_head",)))


@pytest.mark.parametrize("kw,match", [
    (dict(w_bits=None, a_bits=8), "weights are not quantized"),
    (dict(w_bits=3, a_bits=3), "3-bit activations: no loader"),
    (dict(w_bits=4, a_bits=2), "2-bit activations"),
    (dict(w_bits=4, a_bits=8, a_symmetric=False), "asymmetric activations"),
    (dict(w_bits=4, a_bits=8, group_size=128), "fp8-activation kernel"),
])
def test_settings_no_loader_runs_are_refused(kw, match):
    args = dict(a_symmetric=True, group_size=None) | kw
    with pytest.raises(ct.ExportError, match=match):
        ct.check_settings(**args)
