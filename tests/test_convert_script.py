"""scripts/convert.py end to end on a tiny saved HF LLaVA: conversion, --check, refusal, round trip."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from splitq_jax.models.converters import checkpoints  # noqa: E402
from splitq_jax.models.converters.hf import ConversionError  # noqa: E402
from splitq_jax.models.converters.llava import load_llava  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert.py"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random LLaVA saved by transformers (2-layer Llama, 3-layer CLIP, 4 image tokens)."""
    cfg = transformers.LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=14,
                           projection_dim=8),
        image_token_index=90, image_seq_length=4, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the default init is nearly constant; widen it so the check means something
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.15)
    path = tmp_path_factory.mktemp("tiny_llava_hf")
    model.save_pretrained(path)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, check=False,
                          cwd=ROOT, timeout=300)


def test_script_converts_checks_and_refuses_existing_out(hf_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    proc = _run("--model", str(hf_dir), "--out", str(out), "--check", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    check = report["check"]
    assert report["family"] == "llava" and report["out"] == str(out)
    assert check["max_abs_logit_diff"] < 1e-4
    assert check["max_abs_logit"] > 0.5  # not two near-zero tensors
    assert check["top1_agreement"] == 1.0
    assert check["greedy_equal"] is True and len(check["greedy_tokens"]) == 12
    assert (out / "state").is_dir() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind

    # the orbax checkpoint restores to exactly the converted weights
    restored, config, family = checkpoints.load_checkpoint(out)
    direct, _ = load_llava(hf_dir)
    assert family == "llava" and config.image_token_id == 90
    assert restored.num_params() == direct.num_params() == report["num_params"]
    ids = np.array([[5, 6] + [90] * 4 + [7, 8, 9]])
    pix = np.random.default_rng(0).standard_normal((1, 3, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(restored(ids, pix)), np.asarray(direct(ids, pix)))

    # an existing --out is refused and left untouched
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert _script_main()(["--model", str(hf_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_overwrite_and_bfloat16(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    report = checkpoints.convert(str(hf_dir), out, dtype="bfloat16", overwrite=True)
    assert report["dtype"] == "bfloat16" and not (out / "stale.txt").exists()
    restored, _, _ = checkpoints.load_checkpoint(out)
    import jax
    from flax import nnx

    dtypes = {str(x.dtype) for x in jax.tree.leaves(nnx.state(restored))}
    assert dtypes == {"bfloat16"}
    direct, _ = load_llava(hf_dir)
    w_bf16 = np.asarray(restored.multi_modal_projector.linear_1.w[...], np.float32)
    w_f32 = np.asarray(direct.multi_modal_projector.linear_1.w[...])
    assert np.abs(w_bf16 - w_f32).max() <= np.abs(w_f32).max() * 2 ** -8  # one bf16 rounding


def _script_main():
    spec = importlib.util.spec_from_file_location("convert_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_named_model_resolves_to_hub_id_and_fails_offline(tmp_path, capsys):
    names = checkpoints.named_models()
    assert names["llava-1.5-7b"] == "llava-hf/llava-1.5-7b-hf"
    assert names["llava-1.5-13b"] == "llava-hf/llava-1.5-13b-hf"
    assert "llava-1.5-tiny" not in names  # no hub checkpoint
    # HF_HUB_OFFLINE=1 (tests/conftest.py) and nothing cached: a clear error, no output dir
    assert _script_main()(["--model", "llava-1.5-7b", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "llava-hf/llava-1.5-7b-hf" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "x").exists()
    assert _script_main()(["--model", str(tmp_path / "missing_dir"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_detect_family():
    assert checkpoints.detect_family({"architectures": ["LlavaForConditionalGeneration"]}) == "llava"
    assert checkpoints.detect_family({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}) == "qwen2_5_vl"
    assert checkpoints.detect_family({"model_type": "llava"}) == "llava"
    with pytest.raises(ConversionError, match="unsupported architecture"):
        checkpoints.detect_family({"architectures": ["BertModel"], "model_type": "bert"})


def test_qwen_checkpoint_dispatches_to_qwen_converter(tmp_path):
    from splitq_jax.models.qwen2_5_vl import get_config

    cfg = get_config("qwen2.5-vl-tiny")
    t, v = cfg.text, cfg.vision
    hf_cfg = transformers.Qwen2_5_VLConfig(
        text_config={"vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                     "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                     "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
                     "max_position_embeddings": 256, "eos_token_id": 2, "pad_token_id": 0,
                     "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                         "mrope_section": list(cfg.mrope_section)}},
        vision_config={"depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                       "num_heads": v.num_heads, "patch_size": v.patch_size, "window_size": v.window_size,
                       "out_hidden_size": v.out_hidden_size, "fullatt_block_indexes": list(v.fullatt_block_indexes)},
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id)
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name or "ln_q" in name else 0.0, 0.15)
    hf.save_pretrained(tmp_path / "hf")
    report = checkpoints.convert(tmp_path / "hf", tmp_path / "ckpt", check=True, max_new_tokens=6)
    assert report["family"] == "qwen2_5_vl"
    assert report["check"]["max_abs_logit_diff"] < 1e-4 and report["check"]["greedy_equal"] is True
    restored, config, family = checkpoints.load_checkpoint(tmp_path / "ckpt")
    direct, direct_config, _, _ = checkpoints.load_model(tmp_path / "hf")
    assert family == "qwen2_5_vl" and config == direct_config and config.text.hidden_size == t.hidden_size
    assert restored.num_params() == direct.num_params() == report["num_params"]
