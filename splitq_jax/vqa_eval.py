"""easy-vqa exact-match accuracy by question type, against the per-type majority answer.

::

    from splitq_jax.models.converters.easyvqa_vlm import load_easyvqa_vlm, load_tokenizer
    model, config, _ = load_easyvqa_vlm()
    r = easy_vqa_accuracy(model, load_tokenizer(), n=500, seed=0)
    r["accuracy"], r["by_type"]["color"]["accuracy"], r["by_type"]["color"]["majority_accuracy"]

``model`` is a full-precision family model (a LLaVA-family :class:`~splitq_jax.models.llava.Llava`
or a Qwen2.5-VL) or a quantized one (:class:`splitq_jax.runtime.QuantizedModel`). Questions are
drawn from easy-vqa's *test* split (a seeded sample of ``n``, or all 9,673 with ``n=None``) and
asked exactly as :func:`splitq_jax.calib_data.bundled_samples` asks them (``question + "\\n" +
VQA_INSTRUCTION``, through :func:`~splitq_jax.calib_data.encode_samples`, i.e. the model's chat
template). The reply is greedy-decoded for a few tokens and cut at EOS. ``accuracy`` compares its
first word (lower-cased, a final full stop dropped) with the answer: every answer is one word, and a
model whose projector alone was trained (loss on the answer tokens only) may answer right and then
not end its turn ("circle circle circle"). ``exact_accuracy`` compares the whole reply.

Question types come from the answer vocabulary (easy-vqa's 13 answers): ``shape`` (circle,
rectangle, triangle), ``color`` (the 8 colours) and ``yes/no``. The majority baseline of a type is
its most frequent answer in the *train* split; its accuracy is the share of the evaluated questions
of that type whose answer it is.
"""

from __future__ import annotations

import collections
import os
import zipfile
from typing import Any, Sequence

import numpy as np

from splitq_jax import calib_data as cd

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
YES_NO = ("yes", "no")
QUESTION_TYPES = ("shape", "color", "yes/no")


def question_type(answer: str) -> str:
    """``"shape"``, ``"color"`` or ``"yes/no"`` from an easy-vqa answer."""
    a = answer.strip().lower()
    if a in SHAPES:
        return "shape"
    if a in COLORS:
        return "color"
    if a in YES_NO:
        return "yes/no"
    raise ValueError(f"{answer!r} is not an easy-vqa answer (known: {SHAPES + COLORS + YES_NO})")


def normalize_answer(text: str) -> str:
    """Lower case, surrounding whitespace and a trailing full stop removed."""
    return text.strip().rstrip(".").strip().lower()


def first_word(text: str) -> str:
    """The reply's first word, normalized (easy-vqa answers are one word)."""
    words = text.split()
    return normalize_answer(words[0]) if words else ""


def majority_answers(cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """The most frequent train-split answer of each question type (ties: alphabetical first)."""
    with zipfile.ZipFile(cd.easy_vqa_wheel(cache_dir)) as zf:
        train = cd._easy_vqa_split(zf, "train")
    counts: dict[str, collections.Counter] = {t: collections.Counter() for t in QUESTION_TYPES}
    for _, a, _ in train:
        counts[question_type(a)][a] += 1
    return {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in counts.items()}


def eval_samples(n: int | None = None, seed: int = 0, *, split: str = "test", per_type: int | None = None,
                 cache_dir: str | os.PathLike | None = None) -> list[cd.Sample]:
    """``n`` seeded easy-vqa questions of ``split`` (all of them in file order for ``n=None``), or,
    with ``per_type``, that many of each question type (shape, color, yes/no; grouped by type)."""
    with zipfile.ZipFile(cd.easy_vqa_wheel(cache_dir)) as zf:
        questions = cd._easy_vqa_split(zf, split)
        perm = np.random.default_rng([seed, 11]).permutation(len(questions))
        if per_type is not None:
            types = np.asarray([question_type(questions[i][1]) for i in perm])
            order = np.concatenate([perm[types == t][:per_type] for t in QUESTION_TYPES])
            if per_type < 1 or len(order) < per_type * len(QUESTION_TYPES):
                raise ValueError(f"per_type={per_type}: easy-vqa {split} has fewer questions of some type")
        elif n is None:
            order = np.arange(len(questions))
        else:
            if not 1 <= n <= len(questions):
                raise ValueError(f"n must be in [1, {len(questions)}] for easy-vqa {split}, got {n}")
            order = perm[:n]
        images: dict[int, np.ndarray] = {}
        out = []
        for qi in order.tolist():
            q, a, image_id = questions[qi]
            if image_id not in images:
                images[image_id] = cd._easy_vqa_image(zf, split, image_id)
            out.append(cd.Sample(image=images[image_id], prompt=f"{q}\n{cd.VQA_INSTRUCTION}", answer=a,
                                 source=f"easy-vqa/{split}/{image_id}#{qi}"))
    return out


def _family_and_config(model) -> tuple[str, Any]:
    from splitq_jax.runtime import QuantizedModel

    if isinstance(model, QuantizedModel):
        return model.family, model.config
    from splitq_jax.models.llava import Llava

    return ("llava" if isinstance(model, Llava) else "qwen2_5_vl"), model.config


def easy_vqa_accuracy(model, tokenizer, n: int | None = 500, seed: int = 0, *, per_type: int | None = None,
                      batch_size: int = 8, max_new_tokens: int = 4, image_cfg=None, split: str = "test",
                      cache_dir: str | os.PathLike | None = None, progress: bool = False,
                      samples: Sequence[cd.Sample] | None = None) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on easy-vqa, overall and by question type.

    Args:
      model: full-precision family model or ``QuantizedModel`` (any family; the prompt follows
        :func:`~splitq_jax.calib_data.encode_samples` with the model's config).
      tokenizer: the model's tokenizer.
      n, seed, per_type: how many test questions and which (see :func:`eval_samples`; ``per_type``
        draws that many of each type instead of ``n`` at random, for tighter per-type numbers).
      batch_size: prompts per generate call (left-padded).
      max_new_tokens: greedy tokens per answer (easy-vqa answers are one or two Qwen tokens + EOS).
      image_cfg: preprocessing override (default: the model's own).
      samples: evaluate these instead of drawing ``n`` (each with its ``answer``).
    Returns:
      ``{"n", "accuracy" (first word), "exact_accuracy" (whole reply), "majority_accuracy",
      "by_type": {type: {"n", "accuracy", "exact_accuracy", "majority_answer", "majority_accuracy"}},
      "predictions": [(source, answer, reply), ...]}``.
    """
    from splitq_jax.evaluate import decode_generated, eval_batches, model_generate

    family, config = _family_and_config(model)
    if samples is None:
        samples = eval_samples(n, seed, split=split, per_type=per_type, cache_dir=cache_dir)
    encoded = cd.encode_samples([cd.Sample(image=s.image, prompt=s.prompt, answer=None, source=s.source)
                                 for s in samples], family, tokenizer, image_cfg, model_config=config)
    pad_id = config.pad_token_id if config.pad_token_id is not None else (tokenizer.pad_token_id or 0)
    eos = tuple(config.eos_token_id) or None
    # Left padding to one prompt length for every batch: one compiled prefill instead of one per length.
    batches = eval_batches(encoded, batch_size, int(pad_id))
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="easy-vqa", unit="batch")
    predictions: list[str] = []
    for batch in it:
        tokens = model_generate(model, batch, family, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                pad_token_id=int(pad_id))
        predictions.extend(decode_generated(tokens, tokenizer, eos))
    majority = majority_answers(cache_dir)
    by_type: dict[str, dict[str, Any]] = {}
    hits = maj_hits = exact_hits = 0
    rows = []
    for s, pred in zip(samples, predictions):
        t = question_type(s.answer)
        gold = normalize_answer(s.answer)
        hit = first_word(pred) == gold
        exact = normalize_answer(pred) == gold
        maj = majority[t] == gold
        d = by_type.setdefault(t, {"n": 0, "correct": 0, "exact": 0, "majority_answer": majority[t],
                                   "majority_correct": 0})
        d["n"] += 1
        d["correct"] += int(hit)
        d["exact"] += int(exact)
        exact_hits += int(exact)
        d["majority_correct"] += int(maj)
        hits += int(hit)
        maj_hits += int(maj)
        rows.append((s.source, s.answer, pred))
    for d in by_type.values():
        d["accuracy"] = d["correct"] / d["n"]
        d["exact_accuracy"] = d["exact"] / d["n"]
        d["majority_accuracy"] = d["majority_correct"] / d["n"]
    total = len(samples)
    return {"n": total, "accuracy": hits / total, "exact_accuracy": exact_hits / total,
            "majority_accuracy": maj_hits / total,
            "by_type": {t: by_type[t] for t in QUESTION_TYPES if t in by_type}, "predictions": rows}


def format_report(result: dict[str, Any]) -> str:
    """A small text table of :func:`easy_vqa_accuracy`'s result."""
    lines = [f"{'type':8} {'n':>5} {'accuracy':>9} {'exact':>7} {'majority':>9} (majority answer)"]
    for t, d in result["by_type"].items():
        lines.append(f"{t:8} {d['n']:5d} {d['accuracy']:9.3f} {d['exact_accuracy']:7.3f} "
                     f"{d['majority_accuracy']:9.3f} ({d['majority_answer']})")
    lines.append(f"{'all':8} {result['n']:5d} {result['accuracy']:9.3f} {result['exact_accuracy']:7.3f} "
                 f"{result['majority_accuracy']:9.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m splitq_jax.vqa_eval --model easyvqa-vlm-0.5b --per-type 100`` (or ``--quantized DIR``)."""
    import argparse
    import json
    import time

    p = argparse.ArgumentParser(description="easy-vqa exact-match accuracy by question type")
    p.add_argument("--model", default="easyvqa-vlm-0.5b", help="named model (its tokenizer is used in any case)")
    p.add_argument("--quantized", default=None, help="evaluate this exported checkpoint instead of --model")
    p.add_argument("--projector", default=None, help="easyvqa-vlm-0.5b with another projector file")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--per-type", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None, help="write the result (with predictions) here")
    args = p.parse_args(argv)
    from splitq_jax import preprocess as pp

    t0 = time.time()
    if args.model == "easyvqa-vlm-0.5b":
        from splitq_jax.models.converters.easyvqa_vlm import load_easyvqa_vlm, load_tokenizer

        tokenizer = load_tokenizer()
        model = None if args.quantized else load_easyvqa_vlm(projector=args.projector)[0]
    else:
        from splitq_jax.models.converters.checkpoints import load_model

        model, _, _, model_dir = load_model(args.model)
        tokenizer = pp.load_tokenizer(model_dir)
    if args.quantized:
        from splitq_jax.runtime import load_quantized

        model = load_quantized(args.quantized)
    result = easy_vqa_accuracy(model, tokenizer, args.n, args.seed, per_type=args.per_type,
                               batch_size=args.batch_size, progress=True)
    print(format_report(result))
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps({**result, "args": vars(args)}, indent=1) + "\n")
    return 0


__all__ = ["COLORS", "QUESTION_TYPES", "SHAPES", "YES_NO", "easy_vqa_accuracy", "format_report", "majority_answers",
           "first_word", "main", "normalize_answer", "question_type", "eval_samples"]


if __name__ == "__main__":
    raise SystemExit(main())
