"""The main job end to end: ``scripts/calibrate.py`` and ``quantize.quantize_model`` -> checkpoint -> runtime.

* the CLI with no model argument runs offline on the embedded default and its checkpoint loads;
  the packed-integer runtime reproduces the fake-quant model it was folded from;
* every method on the tiny Qwen2.5-VL, splitq on the tiny LLaVA, each checkpoint reloaded
  bit-identically;
* an interrupted run resumed (library and CLI) equals a clean run bit for bit;
* bad input: a clear error, exit status 2 and nothing partial left behind.

Cost: one mini-model CLI run (+ its resume twin) and a handful of tiny-model runs; the bad-input
tests that get past the model load share one embedded model (``cached_model``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from splitq_jax import calib_data as cd
from splitq_jax import pipeline
from splitq_jax.quantized import export, fold
from splitq_jax import quantize as qz
from splitq_jax.config import method_config, variant_config
from splitq_jax.quantized.export import CheckpointError
from splitq_jax.models import llava, qwen2_5_vl
from splitq_jax.runtime import QuantizedModel, load_quantized
import golden_checkpoints as golden  # noqa: E402
from test_pipeline import tiny_batches as qwen_tiny_batches  # the same tiny Qwen2.5-VL stream

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("calibrate_cli", ROOT / "scripts" / "calibrate.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

# The same arguments for the default run and its resumed twin, so both share compiled programs.
DEFAULT_ARGS = ["--samples", "2", "--epochs", "1"]
METHODS = ("rtn", "smoothquant", "flatquant", "splitq")


# ------------------------------------------------------------------------------------ helpers


def tree_snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (files) or 'dir' of everything under ``root`` (the directory itself too)."""
    if not root.exists():
        return {}
    out = {".": "dir"}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def flat_leaves(tree) -> tuple[object, list[np.ndarray]]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [np.asarray(x) for x in leaves]


def assert_trees_identical(a, b, what: str) -> None:
    """Same treedef (PackedTensor metadata included), same dtypes, bit-identical values."""
    da, la = flat_leaves(a)
    db, lb = flat_leaves(b)
    assert da == db, f"{what}: tree structure differs"
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: leaf {i} {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        assert np.array_equal(x, y), f"{what}: leaf {i} differs"


def assert_checkpoints_identical(a: Path, b: Path) -> None:
    """Every array of two checkpoints bit-identical; manifests equal up to times and resume flags."""
    ma, fpa, ba, va = export.load_quantized_parts(a)
    mb, fpb, bb, vb_ = export.load_quantized_parts(b)
    assert_trees_identical(fpa, fpb, "fp params")
    for i, (x, y) in enumerate(zip(ba, bb, strict=True)):
        assert_trees_identical(x, y, f"block {i}")
    assert (va is None) == (vb_ is None)
    for i, (x, y) in enumerate(zip(va or [], vb_ or [], strict=True)):
        assert_trees_identical(x, y, f"vision block {i}")

    def strip(m):
        m = {k: v for k, v in m.items() if k not in ("created", "files")}
        for key in ("blocks", "vision_block_reports"):
            if key in m:
                m[key] = [{k: v for k, v in blk.items() if k not in ("seconds", "resumed")} for blk in m[key]]
        return m

    assert strip(ma) == strip(mb)


@functools.partial(jax.jit, static_argnames=("cfg", "bcfg"))
def _fake_quant_block(folded, x, cos, sin, mask, modality, cfg, bcfg):
    return fold.folded_block_forward(folded, x, cos, sin, mask, modality, cfg, bcfg)


def fake_quant_logits(qm: QuantizedModel, batch: dict) -> jax.Array:
    """The same folded blocks through ``fold.folded_block_forward`` (fake-quant, float matmuls)."""
    emb = qm.embed(batch["input_ids"], batch.get("pixel_values"), batch.get("image_grid_thw"),
                   batch.get("attention_mask"))
    modality = jnp.asarray(batch["modality"], jnp.int32) if "modality" in batch else emb.modality_mask
    cos, sin = qm.model.rope(emb.position_ids)
    mask = qm.model.attention_mask(modality)
    x = emb.hidden
    for folded in qm.blocks:
        x = _fake_quant_block(folded, x, cos, sin, mask, modality, cfg=qm.spec, bcfg=qm.block_config)
    return qm.head(x)


def assert_runtime_matches_fake_quant(qm: QuantizedModel, batch: dict, tol: float = 1e-4) -> np.ndarray:
    got = np.asarray(qm.logits(batch))
    ref = np.asarray(fake_quant_logits(qm, batch))
    valid = np.asarray(batch["attention_mask"]).astype(bool)
    assert np.isfinite(got[valid]).all()
    rel = np.abs(got[valid] - ref[valid]).max() / np.abs(ref[valid]).max()
    assert rel < tol, f"integer runtime vs fake-quant: max relative difference {rel:.2e}"
    return got


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------------- the default CLI run


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``calibrate.py --samples 4 --epochs 1 --out DIR``: no model argument, offline (conftest sets
    HF_HUB_OFFLINE=1). Also hands out the embedded model the CLI built, for the other CLI tests."""
    out = tmp_path_factory.mktemp("default") / "ckpt"
    handles = []
    real = qz.load_model_for_calibration

    def spy(*a, **kw):
        handles.append(real(*a, **kw))
        return handles[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qz, "load_model_for_calibration", spy)
        rc = cli.main([*DEFAULT_ARGS, "--out", str(out)])
    assert rc == 0
    assert len(handles) == 1 and handles[0].name == qz.EMBEDDED_DEFAULT and handles[0].source_dir is None
    return out, handles[0]


@pytest.fixture
def cached_model(monkeypatch, default_run):
    """The CLI's model loader, returning the embedded model built once (same seed, same weights)."""
    handle = default_run[1]
    real = qz.load_model_for_calibration

    def load(ref, *, seed=0, **kw):
        return handle if ref is None and seed == 0 and not kw else real(ref, seed=seed, **kw)

    monkeypatch.setattr(qz, "load_model_for_calibration", load)
    return handle


def test_default_run_offline_checkpoint_loads_and_matches_fake_quant(default_run):
    out, handle = default_run
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]  # no .work, no .tmp-* left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "splitq" and manifest["bits"] == "w4a4"
    assert manifest["method_config"]["epochs"] == 1
    assert manifest["model"]["name"] == qz.EMBEDDED_DEFAULT and manifest["model"]["family"] == "qwen2_5_vl"
    assert manifest["data"]["samples"] == int(DEFAULT_ARGS[1]) and manifest["data"]["source"] == "default"
    blocks = manifest["blocks"]
    assert [b["index"] for b in blocks] == list(range(handle.model.config.text.num_layers))
    for b in blocks:
        assert np.isfinite(b["init_loss"]) and np.isfinite(b["final_loss"]) and not b["resumed"]

    qm = load_quantized(out)
    assert qm.method == "splitq" and len(qm.blocks) == len(blocks)
    # two held-out samples of the bundled set, through the embedded model's own processor
    samples = cd.load_samples("default", n=2, split="eval", seed=0)
    enc = cd.encode_samples(samples, handle.family, handle.tokenizer, handle.image_cfg)
    batch = cd.make_batches(enc, 2, handle.pad_id)[0]
    got = assert_runtime_matches_fake_quant(qm, batch)
    assert got.shape == (*batch["input_ids"].shape, handle.model.config.text.vocab_size)


@pytest.mark.slow  # ~25 s: two more mini-model runs; tests/test_cli.py::test_library_resume_* is the fast twin
def test_cli_resume_reproduces_clean_run(default_run, cached_model, tmp_path, monkeypatch, capsys):
    """Interrupted after block 1, a different-options resume is refused, the real resume finishes
    and equals the uninterrupted default run bit for bit."""
    clean, _ = default_run
    out = tmp_path / "ckpt"
    work = tmp_path / "ckpt.work"
    real_quantize = qz.quantize_model
    with monkeypatch.context() as mp:
        mp.setattr(qz, "quantize_model", functools.partial(real_quantize, fail_after_block=1))
        with pytest.raises(RuntimeError, match="injected failure after block 1"):
            cli.main([*DEFAULT_ARGS, "--out", str(out)])
    assert not out.exists()
    assert {"run.json", "block_000", "block_001"} <= {p.name for p in work.iterdir()}
    before = tree_snapshot(tmp_path)

    rc, err = run_cli([*DEFAULT_ARGS, "--lr", "0.001", "--out", out, "--resume"], capsys)
    assert rc == 2 and "different options" in err
    assert tree_snapshot(tmp_path) == before

    rc, _ = run_cli([*DEFAULT_ARGS, "--out", out, "--resume"], capsys)
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # work directory removed
    manifest = json.loads((out / "manifest.json").read_text())
    assert [b["resumed"] for b in manifest["blocks"]] == [True, True, False, False]
    assert_checkpoints_identical(out, clean)


# ------------------------------------------------------------------ every method, tiny models


def llava_tiny_batches(cfg, n_batches=2, batch=2, seed=0):
    """BOS, text, 4 image placeholders (one 28 px image = 2x2 patches), text; the last row left-padded."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        ids = np.stack([np.r_[cfg.bos_token_id, rng.integers(3, 100, 4), [cfg.image_token_id] * cfg.num_image_tokens,
                              rng.integers(3, 100, 7)] for _ in range(batch)]).astype(np.int32)
        attn = np.ones_like(ids)
        ids[-1, :2], attn[-1, :2] = cfg.pad_token_id, 0
        modality = np.where(ids == cfg.image_token_id, 2, 1).astype(np.int32)
        modality[:, -3:] = 3
        modality[attn == 0] = 0
        pixel_values = rng.normal(size=(batch, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
        out.append({"input_ids": ids, "attention_mask": attn, "pixel_values": pixel_values, "modality": modality})
    return out


@pytest.fixture(scope="module")
def tiny():
    """family -> (handle, batches, stream) for the tiny Qwen2.5-VL and LLaVA, random init."""
    return make_tiny()


def make_tiny() -> dict:
    """The ``tiny`` fixture's value, built anew (also used by ``golden_checkpoints.py``)."""
    qcfg = qwen2_5_vl.get_config("qwen2.5-vl-tiny")
    lcfg = llava.get_config("llava-1.5-tiny")
    out = {}
    for family, name, model, batches in (
        ("qwen2_5_vl", "qwen2.5-vl-tiny", qwen2_5_vl.Qwen2_5_VL(qcfg, rngs=nnx.Rngs(0)), qwen_tiny_batches(qcfg)),
        ("llava", "llava-1.5-tiny", llava.Llava(lcfg, rngs=nnx.Rngs(0)), llava_tiny_batches(lcfg)),
    ):
        handle = qz.ModelHandle(model, family, name, None, None, model.config.pad_token_id, None)
        out[family] = (handle, batches, pipeline.embed_batches(model, batches, family))
    return out


def tiny_cfg(method: str):
    """A method or component variant (``flatquant+mocd``, ...) with the tiny runs' short recipe.
    Three epochs (six steps): the first steps on these random tiny models can raise the loss."""
    return variant_config(method, "w4a4", epochs=3, batch_size=2)


@pytest.fixture(scope="module")
def tiny_runs(tiny, tmp_path_factory):
    """(family, method) -> (checkpoint path, ModelResult), each quantized once."""
    cache = {}

    def get(family: str, method: str):
        if (family, method) not in cache:
            handle, _, stream = tiny[family]
            out = tmp_path_factory.mktemp(f"{family}-{method}") / "ckpt"
            path, result = qz.quantize_model(handle, stream, tiny_cfg(method), out, data_record={"source": "synthetic"})
            cache[family, method] = (path, result)
        return cache[family, method]

    return get


# LLaVA's family parts (config, CLIP tower, 1-D rope, no q/k/v biases) with the cheapest method;
# split groups and branches are exported and reloaded above on the Qwen2.5-VL blocks.
@pytest.mark.parametrize("family,method", [("qwen2_5_vl", m) for m in METHODS] + [("llava", "rtn")])
def test_method_checkpoint_reloads_bit_identically(tiny, tiny_runs, family, method):
    handle, batches, _ = tiny[family]
    path, result = tiny_runs(family, method)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["bits"] == "w4a4"
    assert manifest["model"]["family"] == family and len(manifest["blocks"]) == 2
    assert all(np.isfinite(b["final_loss"]) for b in manifest["blocks"])
    if tiny_cfg(method).trains:
        assert all(b["final_loss"] <= b["init_loss"] * 1.05 for b in manifest["blocks"])
    assert not path.with_name("ckpt.work").exists()

    qm = load_quantized(path)
    # every leaf saved = every leaf loaded (treedef incl. PackedTensor metadata, dtype, bits)
    for i, (saved, loaded) in enumerate(zip(result.folded_blocks, qm.blocks, strict=True)):
        assert_trees_identical(saved, loaded, f"block {i}")
    assert_trees_identical(export.fp_state_dict(handle.model), export.fp_state_dict(qm.model), "fp params")

    batch = batches[0]
    got = assert_runtime_matches_fake_quant(qm, batch)
    in_memory = QuantizedModel.from_parts(family=family, model_config=handle.model.config, fp_params=handle.model,
                                          folded_blocks=result.folded_blocks, method_config=tiny_cfg(method))
    assert np.array_equal(got, np.asarray(in_memory.logits(batch)))  # outputs identical after reload


# flatquant+mocd is slow: a calibration of its own for a path that splitq's golden also takes
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "flatquant+mocd" else c
                                  for c in golden.CASES])
def test_checkpoint_bits_unchanged(tiny, tiny_runs, case):
    """Every array of the exported checkpoint and the loaded model's logits are those recorded in
    ``tests/golden/`` (see ``golden_checkpoints.py``): a restructuring changes no output bit."""
    path, _ = tiny_runs("qwen2_5_vl", case)
    golden.check(case, golden.digest(path, tiny["qwen2_5_vl"][1][0]))


def test_smoothquant_checkpoint_carries_no_transform(tiny, tiny_runs):
    """A SmoothQuant checkpoint pays no online transform: every folded group's main and outlier
    transforms are absent, so the runtime takes the transform-free path; its smoothing lives in
    the saved norms (which differ from the model's)."""
    path, _ = tiny_runs("qwen2_5_vl", "smoothquant")
    qm = load_quantized(path)
    model = tiny["qwen2_5_vl"][0].model
    for i, blk in enumerate(qm.blocks):
        assert all(f["acts"]["transform"] is None and f["acts"].get("text") is None
                   for f in blk["groups"].values()), f"block {i}"
        # nor a channel mask: the main part is every channel, fed as it is
        assert all(f["split"]["main_mask"] is None and f["split"]["main_idx"] is None
                   for f in blk["groups"].values()), f"block {i}"
        fp_norm = np.asarray(list(model.blocks)[i].block_params()["input_layernorm"]["scale"])
        assert not np.array_equal(np.asarray(blk["norms"]["input_layernorm"]["scale"]), fp_norm)


def test_library_resume_reproduces_clean_run(tiny, tiny_runs, tmp_path):
    handle, _, stream = tiny["qwen2_5_vl"]
    clean, _ = tiny_runs("qwen2_5_vl", "splitq")
    cfg = tiny_cfg("splitq")
    out, work = tmp_path / "ckpt", tmp_path / "ckpt.work"
    data = {"source": "synthetic"}
    with pytest.raises(RuntimeError, match="injected failure after block 0"):
        qz.quantize_model(handle, stream, cfg, out, data_record=data, fail_after_block=0)
    assert not out.exists() and (work / "block_000").is_dir() and not (work / "block_001").exists()
    before = tree_snapshot(tmp_path)
    with pytest.raises(qz.QuantizeError, match="different options"):
        qz.quantize_model(handle, stream, cfg.replace(seed=1), out, data_record=data, resume=True)
    assert tree_snapshot(tmp_path) == before
    path, result = qz.quantize_model(handle, stream, cfg, out, data_record=data, resume=True)
    assert [r.resumed for r in result.reports] == [True, False]
    assert not work.exists()
    assert_checkpoints_identical(path, clean)


def test_checkpoint_of_an_unknown_method_loads_and_runs(tiny, tiny_runs, tmp_path):
    """Loading reads the manifest's inference spec, never a method config: a checkpoint whose
    method this version does not know gives the very same logits."""
    src, _ = tiny_runs("qwen2_5_vl", "splitq")
    ck = tmp_path / "ckpt"
    shutil.copytree(src, ck)
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["method"] = manifest["method_config"]["method"] = "a-method-from-the-future"
    manifest["method_config"]["a_new_option"] = 3
    (ck / "manifest.json").write_text(json.dumps(manifest))
    batch = tiny["qwen2_5_vl"][1][0]
    qm, ref = load_quantized(ck), load_quantized(src)
    assert qm.method == "a-method-from-the-future" and ref.method == "splitq" and qm.spec == ref.spec
    assert qm.provenance["a_new_option"] == 3  # kept as saved, never parsed into a config
    assert np.array_equal(np.asarray(qm.logits(batch)), np.asarray(ref.logits(batch)))


def test_corrupted_checkpoint_names_the_file(tiny_runs, tmp_path):
    src, _ = tiny_runs("qwen2_5_vl", "splitq")
    ck = tmp_path / "ckpt"
    shutil.copytree(src, ck)
    target = max((p for p in (ck / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(target.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 8] = bytes(b ^ 0xFF for b in raw[mid:mid + 8])
    target.write_bytes(bytes(raw))
    rel = target.relative_to(ck).as_posix()
    with pytest.raises(CheckpointError, match="corrupted") as e:
        load_quantized(ck)
    assert rel in str(e.value)


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv,message", [
    (["--model", "qwen9-vl-77b"], "unknown model 'qwen9-vl-77b': give a named model ("),
    (["--model", "splitq-tests/no-such-model"], "HF_HUB_OFFLINE"),  # a hub id while offline
    (["--bits", "w9a4"], "unsupported bit width 9"),
    (["--bits", "int4"], "not of the form wXaY"),
    (["--samples", "0"], "--samples must be at least 1"),
], ids=["unknown-model", "hub-id-offline", "bits-w9a4", "bits-int4", "samples-0"])
def test_bad_argument_fails_cleanly(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest sets it too; never reach for the network here
    rc, err = run_cli([*argv, "--out", tmp_path / "ckpt"], capsys)
    assert rc == 2 and message in err and err.startswith("error: ")
    assert list(tmp_path.iterdir()) == []


def test_unknown_method_fails_cleanly(tmp_path, capsys):
    rc, err = run_cli(["--method", "nosuch", "--out", tmp_path / "ckpt"], capsys)
    assert rc == 2 and "unknown method 'nosuch': choose one of rtn, smoothquant, flatquant, splitq, gptq" in err
    config = tmp_path / "method.json"
    config.write_text(json.dumps({"method": "nosuch"}))
    rc, err = run_cli(["--config", config, "--out", tmp_path / "ckpt"], capsys)
    assert rc == 2 and "unknown method 'nosuch'" in err
    assert [p.name for p in tmp_path.iterdir()] == ["method.json"]


def _write_png(path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(path)


@pytest.mark.parametrize("case", ["empty", "malformed", "missing-image", "undecodable-image", "over-long"])
def test_bad_calibration_data_fails_cleanly(case, cached_model, tmp_path, capsys):
    data = tmp_path / "calib.jsonl"
    _write_png(tmp_path / "ok.png")
    good = json.dumps({"image": "ok.png", "prompt": "What is this?", "answer": "grey"})
    if case == "empty":
        data.write_text("")
        message = "file is empty"
    elif case == "malformed":
        data.write_text(good + "\n" + '{"image": "ok.png", "prompt": "What' + "\n")
        message = f"{data}:2: malformed JSON"
    elif case == "missing-image":
        data.write_text(good + "\n" + json.dumps({"image": "nope.png", "prompt": "What?"}) + "\n")
        message = f"{data}:2: image {str(tmp_path / 'nope.png')!r} does not exist"
    elif case == "over-long":  # ~20k tokens; tests/test_reliability.py runs it under a memory cap (slow)
        data.write_text(good + "\n" + json.dumps({"image": "ok.png", "prompt": "word " * 20000 + "?"}) + "\n")
        message = f"{data}:2: the sample is "
    else:
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        data.write_text(good + "\n" + json.dumps({"image": "bad.png", "prompt": "What?"}) + "\n")
        message = f"{data}:2: cannot decode image file"
    before = tree_snapshot(tmp_path)
    rc, err = run_cli(["--calib-data", data, "--samples", "2", "--out", tmp_path / "ckpt"], capsys)
    assert rc == 2 and message in err, err
    if case == "over-long":
        assert "more than the 2048-token limit" in err and "--max-tokens" in err
    assert tree_snapshot(tmp_path) == before


def test_existing_output_refused_unless_overwrite(default_run, cached_model, tmp_path, capsys):
    out, _ = default_run
    before = tree_snapshot(out.parent)
    rc, err = run_cli([*DEFAULT_ARGS, "--out", out], capsys)
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert tree_snapshot(out.parent) == before  # untouched, no .work beside it

    # an unrelated existing directory: refused and untouched, then replaced with --overwrite
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    before = tree_snapshot(tmp_path)
    args = ["--method", "rtn", "--samples", "2", "--out", target]
    rc, err = run_cli(args, capsys)
    assert rc == 2 and "already exists" in err
    assert tree_snapshot(tmp_path) == before
    rc, _ = run_cli([*args, "--overwrite"], capsys)
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert not (target / "keep.txt").exists()
    assert load_quantized(target).method == "rtn"


def test_resume_without_interrupted_run_fails_cleanly(cached_model, tmp_path, capsys):
    rc, err = run_cli(["--samples", "1", "--out", tmp_path / "ckpt", "--resume"], capsys)
    assert rc == 2 and "nothing to resume" in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- vision tower


# ~20 s each: the tower's calibration through quantize_model is also run by
# test_quantized_block_inputs_start_from_the_quantized_tower (Qwen) and test_small_vlm (DINOv2)
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) for f in ("qwen2_5_vl", "llava")])
def test_quantize_vision_checkpoint(tiny, family, tmp_path):
    """--quantize-vision: vision blocks calibrated (W3A3 here while the LLM is W4A4), exported
    without the tower's fp blocks, reloaded bit-identically; the integer vision tower matches the
    fake-quant folded blocks, and the logits use it."""
    from splitq_jax import vision_block as vb

    handle, batches, stream = tiny[family]
    cfg = tiny_cfg("splitq")  # the LLM's recipe of tiny_runs: its compiled programs are shared
    # the vision blocks initialise only (their training step is tested in test_vision_quant)
    job = qz.vision_job(handle, batches, cfg.replace(epochs=0), "w3a3")
    assert job.cfg.bits == "w3a3" and job.cfg.text_ratio == 0 and not job.cfg.mac
    reports = []
    path, result = qz.quantize_model(handle, stream, cfg, tmp_path / "ckpt", data_record={"source": "synthetic"},
                                     vision=job, on_block=reports.append)
    n_vision = vb.num_quantized_blocks(handle.model.config, family)
    assert [r.part for r in reports] == ["vision"] * n_vision + ["language"] * 2
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["vision"]["bits"] == "w3a3" and manifest["vision"]["num_blocks"] == n_vision
    assert manifest["bits"] == "w4a4" and len(manifest["vision_block_reports"]) == n_vision

    qm = load_quantized(path)
    from splitq_jax.models.family import get_family

    top, key = get_family(family).vision_attr, get_family(family).vision_blocks_attr
    assert key not in export.fp_state_dict(qm.model)[top]  # the fp tower blocks are not stored
    vbcfg = vb.block_config(handle.model, family)

    def fake(folded, x, cos, sin, mask, modality):
        return _fake_quant_block(folded, x, cos, sin, mask, modality, cfg=qm.vision_spec, bcfg=vbcfg)

    batch = batches[0]
    args = (batch["pixel_values"], batch.get("image_grid_thw"))
    got = np.asarray(qm.vision_features(*args))
    ref = np.asarray(qm.vision_features(*args, block=fake))
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    fp_feats = np.asarray(handle.model.visual(jnp.asarray(args[0]), args[1]) if family == "qwen2_5_vl"
                          else handle.model.image_features(args[0]))
    assert got.shape == fp_feats.shape and not np.allclose(got, fp_feats)  # really quantized
    assert np.abs(got - fp_feats).max() < 0.5 * np.abs(fp_feats).max()  # ... and still close
    assert_runtime_matches_fake_quant(qm, batch)  # the LLM blocks after the integer vision tower
    emb = qm.embed(batch["input_ids"], batch.get("pixel_values"), batch.get("image_grid_thw"), batch["attention_mask"])
    is_vis = np.asarray(emb.modality_mask) == 2
    np.testing.assert_array_equal(np.asarray(emb.hidden)[is_vis], got.reshape(-1, got.shape[-1]))
    if family == "qwen2_5_vl":  # a crash in the language part resumes with the saved vision blocks
        out2 = tmp_path / "again"
        with pytest.raises(RuntimeError, match="injected failure after block 0"):
            qz.quantize_model(handle, stream, cfg, out2, data_record={"source": "synthetic"}, vision=job,
                              fail_after_block=0)
        resumed = []
        path2, _ = qz.quantize_model(handle, stream, cfg, out2, data_record={"source": "synthetic"}, vision=job,
                                     resume=True, on_block=resumed.append)
        assert [r.resumed for r in resumed] == [True] * n_vision + [True, False]
        assert_checkpoints_identical(path2, path)


def test_vision_bits_without_quantize_vision_fails(tmp_path, capsys):
    rc, err = run_cli(["--vision-bits", "w4a4", "--out", tmp_path / "ckpt"], capsys)
    assert rc == 2 and "--vision-bits needs --quantize-vision" in err
    assert list(tmp_path.iterdir()) == []


def test_quantized_block_inputs_start_from_the_quantized_tower(tiny, tmp_path, monkeypatch):
    """block_inputs='quantized' + --quantize-vision: the language blocks' quantized stream starts
    from embeddings whose vision positions hold the quantized tower's features."""
    handle, batches, stream = tiny["qwen2_5_vl"]
    cfg = method_config("rtn", "w4a4", block_inputs="quantized")
    seen = {}
    real = pipeline.quantize_decoder

    def spy(*a, **kw):
        seen["x_quant"] = kw.get("x_quant")
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "quantize_decoder", spy)
    path, _ = qz.quantize_model(handle, stream, cfg, tmp_path / "ckpt", data_record={"source": "synthetic"},
                                vision=qz.vision_job(handle, batches, cfg))
    xq, x = np.asarray(seen["x_quant"]), np.asarray(stream.x)
    is_vis = np.asarray(stream.modality) == 2
    assert np.array_equal(xq[~is_vis], x[~is_vis]) and not np.allclose(xq[is_vis], x[is_vis])
    qm = load_quantized(path)
    want = np.concatenate([np.asarray(qm.vision_features(b["pixel_values"], b["image_grid_thw"])) for b in batches])
    np.testing.assert_allclose(xq[is_vis], want.reshape(-1, want.shape[-1]), rtol=1e-5, atol=1e-6)
