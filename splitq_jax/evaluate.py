"""Evaluation: a quantized model against its full-precision reference on held-out samples.

::

    qm = load_quantized("out/qwen2.5-vl-3b-w4a4")
    ref = load_reference(qm)                     # the fp model the checkpoint was made from (checked)
    raw = cd.load_samples("default", n=32, split="eval")          # disjoint from calibration
    encoded = cd.encode_samples(raw, ref.family, ref.tokenizer, ref.image_cfg)
    result = evaluate(qm, ref.model, eval_batches(encoded, 4, ref.pad_id), encoded,
                      tokenizer=ref.tokenizer, family=ref.family)

Every mean is pooled over the whole set (each position or sample weighs the same), not a mean
of per-sample means. Position sets, each a subset of the real (non-pad) positions:

- *all*: every real position; *text*: positions holding a text token (prompt, template or answer,
  modality ``TEXT`` or ``ANSWER``); *vision*: positions holding an image token;
- *answer*: positions whose **next** token is a reference-answer token, i.e. exactly the
  distributions that answer perplexity scores.

Metrics (keys of :func:`evaluate`'s result; ``_fp`` / ``_q`` name the model, the others compare
the quantized model with the fp one):

- ``kl``, ``kl_text``, ``kl_vision``, ``kl_answer``: mean KL(P_fp || P_q) of the next-token
  distributions, in nats, from float32 ``log_softmax``;
- ``top1_agreement[_text|_vision|_answer]``: fraction of positions where the fp model's top-1
  token is also the quantized model's;
- ``answer_ppl_fp``, ``answer_ppl_q``: exp of the mean NLL of the reference answer tokens given
  their prefix (teacher forcing);
- ``exact_match_fp``, ``exact_match_q``: greedy generation from the prompt *without* the answer,
  normalised (:func:`normalize_answer`) and compared with the normalised reference answer;
  ``generation_agreement``: fraction of those samples where both models' normalised outputs agree;
- counts: ``n_samples``, ``n_positions``, ``n_text_positions``, ``n_vision_positions``,
  ``n_answer_tokens``, ``n_exact_match`` (samples with a reference answer).

A metric over an empty set is NaN (e.g. answer metrics on data without answers).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import sys
import time
import unicodedata
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import calib_data as cd
from splitq_jax.modality import ANSWER, PAD, TEXT, VISION
from splitq_jax.models.family import get_family
from splitq_jax.errors import SplitqError

Batch = Mapping[str, Any]


class EvaluateError(SplitqError):
    """Evaluation inputs that do not fit together; the message says how to fix it."""


# ------------------------------------------------------------------------------ answers


def normalize_answer(text: str) -> str:
    """The first non-empty line, stripped, lowercased, without trailing punctuation.

    ``"  Red.\\nThe shape is red."`` -> ``"red"``; ``"Yes!"`` -> ``"yes"``.
    """
    lines = text.strip().splitlines()
    out = lines[0].strip().lower() if lines else ""
    while out and unicodedata.category(out[-1]).startswith("P"):
        out = out[:-1].rstrip()
    return out


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


# ------------------------------------------------------------------------------ models


def _is_quantized(model: Any) -> bool:
    from splitq_jax.runtime import QuantizedModel

    return isinstance(model, QuantizedModel)


def model_logits(model: Any, batch: Batch, family: str) -> jax.Array:
    """Logits ``(B, N, vocab)`` of a full-precision family model or a ``QuantizedModel``, both
    through the one whole-model forward (:mod:`splitq_jax.models.forward`)."""
    if _is_quantized(model):
        return model.logits(batch)
    from splitq_jax.models import forward

    return forward.logits(model, family, batch)


def model_generate(model: Any, batch: Batch, family: str, *, max_new_tokens: int,
                   eos_token_id: int | Sequence[int] | None, pad_token_id: int | None,
                   on_token=None) -> np.ndarray:
    """Greedy tokens ``(B, max_new_tokens)`` for a left-padded prompt batch, either kind of model
    (``on_token(tokens (B,))`` streams them)."""
    # A QuantizedModel's generate takes image_grid_thw whatever its family (None for LLaVA).
    args = get_family(family).model_args(batch, with_grid=True if _is_quantized(model) else None)
    kw = {} if on_token is None else {"on_token": on_token}
    return np.asarray(model.generate(*args, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                     pad_token_id=pad_token_id, **kw))


def decode_generated(tokens: np.ndarray, tokenizer, eos_token_id: int | Sequence[int] | None) -> list[str]:
    """Text of each row of generated tokens, cut at its first EOS, special tokens dropped."""
    eos = set(np.atleast_1d(eos_token_id).tolist()) if eos_token_id is not None else set()
    out = []
    for row in np.asarray(tokens).tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        out.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return out


# ------------------------------------------------------------------------------ per position


def token_stats(logits_fp: jax.Array, logits_q: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """Two models' next-token distributions compared at each row of ``(..., vocab)`` logits, float32
    ``(...)``: ``kl`` KL(P_fp || P_q); ``agree`` 1 where the fp model's top-1 token is also the
    quantized model's (one of its, on an exact tie); ``nll_fp`` / ``nll_q`` NLL of ``targets``."""
    lp = jax.nn.log_softmax(logits_fp.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(logits_q.astype(jnp.float32), axis=-1)
    # A contraction, not sum(p * d): XLA:CPU vectorises dots but not product reductions (5x
    # faster over a 150k vocabulary); HIGHEST keeps GPUs from rounding the operands to TF32.
    kl = jnp.einsum("...v,...v->...", jnp.exp(lp), lp - lq, precision=jax.lax.Precision.HIGHEST)
    top_fp = jnp.argmax(lp, axis=-1)[..., None]  # one argmax: they are slow on CPU too
    agree = (jnp.take_along_axis(lq, top_fp, axis=-1)[..., 0] == jnp.max(lq, axis=-1)).astype(jnp.float32)
    t = targets.astype(jnp.int32)[..., None]
    return {"kl": kl, "agree": agree, "nll_fp": -jnp.take_along_axis(lp, t, axis=-1)[..., 0],
            "nll_q": -jnp.take_along_axis(lq, t, axis=-1)[..., 0]}


@jax.jit
def position_stats(logits_fp: jax.Array, logits_q: jax.Array, input_ids: jax.Array) -> dict[str, jax.Array]:
    """Per-position :func:`token_stats` of ``(B, N, vocab)`` logits, all ``(B, N)`` float32, the
    NLLs of the actual next token ``input_ids[:, t + 1]`` (the last column has no next token: 0).
    Rows at padding are meaningless (possibly NaN); mask them out.
    """
    nxt = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    stats = token_stats(logits_fp, logits_q, nxt)
    for k in ("nll_fp", "nll_q"):
        stats[k] = stats[k].at[:, -1].set(0.0)
    return stats


def position_masks(batch: Batch) -> dict[str, np.ndarray]:
    """The position sets of the module docstring as ``(B, N)`` bool masks: all, text, vision, answer."""
    modality = np.asarray(batch["modality"])
    answer_tokens = np.asarray(batch["answer_mask"]) if "answer_mask" in batch else modality == ANSWER
    predicts_answer = np.zeros_like(answer_tokens, dtype=bool)
    predicts_answer[:, :-1] = answer_tokens[:, 1:]
    return {"all": modality != PAD, "text": (modality == TEXT) | (modality == ANSWER),
            "vision": modality == VISION, "answer": predicts_answer}


# ------------------------------------------------------------------------------ batches


def pad_batch(batch: Batch, length: int, pad_id: int) -> dict[str, Any]:
    """``batch`` left-padded to ``length`` tokens (padding is masked everywhere, so the real
    positions compute the same numbers; one common length means one compiled program)."""
    n = np.shape(batch["input_ids"])[1]
    if n > length:
        raise ValueError(f"batch of {n} tokens is longer than {length}")
    out = dict(batch)
    if n == length:
        return out
    fill = {"input_ids": pad_id, "attention_mask": 0, "modality": PAD, "answer_mask": False}
    for key, value in fill.items():
        if key in batch:
            a = np.asarray(batch[key])
            out[key] = np.concatenate([np.full((a.shape[0], length - n), value, a.dtype), a], axis=1)
    return out


def eval_batches(encoded: Sequence[cd.EncodedSample], batch_size: int, pad_id: int, *,
                 length: int | None = None) -> list[dict[str, Any]]:
    """``calib_data.make_batches`` (left padding), every batch padded to ``length`` (default:
    the longest sample), so that each model compiles once per batch size."""
    batches = cd.make_batches(encoded, batch_size, pad_id, padding_side="left")
    length = max(len(s.input_ids) for s in encoded) if length is None else length
    return [pad_batch(b, length, pad_id) for b in batches]


def prompt_only(sample: cd.EncodedSample) -> cd.EncodedSample:
    """The sample without its answer: the generation prompt, ending with the assistant prefix.

    ``encode_samples`` checks that the tokens before ``answer_start`` are the prompt's own
    tokenization, so this equals re-encoding the sample with ``answer=None``.
    """
    s = sample.answer_start
    return dataclasses.replace(sample, input_ids=sample.input_ids[:s], modality=sample.modality[:s],
                               answer_start=s, answer_end=s)


# ------------------------------------------------------------------------------ evaluate


def _mean(total: float, count: int) -> float:
    return total / count if count else math.nan


def evaluate(qmodel: Any, fp_model: Any, batches: Sequence[Batch], encoded: Sequence[cd.EncodedSample], *,
             tokenizer, family: str, max_new_tokens: int = 8, gen_batch_size: int | None = None,
             pad_id: int | None = None, eos_token_id: int | Sequence[int] | None = None,
             on_batch: Callable[[str, int, int], None] | None = None,
             fp_logits: Sequence[jax.Array] | None = None) -> dict[str, float | int]:
    """Compare ``qmodel`` with ``fp_model`` on ``batches`` (from :func:`eval_batches` over
    ``encoded``); see the module docstring for the metrics. Either model may be a family model
    or a ``runtime.QuantizedModel`` (fp against itself gives KL 0 and agreement 1).

    Exact match generates ``max_new_tokens`` greedily for every sample of ``encoded`` that has an
    answer, ``gen_batch_size`` at a time (default: the size of the first batch).
    ``pad_id`` / ``eos_token_id`` default to ``fp_model.config``'s.
    ``on_batch(stage, done, total)`` is called after each batch (``stage``: ``"logits"`` or
    ``"generate"``), for progress bars. ``fp_logits``: ``fp_model``'s logits of every batch,
    computed once by a caller that compares many quantized models with one reference.
    """
    if not batches:
        raise EvaluateError("no batches to evaluate")
    config = fp_model.config
    pad_id = (config.pad_token_id if config.pad_token_id is not None else 0) if pad_id is None else pad_id
    eos_token_id = config.eos_token_id if eos_token_id is None else eos_token_id

    sums = {k: 0.0 for k in ("kl", "kl_text", "kl_vision", "kl_answer", "top1", "top1_text", "top1_vision",
                             "top1_answer", "nll_fp", "nll_q", "nll_all_fp", "nll_all_q")}
    counts = {"all": 0, "text": 0, "vision": 0, "answer": 0, "next": 0}
    n_samples = 0
    if fp_logits is not None and len(fp_logits) != len(batches):
        raise EvaluateError(f"{len(fp_logits)} cached fp logits for {len(batches)} batches")
    for i, batch in enumerate(batches):
        ref = model_logits(fp_model, batch, family) if fp_logits is None else fp_logits[i]
        stats = position_stats(ref, model_logits(qmodel, batch, family), jnp.asarray(batch["input_ids"]))
        stats = {k: np.asarray(v, np.float64) for k, v in stats.items()}
        for name, mask in position_masks(batch).items():
            suffix = "" if name == "all" else f"_{name}"
            sums["kl" + suffix] += float(stats["kl"][mask].sum())
            sums["top1" + suffix] += float(stats["agree"][mask].sum())
            counts[name] += int(mask.sum())
            if name == "answer":
                sums["nll_fp"] += float(stats["nll_fp"][mask].sum())
                sums["nll_q"] += float(stats["nll_q"][mask].sum())
        real = np.asarray(batch["modality"]) != PAD
        predicts_real = np.zeros_like(real)  # position t predicts the real token t + 1
        predicts_real[:, :-1] = real[:, :-1] & real[:, 1:]
        sums["nll_all_fp"] += float(stats["nll_fp"][predicts_real].sum())
        sums["nll_all_q"] += float(stats["nll_q"][predicts_real].sum())
        counts["next"] += int(predicts_real.sum())
        n_samples += int(np.shape(batch["input_ids"])[0])
        if on_batch is not None:
            on_batch("logits", i + 1, len(batches))

    result: dict[str, float | int] = {}
    for suffix, name in (("", "all"), ("_text", "text"), ("_vision", "vision"), ("_answer", "answer")):
        result["kl" + suffix] = _mean(sums["kl" + suffix], counts[name])
        result["top1_agreement" + suffix] = _mean(sums["top1" + suffix], counts[name])
    for who in ("fp", "q"):  # exp of a broken model's NLL may overflow: inf, not an exception
        nll = _mean(sums[f"nll_{who}"], counts["answer"])
        result[f"answer_ppl_{who}"] = math.exp(nll) if nll < 700 or math.isnan(nll) else math.inf
        nll = _mean(sums[f"nll_all_{who}"], counts["next"])
        result[f"ppl_{who}"] = math.exp(nll) if nll < 700 or math.isnan(nll) else math.inf
    result.update(_exact_match(qmodel, fp_model, encoded, tokenizer=tokenizer, family=family,
                               max_new_tokens=max_new_tokens, batch_size=gen_batch_size or len(batches[0]["input_ids"]),
                               pad_id=pad_id, eos_token_id=eos_token_id, on_batch=on_batch))
    result.update(n_samples=n_samples, n_positions=counts["all"], n_text_positions=counts["text"],
                  n_vision_positions=counts["vision"], n_answer_tokens=counts["answer"], n_next_tokens=counts["next"],
                  max_new_tokens=max_new_tokens)
    return result


def _exact_match(qmodel, fp_model, encoded, *, tokenizer, family, max_new_tokens, batch_size, pad_id,
                 eos_token_id, on_batch) -> dict[str, float | int]:
    answered = [s for s in encoded if s.answer is not None and s.answer_end > s.answer_start]
    hits = {"fp": 0, "q": 0, "agree": 0}
    if answered:
        prompts = [prompt_only(s) for s in answered]
        gen_batches = eval_batches(prompts, batch_size, pad_id)
        for i, batch in enumerate(gen_batches):
            texts = {}
            for key, model in (("fp", fp_model), ("q", qmodel)):
                tokens = model_generate(model, batch, family, max_new_tokens=max_new_tokens,
                                        eos_token_id=eos_token_id, pad_token_id=pad_id)
                texts[key] = [normalize_answer(t) for t in decode_generated(tokens, tokenizer, eos_token_id)]
            for j, k in enumerate(batch["sample_index"]):
                ref = normalize_answer(answered[int(k)].answer)
                hits["fp"] += texts["fp"][j] == ref
                hits["q"] += texts["q"][j] == ref
                hits["agree"] += texts["fp"][j] == texts["q"][j]
            if on_batch is not None:
                on_batch("generate", i + 1, len(gen_batches))
    n = len(answered)
    return {"exact_match_fp": _mean(hits["fp"], n), "exact_match_q": _mean(hits["q"], n),
            "generation_agreement": _mean(hits["agree"], n), "n_exact_match": n}


# ------------------------------------------------------------------------------ reference


def processor_for(manifest: Mapping[str, Any]):
    """``(tokenizer, image_cfg)`` the checkpoint's model was calibrated with (the choices of
    ``quantize.load_model_for_calibration``; ``image_cfg`` None means calib_data's default),
    without building the model."""
    from splitq_jax import preprocess as pp
    from splitq_jax import quantize as qz

    model = manifest["model"]
    source_dir = manifest.get("source_dir")
    if source_dir is None and model["name"] == qz.EMBEDDED_DEFAULT:
        return pp.qwen_tokenizer(), qz.EMBEDDED_IMAGE_CFG
    if source_dir is None or not os.path.isdir(source_dir):
        raise EvaluateError(f"the checkpoint's source model directory {source_dir!r} is not available here; "
                            f"its tokenizer is needed")
    return pp.load_tokenizer(source_dir), None


def load_reference(qmodel: Any):
    """The full-precision model a checkpoint was made from, as a ``quantize.ModelHandle``.

    Rebuilt from the manifest (``source_dir`` if it still exists, else the model name; the
    embedded default from the calibration seed). Raises :class:`EvaluateError` unless its
    unquantized parameters (embedding, vision tower, head) equal the checkpoint's bit for bit.
    """
    from splitq_jax import quantize as qz

    from splitq_jax.models.converters.checkpoints import named_models

    manifest = qmodel.manifest
    source_dir = manifest.get("source_dir")
    name = manifest["model"]["name"]
    # A named model is rebuilt by its name: an assembled one (easyvqa-vlm-0.5b) records its decoder's
    # directory as source_dir (where its tokenizer lives), which loads as the text-only decoder alone.
    named = name is not None and name in named_models()
    ref = name if named or source_dir is None or not os.path.isdir(source_dir) else source_dir
    seed = int(manifest.get("method_config", {}).get("seed", 0))
    handle = qz.load_model_for_calibration(ref, seed=seed)
    check_reference(qmodel, handle.model)
    return handle


def _plain(obj: Any) -> Any:
    """Tuples as lists, as a config reads back from the manifest's JSON."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def check_reference(qmodel: Any, fp_model: Any) -> None:
    """Raise :class:`EvaluateError` unless ``fp_model``'s config and unquantized parameters are
    the checkpoint's (then the quantized blocks were calibrated from this model)."""
    from splitq_jax.quantized import export

    if _plain(dataclasses.asdict(fp_model.config)) != _plain(dataclasses.asdict(qmodel.config)):
        raise EvaluateError("the reference model's config differs from the checkpoint's; evaluate against the "
                            "model the checkpoint was calibrated from")
    ref_fp = export.fp_state_dict(fp_model)
    if getattr(qmodel, "vision_blocks", None) is not None:  # the tower's blocks are stored quantized
        ref_fp = export.strip_vision_layers(ref_fp, qmodel.family)
    ref = jax.tree_util.tree_leaves_with_path(ref_fp)
    ck = dict(jax.tree_util.tree_leaves_with_path(export.fp_state_dict(qmodel.model)))
    for path, value in ref:
        if path not in ck or not np.array_equal(np.asarray(value), np.asarray(ck[path])):
            raise EvaluateError(f"the reference model's parameter {jax.tree_util.keystr(path)} differs from the "
                                f"checkpoint's: this is not the model the checkpoint was calibrated from")


# ------------------------------------------------------------------------------ generation


def end_of_turn_ids(config, tokenizer) -> tuple[int, ...]:
    """Where a chat reply ends: the model's EOS ids, plus the tokenizer's EOS and the chat
    template's end-of-turn token (``<|im_end|>``) where the vocabulary has them."""
    ids = [int(t) for t in (config.eos_token_id or ())]
    vocab = tokenizer.get_vocab()
    extra = [tokenizer.eos_token_id] + [vocab.get(t) for t in ("<|im_end|>", "<|endoftext|>")]
    ids += [int(t) for t in extra if t is not None and int(t) not in ids]
    return tuple(ids)


def generate_text(model: Any, image, prompt: str, *, family: str, tokenizer, image_cfg=None,
                  max_new_tokens: int = 32, on_token=None, max_context: int | None = None) -> str:
    """One chat turn: ``prompt`` about ``image`` (path, PIL image or array) -> the decoded reply,
    stopped at the end of the turn (:func:`end_of_turn_ids`). ``on_token(tokens (1,))`` streams
    it; a prompt that leaves no room for ``max_new_tokens`` in ``max_context`` is refused."""
    from splitq_jax import preprocess as pp

    sample = cd.Sample(image=pp.load_image(image), prompt=prompt)
    encoded = cd.encode_samples([sample], family, tokenizer, image_cfg)
    check_context(len(encoded[0].input_ids), max_new_tokens, max_context)
    config = model.config
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    batch = cd.make_batches(encoded, 1, pad_id)[0]
    stop = end_of_turn_ids(config, tokenizer)
    tokens = model_generate(model, batch, family, max_new_tokens=max_new_tokens, eos_token_id=stop or None,
                            pad_token_id=pad_id, on_token=on_token)
    return decode_generated(tokens, tokenizer, stop or None)[0]


def check_context(n_prompt: int, max_new_tokens: int, max_context: int | None) -> None:
    """Refuse a prompt of ``n_prompt`` tokens when it and the reply do not fit the model's context."""
    if max_context is not None and n_prompt + max_new_tokens > max_context:
        raise EvaluateError(f"the prompt is {n_prompt} tokens; with --max-new-tokens {max_new_tokens} that is more "
                            f"than the model's context of {max_context} tokens: shorten the prompt or lower "
                            f"--max-new-tokens")


# ------------------------------------------------------------------------------ report

# (metric, fp key, quantized key, count key): how a result becomes table rows and JSON records.
# Comparisons with the fp model have no fp value (fp against itself: KL 0, agreement 1).
REPORT = (
    ("kl", None, "kl", "n_positions"),
    ("kl_text", None, "kl_text", "n_text_positions"),
    ("kl_vision", None, "kl_vision", "n_vision_positions"),
    ("kl_answer", None, "kl_answer", "n_answer_tokens"),
    ("top1_agreement", None, "top1_agreement", "n_positions"),
    ("top1_agreement_text", None, "top1_agreement_text", "n_text_positions"),
    ("top1_agreement_vision", None, "top1_agreement_vision", "n_vision_positions"),
    ("top1_agreement_answer", None, "top1_agreement_answer", "n_answer_tokens"),
    ("answer_ppl", "answer_ppl_fp", "answer_ppl_q", "n_answer_tokens"),
    ("ppl", "ppl_fp", "ppl_q", "n_next_tokens"),  # every real next token (code perplexity of a text model)
    ("exact_match", "exact_match_fp", "exact_match_q", "n_exact_match"),
    ("generation_agreement", None, "generation_agreement", "n_exact_match"),
)


def _json_number(x: float) -> float | None:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def result_records(result: Mapping[str, Any], manifest: Mapping[str, Any], **extra: Any) -> list[dict[str, Any]]:
    """Flat records ``{"metric", "value", "model", "method", "bits", "count", **extra}``, one per
    model and metric. The fp reference is ``method "fp"``, ``bits "w16a16"`` (the benchmarks'
    name for unquantized) with its ``dtype``; NaN (an empty set) and inf become ``null``."""
    model = manifest["model"]["name"]
    fp = {"model": model, "method": "fp", "bits": "w16a16", "dtype": manifest["model"].get("dtype")}
    q = {"model": model, "method": manifest["method"], "bits": manifest["bits"]}
    records = []
    for metric, fp_key, q_key, count_key in REPORT:
        for who, key in ((fp, fp_key), (q, q_key)):
            if key is not None:
                records.append({"metric": metric, "value": _json_number(float(result[key])), **who,
                                "count": int(result[count_key]), **extra})
    return records


def run_record(command: Sequence[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The record that says how the numbers were made: command line (default ``sys.argv``),
    device, package versions."""
    from splitq_jax.quantized import export

    command = sys.argv if command is None else command
    rec = {"metric": "run", "command": " ".join(shlex.quote(a) for a in command), "device": str(jax.devices()[0]),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rec.update(export.package_versions())
    rec.update(extra)
    return rec


def format_table(result: Mapping[str, Any]) -> str:
    """``metric  fp  quantized  count`` rows of :data:`REPORT`."""
    def fmt(key):
        if key is None:
            return "-"
        v = float(result[key])
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"

    lines = [f"{'metric':<24} {'fp':>10} {'quantized':>10} {'count':>7}"]
    for metric, fp_key, q_key, count_key in REPORT:
        lines.append(f"{metric:<24} {fmt(fp_key):>10} {fmt(q_key):>10} {int(result[count_key]):>7}")
    return "\n".join(lines)


__all__ = ["EvaluateError", "REPORT", "check_reference", "decode_generated", "eval_batches", "evaluate",
           "exact_match", "format_table", "generate_text", "load_reference", "model_generate", "model_logits",
           "normalize_answer", "pad_batch", "position_masks", "position_stats", "processor_for", "prompt_only",
           "result_records", "run_record"]
