"""compressed-tensors export, loaded by the third-party client users have: transformers with the
compressed-tensors package. The tiny Qwen2.5-VL and LLaVA models are saved by transformers
(``save_pretrained``), read by our converter, quantized, exported, and loaded back by
``from_pretrained``; its logits must equal our runtime's on the same text+image batch."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from splitq_jax import methods, pipeline  # noqa: E402
from splitq_jax import quantize as qz  # noqa: E402
from splitq_jax.interop.hf_export import PROVENANCE_FILE, ExportError, export_hf  # noqa: E402
from splitq_jax.models.converters.llava import load_llava  # noqa: E402
from splitq_jax.models.converters.qwen2_5_vl import load_qwen2_5_vl  # noqa: E402
from splitq_jax.runtime import load_quantized  # noqa: E402
from test_cli import llava_tiny_batches  # noqa: E402
from test_pipeline import tiny_batches as qwen_tiny_batches  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "models"))
import test_llava as hf_llava  # noqa: E402
import test_qwen2_5_vl as hf_qwen  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HF_CLASS = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
            "llava": transformers.LlavaForConditionalGeneration}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> (handle, batches, stream) of a tiny model that transformers saved."""
    out = {}
    for family, ref, load, batches in (
        ("qwen2_5_vl", hf_qwen, load_qwen2_5_vl, qwen_tiny_batches),
        ("llava", hf_llava, load_llava, llava_tiny_batches),
    ):
        path = tmp_path_factory.mktemp(f"{family}_hf")
        ref.build_hf(ref.CFG, seed=0).save_pretrained(path)
        model, cfg = load(path)
        handle = qz.ModelHandle(model, family, str(path), None, None, cfg.pad_token_id, str(path))
        b = batches(cfg)
        out[family] = (handle, b, pipeline.embed_batches(model, b, family))
    return out


def _quantize(sources, family, method, bits, out, **opts):
    handle, _, stream = sources[family]
    path, _ = qz.quantize_model(handle, stream, methods.get_config(method, bits, **opts), out,
                                data_record={"source": "synthetic"})
    return path


def _hf_logits(model, family: str, batch: dict) -> np.ndarray:
    kw = dict(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
              attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
              pixel_values=torch.tensor(np.asarray(batch["pixel_values"])))
    if family == "qwen2_5_vl":
        kw["image_grid_thw"] = torch.tensor(np.asarray(batch["image_grid_thw"]))
        # without it transformers silently gives the image tokens 1-D positions
        kw["mm_token_type_ids"] = torch.tensor((batch["input_ids"] == hf_qwen.CFG.image_token_id).astype(np.int64))
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


# family, method, bits, options, bound on the logits' max relative difference. Weight-only: the
# dequantized weights are identical, so only float round-off differs. With activation quantization
# the loader's dynamic per-token quantizer uses scale absmax/(q_max + 1/2) (compressed-tensors'
# symmetric range: (q_max - q_min)/2) where ours uses absmax/q_max: activations round on a grid
# 1/254 (int8) or 1/14 (int4) finer. Measured on these tiny random models: 2.4e-2 (w8a8) and
# 0.155 (w4a4); the bound below is ~2x that. With the loader's scale set to ours, the logits
# must agree to round-off (checked separately), which shows that rounding is the only difference.
CASES = [
    # AWQ: plain 4-bit weights whose scales moved into the norms and up_proj's rows (symmetric:
    # transformers 5.23 loads no asymmetric weights, see the README)
    ("qwen2_5_vl", "awq", "w4a16", dict(w_group_size=16, w_symmetric=True), 1e-3),
    ("qwen2_5_vl", "gptq", "w3a16", dict(w_group_size=16), 1e-3),  # 3 bits: values straddle words
    ("llava", "rtn", "w8a8", dict(), 5e-2),
    ("qwen2_5_vl", "smoothquant", "w4a4", dict(), 0.3),
]


@pytest.mark.parametrize("family,method,bits,opts,tol", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_transformers_loads_the_export_and_matches_our_runtime(sources, tmp_path, family, method, bits, opts, tol):
    ckpt = _quantize(sources, family, method, bits, tmp_path / "ckpt", **opts)
    out = tmp_path / "hf"
    record = export_hf(ckpt, out)
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    scheme = q["config_groups"]["group_0"]
    assert scheme["weights"]["num_bits"] == int(bits[1])
    assert (scheme["input_activations"] is None) == bits.endswith("a16")
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(q)  # the format's own validator
    assert json.loads((out / PROVENANCE_FILE).read_text())["method"] == method == record["method"]

    hf = HF_CLASS[family].from_pretrained(out, dtype=torch.float32).eval()
    qm = load_quantized(ckpt)
    _, batches, _ = sources[family]
    valid = np.asarray(batches[0]["attention_mask"]).astype(bool)
    ours = np.asarray(qm.logits(batches[0]))[valid]
    theirs = _hf_logits(hf, family, batches[0])[valid]
    rel = np.abs(ours - theirs).max() / np.abs(ours).max()
    assert rel < tol, f"transformers vs our runtime: max relative difference {rel:.2e}"
    if not bits.endswith("a16"):
        import compressed_tensors.quantization.lifecycle.forward as ctf

        real = ctf.compute_dynamic_scales_and_zp

        def our_scale(value, args, *a, **k):
            scale, zp = real(value, args, *a, **k)
            q_max = 2 ** (args.num_bits - 1) - 1
            return scale * ((q_max + 0.5) / q_max), zp

        ctf.compute_dynamic_scales_and_zp = our_scale
        try:
            same = _hf_logits(hf, family, batches[0])[valid]
        finally:
            ctf.compute_dynamic_scales_and_zp = real
        rel = np.abs(ours - same).max() / np.abs(ours).max()
        # 1e-3, not round-off: x/s (theirs) and x*fl(1/s) (ours) may round a tie apart on some CPU
        assert rel < 1e-3, f"with our activation scale, transformers vs our runtime: {rel:.2e}"


def test_text_only_qwen2_export_loads_as_causal_lm(tmp_path):
    """A text-only Qwen2 (the code model's family) with no source config.json: the config is
    rebuilt as Qwen2ForCausalLM and AutoModelForCausalLM computes our logits."""
    import dataclasses

    from flax import nnx

    from splitq_jax.models.qwen2_5_vl import Qwen2_5_VL, get_config

    cfg = dataclasses.replace(get_config("qwen2.5-vl-tiny"), vision=None)
    model = Qwen2_5_VL(cfg, rngs=nnx.Rngs(1))
    handle = qz.ModelHandle(model, "qwen2_5_vl", "qwen2-tiny", None, None, cfg.pad_token_id, None)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 100, (2, 16)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": None,
             "modality": np.ones_like(ids)}
    stream = pipeline.embed_batches(model, [batch], "qwen2_5_vl")
    ckpt, _ = qz.quantize_model(handle, stream, methods.get_config("rtn", "w4a16"), tmp_path / "ckpt",
                                data_record={"source": "synthetic"})
    export_hf(ckpt, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(load_quantized(ckpt).logits(batch))
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 1e-3


# ------------------------------------------------------------------------------ refusals


def _run_script(capsys, *args) -> tuple[int, str]:
    """scripts/export_hf.py's main in this process (its exit status and stderr)."""
    spec = importlib.util.spec_from_file_location("export_hf_script", ROOT / "scripts" / "export_hf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rc = script.main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("method,bits,match", [
    ("flatquant", "w4a4", "online transform of the linear's input"),
    pytest.param("splitq", "w4a4", "MOCD's split", marks=pytest.mark.slow),  # flatquant's case: the same check
    ("rtn", "w3a3", "3-bit activations: no loader"),
])
def test_refused_exports_name_the_reason_and_write_nothing(sources, tmp_path, method, bits, match):
    ckpt = _quantize(sources, "qwen2_5_vl", method, bits, tmp_path / "ckpt", **(
        {} if method == "rtn" else {"epochs": 0}))
    with pytest.raises(ExportError, match=match):
        export_hf(ckpt, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_script_refuses_bad_input_with_status_2(sources, tmp_path, capsys):
    ckpt = _quantize(sources, "llava", "rtn", "w4a16", tmp_path / "ckpt")
    (tmp_path / "taken").mkdir()
    rc, err = _run_script(capsys, "--checkpoint", ckpt, "--out", tmp_path / "taken")
    assert rc == 2 and "already exists; pass --overwrite" in err
    assert os.listdir(tmp_path / "taken") == []
    # a corrupted checkpoint names the file, and nothing is written
    manifest = json.loads((ckpt / "manifest.json").read_text())
    victim = ckpt / next(f for f in manifest["files"] if f.startswith("state/"))
    victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
    rc, err = _run_script(capsys, "--checkpoint", ckpt, "--out", tmp_path / "new")
    assert rc == 2 and "error:" in err and victim.name in err
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "taken"]


def _calibrate_cli():
    spec = importlib.util.spec_from_file_location("calibrate_script", ROOT / "scripts" / "calibrate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main


@pytest.mark.parametrize("argv,match", [
    (["--method", "flatquant", "--bits", "w4a4"], "a flatquant checkpoint cannot be written in the compressed-tensors"),
    (["--method", "splitq", "--bits", "w4a4"], "the exportable methods are rtn, smoothquant, gptq, gptaq, vlm-ptq"),
    (["--method", "rtn", "--bits", "w3a3"], "3-bit activations: no loader"),
    (["--method", "gptq", "--bits", "w4a8", "--w-group-size", "128"], "fp8-activation kernel"),
    (["--method", "rtn", "--bits", "w4a16", "--quantize-vision"], "drop --quantize-vision"),
    (["--model", "easyvqa-vlm-0.5b", "--method", "rtn", "--bits", "w4a16"], "no transformers architecture"),
])
def test_calibrate_refuses_an_export_it_cannot_write_before_loading_a_model(argv, match, tmp_path, capsys,
                                                                             monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the export request was checked")

    monkeypatch.setattr(qz, "load_model_for_calibration", no_model)
    rc = _calibrate_cli()([*argv, "--out", str(tmp_path / "ckpt"), "--export-hf", str(tmp_path / "hf")])
    assert rc == 2 and match in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # the embedded default's 151k-word embedding through calibration, export and transformers
def test_calibrate_export_hf_end_to_end(tmp_path, capsys):
    rc = _calibrate_cli()(["--method", "rtn", "--bits", "w4a16", "--samples", "2", "--out", str(tmp_path / "ckpt"),
                           "--export-hf", str(tmp_path / "hf")])
    out = capsys.readouterr().out
    assert rc == 0 and "compressed-tensors" in out
    assert "pre-flight: calibration needs about" in out and "its --export-hf copy about as much" in out
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = np.arange(3, 19, dtype=np.int64)[None]
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(load_quantized(tmp_path / "ckpt").logits(
        {"input_ids": ids.astype(np.int32), "attention_mask": np.ones_like(ids), "pixel_values": None}))
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 1e-3
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # the real Qwen2.5 tokenizer, saved beside it
