"""Process group, device mesh, FSDP2 sharding and the few collectives the trainer needs.

`init_distributed` works under torchrun and in a plain `python -m ovr_train.launch` (a world of 1, same code path).
`apply_fsdp` shards the ViT as one unit, each decoder layer, then the root (embeddings, final norm, LM head):
bf16 parameters with fp32 gradient reduction on GPU, fp32 on CPU. HSDP (`hsdp_replicas` > 1) replicates across
groups (e.g. nodes) and shards within each.
"""

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor


@dataclass
class DistInfo:
    """This process's place: rank, world size, local rank, device, backend, and the FSDP mesh."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(dcfg, cpu_collectives: bool = False) -> DistInfo:
    """Join (or create, for a single process) the process group and build the FSDP mesh (DistCfg `dcfg`).
    cpu_collectives (optimizer offload): on NCCL, add a gloo backend for collectives on CPU tensors (the gradient
    norm of CPU shards, gathering them for export), which NCCL cannot run."""
    if "RANK" not in os.environ:  # plain `python -m ...`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    backend = dcfg.backend if dcfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ValueError("dist.backend=nccl needs CUDA; use gloo on CPU")
    nccl = backend == "nccl"
    if nccl and cpu_collectives:
        backend = "cpu:gloo,cuda:nccl"
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(dcfg.cpu_threads or max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=dcfg.timeout_s),
                                device_id=device if nccl else None)
    if world % dcfg.hsdp_replicas:
        raise ValueError(f"dist.hsdp_replicas={dcfg.hsdp_replicas} must divide the world size {world}")
    if dcfg.hsdp_replicas > 1:
        mesh = init_device_mesh(device.type, (dcfg.hsdp_replicas, world // dcfg.hsdp_replicas),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return DistInfo(rank, world, local_rank, device, backend, mesh)


def shutdown():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def compute_dtype(mcfg, device: torch.device) -> torch.dtype:
    """ModelCfg.dtype resolved: bf16 on GPU and fp32 on CPU for "auto"."""
    if mcfg.dtype == "bf16" or (mcfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def fsdp_units(model) -> list:
    """(name, module) of each FSDP unit in wrapping order: the ViT, each LLM decoder layer; the root comes last."""
    return [("visual", model.visual)] + [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]


def apply_fsdp(model, mesh, param_dtype: torch.dtype, reshard_after_forward: bool = True, cpu_offload: bool = False):
    """fully_shard the ViT, each decoder layer, then the root. Gradients reduce in fp32.

    Parameters must be fp32 (the sharded master copy the optimizer updates); `param_dtype` is what forward
    gathers and computes in. Works on meta parameters (shard first, then `to_empty` + load). With cpu_offload the
    parameter and gradient shards live in host memory (FSDP2 copies them to the device to gather, and the reduced
    gradients back): the parameters must then be materialised on the CPU."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # Pinned host memory makes the copies asynchronous (the reduced gradients' copy out is non-blocking only into
    # pinned memory: torch 2.13 torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py:711); pinning needs CUDA.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for _, unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward, offload_policy=offload)
    # The root's parameters (embeddings, norm, LM head) are needed again right at the start of backward.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False, offload_policy=offload)
    return model


@torch.no_grad()  # there `to_local()` is the gradient's own shard, so the in-place scale writes the gradient
def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """Global gradient norm over all shards as a 0-d fp32 tensor (no host sync); clips to max_norm when > 0. A
    non-finite norm makes the clipped gradients non-finite too: the caller skips that step.

    Works on the local gradient shards: one foreach norm, the squared norm all-reduced over the mesh dims the
    parameters are sharded on (replicated dims hold copies), one foreach scale. The same value as
    `torch.nn.utils.clip_grad_norm_` on the DTensors, without DTensor's per-call sharding propagation (which cost
    more than the arithmetic on small models)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    layouts = {(g.device_mesh, g.placements) if isinstance(g, DTensor) else None for g in grads}
    if len(layouts) != 1:
        raise ValueError(f"clip_grad_norm: the gradients have {len(layouts)} different layouts (meshes / placements); "
                         "expected one FSDP2 layout for all")
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sq = torch.nn.utils.get_total_norm(local, 2.0, foreach=True).float().square()
    layout = layouts.pop()
    if layout is not None:
        mesh, placements = layout
        for dim, placement in enumerate(placements):
            if placement.is_shard() and mesh.size(dim) > 1:
                dist.all_reduce(sq, group=mesh.get_group(dim))
    norm = sq.sqrt()
    if max_norm > 0:  # torch's clip_grad_norm_ coefficient (clip_grads_with_norm_ takes parameters, not gradients)
        torch._foreach_mul_(local, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce (no-op without a process group); returns `t`."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def all_reduce_sums(sums: dict, device) -> dict:
    """{name: sum over ranks} of a dict of per-rank sums (Python numbers or 0-d tensors, the same names in the same
    order on every rank), as Python floats: one float64 all-reduce of them all, one host sync."""
    flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in sums.values()])
    return dict(zip(sums, all_reduce(flat).tolist()))


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def full_state_dict(model, cpu_offload: bool = True) -> dict:
    """The full (unsharded) model state dict (collective; e.g. for the HF export or to push weights to a rollout
    engine). Keys are OvrVLM's (`hf.model...`). With cpu_offload (in CPU memory) only rank 0 gets it, the other
    ranks get an empty dict (torch's rule); without, every rank gets it on the model's device."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))
