"""ovr_kernels: packed varlen attention, fused linear log-prob + entropy, PPO / GSPO losses, GAE, packing.

CUDA tensors take the Triton/CUDA kernels, CPU tensors the plain-PyTorch reference (`ovr_kernels.reference`);
`OVR_BACKEND=triton|reference` forces one (see `ovr_kernels._triton`). `HAS_EXT` says whether the compiled
module `ovr_kernels._C` is present (it is optional: every op has a pure-Python fallback with identical results).
"""

import torch  # noqa: F401  (torch first: the compiled module links against the libraries it loads)

from ovr_kernels._ext import HAS_CUDA_EXT, HAS_EXT
from ovr_kernels._triton import backend
from ovr_kernels.advantages import (
    broadcast_to_tokens,
    drgrpo_advantages,
    grpo_advantages,
    masked_whiten,
    rloo_advantages,
)
from ovr_kernels.gae import gae
from ovr_kernels.gspo_loss import gspo_loss
from ovr_kernels.linear_logprob import check_targets, linear_logprob_entropy, linear_logprob_nograd
from ovr_kernels.packing import (
    balanced_partition,
    cu_seqlens_from_lengths,
    pack,
    position_ids_from_cu_seqlens,
    token_budget_microbatches,
    unpack,
)
from ovr_kernels.policy_loss import ppo_policy_loss_from_hidden
from ovr_kernels.ppo_loss import ppo_loss
from ovr_kernels.value_loss import value_loss
from ovr_kernels.varlen_attention import varlen_attention

__all__ = [
    "HAS_CUDA_EXT",
    "HAS_EXT",
    "backend",
    "balanced_partition",
    "broadcast_to_tokens",
    "check_targets",
    "cu_seqlens_from_lengths",
    "drgrpo_advantages",
    "gae",
    "grpo_advantages",
    "gspo_loss",
    "linear_logprob_entropy",
    "linear_logprob_nograd",
    "masked_whiten",
    "pack",
    "position_ids_from_cu_seqlens",
    "ppo_loss",
    "ppo_policy_loss_from_hidden",
    "rloo_advantages",
    "token_budget_microbatches",
    "unpack",
    "value_loss",
    "varlen_attention",
]
