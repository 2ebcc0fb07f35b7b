"""Data-parallel calibration (:mod:`splitq_jax.sharding`).

The multi-device comparisons run ``tests/multidevice_check.py`` in a subprocess with 4 forced host
devices: the device count is fixed when JAX starts, and CPU collectives must not share a process
(and its thread pool) with the rest of the suite. The checks in this process run on one device:
the masked padding, the device-count errors and the CLI's refusal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitq_jax import calibrate as cal
from splitq_jax import sharding
from splitq_jax.block import BlockConfig, causal_mask, init_block_params, rope_1d
from splitq_jax.config import method_config

ROOT = Path(__file__).resolve().parents[1]
BCFG = BlockConfig(hidden=48, intermediate=96, num_heads=4, num_kv_heads=2)


def _run_check(tmp_path: Path, full: bool) -> dict:
    out = tmp_path / "multidevice.json"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(ROOT / "tests" / "multidevice_check.py"), str(out)] + (["--full"] if full else [])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900 if full else 420)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


def _check(result: dict) -> None:
    assert result["device_count"] == 4
    for method, g in result["grad"].items():
        assert g["devices"] == 4 and g["grad_devices"] == 4, method  # the batch really was split
        assert g["grad_norm"] > 0
        assert g["loss_rel"] < 1e-5 and g["grad_rel"] < 1e-5, (method, g)
        # the control: summing each device's gradient of its own loss is off by about the device
        # count (a relative error near 3 with 4 devices), so the comparison above can fail
        assert g["wrong_rel"] > 1.0, (method, g)
    for pair, st in result["stats"].items():
        assert st["same_split"] and st["count_equal"], pair
        assert st["absmax_rel"] < 1e-5 and st["hessian_rel"] < 1e-5, (pair, st)
    for method, runs in result["fit"].items():
        for n, r in runs.items():
            if n == "split_nonempty":
                continue
            assert r["state_devices"] == int(n) and r["trained"] and r["same_split"], (method, n)
            for k in ("init_loss_rel", "final_loss_rel", "epoch_losses_rel", "params_rel"):
                assert r[k] < 1e-5, (method, n, k, r[k])
    for method, h in result["hessian"].items():  # GPTQ-family statistics and solve
        assert h["init_loss_rel"] < 1e-5 and h["final_loss_rel"] < 1e-4, (method, h)
        assert h["weights_identical_fraction"] > 0.999, (method, h)
    if "splitq" in result["fit"]:
        assert result["fit"]["splitq"]["split_nonempty"]  # MOCD chose outlier channels to agree on


def test_four_devices_match_one(tmp_path):
    """FlatQuant's step gradient, statistics, a flatquant block fit and a GPTQ block: 4 devices = 1."""
    _check(_run_check(tmp_path, full=False))


@pytest.mark.slow  # ~2.5 min: splitq and flatquant fits on 1, 4 and 3 (padded) devices, every statistics pair
def test_four_devices_match_one_every_case(tmp_path):
    result = _run_check(tmp_path, full=True)
    _check(result)
    assert set(result["fit"]) == set(result["grad"]) == {"flatquant", "splitq"}
    assert set(result["hessian"]) == {"gptq", "gptaq"}
    assert set(result["fit"]["splitq"]) >= {"3", "4"}


def _data():
    s, n = 3, 8
    params = init_block_params(jax.random.PRNGKey(0), BCFG, scale=0.15)
    x = jax.random.normal(jax.random.PRNGKey(1), (s, n, BCFG.hidden))
    valid = jnp.ones((s, n), bool).at[0, :2].set(False)
    modality = jnp.where(valid, jnp.where(jnp.arange(n) < 3, 2, 1)[None], 0)
    cos, sin = rope_1d(jnp.cumsum(valid, axis=1) - 1, BCFG.head_dim)
    return params, cal.make_block_data(params, x, cos, sin, causal_mask(valid), modality, BCFG)


def test_masked_padding_changes_no_loss_and_no_statistic():
    params, data = _data()
    padded = sharding._pad_masked(data, 2)
    assert padded.x.shape[0] == 5 and bool(jnp.all(padded.modality[3:] == 0))
    cfg = method_config("flatquant", "w4a4", epochs=0, batch_size=5)
    stats = cal.collect_stats(params, data, cfg, BCFG, batch_size=3)
    qp, qc = cal.init_qblock(jax.random.PRNGKey(0), params, stats, cfg, BCFG)
    a = cal.evaluate(qp, qc, data, cfg, BCFG, batch_size=3)
    b = cal.evaluate(qp, qc, padded, cfg, BCFG, batch_size=5)
    assert abs(a - b) <= 1e-6 * abs(a)
    wanted = {g: ("absmax", "hessian") for g in BCFG.groups}
    s1 = cal.collect_group_stats(params, data, BCFG, wanted, batch_size=3)
    s2 = cal.collect_group_stats(params, padded, BCFG, wanted, batch_size=5)
    for g in BCFG.groups:
        h1, h2 = s1[g].collected["hessian"], s2[g].collected["hessian"]
        assert float(h1.weight_sum) == float(h2.weight_sum)
        np.testing.assert_allclose(h2.matrix, h1.matrix, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(h1.matrix))))
        np.testing.assert_allclose(s2[g].collected["absmax"].absmax, s1[g].collected["absmax"].absmax, rtol=1e-5)


def test_one_device_is_the_single_device_path():
    _, data = _data()
    with sharding.data_parallel(1) as mesh:
        assert mesh.size == 1 and sharding.current_mesh() is None and sharding.device_count() == 1
        assert sharding.shard_batch(data) is data
    with sharding.data_parallel(None) as mesh:
        assert mesh.size == jax.device_count()


@pytest.mark.parametrize("n,message", [(0, "at least 1"), (10**6, "only 1")])
def test_device_count_errors(n, message):
    with pytest.raises(sharding.DeviceError, match=message):
        sharding.data_mesh(n)


@pytest.mark.parametrize("extra,message", [(1, "only 1"), (None, "at least 1")])
def test_cli_refuses_a_device_count_it_cannot_serve(tmp_path, capsys, extra, message):
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibrate_cli_sharding", ROOT / "scripts" / "calibrate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "ckpt"
    n = 0 if extra is None else jax.device_count() + extra
    rc = cli.main(["--devices", str(n), "--out", str(out)])
    assert rc == 2 and message in capsys.readouterr().err and list(tmp_path.iterdir()) == []
