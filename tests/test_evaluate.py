"""Evaluation against the fp reference: metric code checked against independent numpy
computations, exact-match normalisation, and the evaluate / generate scripts.

One small checkpoint per module: the embedded mini Qwen2.5-VL (real tokenizer, real vocabulary)
quantized with rtn w4a4 (closed form: calibration training and splitq's branch initialisation add
tens of seconds of compile and nothing the metrics need) from 4 calibration samples; evaluated on
4 held-out samples (3 easy-vqa questions with answers, 1 photograph). Every batch, here and in the
script runs, has one sample and one common length, so each model compiles once for the module.
"""

import importlib.util
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitq_jax import calib_data as cd
from splitq_jax import evaluate as ev
from splitq_jax import quantize as qz
from splitq_jax.config import method_config
from splitq_jax.runtime import load_quantized

pytest.importorskip("skimage")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
N_EVAL = 4
BATCH = 1
MAX_NEW = 2  # generation length: enough to exercise the decode loop, cheap to compile


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    handle = qz.load_model_for_calibration(None, seed=0)
    stream = qz.calibration_stream(handle, samples=4, seed=0, batch_size=4)
    cfg = method_config("rtn", "w4a4")
    ckpt = tmp_path_factory.mktemp("eval") / "ckpt"
    qz.quantize_model(handle, stream, cfg, ckpt, data_record={"source": "default", "samples": 4, "seed": 0})
    qm = load_quantized(ckpt)
    raw = cd.load_samples("default", n=N_EVAL, split="eval", seed=0)
    encoded = cd.encode_samples(raw, handle.family, handle.tokenizer, handle.image_cfg)
    batches = ev.eval_batches(encoded, BATCH, handle.pad_id)
    return handle, qm, ckpt, raw, encoded, batches


@pytest.fixture(scope="module")
def evaluated(setup):
    """The quantized model's evaluation and the logits it saw, concatenated ``(N_EVAL, L, vocab)``
    per model: (result, (fp, quantized))."""
    handle, qm, _, _, encoded, batches = setup
    seen = {"fp": [], "q": []}
    model_logits = ev.model_logits

    def spy(model, batch, family):
        out = model_logits(model, batch, family)
        seen["q" if model is qm else "fp"].append(np.asarray(out))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "model_logits", spy)
        result = ev.evaluate(qm, handle.model, batches, encoded, tokenizer=handle.tokenizer, family=handle.family,
                             max_new_tokens=MAX_NEW)
    assert len(seen["fp"]) == len(seen["q"]) == len(batches)
    return result, (np.concatenate(seen["fp"]), np.concatenate(seen["q"]))


@pytest.fixture(scope="module")
def q_result(evaluated):
    return evaluated[0]


@pytest.fixture(scope="module")
def logits(evaluated):
    return evaluated[1]


def _cat(batches, key):
    return np.concatenate([b[key] for b in batches])


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("text, want", [
    ("Yes", "yes"), ("  Red.\n", "red"), ("circle!?", "circle"), ("Blue .", "blue"),
    ("\n\nTriangle\nbecause it has three sides.", "triangle"), ("no\r\nmore", "no"),
    ("", ""), ("...", ""), ("3.5", "3.5"), ("U.S.", "u.s"), ("«Oui»", "«oui"),
])
def test_normalize_answer(text, want):
    assert ev.normalize_answer(text) == want


def test_exact_match():
    assert ev.exact_match(" Rectangle.\nIt has four sides", "rectangle")
    assert not ev.exact_match("a rectangle", "rectangle")
    assert not ev.exact_match("", "no")


# ------------------------------------------------------------------------------ metrics


def test_fp_against_itself_is_exact(setup):
    """A real check of the metric code: identical logits give KL exactly 0, agreement exactly 1."""
    handle, _, _, _, encoded, batches = setup
    r = ev.evaluate(handle.model, handle.model, batches, encoded, tokenizer=handle.tokenizer,
                    family=handle.family, max_new_tokens=MAX_NEW)
    for suffix in ("", "_text", "_vision", "_answer"):
        assert r["kl" + suffix] == 0.0
        assert r["top1_agreement" + suffix] == 1.0
    assert r["answer_ppl_fp"] == r["answer_ppl_q"]
    assert r["exact_match_fp"] == r["exact_match_q"] and r["generation_agreement"] == 1.0
    modality = _cat(batches, "modality")
    assert r["n_samples"] == N_EVAL and r["n_positions"] == int((modality != cd.PAD).sum())
    assert r["n_positions"] == r["n_text_positions"] + r["n_vision_positions"]
    assert r["n_answer_tokens"] == sum(s.answer_end - s.answer_start for s in encoded) > 0
    assert r["n_exact_match"] == sum(s.answer is not None for s in encoded) == 3


def test_quantized_kl_positive_and_finite(q_result):
    r = q_result
    for suffix in ("", "_text", "_vision", "_answer"):
        assert np.isfinite(r["kl" + suffix]) and r["kl" + suffix] > 0
        assert 0.0 <= r["top1_agreement" + suffix] <= 1.0
    assert r["top1_agreement"] < 1.0
    assert np.isfinite(r["answer_ppl_q"]) and r["answer_ppl_q"] != r["answer_ppl_fp"]
    for key in ("exact_match_fp", "exact_match_q", "generation_agreement"):
        assert 0.0 <= r[key] <= 1.0


def test_kl_and_agreement_match_numpy(setup, q_result, logits):
    """float64 numpy, one sample at a time, against the pooled means."""
    _, _, _, _, _, batches = setup
    modality, answer = _cat(batches, "modality"), _cat(batches, "answer_mask")
    kl, agree = np.full(modality.shape, np.nan), np.zeros(modality.shape, bool)
    for row, (fp_row, q_row) in enumerate(zip(*logits)):
        valid = modality[row] != 0
        lp, lq = _log_softmax(fp_row[valid].astype(np.float64)), _log_softmax(q_row[valid].astype(np.float64))
        kl[row, valid] = (np.exp(lp) * (lp - lq)).sum(-1)
        agree[row, valid] = lp.argmax(-1) == lq.argmax(-1)
    next_is_answer = np.zeros_like(answer)
    next_is_answer[:, :-1] = answer[:, 1:]
    sets = {"": modality != 0, "_text": (modality == 1) | (modality == 3), "_vision": modality == 2,
            "_answer": next_is_answer}
    for suffix, mask in sets.items():
        assert mask.any()
        np.testing.assert_allclose(q_result["kl" + suffix], kl[mask].mean(), rtol=2e-3, atol=1e-7)
        np.testing.assert_allclose(q_result["top1_agreement" + suffix], agree[mask].mean(), atol=1.5 / mask.sum())


def test_answer_perplexity_is_exp_mean_nll(setup, q_result, logits):
    """Straight from the encoded samples' answer spans, not the batch's masks."""
    _, _, _, _, encoded, batches = setup
    length = batches[0]["input_ids"].shape[1]
    for name, lg in zip(("fp", "q"), logits):
        nll = []
        for row, s in enumerate(encoded):
            offset = length - len(s.input_ids)  # left padding
            for t in range(s.answer_start, s.answer_end):
                nll.append(-_log_softmax(lg[row, offset + t - 1].astype(np.float64))[s.input_ids[t]])
        assert len(nll) == q_result["n_answer_tokens"]
        np.testing.assert_allclose(q_result[f"answer_ppl_{name}"], np.exp(np.mean(nll)), rtol=1e-4)


def test_prompt_only_equals_encoding_without_answer(setup):
    handle, _, _, raw, encoded, _ = setup
    k = next(i for i, s in enumerate(raw) if s.answer is not None)
    again = cd.encode_samples([cd.Sample(image=raw[k].image, prompt=raw[k].prompt)], handle.family,
                              handle.tokenizer, handle.image_cfg)[0]
    cut = ev.prompt_only(encoded[k])
    np.testing.assert_array_equal(cut.input_ids, again.input_ids)
    np.testing.assert_array_equal(cut.modality, again.modality)
    np.testing.assert_array_equal(cut.pixel_values, again.pixel_values)


def test_more_left_padding_changes_nothing(setup, logits):
    """The prompt alone, padded to the same length (so more padding on the left), gives the same
    logits at its positions: padding is neutral, as ``eval_batches``' common length needs."""
    handle, qm, _, _, encoded, batches = setup
    k = next(i for i, s in enumerate(encoded) if s.answer is not None)
    length = batches[0]["input_ids"].shape[1]
    prompt = ev.eval_batches([ev.prompt_only(encoded[k])], 1, handle.pad_id, length=length)[0]
    n = encoded[k].answer_start
    for model, ref in zip((handle.model, qm), logits):
        got = np.asarray(ev.model_logits(model, prompt, handle.family))[0, length - n:]
        want = ref[k, length - len(encoded[k].input_ids):][:n]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


class _Scripted:
    """A stand-in fp model: the wrapped model's logits and scripted replies per prompt (matched
    on its tokens)."""

    def __init__(self, model, tokenizer, replies):
        self.model, self.tokenizer, self.replies = model, tokenizer, replies

    def __getattr__(self, name):  # embed, rope, attention_mask, head, ...: the forward's pieces
        return getattr(self.model, name)

    def generate(self, input_ids, pixel_values, image_grid_thw, attention_mask, *, max_new_tokens, eos_token_id,
                 pad_token_id):
        out = np.full((len(input_ids), max_new_tokens), pad_token_id, np.int64)
        for i, (ids, mask) in enumerate(zip(np.asarray(input_ids), np.asarray(attention_mask))):
            toks = self.tokenizer(self.replies[tuple(ids[mask.astype(bool)].tolist())])["input_ids"]
            toks = (toks + list(np.atleast_1d(eos_token_id)))[:max_new_tokens]
            out[i, :len(toks)] = toks
        return out


def test_exact_match_counts_normalised_replies(setup):
    handle, _, _, _, encoded, batches = setup
    answered = [s for s in encoded if s.answer is not None]
    key = lambda s: tuple(ev.prompt_only(s).input_ids.tolist())  # noqa: E731
    right = {key(s): f" {s.answer.capitalize()}.\nBecause." for s in answered}
    one_wrong = dict(right)
    one_wrong[key(answered[0])] = "definitely not"
    fp = _Scripted(handle.model, handle.tokenizer, right)
    q = _Scripted(handle.model, handle.tokenizer, one_wrong)
    # Generation covers every answered sample of ``encoded`` whatever the batches; two rows per
    # generation batch check that rows map back to their samples.
    r = ev.evaluate(q, fp, batches[:1], encoded, tokenizer=handle.tokenizer, family=handle.family,
                    max_new_tokens=16, gen_batch_size=2)
    assert r["n_exact_match"] == 3
    assert r["exact_match_fp"] == 1.0
    assert r["exact_match_q"] == pytest.approx(2 / 3) and r["generation_agreement"] == pytest.approx(2 / 3)


def test_reference_must_be_the_checkpoints_model(setup):
    handle, qm, _, _, _, _ = setup
    ev.check_reference(qm, handle.model)
    norm = handle.model.language_model.norm.scale
    saved = norm[...]
    try:
        norm[...] = saved * 1.5
        with pytest.raises(ev.EvaluateError, match="norm"):
            ev.check_reference(qm, handle.model)
    finally:
        norm[...] = saved


def test_report_records_and_table(setup, q_result):
    _, qm, _, _, _, _ = setup
    records = ev.result_records(q_result, qm.manifest, split="eval")
    by = {(r["metric"], r["method"]): r for r in records}
    assert by[("kl", "rtn")]["value"] == q_result["kl"] and by[("kl", "rtn")]["bits"] == "w4a4"
    assert ("kl", "fp") not in by and by[("answer_ppl", "fp")]["value"] == q_result["answer_ppl_fp"]
    assert all(set(r) >= {"metric", "value", "model", "method", "bits", "count", "split"} for r in records)
    table = ev.format_table(q_result)
    assert table.splitlines()[0].split() == ["metric", "fp", "quantized", "count"]
    assert len(table.splitlines()) == len(ev.REPORT) + 1


# ------------------------------------------------------------------------------ scripts


@pytest.fixture
def reuse_reference(setup, monkeypatch):
    """The scripts rebuild the fp model from the manifest; hand them the module's (same seed, same
    weights; ``load_reference`` still checks them against the checkpoint)."""
    handle = setup[0]
    calls = []

    def load(ref, *, seed=0, **_):
        calls.append((ref, seed))
        return handle

    monkeypatch.setattr(qz, "load_model_for_calibration", load)
    return calls


def test_evaluate_script(setup, q_result, reuse_reference, tmp_path, capsys):
    _, _, ckpt, _, _, _ = setup
    out = tmp_path / "res" / "eval.json"
    rc = _script("evaluate").main(["--checkpoint", str(ckpt), "--samples", str(N_EVAL), "--batch-size", str(BATCH),
                                   "--max-new-tokens", str(MAX_NEW), "--json", str(out)])
    assert rc == 0
    assert reuse_reference == [(qz.EMBEDDED_DEFAULT, 0)]
    printed = capsys.readouterr().out
    assert "kl_answer" in printed and "exact_match" in printed
    records = json.loads(out.read_text())
    run = [r for r in records if r["metric"] == "run"]
    assert len(run) == 1 and "scripts/evaluate.py" in run[0]["command"] and run[0]["jax"]
    kl = next(r for r in records if r["metric"] == "kl")
    assert kl["value"] == pytest.approx(q_result["kl"], rel=1e-6) and kl["samples"] == N_EVAL


def test_evaluate_script_bad_inputs(setup, tmp_path, capsys):
    _, _, ckpt, _, _, _ = setup
    main = _script("evaluate").main
    assert main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "prompt": "hi"\n')
    assert main(["--checkpoint", str(ckpt), "--data", str(bad)]) == 2
    assert "malformed JSON" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["--checkpoint", str(ckpt), "--data", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["--checkpoint", str(ckpt), "--samples", "0"]) == 2
    assert "--samples" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    with open(corrupt / "structure.json", "r+b") as f:
        f.write(b"#")
    assert main(["--checkpoint", str(corrupt), "--samples", "1"]) == 2
    assert "structure.json" in capsys.readouterr().err


def test_generate_script(setup, tmp_path, capsys):
    handle, qm, ckpt, raw, encoded, _ = setup
    # The longest question: its prompt has the generation batches' common length (no new compile).
    k = max((i for i, s in enumerate(encoded) if s.answer is not None), key=lambda i: encoded[i].answer_start)
    image = tmp_path / "shape.png"
    Image.fromarray(raw[k].image).save(image)
    main = _script("generate").main
    assert main(["--checkpoint", str(ckpt), "--image", str(image), "--prompt", raw[k].prompt,
                 "--max-new-tokens", str(MAX_NEW)]) == 0
    prompt = ev.prompt_only(encoded[k])
    stop = ev.end_of_turn_ids(qm.config, handle.tokenizer)  # the model's EOS, <|im_end|>, <|endoftext|>
    assert set(qm.config.eos_token_id) < set(stop) and handle.tokenizer.convert_tokens_to_ids("<|im_end|>") in stop
    tokens = qm.generate(prompt.input_ids[None], prompt.pixel_values, prompt.image_grid_thw,
                         max_new_tokens=MAX_NEW, eos_token_id=stop)
    row = tokens[0].tolist()
    cut = next((i for i, t in enumerate(row) if t in set(stop)), len(row))
    want = handle.tokenizer.decode(row[:cut], skip_special_tokens=True)
    assert capsys.readouterr().out == want + "\n"  # streamed token by token: the same text
    assert main(["--checkpoint", str(tmp_path / "nope"), "--image", str(image), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["--checkpoint", str(ckpt), "--image", str(broken), "--prompt", "hi"]) == 2
    assert "cannot decode image" in capsys.readouterr().err
    assert main(["--checkpoint", str(ckpt), "--image", str(tmp_path / "none.png"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--model", "qwen2.5-vl-tiny", "--fp", "--prompt", "hi"]) == 2
    assert "--fp answers with the full-precision model of a --checkpoint" in capsys.readouterr().err


def test_generate_script_fp_answers_with_the_reference(setup, reuse_reference, tmp_path, capsys):
    handle, qm, ckpt, raw, encoded, _ = setup
    k = max((i for i, s in enumerate(encoded) if s.answer is not None), key=lambda i: encoded[i].answer_start)
    image = tmp_path / "shape.png"
    Image.fromarray(raw[k].image).save(image)
    assert _script("generate").main(["--checkpoint", str(ckpt), "--fp", "--image", str(image), "--prompt",
                                     raw[k].prompt, "--max-new-tokens", str(MAX_NEW)]) == 0
    assert reuse_reference == [(qz.EMBEDDED_DEFAULT, 0)]  # the reference, checked against the checkpoint
    want = ev.generate_text(handle.model, raw[k].image, raw[k].prompt, family=handle.family,
                            tokenizer=handle.tokenizer, image_cfg=handle.image_cfg, max_new_tokens=MAX_NEW)
    assert capsys.readouterr().out == want + "\n"


def test_prompt_longer_than_the_context_is_refused(setup):
    handle, _, _, raw, _, _ = setup
    n = len(cd.encode_samples([cd.Sample(image=raw[0].image, prompt=raw[0].prompt)], handle.family,
                                 handle.tokenizer, handle.image_cfg)[0].input_ids)
    with pytest.raises(ev.EvaluateError, match=f"the prompt is {n} tokens; with --max-new-tokens 4 that is more "
                                               f"than the model's context of {n + 3} tokens"):
        ev.generate_text(handle.model, raw[0].image, raw[0].prompt, family=handle.family, tokenizer=handle.tokenizer,
                         image_cfg=handle.image_cfg, max_new_tokens=4, max_context=n + 3)


def test_reference_of_a_named_model_is_rebuilt_by_name(setup, monkeypatch):
    """easyvqa-vlm-0.5b records its decoder's directory as source_dir (its tokenizer lives there);
    loading that directory gave the text-only decoder, and evaluation stopped with "the reference
    model's config differs". A named model is rebuilt by its name."""
    handle, qm = setup[0], setup[1]
    calls = []

    def load(ref, *, seed=0, **_):
        calls.append(ref)
        return handle

    monkeypatch.setattr(qz, "load_model_for_calibration", load)
    import splitq_jax.models.converters.checkpoints as ckpts

    fake = types.SimpleNamespace(model=qm.model, family=qm.family, config=qm.config, vision_blocks=None,
                                 manifest={**qm.manifest, "model": {**qm.manifest["model"], "name": "easyvqa-vlm-0.5b"},
                                           "source_dir": str(Path(__file__).parent)})
    ev.load_reference(fake)
    assert calls == ["easyvqa-vlm-0.5b"] and "easyvqa-vlm-0.5b" in ckpts.named_models()
    fake.manifest["model"]["name"] = "my-local-dir"  # not a named model: its existing source_dir
    ev.load_reference(fake)
    assert calls[-1] == str(Path(__file__).parent)


@pytest.mark.slow  # two generation passes over a 151k-word vocabulary, three photo questions, the figure
def test_demo_script_writes_the_report(setup, reuse_reference, tmp_path, capsys):
    _, _, ckpt, _, _, _ = setup
    report = tmp_path / "report.md"
    assert _script("demo").main(["--checkpoint", str(ckpt), "--per-type", "1", "--report", str(report)]) == 0
    text = report.read_text()
    for row in ("| shape | 1 |", "| color | 1 |", "| yes/no | 1 |", "| all | 3 |", "| chelsea |", "| moon |"):
        assert row in text
    assert (tmp_path / "channels.png").stat().st_size > 0 and "![per-channel activation magnitude](channels.png)" in text
    assert _script("demo").main(["--checkpoint", str(ckpt), "--per-type", "0"]) == 2
    assert "--per-type must be at least 1" in capsys.readouterr().err
