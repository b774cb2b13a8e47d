"""The optimizer of SFT and RL: `torch.optim.AdamW` on the device, or with `optim.offload=cpu` DeepSpeed's CPU Adam
(AVX C++, JIT-compiled by DeepSpeed on first use) stepping FSDP2's CPU-offloaded fp32 parameter shards.

Both are torch Optimizers over the model's DTensor parameters that step their local shards, so LambdaLR, gradient
clipping, the NaN-guarded step and DCP checkpoints (optimizer state saved and resharded by parameter name) are the
same code either way.
"""

import functools
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam
from torch.utils.cpp_extension import get_default_build_root


def build_optimizer(params: list, offload: str, lr: float, betas, weight_decay: float, eps: float = 1e-8):
    """AdamW over `params` (the trainable parameters of an FSDP2 model): ShardedAdamW (torch's fused AdamW kernel
    on the local shards) for offload="none", ShardedCPUAdam (DeepSpeed's CPU Adam) for offload="cpu" (the model
    sharded with CPU offload)."""
    if offload == "none":
        return ShardedAdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=True)
    if offload != "cpu":
        raise ValueError(f"optim.offload={offload!r}: must be one of ['none', 'cpu']")
    load_cpu_adam_op()
    return sharded_cpu_adam_class()(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def load_cpu_adam_op():
    """DeepSpeed's cpu_adam extension, compiled into torch's extension cache on first use (a clear error when
    DeepSpeed or the C++ toolchain is missing)."""
    try:  # DeepSpeed is an optional extra (ovr[offload]): imported only with optim.offload=cpu
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except ImportError as e:
        raise RuntimeError('optim.offload=cpu needs DeepSpeed: pip install -e ".[offload]" '
                           "(or deepspeed==0.19.8), or use --optim.offload none") from e
    if not dist.is_initialized() or dist.get_rank() == 0:
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
        print(f"[optim] loading DeepSpeed's CPU Adam op (JIT-compiled on first use, about a minute; cached under "
              f"{root})", flush=True)
    try:
        return CPUAdamBuilder().load(verbose=False)
    except Exception as e:  # torch's JIT build raises RuntimeError/OSError/CalledProcessError for a bad toolchain
        raise RuntimeError(f"optim.offload=cpu: DeepSpeed's CPU Adam op failed to build ({type(e).__name__}: {e}). "
                           "It is compiled with ninja and a C++ compiler (CXX, default c++) against torch's headers: "
                           "install them, or use --optim.offload none") from e


def _local(t: torch.Tensor) -> torch.Tensor:
    # Under no_grad `to_local()` is the DTensor's own local tensor: writing it updates the shard in place.
    return t.to_local() if isinstance(t, DTensor) else t


def _closure_loss(closure):
    """An optimizer step's `closure` convention: the loss it returns, evaluated with gradients on (None without one)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class ShardedAdamW(torch.optim.AdamW):
    """torch's AdamW whose step runs on the local shards of DTensor parameters.

    The parameters, moments and state are torch AdamW's own (DTensors, the same state keys), so LambdaLR, DCP
    checkpoints and resharding see no difference. Only the step's kernel is given the local tensors. Given the
    DTensors themselves, the fused kernel re-derives their sharding on every step (DTensor's propagation cache
    does not cover an op over tensor lists): on the tiny model on 2 CPU cores that was 5.7% of an SFT step (a
    profile), against 1.5% for the update itself; stepping the shards made the step 2-3% faster. The update is
    elementwise on each shard, so the result is bit-identical."""

    @torch.no_grad()
    def step(self, closure=None):
        # torch 2.13's Adam.step (torch/optim/adam.py) with the lists made local: the same `_init_group` (state
        # created on the DTensors) and the same call of the functional `adam`
        loss = _closure_loss(closure)
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
            beta1, beta2 = group["betas"]
            adam(
                [_local(t) for t in params], [_local(t) for t in grads], [_local(t) for t in exp_avgs],
                [_local(t) for t in exp_avg_sqs], [_local(t) for t in max_exp_avg_sqs], steps,
                amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                foreach=group["foreach"], capturable=group["capturable"], differentiable=group["differentiable"],
                fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None), decoupled_weight_decay=group["decoupled_weight_decay"])
        return loss


@functools.cache
def sharded_cpu_adam_class():
    """ShardedCPUAdam, defined on first use: it subclasses DeepSpeed's optimizer, an optional dependency."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    class ShardedCPUAdam(DeepSpeedCPUAdam):
        """DeepSpeedCPUAdam (AdamW mode) over DTensor parameter shards in host memory.

        DeepSpeed's C++ update reads raw pointers, which a DTensor wrapper does not have (DeepSpeedCPUAdam given
        DTensors as they are crashes the process, deepspeed 0.19.8): each step passes the local shards instead. The moments are DTensors laid out like their parameter, so DCP saves and reshards them
        exactly like torch AdamW's."""

        def __init__(self, params, lr: float, betas, eps: float, weight_decay: float):
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True)
            for group in self.param_groups:
                for p in group["params"]:
                    local = _local(p)
                    if local.device.type != "cpu" or local.dtype != torch.float32 or not local.is_contiguous():
                        raise ValueError(f"optim.offload=cpu: a parameter of shape {tuple(p.shape)} is on "
                                         f"{local.device} as {local.dtype} (contiguous: {local.is_contiguous()}); "
                                         "CPU Adam needs contiguous fp32 CPU shards (FSDP2 with CPUOffloadPolicy)")

        @torch.no_grad()
        def step(self, closure=None):
            loss = _closure_loss(closure)
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                # A fresh C++ optimizer: its bias-correction cache (beta**t) is then pow(beta, t), never a product
                # over the steps this process happened to run, so a resumed run steps bit-identically.
                self.ds_opt_adam.create_adam(self.opt_id, group["lr"], beta1, beta2, group["eps"],
                                             group["weight_decay"], True, False)
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    state["step"] += 1
                    self.ds_opt_adam.adam_update(self.opt_id, state["step"], group["lr"], beta1, beta2, group["eps"],
                                                 group["weight_decay"], group["bias_correction"], _local(p),
                                                 _local(p.grad), _local(state["exp_avg"]),
                                                 _local(state["exp_avg_sq"]))
            return loss

    return ShardedCPUAdam

