"""What a quantized VLM checkpoint still knows: the first run's report (``make demo``).

    python scripts/demo.py --checkpoint runs/demo [--per-type 16] [--report runs/demo/report.md]

For a checkpoint of a vision-language model (``make demo`` calibrates ``easyvqa-vlm-0.5b``):

1. easy-vqa answer accuracy by question type (shape, color, yes/no) of the full-precision model and
   of the quantized one, on held-out test questions (greedy replies, first word);
2. the answer tokens' KL divergence and top-1 agreement between the two (teacher-forced), and how
   often their replies agree;
3. a few questions about real photographs that calibration never saw (question, image, fp answer,
   quantized answer);
4. the per-channel activation figure (text vs vision tokens) of the middle decoder layer;
5. ``report.md`` and the figure ``channels.png`` beside it (default: in the checkpoint's directory),
   each written atomically.

Progress bars on every long step; exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from splitq_jax.errors import SplitqError  # noqa: E402

# Real photographs from calib_data.EVAL_PHOTOS (calibration never sees them), with a question each.
PHOTO_QUESTIONS = (("chelsea", "What animal is in this picture?"), ("moon", "What is shown in this picture?"),
                   ("text", "Describe this image."))


def _bar(desc: str):
    bars: dict[str, tqdm] = {}

    def on_batch(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=f"{desc} ({stage})", leave=False)
        bars[stage].update(1)
        if done == total:
            bars.pop(stage).close()

    return on_batch


def run(ckpt: str, per_type: int, report: Path | None, max_new_tokens: int = 24) -> dict:
    from splitq_jax import analysis
    from splitq_jax import calib_data as cd
    from splitq_jax import evaluate as ev
    from splitq_jax import quantize as qz
    from splitq_jax import vqa_eval as vqa
    from splitq_jax.config import method_config
    from splitq_jax.fsutil import atomic_file
    from splitq_jax.runtime import load_quantized

    t0 = time.time()
    qm = load_quantized(ckpt)
    if getattr(qm.config, "vision", None) is None:
        raise SplitqError("the demo asks questions about images; this checkpoint is a text-only model "
                          "(use scripts/evaluate.py for its perplexity)")
    ref = ev.load_reference(qm)  # the checkpoint's own fp model, checked bit for bit
    root = Path(ckpt)
    report = report or root / "report.md"
    samples = vqa.eval_samples(per_type=per_type)
    acc = {}
    for who, model in (("fp", ref.model), ("quantized", qm)):
        print(f"easy-vqa: {len(samples)} held-out questions, {who} model")
        acc[who] = vqa.easy_vqa_accuracy(model, ref.tokenizer, samples=samples, batch_size=8, progress=True)
    agree = sum(a[2] == b[2] for a, b in zip(acc["fp"]["predictions"], acc["quantized"]["predictions"]))
    encoded = cd.encode_samples(samples, ref.family, ref.tokenizer, model_config=ref.model.config)
    batches = ev.eval_batches(encoded, 8, ref.pad_id)
    # Teacher-forced comparison only: the replies were generated above (no second generation pass).
    cmp = ev.evaluate(qm, ref.model, batches, [], tokenizer=ref.tokenizer, family=ref.family,
                      on_batch=_bar("answer-token KL"))
    photos = []
    for name, question in tqdm(PHOTO_QUESTIONS, desc="photographs", leave=False):
        image = cd.photograph(name)
        answers = [ev.generate_text(m, image, question, family=ref.family, tokenizer=ref.tokenizer,
                                    image_cfg=ref.image_cfg, max_new_tokens=max_new_tokens) for m in (ref.model, qm)]
        photos.append((name, question, *answers))
    print("channel figure")
    stream = qz.calibration_stream(ref, samples=8, seed=0)
    layer = len(list(ref.model.blocks)) // 2
    prof = analysis.channel_profile(ref.model, stream, layer, "attn_in", method_config("splitq", "w4a4"))
    # beside the report, which links it by name; matplotlib needs the suffix of the temporary file
    figure, tmp_figure = report.parent / "channels.png", report.parent / ".channels.tmp.png"
    analysis.plot_profile(prof, str(tmp_figure), f"{qm.manifest['model']['name']}: layer {layer}, attn_in input")
    os.replace(tmp_figure, figure)
    text = _report(qm.manifest, acc, cmp, agree, len(samples), photos, prof, layer, time.time() - t0)
    with atomic_file(report) as tmp:
        tmp.write_text(text)
    print(text)
    print(f"wrote {report} and {figure}")
    return {"accuracy": acc, "compare": cmp, "photos": photos}


def _report(manifest, acc, cmp, agree, n, photos, prof, layer, seconds) -> str:
    m = manifest
    lines = [f"# {m['model']['name']}: {m['method']} {m['bits']}", "",
             f"Checkpoint made {m.get('created')} with {m['method']} at {m['bits']} "
             f"({len(m.get('blocks', []))} decoder blocks calibrated). Report written in {seconds:.0f} s.", "",
             f"## easy-vqa answer accuracy ({n} held-out test questions, greedy replies, first word)", "",
             "| question type | n | full precision | quantized |", "|---|---|---|---|"]
    for t, d in acc["fp"]["by_type"].items():
        lines.append(f"| {t} | {d['n']} | {d['accuracy']:.3f} | {acc['quantized']['by_type'][t]['accuracy']:.3f} |")
    lines += [f"| all | {n} | {acc['fp']['accuracy']:.3f} | {acc['quantized']['accuracy']:.3f} |", "",
              f"Replies equal between the two models: {agree} of {n}. Answer tokens (teacher-forced): "
              f"KL(fp || quantized) {cmp['kl_answer']:.4f}, top-1 agreement {cmp['top1_agreement_answer']:.3f} "
              f"({cmp['n_answer_tokens']} tokens); over every position KL {cmp['kl']:.4f}, top-1 agreement "
              f"{cmp['top1_agreement']:.3f}.", "",
              "## Questions about photographs calibration never saw", "",
              "| image | question | full precision | quantized |", "|---|---|---|---|"]
    for name, q, a_fp, a_q in photos:
        lines.append(f"| {name} | {q} | {a_fp.strip() or '(empty)'} | {a_q.strip() or '(empty)'} |")
    lines += ["", f"## Where text and vision tokens put their outliers (layer {layer}, attn_in input)", "",
              "![per-channel activation magnitude](channels.png)", "",
              f"MOCD's text-outlier channels: {prof.split.text.tolist()}; vision-outlier channels: "
              f"{prof.split.vision.tolist()}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="directory written by scripts/calibrate.py")
    ap.add_argument("--per-type", type=int, default=16, help="easy-vqa test questions per type (default 16)")
    ap.add_argument("--report", default=None, help="where to write the report (default CHECKPOINT/report.md)")
    args = ap.parse_args(argv)
    try:
        if args.per_type < 1:
            raise SplitqError(f"--per-type must be at least 1, got {args.per_type}")
        run(args.checkpoint, args.per_type, Path(args.report) if args.report else None)
    except SplitqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
