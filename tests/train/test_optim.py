"""optim.ShardedAdamW (torch's fused AdamW kernel on the local shards) steps exactly like torch's fused AdamW on the
DTensors, on 2 ranks with uneven shards (one rank empty), keeps the same state, and resumes from its state dict;
on plain tensors it is torch's AdamW."""

import copy

import torch
from shared_runs import spawn_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ovr_train.optim import ShardedAdamW, build_optimizer

SHAPES = [(7, 3), (5,), (4, 4, 2), (1, 9)]  # odd first dims: uneven shards, one rank empty for (1, 9)
KW = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "fused": True}


def _params(place, seed):
    g = torch.Generator().manual_seed(seed)
    return [place(torch.randn(shape, generator=g)).requires_grad_() for shape in SHAPES]


def _step(params, optim, place, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = place(torch.randn(p.shape, generator=g))
    optim.step()


def _compare(ours, theirs, opt_ours, opt_theirs, full) -> list:
    bad = [f"param {i}" for i, (a, b) in enumerate(zip(ours, theirs)) if not torch.equal(full(a), full(b))]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        sa, sb = opt_ours.state[a], opt_theirs.state[b]
        if set(sa) != set(sb) or any(not torch.equal(full(sa[k]), full(sb[k])) for k in sa):
            bad.append(f"state of param {i}")
    return bad


def _check(place, full) -> list:
    ours, theirs = _params(place, 0), _params(place, 0)
    opt_ours, opt_theirs = ShardedAdamW(ours, **KW), torch.optim.AdamW(theirs, **KW)
    failures = []
    for step in range(3):
        _step(ours, opt_ours, place, step)
        _step(theirs, opt_theirs, place, step)
        failures += [f"step {step + 1}: {b}" for b in _compare(ours, theirs, opt_ours, opt_theirs, full)]
    # a fresh optimizer loaded from the state dict continues exactly
    resumed = [place(full(p).detach().clone()).requires_grad_() for p in ours]
    opt_resumed = ShardedAdamW(resumed, **KW)
    opt_resumed.load_state_dict(copy.deepcopy(opt_ours.state_dict()))  # as a checkpoint gives it: no shared tensors
    _step(ours, opt_ours, place, 3)
    _step(resumed, opt_resumed, place, 3)
    failures += [f"resumed: {b}" for b in _compare(resumed, ours, opt_resumed, opt_ours, full)]
    if all(torch.equal(full(a), full(b)) for a, b in zip(ours, _params(place, 0))):
        failures.append("the parameters did not move")
    return failures


def _ranks(rank, failures):
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("shard",))
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # the step counts are plain tensors
    for f in _check(lambda t: distribute_tensor(t, mesh, [Shard(0)]), full):
        failures.put(f"rank {rank}: {f}")


def test_matches_torch_fused_adamw_on_dtensors_across_ranks():
    found = spawn_ranks(_ranks)
    assert not found, found


def test_plain_tensors_and_the_factory():
    assert _check(lambda t: t, lambda t: t) == []
    optim = build_optimizer([torch.zeros(3, requires_grad=True)], "none", 1e-3, (0.9, 0.95), 0.1)
    assert type(optim) is ShardedAdamW and optim.defaults["fused"] and optim.defaults["weight_decay"] == 0.1
