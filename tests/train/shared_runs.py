"""Launches whose outputs several tests read, run once per test session (pytest runs a session's tests in one
process): the first test that asks runs it, the others read what it wrote. Tests treat those outputs as read-only.
A launch that failed fails every test that asks for it again, without running it again."""

import atexit
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

_DONE = {}
_ROOT = []


def once(key: str, make):
    """`make(directory)`'s result for `key`, computed on first use in a fresh directory of this session."""
    if key not in _DONE:
        if not _ROOT:
            _ROOT.append(Path(tempfile.mkdtemp(prefix="ovr-shared-runs-")))
            atexit.register(shutil.rmtree, _ROOT[0], True)
        out = _ROOT[0] / key
        out.mkdir()
        try:
            _DONE[key] = (True, make(out))
        except Exception as e:  # noqa: BLE001  (kept and re-raised for every test that asks)
            _DONE[key] = (False, e)
    ok, value = _DONE[key]
    if not ok:
        raise value
    return value


def torchrun(nproc: int) -> list:
    """argv prefix of a `nproc`-rank torchrun launch (plain python for one rank). `--standalone` makes torchrun pick
    a free rendezvous port, so launches from concurrent test workers never collide on a fixed one."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def _rank_main(rank, body, port, world, failures):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        body(rank, failures)
    finally:
        dist.destroy_process_group()


def spawn_ranks(body, nprocs: int = 2) -> list:
    """Runs `body(rank, failures)` in `nprocs` spawned processes, inside a gloo process group on a free local port,
    and returns the messages they put in the `failures` queue. `body` must be a module-level function."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    failures = mp.get_context("spawn").Queue()
    mp.start_processes(_rank_main, args=(body, port, nprocs, failures), nprocs=nprocs, start_method="spawn")
    found = []
    while not failures.empty():
        found.append(failures.get())
    return found
