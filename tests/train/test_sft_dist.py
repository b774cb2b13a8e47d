"""End-to-end SFT through the real launcher (torchrun + gloo + FSDP2 + DCP on CPU, S7): 2 ranks == 1 rank at
step 1, kill -9 mid-run then rerun == an uninterrupted run, NaN steps skipped then abort, the HF export loads."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ovr_train.checkpoint import latest_checkpoint, list_checkpoints

ROOT = Path(__file__).resolve().parents[2]
# A small run: 8 sequences per step over ~2 micro-batches per rank, a 400-problem corpus.
SMALL = ["--sft.batch_size=8", "--data.synth_num_train=400", "--data.synth_num_eval=40", "--data.token_budget=256",
         "--optim.warmup_steps=2", "--sft.log_every=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, OVR_CACHE=str(tmp_path_factory.mktemp("cache")), OMP_NUM_THREADS="1",
             PYTHONPATH=str(ROOT))
    e.pop("RANK", None)
    return e


def _cmd(nproc: int, out_dir, extra: list) -> list:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(29500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
    return launcher + ["-m", "ovr_train.launch", "--stage", "sft", f"--run.out_dir={out_dir}", *SMALL, *extra]


def _run(nproc, out_dir, extra, env, check=True):
    proc = subprocess.run(_cmd(nproc, out_dir, extra), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=240, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _metrics(out_dir) -> list:
    return [json.loads(line) for line in (Path(out_dir) / "sft" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.dist
def test_two_ranks_match_one_rank_and_hsdp(tmp_path, env):
    _run(1, tmp_path / "one", ["--sft.steps=2", "--checkpoint.every=0", "--checkpoint.export_hf=false"], env)
    _run(2, tmp_path / "two", ["--sft.steps=2", "--checkpoint.every=0", "--checkpoint.export_hf=false"], env)
    # HSDP (2 replicas x 1 shard) with activation checkpointing computes the same thing
    _run(2, tmp_path / "hsdp", ["--sft.steps=2", "--checkpoint.every=0", "--checkpoint.export_hf=false",
                                "--dist.hsdp_replicas=2", "--model.activation_checkpointing=true"], env)
    one, two, hsdp = _metrics(tmp_path / "one"), _metrics(tmp_path / "two"), _metrics(tmp_path / "hsdp")
    assert one[0]["loss_tokens"] == two[0]["loss_tokens"]
    assert two[0]["micro_batches"] < one[0]["micro_batches"]  # the work really was split
    for a, b, c in zip(one, two, hsdp):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) == c["loss"], (a, b, c)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4) == pytest.approx(c["grad_norm"], rel=1e-4)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, env):
    """An uninterrupted 2-rank run and one killed with SIGKILL after its step-4 checkpoint, then rerun."""
    tmp = tmp_path_factory.mktemp("resume")
    extra = ["--sft.steps=14", "--checkpoint.every=2", "--checkpoint.keep=2"]
    _run(2, tmp / "full", extra + ["--checkpoint.export_hf=false"], env)
    victim = subprocess.Popen(_cmd(2, tmp / "killed", extra), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = tmp / "killed" / "sft" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and victim.poll() is None and not (ckpts / "step_00000004").is_dir():
        time.sleep(0.1)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and both ranks, at once, mid-run
    victim.wait()
    killed_at = max(r["step"] for r in _metrics(tmp / "killed"))
    assert killed_at < 14
    log = _run(2, tmp / "killed", extra, env)
    return tmp, killed_at, log.stdout


@pytest.mark.dist
def test_kill9_then_rerun_continues_exactly(resumed_run):
    tmp, _, stdout = resumed_run
    assert "resumed from" in stdout and "at step" in stdout
    full, resumed = _metrics(tmp / "full"), _metrics(tmp / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 15))  # the curve has every step exactly once
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), (a["step"], a["loss"], b["loss"])
        assert a["lr"] == b["lr"]
    assert full[-1]["loss"] < full[0]["loss"]
    stage = tmp / "killed" / "sft"
    assert [p.name for p in list_checkpoints(stage / "checkpoints")] == ["step_00000012", "step_00000014"]
    assert (stage / "curves.png").stat().st_size > 0 and (stage / "config.yaml").is_file()
    assert any((stage / "tensorboard").iterdir())


@pytest.mark.dist
def test_hf_export_loads_in_transformers_and_through_sharded_load(resumed_run):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from ovr_train.config import load_config
    from ovr_train.data import collate, encode_messages
    from ovr_train.dist import init_distributed, shutdown
    from ovr_train.model import build_sharded_model
    from ovr_train.tokenizer import special_ids

    hf_dir = resumed_run[0] / "killed" / "sft" / "hf"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = special_ids(tok)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    enc = encode_messages([("user", ["Compute (2 + 3) * 4."]), ("assistant", ["<think>2 + 3 = 5.</think>"])], tok,
                          ids, None)
    with torch.no_grad():
        logits = ref(input_ids=enc.input_ids[None]).logits[0]
        out = ref.generate(input_ids=enc.input_ids[None, :12], max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 16
    want = torch.log_softmax(logits, -1).gather(1, enc.targets.clamp_min(0)[:, None])[:, 0]
    want = torch.where(enc.targets >= 0, want, torch.zeros_like(want))
    cfg = load_config(None, [f"--model.path={hf_dir}"])
    info = init_distributed(cfg.dist)
    try:
        model = build_sharded_model(cfg, info, ids, len(tok))
        batch = collate([enc])
        with torch.no_grad():
            got = model(**batch.model_inputs(), targets=batch.targets).logprobs
    finally:
        shutdown()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.dist
def test_nan_steps_are_skipped_then_abort(tmp_path, env):
    proc = _run(1, tmp_path, ["--sft.steps=4", "--optim.lr=1e30", "--optim.warmup_steps=0", "--optim.grad_clip=0",
                              "--sft.max_bad_steps=2", "--checkpoint.every=0"], env, check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "step skipped (1 in a row)" in text and "2 consecutive non-finite steps" in text
    rows = _metrics(tmp_path)
    assert rows[0]["skipped"] == 0 and rows[1]["skipped"] == 1


def test_half_written_checkpoints_are_never_loaded(tmp_path):
    (tmp_path / "step_00000004").mkdir()
    (tmp_path / "step_00000004" / ".metadata").write_text("x")
    (tmp_path / "step_00000006").mkdir()  # a crash before DCP finished: no .metadata
    (tmp_path / ".tmp_step_00000008").mkdir()
    (tmp_path / ".tmp_step_00000008" / ".metadata").write_text("x")  # written but never renamed
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert latest_checkpoint(tmp_path / "none") is None
