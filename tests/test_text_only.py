"""Text-only models (the GGUF qwen2.5-coder-0.5b): calibration on Python code, export, runtime,
evaluation. A small random text-only Qwen2 decoder with the real Qwen2.5 vocabulary stands in for
the real weights (those are exercised by the slow tests and bench/real_weights.py)."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from splitq_jax import calib_data as cd
from splitq_jax import evaluate as ev
from splitq_jax import pipeline
from splitq_jax import preprocess as pp
from splitq_jax import quantize as qz
from splitq_jax.config import method_config
from splitq_jax.models.qwen2_5_vl import Qwen2_5_VL, get_config
from splitq_jax.runtime import load_quantized
from test_cli import assert_runtime_matches_fake_quant


@pytest.fixture(scope="module")
def handle():
    cfg = dataclasses.replace(get_config("qwen2.5-vl-mini"), vision=None)
    model = Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))
    return qz.ModelHandle(model, "qwen2_5_vl", "coder-mini", pp.qwen_tokenizer(), None, cfg.pad_token_id, None)


def test_code_batches_are_text_only(handle):
    batches = qz.calibration_batches(handle, samples=3, batch_size=2, max_tokens=32)
    assert [b["input_ids"].shape for b in batches] == [(2, 32), (1, 32)]
    for b in batches:
        assert b["pixel_values"] is None and (b["modality"] == cd.TEXT).all()
    # deterministic, and the evaluation windows come from other files
    again = qz.calibration_batches(handle, samples=3, batch_size=2, max_tokens=32)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    held_out = cd.code_samples(handle.tokenizer, split="eval", n=3, max_tokens=32)
    assert not {tuple(s.input_ids) for s in held_out} & {tuple(r) for b in batches for r in b["input_ids"]}


def test_text_only_bad_data_and_vision(handle):
    with pytest.raises(qz.QuantizeError, match="text-only model: it calibrates on text"):
        qz.calibration_batches(handle, source="my.jsonl", samples=2)
    with pytest.raises(qz.QuantizeError, match="no vision tower"):
        qz.vision_job(handle, [], method_config("splitq", "w4a4"))


def test_text_only_quantize_export_run_evaluate(handle, tmp_path):
    batches = qz.calibration_batches(handle, samples=4, batch_size=2, max_tokens=32)
    stream = pipeline.embed_batches(handle.model, batches, handle.family)
    assert stream.x.shape == (4, 32, 128)
    # Initialisation only (MOCD split, transforms, CWS/MAC from their closed-form start): the flow of
    # a text-only model is the point here, the training step is compiled and tested elsewhere.
    cfg = method_config("splitq", "w4a4", epochs=0, batch_size=2)
    with pytest.warns(UserWarning, match="no vision tokens"):  # MOCD's documented text-only fallback
        path, result = qz.quantize_model(handle, stream, cfg, tmp_path / "ckpt", data_record={"source": "stdlib"})
    assert len(result.folded_blocks) == 4
    qm = load_quantized(path)
    assert qm.config.vision is None
    assert_runtime_matches_fake_quant(qm, batches[0])
    encoded = cd.code_samples(handle.tokenizer, split="eval", n=2, max_tokens=32)
    res = ev.evaluate(qm, handle.model, ev.eval_batches(encoded, 2, handle.pad_id), encoded,
                      tokenizer=handle.tokenizer, family="qwen2_5_vl")
    assert res["n_next_tokens"] == 2 * 31
    assert math.isfinite(res["ppl_fp"]) and math.isfinite(res["ppl_q"]) and res["ppl_q"] != res["ppl_fp"]
    assert 0 < res["kl"] and 0 <= res["top1_agreement"] <= 1
    # a caller's cached fp logits give the same numbers
    eb = ev.eval_batches(encoded, 2, handle.pad_id)
    cached = ev.evaluate(qm, handle.model, eb, encoded, tokenizer=handle.tokenizer, family="qwen2_5_vl",
                         fp_logits=[ev.model_logits(handle.model, b, "qwen2_5_vl") for b in eb])
    assert cached.keys() == res.keys()
    for k, v in res.items():  # NaN for the empty sets (no vision, no answer), equal elsewhere
        assert (math.isnan(v) and math.isnan(cached[k])) or cached[k] == v, k
    # perplexity is exp(mean NLL) of the real next tokens, checked by hand
    logits = np.asarray(handle.model(jnp.asarray(np.stack([s.input_ids for s in encoded]))), np.float64)
    ids = np.stack([s.input_ids for s in encoded])
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse[:, :-1] - np.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0]
    assert abs(math.exp(nll.mean()) - res["ppl_fp"]) < 1e-3 * res["ppl_fp"]
