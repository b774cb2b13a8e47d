"""One writer per run directory: ranks die with their launcher, and a stage directory is locked by one live run.

`die_with_launcher()` (first thing a rank does under torchrun) asks the kernel to SIGKILL this process when its
parent, the torchrun agent, dies. `lock_run_dir(info, *dirs)` (first thing each stage does) takes an exclusive
`fcntl.flock` on `<dir>/.ovr.lock`; a second run on a directory a live run holds raises `RunDirBusy` naming the
directory and the holder's pid and host, before it touches any file. The kernel drops the lock when the holder dies
(even by SIGKILL), so a crash never leaves a stale lock and a rerun resumes at once.
"""

import ctypes
import fcntl
import os
import signal
import socket
import sys
from pathlib import Path

from ovr_train.dist import broadcast_object

LOCK_NAME = ".ovr.lock"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_held = {}  # resolved directory -> its open lock file; closing the file would release the lock


class RunDirBusy(RuntimeError):
    """Another live run holds the run directory."""


def die_with_launcher() -> None:
    """Under torchrun: receive SIGKILL when the launcher dies. No-op in a plain single process or off Linux.

    torchrun starts every worker in a session of its own (torch/distributed/elastic/multiprocessing/
    subprocess_handler/subprocess_handler.py:66, `start_new_session=True`), so a launcher killed by SIGKILL, even with
    its whole process group, leaves the ranks running as orphans that keep writing metrics and checkpoints into the
    directory a restarted run resumes in. The kernel sends the signal when the thread that forked us exits; the
    agent forks from its main thread, i.e. when the launcher process dies."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    # The launcher may have died before the call: the signal then never comes, and we were already re-parented,
    # to init (pid 1) unless a subreaper adopts orphans (undetectable here; on one node such an orphan cannot
    # rendezvous either: torchrun's agent hosted the store). Checked after the call, so no death slips between.
    if os.getppid() != parent or parent == 1:
        sys.exit(f"rank {os.environ.get('RANK', '?')}: the torchrun launcher is gone; exiting")


def _try_lock(path: Path) -> str:
    """Lock `path` for this process; "" on success, else the error message naming the holder."""
    key = str(path.resolve())
    if key in _held:  # this process already holds it (e.g. a stage run twice in one process)
        return ""
    path.mkdir(parents=True, exist_ok=True)
    f = open(path / LOCK_NAME, "a+")  # noqa: SIM115 - kept open while the run lives; "a+" never truncates
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its pid yet"
        f.close()
        return (f"run directory {path} is in use by another live run ({holder}; lock file {path / LOCK_NAME}): "
                "wait for it to finish or stop it, or choose another --run.out_dir")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    f.flush()
    _held[key] = f
    return ""


def lock_run_dir(info, *dirs) -> None:
    """Collective: make this run the only writer of each directory in `dirs` (created if missing) until the process
    exits. Rank 0 holds the locks for the job (every rank writes into the same, shared directory); every rank
    raises RunDirBusy when one is held by another live run, so all ranks stop before touching a file."""
    error = ""
    if info.is_main:
        for d in dirs:
            error = error or _try_lock(Path(d))
    error = broadcast_object(error)
    if error:
        raise RunDirBusy(error)
