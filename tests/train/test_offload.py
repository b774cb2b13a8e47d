"""Optimizer offload (`optim.offload=cpu`: FSDP2 CPU offload + DeepSpeed's CPU Adam on the local shards): the
optimizer matches torch AdamW, 2-rank SFT and RL runs match the no-offload runs step by step, a SIGKILLed offload
run resumes exactly, and a missing DeepSpeed or toolchain is a clear error. DeepSpeed JIT-builds its op once per
machine (about a minute, cached in torch's extension directory)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_rl_step import dumps, init_dir, launch, straight_run  # noqa: F401  (init_dir is a fixture)
from test_sft_dist import ROOT, _alive, _metrics, _run, _start_until_checkpoint, env  # noqa: F401  (env is a fixture)

from ovr_train.optim import build_optimizer, load_cpu_adam_op


def _params(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).requires_grad_() for n in (7, 130, 1)]  # odd sizes: the AVX tail


def test_cpu_adam_matches_torch_adamw():
    ours, ref = _params(0), _params(0)
    opt = build_optimizer(ours, "cpu", lr=1e-2, betas=[0.9, 0.95], weight_decay=0.1)
    want = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))  # the scheduler drives its lr
    sched_ref = torch.optim.lr_scheduler.LambdaLR(want, lambda s: 1.0 / (s + 1))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        want.step()
        sched.step()
        sched_ref.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours[1], _params(0)[1])  # it did move


def test_cpu_adam_resumed_from_its_state_dict_steps_bit_identically():
    def steps(params, opt, n, g):
        for _ in range(n):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()

    straight, resumed = _params(0), _params(0)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    steps(straight, build_optimizer(straight, "cpu", 1e-2, [0.9, 0.95], 0.1), 12, g1)
    first = build_optimizer(resumed, "cpu", 1e-2, [0.9, 0.95], 0.1)
    steps(resumed, first, 6, g2)  # resumed at step 7: fp32 0.95**7 as a running product != as pow(0.95, 7)
    again = build_optimizer(resumed, "cpu", 1e-2, [0.9, 0.95], 0.1)  # a new process's optimizer
    again.load_state_dict(first.state_dict())
    steps(resumed, again, 6, g2)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b), (a - b).abs().max()


def test_missing_deepspeed_and_failed_build_are_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "deepspeed.ops.op_builder", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"optim.offload=cpu needs DeepSpeed"):
        load_cpu_adam_op()
    monkeypatch.undo()
    # A C++ compiler that does not exist, in a fresh extension cache: the real JIT build fails
    code = ("from ovr_train.optim import load_cpu_adam_op\ntry:\n    load_cpu_adam_op()\n"
            "except RuntimeError as e:\n    print('ERR', e)\n")
    child_env = dict(os.environ, CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(tmp_path / "no_toolchain"),
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=child_env, cwd=ROOT, capture_output=True, text=True,
                          timeout=240, check=False)
    assert "loading DeepSpeed's CPU Adam op" in proc.stdout and "no_toolchain" in proc.stdout, proc.stdout
    assert "ERR optim.offload=cpu: DeepSpeed's CPU Adam op failed to build" in proc.stdout, proc.stdout + proc.stderr
    with pytest.raises(ValueError, match=r"optim.offload='gpu'"):
        build_optimizer(_params(0), "gpu", 1e-3, [0.9, 0.95], 0.0)


FEW = ["--sft.steps=6", "--checkpoint.every=2", "--checkpoint.keep=1"]


@pytest.mark.dist
@pytest.mark.slow
def test_sft_offload_matches_and_resumes_after_kill9(tmp_path, env):  # noqa: F811  (the imported fixture)
    _run(2, tmp_path / "none", FEW + ["--checkpoint.export_hf=false"], env)
    assert "CPU Adam" in _run(2, tmp_path / "cpu", FEW + ["--optim.offload=cpu"], env).stdout
    none, cpu = _metrics(tmp_path / "none"), _metrics(tmp_path / "cpu")
    assert [r["step"] for r in cpu] == list(range(1, 7))
    for a, b in zip(none, cpu):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a["step"], a["grad_norm"], b["grad_norm"])
        assert a["lr"] == b["lr"]
    assert (tmp_path / "cpu" / "sft" / "hf" / "config.json").is_file()  # the export gathers CPU shards too

    # kill -9 (launcher and ranks) after the step-2 checkpoint, rerun: the curve is the uninterrupted one
    victim, ranks = _start_until_checkpoint(tmp_path / "killed", FEW + ["--optim.offload=cpu",
                                                                      "--checkpoint.export_hf=false"], 2, env)
    for pid in [victim.pid, *ranks]:
        os.kill(pid, signal.SIGKILL)
    victim.wait()
    while any(_alive(p) for p in ranks):
        time.sleep(0.05)
    assert max(r["step"] for r in _metrics(tmp_path / "killed")) < 6
    log = _run(2, tmp_path / "killed", FEW + ["--optim.offload=cpu", "--checkpoint.export_hf=false"], env)
    assert "resumed from" in log.stdout
    resumed = _metrics(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(cpu, resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)


@pytest.mark.dist
@pytest.mark.slow
def test_rl_offload_matches_no_offload(init_dir):  # noqa: F811  (the imported fixture)
    """2 offloaded steps against the first 2 of test_rl_step's 3-step run (same options otherwise)."""
    none = straight_run(init_dir)
    assert "CPU Adam" in launch(init_dir, init_dir / "cpu", 2, "--checkpoint.export_hf=false", "--optim.offload=cpu")
    rows = [[json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
            for run in (none, init_dir / "cpu")]
    assert [r["step"] for r in rows[1]] == [1, 2]
    for a, b in zip(*rows):
        for key in ("loss", "value_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key, a[key], b[key])
    for a, b in zip(dumps(none, 2), dumps(init_dir / "cpu", 2)):
        assert [s[1] for s in a["samples"]] == [s[1] for s in b["samples"]]  # the pushed policy sampled the same
        torch.testing.assert_close(a["old"], b["old"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a["values"], b["values"], rtol=1e-4, atol=1e-5)


def test_dry_run_memory_with_offload(capsys):
    from ovr_train.config import load_config
    from ovr_train.launch import dry_run

    base = ["--model.hidden_size=3584", "--model.intermediate_size=18944", "--model.num_layers=28",
            "--model.num_heads=28", "--model.num_kv_heads=4", "--model.mrope_section=[16,24,24]",
            "--model.tokenizer=qwen", "--run.dry_run_world_size=2"]
    none = dry_run(load_config(None, base))
    cpu = dry_run(load_config(None, base + ["--optim.offload=cpu"]))
    out = capsys.readouterr().out
    assert "host_per_rank" in out and "(host memory, not GPU)" in out
    # the shards, gradients and moments move to the host; what the GPU keeps besides is the same
    moved = none["params_fp32_shard"] + none["grads_fp32_shard"] + none["adamw_shard"]
    assert cpu["host_per_rank"] == pytest.approx(moved)
    assert cpu["gathered_bf16"] == none["gathered_bf16"] and cpu["activations"] == none["activations"]
    assert cpu["total"] == pytest.approx(none["total"] - moved + cpu["offload_staging_fp32"])
    assert cpu["total"] < 0.5 * none["total"]
