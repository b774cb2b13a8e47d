"""End-to-end SFT through the real launcher (torchrun + gloo + FSDP2 + DCP on CPU, S7): 2 ranks == 1 rank at
step 1, a second run on a live run's directory is refused, the ranks die with a SIGKILLed launcher and the rerun ==
an uninterrupted run, NaN steps skipped then abort, the HF export loads."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from shared_runs import once, torchrun

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
    return torchrun(nproc) + ["-m", "ovr_train.launch", "--stage", "sft", f"--run.out_dir={out_dir}", *SMALL, *extra]


def _run(nproc, out_dir, extra, env, check=True):
    proc = subprocess.run(_cmd(nproc, out_dir, extra), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=240, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _metrics(out_dir) -> list:
    return [json.loads(line) for line in (Path(out_dir) / "sft" / "metrics.jsonl").read_text().splitlines()]


FULL = ["--sft.steps=14", "--checkpoint.every=2", "--checkpoint.keep=2"]


def full_run(env) -> Path:
    """An uninterrupted 14-step 2-rank run, once per session (the resume and the 2-vs-1-rank checks read it)."""
    return once("sft-full", lambda out: (_run(2, out, FULL + ["--checkpoint.export_hf=false"], env), out)[1])


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_match_one_rank_and_hsdp(tmp_path, env):
    _run(1, tmp_path / "one", ["--sft.steps=2", "--checkpoint.every=0", "--checkpoint.export_hf=false"], env)
    two_ranks = full_run(env)  # its first 2 steps: the lr warmup (2 steps) does not depend on the run's length
    # HSDP (2 replicas x 1 shard) with activation checkpointing computes the same thing
    _run(2, tmp_path / "hsdp", ["--sft.steps=2", "--checkpoint.every=0", "--checkpoint.export_hf=false",
                                "--dist.hsdp_replicas=2", "--model.activation_checkpointing=true"], env)
    one, two, hsdp = _metrics(tmp_path / "one"), _metrics(two_ranks)[:2], _metrics(tmp_path / "hsdp")
    assert one[0]["loss_tokens"] == two[0]["loss_tokens"]
    assert two[0]["micro_batches"] < one[0]["micro_batches"]  # the work really was split
    for a, b, c in zip(one, two, hsdp):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) == c["loss"], (a, b, c)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4) == pytest.approx(c["grad_norm"], rel=1e-4)


def _start_until_checkpoint(out_dir, extra: list, step: int, env):
    """Start a 2-rank SFT run in its own session and wait (at most 180 s) until its step-`step` checkpoint
    exists; returns (the launcher's Popen, its rank pids). Fails if the run ended before that."""
    victim = subprocess.Popen(_cmd(2, out_dir, extra), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = Path(out_dir) / "sft" / "checkpoints" / f"step_{step:08d}"
    deadline = time.time() + 180
    while time.time() < deadline and victim.poll() is None and not ckpt.is_dir():
        time.sleep(0.1)
    assert victim.poll() is None, "the run finished before it could be killed"
    return victim, _descendants(victim.pid)


def _descendants(pid: int) -> list:
    """Live (non-zombie) descendants of `pid`, from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # exited while we looked
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out, todo = out + kids, todo + kids
    return sorted(out)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _snapshot(root: Path) -> dict:
    """Every file under `root` -> (size, mtime_ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, env):
    """An uninterrupted 2-rank run, and one paused after its step-4 checkpoint while a second run on the same
    directory is started (it must be refused), then its launcher alone killed with SIGKILL (the ranks must follow)
    and the same command rerun."""
    tmp, extra = tmp_path_factory.mktemp("resume"), FULL
    victim, ranks = _start_until_checkpoint(tmp / "killed", extra, 4, env)
    facts = {"ranks": ranks}
    lock = tmp / "killed" / "sft" / ".ovr.lock"
    try:
        for pid in [victim.pid, *ranks]:  # paused: the directory must stay as it is while the second run tries
            os.kill(pid, signal.SIGSTOP)
        facts["holder"] = lock.read_text().split() if lock.is_file() else []
        before, t0 = _snapshot(tmp / "killed"), time.time()
        facts["second"] = _run(2, tmp / "killed", extra, env, check=False)
        facts["second_s"], facts["changed"] = time.time() - t0, before != _snapshot(tmp / "killed")
    finally:
        for pid in [victim.pid, *ranks]:
            os.kill(pid, signal.SIGCONT)
        # The launcher's process group is the launcher alone: torchrun starts each rank in a session of its own.
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in ranks):
        time.sleep(0.05)
    facts["survivors"], facts["gone_s"] = [p for p in ranks if _alive(p)], time.time() - deadline + 10
    for pid in facts["survivors"]:  # never leave orphans behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    killed_at = max(r["step"] for r in _metrics(tmp / "killed"))
    assert killed_at < 14
    log = _run(2, tmp / "killed", extra, env)
    return tmp, killed_at, log.stdout, facts, full_run(env)


@pytest.mark.dist
@pytest.mark.slow
def test_second_run_is_refused_and_ranks_die_with_their_launcher(resumed_run):
    tmp, _, _, facts, _ = resumed_run
    second = facts["second"]
    assert second.returncode != 0
    holder = facts["holder"]
    assert holder and holder[0] == "pid" and int(holder[1]) in facts["ranks"] and holder[4] == socket.gethostname()
    assert (f"run directory {tmp / 'killed' / 'sft'} is in use by another live run "
            f"(pid {holder[1]} on host {socket.gethostname()}") in second.stderr, second.stderr[-3000:]
    assert second.stderr.count("is in use by another live run") == 1  # said once, by rank 0
    assert not facts["changed"], "the refused run touched the live run's directory"
    assert facts["second_s"] < 90, f"refused only after {facts['second_s']:.0f}s"
    assert len(facts["ranks"]) >= 2 and facts["survivors"] == [], f"ranks outlived their launcher: {facts}"
    print(f"refused in {facts['second_s']:.1f}s; ranks gone {facts['gone_s']:.2f}s after the launcher's SIGKILL")


@pytest.mark.dist
@pytest.mark.slow
def test_kill9_then_rerun_continues_exactly(resumed_run):
    tmp, _, stdout, _, full_dir = resumed_run
    assert "resumed from" in stdout and "at step" in stdout
    full, resumed = _metrics(full_dir), _metrics(tmp / "killed")
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
@pytest.mark.slow
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
@pytest.mark.slow
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
