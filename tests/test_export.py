"""Saving folded blocks and whole quantized models: exact round trips, atomicity, integrity checks."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from splitq_jax.methods import transform
from splitq_jax import calibrate as cal
from splitq_jax import runtime
from splitq_jax.quantized import export
from splitq_jax.config import MethodConfig, method_config
from splitq_jax.quantized.export import CheckpointError
from splitq_jax.models import qwen2_5_vl as qv
from splitq_jax.packing import PackedTensor, pack_quantized
from splitq_jax.pipeline import block_config_of
from splitq_jax.quant import quantize

# Asymmetric, so that packed weights carry zero points (symmetric ones store None).
QWEN_CFG = method_config("splitq", "w4a4", w_symmetric=False, a_symmetric=False, mac_gate_init=0.5)


@functools.lru_cache(maxsize=None)
def tiny_quantized_qwen(cfg: MethodConfig):
    """A random tiny Qwen2.5-VL (logits sharpened so greedy choices are clear), its blocks folded from
    initialisation (``fit_block(epochs=0)`` without the loss evaluation) and a left-padded
    two-row batch with an image. Shared with test_runtime.py."""
    config = qv.get_config("qwen2.5-vl-tiny")
    model = qv.Qwen2_5_VL(config, rngs=nnx.Rngs(0))
    model.language_model.lm_head.w[...] = 20.0 * model.language_model.lm_head.w[...]
    rng = np.random.default_rng(0)
    row = np.concatenate([[config.vision_start_token_id], [config.image_token_id] * 4,
                          [config.vision_end_token_id], rng.integers(3, 100, 6)])
    batch = {"input_ids": np.stack([row, np.concatenate([[0, 0], rng.integers(3, 100, row.size - 2)])]),
             "attention_mask": (np.arange(row.size) >= np.array([[0], [2]])).astype(np.int32),
             "pixel_values": rng.standard_normal((16, config.vision.patch_dim)).astype(np.float32),
             "image_grid_thw": np.array([[1, 4, 4]])}
    emb = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"], batch["attention_mask"])
    cos, sin = model.rope(emb.position_ids)
    mask = model.attention_mask(emb.modality_mask)
    bcfg = block_config_of(config.text)
    fold_jit = jax.jit(lambda qp, qc: transform.fold_block(qp, qc, cfg))
    x, folded = emb.hidden, []
    for i, layer in enumerate(model.blocks):
        p = layer.block_params()
        data = cal.BlockData(x, x, cos, sin, mask, emb.modality_mask)
        qp, qc = cal.init_qblock(jax.random.PRNGKey(i), p, cal.collect_stats(p, data, cfg, bcfg), cfg, bcfg)
        folded.append(fold_jit(qp, qc))
        x = layer(x, cos, sin, mask)
    return model, folded, batch


def _is_packed(t):
    return isinstance(t, PackedTensor)


def assert_trees_identical(a, b):
    """Same treedef (PackedTensor metadata included), same dtypes, bit-identical values."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert type(x) is type(y) if not hasattr(x, "dtype") else jnp.dtype(x.dtype) == jnp.dtype(y.dtype)
        assert np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y))
    # None leaves (symmetric zero points, missing biases/outlier groups) are part of the treedef
    pa = [t for t in jax.tree_util.tree_leaves(a, is_leaf=_is_packed) if _is_packed(t)]
    pb = [t for t in jax.tree_util.tree_leaves(b, is_leaf=_is_packed) if _is_packed(t)]
    assert [(t.bits, t.shape, t.symmetric, t.group_size, t.word_dtype) for t in pa] == \
           [(t.bits, t.shape, t.symmetric, t.group_size, t.word_dtype) for t in pb]


@pytest.fixture(scope="module")
def qwen():
    return tiny_quantized_qwen(QWEN_CFG)


@pytest.fixture(scope="module")
def saved(qwen, tmp_path_factory):
    model, folded, _ = qwen
    out = tmp_path_factory.mktemp("export") / "tiny-w4a4"
    export.save_quantized(out, family="qwen2_5_vl", model_config=model.config, fp_params=model,
                          folded_blocks=folded, method_config=QWEN_CFG, model_name="qwen2.5-vl-tiny",
                          manifest_extra={"block_losses": [0.25, float("nan")], "calibration": {"samples": 2}})
    return out


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Single blocks


def test_block_round_trip_is_bit_identical(qwen, tmp_path):
    _, folded, _ = qwen
    path = export.save_block(tmp_path / "block_000", folded[0], meta={"final_loss": 0.5, "resumable": True})
    assert [p.name for p in tmp_path.iterdir()] == ["block_000"]  # no temporary left beside it
    assert_trees_identical(export.load_block(path), folded[0])
    assert export.load_block_meta(path) == {"final_loss": 0.5, "resumable": True}
    # replaced atomically on a re-run
    export.save_block(path, folded[1])
    assert_trees_identical(export.load_block(path), folded[1])
    with pytest.raises(FileExistsError):
        export.save_block(path, folded[0], overwrite=False)


def test_encoding_keeps_every_leaf_kind(tmp_path):
    w = jax.random.normal(jax.random.PRNGKey(0), (6, 40))
    p3 = quantize(w, 3, symmetric=True, group_size=8)
    packed3 = pack_quantized(p3, 3, True, w.shape, 8, word_dtype=jnp.uint32)  # zero_point None
    p2 = quantize(w, 2, symmetric=False)
    packed2 = pack_quantized(p2, 2, False, w.shape)
    tree = {"packed": [packed3, packed2], "bf16": jnp.arange(5, dtype=jnp.bfloat16) / 3,
            "empty": jnp.zeros((0, 3), jnp.int32), "none": None, "layers": {7: {"scalar": jnp.float32(1.5)}, 2: {}},
            "pair": (jnp.uint8(3), np.arange(4, dtype=np.int8)), "value": 0.1}
    assert_trees_identical(export.load_block(export.save_block(tmp_path / "b", tree)), tree)
    loaded = export.load_block(tmp_path / "b")
    assert loaded["value"] == 0.1 and list(loaded) == list(tree) and isinstance(loaded["pair"], tuple)
    assert list(loaded["layers"]) == [7, 2]  # int keys (NNX list indices) and order survive


# ---------------------------------------------------------------------------------------------
# Whole model


def test_quantized_checkpoint_round_trip(qwen, saved):
    model, folded, batch = qwen
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
    assert {p.name for p in saved.iterdir()} == {"state", "structure.json", "manifest.json"}
    manifest = export.verify_checkpoint(saved)
    assert manifest["format"] == export.FORMAT and manifest["format_version"] == export.FORMAT_VERSION
    assert manifest["model"]["name"] == "qwen2.5-vl-tiny" and manifest["model"]["family"] == "qwen2_5_vl"
    assert manifest["model"]["config"]["text"]["num_layers"] == 2
    assert manifest["method"] == "splitq" and manifest["bits"] == "w4a4"
    assert manifest["method_config"] == json.loads(json.dumps(QWEN_CFG.to_dict()))  # every option
    assert manifest["block_losses"] == [0.25, None] and manifest["calibration"] == {"samples": 2}
    assert {"jax", "flax", "orbax-checkpoint", "numpy", "python"} <= set(manifest["versions"])
    on_disk = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    # users find the packed leaves under the names they know
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().metadata(saved / "state").item_metadata.tree
    main = tree["blocks"]["1"]["groups"]["attn_in"]["weights"]["q_proj"]["main"]
    assert set(main) == {"qvalue", "scale", "zero_point"} and main["qvalue"].dtype == jnp.uint8
    assert {"embed_tokens", "lm_head", "norm"} == set(tree["fp"]["language_model"])

    qm = runtime.load_quantized(saved)
    assert qm.config == model.config and qm.method == "splitq" and qm.family == "qwen2_5_vl"
    assert qm.provenance == json.loads(json.dumps(QWEN_CFG.to_dict()))
    for got, want in zip(qm.blocks, folded, strict=True):
        assert_trees_identical(got, want)
    fp = export.fp_state_dict(model)
    assert_trees_identical(nnx.to_pure_dict(nnx.state(qm.model)), fp)
    assert "layers" not in fp["language_model"]
    in_memory = runtime.QuantizedModel.from_parts(family="qwen2_5_vl", model_config=model.config, fp_params=model,
                                                  folded_blocks=folded, method_config=QWEN_CFG)
    assert np.array_equal(np.asarray(qm.logits(batch)), np.asarray(in_memory.logits(batch)))


def test_existing_checkpoint_is_refused_unless_overwrite(qwen, saved, tmp_path):
    model, folded, _ = qwen
    kw = dict(family="qwen2_5_vl", model_config=model.config, fp_params=model, folded_blocks=folded,
              method_config=QWEN_CFG)
    with pytest.raises(FileExistsError, match="overwrite"):
        export.save_quantized(saved, **kw)
    out = tmp_path / "ckpt"
    shutil.copytree(saved, out)
    export.save_quantized(out, **kw, manifest_extra={"run": 2}, overwrite=True)
    assert export.verify_checkpoint(out)["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(ValueError, match="manifest_extra"):
        export.save_quantized(tmp_path / "other", **kw, manifest_extra={"files": {}})
    with pytest.raises(ValueError, match="folded blocks"):
        export.save_quantized(tmp_path / "other", **{**kw, "folded_blocks": folded[:1]})


@pytest.mark.parametrize("cleanup", [True, False], ids=["exception", "killed"])
def test_crash_mid_save_never_looks_complete(qwen, saved, tmp_path, monkeypatch, cleanup):
    model, folded, _ = qwen
    kw = dict(family="qwen2_5_vl", model_config=model.config, fp_params=model, folded_blocks=folded,
              method_config=QWEN_CFG)
    old = tmp_path / "ckpt"
    shutil.copytree(saved, old)
    before = _files(old)
    real_write = export._write_json

    def crash_on_manifest(path, obj):
        if path.name == export.MANIFEST_FILE:
            real_write(path.with_name("manifest.partial"), obj)  # half-written
            raise OSError("disk full")
        real_write(path, obj)

    monkeypatch.setattr(export, "_write_json", crash_on_manifest)
    if not cleanup:  # a killed process runs no cleanup: its temporary directory stays behind
        monkeypatch.setattr(export, "_remove_tree", lambda path: None)
    for out, overwrite in ((tmp_path / "new", False), (old, True)):
        with pytest.raises(OSError, match="disk full"):
            export.save_quantized(out, **kw, overwrite=overwrite)
    assert not (tmp_path / "new").exists()
    assert _files(old) == before  # the previous checkpoint is untouched
    export.verify_checkpoint(old)
    leftovers = [p for p in tmp_path.iterdir() if p.name not in ("ckpt",)]
    assert all(".tmp-" in p.name and not (p / "manifest.json").exists() for p in leftovers)
    assert len(leftovers) == (0 if cleanup else 2)
    for p in leftovers:
        with pytest.raises(CheckpointError, match="manifest.json"):
            runtime.load_quantized(p)


def test_corruption_and_foreign_directories_are_detected(saved, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    victim = max(manifest["files"], key=lambda f: manifest["files"][f]["bytes"] if f.startswith("state/") else -1)
    data = bytearray((bad / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / victim).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim} is corrupted"):
        export.verify_checkpoint(bad)
    with pytest.raises(CheckpointError, match=victim):
        runtime.load_quantized(bad)
    (bad / victim).unlink()
    with pytest.raises(CheckpointError, match=f"{victim} is missing"):
        runtime.load_quantized(bad)

    newer = tmp_path / "newer"
    shutil.copytree(saved, newer)
    (newer / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        runtime.load_quantized(newer)
    (newer / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        runtime.load_quantized(newer)
    with pytest.raises(CheckpointError, match="does not exist"):
        runtime.load_quantized(tmp_path / "nowhere")


def test_corrupted_block_is_detected(qwen, tmp_path):
    path = export.save_block(tmp_path / "block_000", qwen[1][0])
    header = json.loads((path / "block.json").read_text())
    victim = max(header["files"], key=lambda f: header["files"][f]["bytes"])
    (path / victim).write_bytes(b"\0" * header["files"][victim]["bytes"])
    with pytest.raises(CheckpointError, match=victim):
        export.load_block(path)


def test_folded_block_schema_names_what_is_wrong(tmp_path):
    """Every folded block follows one schema, checked when a block is made, saved and loaded; a
    block that breaks it is refused with the path of the offending entry."""
    from splitq_jax.quantized.schema import InferenceSpec, validate_folded_block

    model, folded, _ = tiny_quantized_qwen(QWEN_CFG)
    spec = InferenceSpec.of(QWEN_CFG)
    for b in folded:
        validate_folded_block(b, spec)
    g = folded[0]["groups"]["attn_in"]
    d = g["split"]["main_mask"].shape[0]

    def broken(edit):
        b = jax.tree_util.tree_map(lambda x: x, folded[0], is_leaf=lambda x: x is None)
        edit(b["groups"]["attn_in"])
        return b

    cases = [
        (lambda f: f["weights"]["q_proj"].pop("main"), "weights/q_proj: has keys .*missing \\['main'\\]"),
        (lambda f: f["acts"].__setitem__("transform", {"p1": jnp.eye(2), "p2": jnp.eye(3)}),
         f"acts on 2 x 3 = 6 channels, the main width is {d}"),
        (lambda f: f["biases"].__setitem__("q_proj", jnp.zeros(5)), "biases/q_proj: has shape \\(5,\\)"),
        (lambda f: f["split"].__setitem__("text_idx", jnp.asarray([d + 1], jnp.int32)), "text_idx: must be"),
        (lambda f: f["acts"].__setitem__("text", None), "acts/text: is absent but the group has"),
        (lambda f: f["weights"]["k_proj"].__setitem__("extra", jnp.zeros(1)), "unknown \\['extra'\\]"),
        (lambda f: f["split"].__setitem__("main_mask", None), "split/main_idx: must be None with main_mask None"),
        (lambda f: f["split"].update(main_mask=None, main_idx=None), "split: has outlier channels but no main_mask"),
    ]
    for edit, msg in cases:
        with pytest.raises(CheckpointError, match=msg):
            validate_folded_block(broken(edit), spec, "block 0")
    bad = broken(cases[2][0])
    with pytest.raises(CheckpointError, match="block 0: groups/attn_in/biases/q_proj"):
        export.save_quantized(tmp_path / "ck", family="qwen2_5_vl", model_config=model.config, fp_params=model,
                              folded_blocks=[bad] + folded[1:], method_config=QWEN_CFG)
    assert not (tmp_path / "ck").exists() and not list(tmp_path.iterdir())
