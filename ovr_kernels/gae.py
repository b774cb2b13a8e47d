"""GAE over packed sequences (placeholder: reference path only until the C++/CUDA op lands)."""

from ovr_kernels.reference import gae_ref


def gae(rewards, values, cu_seqlens, gamma=1.0, lam=1.0):
    """See DESIGN.md's contract."""
    return gae_ref(rewards, values, cu_seqlens, gamma, lam)
