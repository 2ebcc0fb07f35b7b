"""bench/real_weights.py's VLM answer metrics and resumable output, against numpy references."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from splitq_jax import calib_data as cd
from splitq_jax.modality import ANSWER, PAD, TEXT

BENCH = Path(__file__).resolve().parents[1] / "bench" / "real_weights.py"


@pytest.fixture(scope="module")
def rw():
    spec = importlib.util.spec_from_file_location("real_weights_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _batch(rows):
    """A left-padded batch from ``(pad, prompt ids, answer ids)`` rows, every row 6 tokens."""
    ids, mod = [], []
    for pad, prompt, answer in rows:
        ids.append([0] * pad + prompt + answer)
        mod.append([PAD] * pad + [TEXT] * len(prompt) + [ANSWER] * len(answer))
    return {"input_ids": np.asarray(ids, np.int32), "modality": np.asarray(mod, np.int32)}


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_answer_metrics_match_numpy(rw):
    rng = np.random.default_rng(0)
    vocab = 7
    b1 = _batch([(1, [5, 6, 1], [2, 3]), (2, [5, 6, 1], [4])])
    b1["sample_index"] = np.asarray([0, 1])
    b2 = _batch([(3, [5, 6], [6])])
    b2["sample_index"] = np.asarray([2])
    batches = [b1, b2]
    samples = [cd.Sample(image=None, prompt="q", answer=a) for a in ("teal", "circle", "yes")]

    # Positions predicting an answer token: the last prompt token and every answer token but the last.
    (rows, cols), target = rw.answer_positions(b1)
    assert rows.tolist() == [0, 0, 1] and cols.tolist() == [3, 4, 4] and target.tolist() == [2, 3, 4]

    ref = [rng.normal(size=(3, vocab)).astype(np.float32), rng.normal(size=(1, vocab)).astype(np.float32)]
    q = [r + rng.normal(scale=0.7, size=r.shape).astype(np.float32) for r in ref]
    # Make sample 1 (circle) right and sample 2 (yes) wrong under q; sample 0 right on one token only.
    q[0][0, 2] = q[0][1, 1] = q[0][2, 4] = 50.0
    q[1][0, 6] = -50.0
    out = rw.answer_metrics(ref, q, batches, samples)

    lp, lq = _log_softmax(np.concatenate(ref)), _log_softmax(np.concatenate(q))
    tgt = np.asarray([2, 3, 4, 6])
    assert out["answer_tokens"] == 4
    np.testing.assert_allclose(out["kl_answer"], np.mean((np.exp(lp) * (lp - lq)).sum(-1)), rtol=1e-5)
    assert out["top1_agreement_answer"] == pytest.approx(np.mean(lp.argmax(-1) == lq.argmax(-1)))
    np.testing.assert_allclose(out["answer_ppl"], math.exp(-np.mean(lq[np.arange(4), tgt])), rtol=1e-5)
    assert out["answer_accuracy"] == pytest.approx(1 / 3)
    assert out["answer_accuracy_shape"] == 1.0
    assert out["answer_accuracy_color"] == 0.0 and out["answer_accuracy_yes_no"] == 0.0

    same = rw.answer_metrics(ref, ref, batches, samples)
    assert same["kl_answer"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement_answer"] == 1.0


def test_resume_keeps_same_recipe_parts_and_other_processes_cells(rw, tmp_path):
    args = rw.parse_args(["--parts", "vlm"])
    recipe = rw.recipe_of(args)
    out = tmp_path / "rw.json"
    llm = {"part": "llm", "method": "rtn", "bits": "w4a4", "metric": "ppl", "value": 6.0}
    vlm = {"part": "vlm", "method": "rtn", "bits": "w4a4", "metric": "answer_accuracy", "value": 0.5}
    other = dict(recipe, vqa_per_type=recipe["vqa_per_type"] + 1)  # the VLM recipe differs, the LLM one not
    out.write_text(json.dumps([llm, vlm, {"metric": "run", "recipe": other, "command": "python x"}]))
    keep, earlier, stale = rw.load_previous(out, recipe)
    assert keep == [llm]
    assert stale == {rw.cell_key(vlm)}
    assert earlier == [{"command": "python x", "time_utc": None, "seconds": None}]


def test_bad_method_or_bits_is_an_error(rw, capsys):
    assert rw.main(["--parts", "vlm", "--bits", "w5a5", "--out", "/nonexistent/x.json"]) == 2
    assert "w5a5" in capsys.readouterr().err
    assert rw.main(["--parts", "nope"]) == 2


def test_cell_configs(rw):
    """A cell's config: ``NAME+gptq`` is the transform method with GPTQ as its weight back end; 2/3-bit
    weight-only cells of every method are on groups of 128 (one grid for RTN and the solvers)."""
    args = rw.parse_args(["--epochs", "3"])
    cfg = rw.run_config("flatquant+gptq", "w4a4", args)
    assert cfg.method == "flatquant" and cfg.weight_solver == "gptq" and cfg.epochs == 3 and cfg.w_group_size is None
    assert rw.run_config("flatquant+mocd+gptq", "w4a4", args).cws is False
    assert rw.run_config("rtn", "w3a16", args).w_group_size == 128
    assert rw.run_config("vlm-ptq", "w2a16", args).w_group_size == 128
    assert rw.run_config("splitq", "w4a4", args).weight_solver == "rtn"
    assert "splitq+gptq" in rw.known_methods() and "rtn+gptq" not in rw.known_methods()


def test_cell_options_reach_every_config(rw):
    args = rw.parse_args(["--options", "clip_search=true,damp=0.05"])
    cfg = rw.run_config("gptq", "w3a16", args)
    assert cfg.clip_search is True and cfg.damp == 0.05
    assert rw.run_config("flatquant", "w4a4", rw.parse_args(["--options", "lr=0.001"])).lr == 0.001


def test_unknown_option_fails_before_any_model_loads(rw, capsys, monkeypatch):
    monkeypatch.setattr(rw, "llm_part", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran a cell")))
    rc = rw.main(["--parts", "llm", "--methods", "gptq", "--bits", "w3a16", "--options", "no_such_option=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--options 'no_such_option=1' with gptq w3a16" in err and "no_such_option" in err
