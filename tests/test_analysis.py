"""analysis.channel_profile / scripts/plot_channels.py on the embedded tiny model, against numpy."""

import sys
from pathlib import Path

import numpy as np
import pytest

from splitq_jax import analysis
from splitq_jax.methods.splitq import mocd
from splitq_jax import quantize as qz
from splitq_jax.config import method_config
from splitq_jax.modality import TEXT, VISION

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.fixture(scope="module")
def setup():
    handle = qz.load_model_for_calibration(None)
    stream = qz.calibration_stream(handle, samples=4, batch_size=2)
    return handle, stream


def test_top_channels():
    a = np.asarray([0.5, 3.0, -1.0, 7.0, 3.0])
    assert analysis.top_channels(a, 2).tolist() == [1, 3]  # ties: the lower channel first
    assert analysis.top_channels(a, 3).tolist() == [1, 3, 4]


def test_layer0_profile_is_the_normalised_embedding(setup):
    handle, stream = setup
    cfg = method_config("splitq", "w4a4")
    prof = analysis.channel_profile(handle.model, stream, 0, "attn_in", cfg)
    # Layer 0's attention input is RMSNorm(embedding) * scale, in numpy.
    x = np.asarray(stream.x, np.float64)
    scale = np.asarray(handle.model.blocks[0].block_params()["input_layernorm"]["scale"], np.float64)
    eps = handle.model.config.text.rms_norm_eps
    h = np.abs(x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale).reshape(-1, x.shape[-1])
    modality = np.asarray(stream.modality).reshape(-1)
    assert (modality == VISION).any() and (modality == TEXT).any()
    np.testing.assert_allclose(prof.vision_absmax, h[modality == VISION].max(0), rtol=1e-5, atol=1e-6)
    text = np.asarray(analysis.cal.text_mask_of(modality, cfg))
    np.testing.assert_allclose(prof.text_absmax, h[text].max(0), rtol=1e-5, atol=1e-6)
    k_t, k_v = mocd.channel_counts(x.shape[-1], cfg.text_ratio, cfg.vision_ratio)
    assert len(prof.split.text) == k_t and len(prof.split.vision) == k_v
    assert not set(prof.split.text.tolist()) & set(prof.split.vision.tolist())


def test_plot_channels_script(setup, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import plot_channels

    out = tmp_path / "ch.png"
    assert plot_channels.main(["--samples", "4", "--layer", "1", "--group", "mlp_in", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "shared" in capsys.readouterr().out
    assert plot_channels.main(["--samples", "4", "--layer", "99", "--out", str(out)]) == 2
    assert "out of range" in capsys.readouterr().err
