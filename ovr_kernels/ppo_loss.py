"""PPO clipped surrogate (placeholder: reference path only until the Triton kernel lands)."""

from ovr_kernels.reference import ppo_loss_ref


def ppo_loss(logprobs, old_logprobs, advantages, mask, **kwargs):
    """See DESIGN.md's contract."""
    return ppo_loss_ref(logprobs, old_logprobs, advantages, mask, **kwargs)
