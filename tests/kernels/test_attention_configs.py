"""The committed attention tuning table: well formed, read by the launchers, and sane fallbacks for missing keys;
benchmarks/autotune.py's rehearsal writes winners with their source into a copy of it."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

va = importlib.import_module("ovr_kernels.varlen_attention")
ROOT = Path(__file__).resolve().parents[2]
KERNELS = ("fwd", "dkdv", "dkdvq", "dq")


def _pow2(x):
    return x > 0 and x & (x - 1) == 0


def test_table_is_well_formed_and_says_where_it_came_from():
    doc = json.loads(va._TABLE_PATH.read_text())
    assert "untuned defaults" in doc["source"] and "never timed on a GPU" in doc["source"]
    for key, entry in doc["configs"].items():
        arch, dtype, dim, causal, short = key.split("/")
        assert arch in ("sm80", "sm90") and dtype in ("bf16", "fp16", "fp32") and causal in ("causal", "full")
        assert short in ("short", "long") and va.supported_head_dim(int(dim[1:])), key
        assert set(entry) - {"source"} == set(KERNELS), key
        for kernel in KERNELS:
            bm, bn, warps, stages = entry[kernel]
            assert _pow2(bm) and _pow2(bn) and bm >= 16 and bn >= 16 and warps in (1, 2, 4, 8) and 1 <= stages <= 5
    # every benchmark key is present (no benchmark runs on a fallback)
    for arch in (80, 90):
        for key in ("bf16/d128/causal/long", "bf16/d80/full/long", "bf16/d80/full/short"):
            assert f"sm{arch}/{key}" in doc["configs"]


def test_launchers_read_the_table(monkeypatch):
    """On a CUDA device (capability faked), the launch parameters are the table's entry for the call's key."""
    doc = json.loads(va._TABLE_PATH.read_text())["configs"]
    monkeypatch.setattr(va, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    dev = torch.device("cuda")
    assert va._launch_params("dkdv", 128, 8192, dev, torch.bfloat16, True) == \
        tuple(doc["sm90/bf16/d128/causal/long"]["dkdv"])
    assert va._launch_params("fwd", 80, 64, dev, torch.bfloat16, False) == tuple(doc["sm90/bf16/d80/full/short"]["fwd"])
    assert va._launch_params("fwd", 80, 4096, dev, torch.float32, False) == tuple(doc["sm90/fp32/d80/full/long"]["fwd"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert va._launch_params("dq", 80, 4096, dev, torch.bfloat16, False) == tuple(doc["sm80/bf16/d80/full/long"]["dq"])


@pytest.fixture
def small_table(tmp_path, monkeypatch):
    """A table with a few keys only, to exercise the fallbacks."""
    cfg = {"fwd": [128, 64, 8, 3], "dkdv": [32, 64, 8, 2], "dq": [64, 64, 4, 2]}
    table = {"source": "test", "configs": {
        "sm90/bf16/d64/full/long": {**cfg, "fwd": [64, 64, 4, 2]},
        "sm90/bf16/d128/causal/long": cfg,
        "sm90/bf16/d128/causal/short": {**cfg, "fwd": [64, 32, 4, 1], "source": "autotune on X"},
        "sm90/fp32/d80/full/long": {"fwd": [32, 32, 4, 1], "dkdv": [32, 32, 8, 1], "dq": [64, 32, 8, 1]},
    }}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(va, "_TABLE_PATH", path)
    va.tuning_table.cache_clear()
    yield table["configs"]
    va.tuning_table.cache_clear()


def test_fallbacks_for_missing_keys(small_table):
    bc = va.block_config
    assert bc("fwd", 128, 64, 90, torch.bfloat16, True) == (64, 32, 4, 1)  # exact (short), "source" ignored
    assert bc("fwd", 48, 4096, 90, torch.bfloat16, False) == (64, 64, 4, 2)  # next tabled head dim up
    assert bc("fwd", 96, 4096, 90, torch.bfloat16, False) == (128, 64, 8, 3)  # d128, the other causal flag
    assert bc("dkdv", 128, 64, 90, torch.bfloat16, False) == (32, 64, 8, 2)  # short -> long
    assert bc("dq", 128, 4096, 90, torch.float16, True) == (64, 64, 4, 2)  # fp16 -> bf16
    assert bc("fwd", 128, 4096, 100, torch.bfloat16, True) == (128, 64, 8, 3)  # sm_100 -> the sm_90 family
    # never across element sizes, nor to an architecture family the table lacks: the small safe config
    assert bc("fwd", 128, 4096, 90, torch.float32, True) == va._FALLBACK_CONFIG
    assert bc("fwd", 128, 4096, 80, torch.bfloat16, True) == va._FALLBACK_CONFIG


@pytest.mark.slow
def test_autotune_rehearsal_writes_winners_with_their_source(tmp_path):
    table, out = tmp_path / "table.json", tmp_path / "sweep.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "benchmarks/autotune.py", "--tiny", "--budget", "120", "--table",
                          str(table), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[1/" in res.stdout  # progress per candidate
    sweep = json.loads(out.read_text())
    assert sweep["records"] and all(r["ms"] is not None for r in sweep["records"])
    doc = json.loads(table.read_text())
    committed = json.loads(va._TABLE_PATH.read_text())
    for key, kernels in sweep["winners"].items():
        assert doc["configs"][key]["source"].startswith("autotune on cpu interpreter")
        for kernel, cfg in kernels.items():
            assert doc["configs"][key][kernel] == cfg
    untouched = set(committed["configs"]) - set(sweep["winners"])
    assert untouched and all(doc["configs"][k] == committed["configs"][k] for k in untouched)
    # the committed table is refused as a rehearsal target
    res = subprocess.run([sys.executable, "benchmarks/autotune.py", "--tiny", "--table", str(va._TABLE_PATH)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert res.returncode != 0 and "--table" in res.stderr
