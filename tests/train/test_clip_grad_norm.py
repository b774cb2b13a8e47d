"""dist.clip_grad_norm (local shards, one all-reduce of the squared norm) equals torch's clip_grad_norm_ on the
DTensors, on 2 ranks: FSDP-style Shard(0) over both, and a 2-D (replicate, shard) mesh each way round."""


import pytest
import torch
import torch.distributed as dist
from shared_runs import spawn_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from ovr_train.dist import clip_grad_norm

SHAPES = [(7, 3), (5,), (4, 4, 2), (1, 9)]  # odd first dims: uneven shards, one rank empty for (1, 9)


def _params(mesh, placements, seed):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES:
        p = distribute_tensor(torch.randn(shape, generator=g), mesh, placements).requires_grad_()
        p.grad = distribute_tensor(torch.randn(shape, generator=g) * 3, mesh, placements)
        params.append(p)
    return params


def _ranks(rank, failures):
    layouts = [((2,), ("shard",), [Shard(0)]), ((1, 2), ("replicate", "shard"), [Replicate(), Shard(0)]),
               ((2, 1), ("replicate", "shard"), [Replicate(), Shard(0)])]
    for shape, names, placements in layouts:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        for max_norm in (0.0, 1.0, 1e6):
            ours, theirs = _params(mesh, placements, 0), _params(mesh, placements, 0)
            norm = clip_grad_norm(ours, max_norm)
            ref = torch.nn.utils.clip_grad_norm_(theirs, max_norm if max_norm > 0 else float("inf"))
            ref = ref.full_tensor() if hasattr(ref, "full_tensor") else ref
            if not torch.allclose(norm, ref, rtol=1e-6):
                failures.put(f"{shape} max_norm={max_norm}: norm {norm.item()} != {ref.item()}")
            for a, b in zip(ours, theirs):
                if not torch.allclose(a.grad.full_tensor(), b.grad.full_tensor(), rtol=1e-6, atol=1e-7):
                    failures.put(f"{shape} max_norm={max_norm}: clipped gradients differ")


def test_matches_torch_on_dtensors_across_ranks():
    found = spawn_ranks(_ranks)
    assert not found, found


def test_mixed_layouts_are_refused():
    a = torch.zeros(3, requires_grad=True)
    a.grad = torch.ones(3)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))
        b = distribute_tensor(torch.zeros(3), mesh, [Shard(0)]).requires_grad_()
        b.grad = distribute_tensor(torch.ones(3), mesh, [Shard(0)])
        with pytest.raises(ValueError, match="different layouts"):
            clip_grad_norm([a, b], 1.0)
    finally:
        dist.destroy_process_group()
