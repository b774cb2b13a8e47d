"""One writer per run directory: every stage refuses a directory a live run holds, before touching a file; the
death signal is armed under torchrun only, and a rank whose launcher died before it could arm it exits.
(The 2-rank torchrun tests, a refused second run and ranks dying with a SIGKILLed launcher, are in
test_sft_dist.py.)"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

HOLD = ("import sys, time, types\nfrom ovr_train.runlock import lock_run_dir\n"
        "lock_run_dir(types.SimpleNamespace(is_main=True), *sys.argv[1:])\nprint('locked', flush=True)\n"
        "time.sleep(600)\n")


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def holder(tmp_path):
    """Another live process holding the lock on every stage directory of tmp_path/run."""
    out = tmp_path / "run"
    dirs = [out, *(out / d for d in ("base", "sft", "rl", "eval"))]
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, dirs)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield out, proc
    finally:
        proc.kill()
        proc.wait()


def test_every_stage_refuses_a_held_directory_before_touching_it(holder, tmp_path):
    from ovr_train.config import load_config
    from ovr_train.dist import init_distributed, shutdown
    from ovr_train.evaluate import evaluate
    from ovr_train.pipeline import run_all
    from ovr_train.rl import train_rl
    from ovr_train.runlock import RunDirBusy, lock_run_dir
    from ovr_train.sft import train_sft

    out, proc = holder
    (tmp_path / "model").mkdir()
    cfg = load_config(None, [f"--run.out_dir={out}", f"--data.cache_dir={tmp_path / 'cache'}"])
    before = _snapshot(out)
    info = init_distributed(cfg.dist)
    try:
        stages = {"base": lambda: train_sft(cfg, info, stage="base"), "sft": lambda: train_sft(cfg, info),
                  "rl": lambda: train_rl(cfg, info), "all": lambda: run_all(cfg, info)}
        ecfg = load_config(None, [f"--run.out_dir={out}", f"--model.path={tmp_path / 'model'}"])
        stages["eval"] = lambda: evaluate(ecfg, info)
        for name, run in stages.items():
            where = out if name == "all" else out / name
            with pytest.raises(RunDirBusy, match=f"run directory {where} is in use by another live run "
                                                 f"\\(pid {proc.pid} on host "):
                run()
        assert _snapshot(out) == before  # nothing written, not even the caches of the data (they live elsewhere)
        assert not (tmp_path / "cache").exists()
        proc.kill()
        proc.wait()  # the kernel drops a dead holder's lock: no stale lock to clean up
        lock_run_dir(info, out / "rl")
        assert (out / "rl" / ".ovr.lock").read_text().startswith(f"pid {os.getpid()} on host ")
    finally:
        shutdown()


def _pdeathsig_of_child(env: dict) -> str:
    code = ("import ctypes\nfrom ovr_train.runlock import die_with_launcher\ndie_with_launcher()\n"
            "sig = ctypes.c_int()\nctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG\n"
            "print(sig.value)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_death_signal_is_armed_under_torchrun_only():
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    env["PYTHONPATH"] = str(ROOT)
    assert _pdeathsig_of_child(env) == "0"  # a plain single process is left alone
    assert _pdeathsig_of_child(dict(env, TORCHELASTIC_RUN_ID="none")) == str(int(signal.SIGKILL))


def test_a_rank_whose_launcher_already_died_exits(tmp_path):
    log = tmp_path / "log"
    code = ("import os\nprint('ppid', os.getppid(), flush=True)\nfrom ovr_train.runlock import die_with_launcher\n"
            "die_with_launcher()\nprint('still running', flush=True)\n")
    # the shell exits at once; its background child, re-parented, then starts as a "rank" with no launcher
    script = f"(sleep 1; exec {sys.executable} -c \"$0\") >{log} 2>&1 &"
    subprocess.run(["sh", "-c", script, code], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT), TORCHELASTIC_RUN_ID="none", RANK="1"))
    deadline, text = time.time() + 60, ""
    while time.time() < deadline and not ("exiting" in text or "still running" in text):
        time.sleep(0.1)
        text = log.read_text() if log.exists() else ""
    if text.startswith("ppid ") and text.split()[1] != "1":
        pytest.skip(f"orphans are adopted by a subreaper (pid {text.split()[1]}) here, not init")
    assert "rank 1: the torchrun launcher is gone; exiting" in text and "still running" not in text, text
