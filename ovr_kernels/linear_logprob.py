"""Fused linear log-prob + entropy (placeholder: reference path only until the Triton kernel lands)."""

from ovr_kernels.reference import linear_logprob_entropy_ref


def linear_logprob_entropy(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """See DESIGN.md's contract."""
    return linear_logprob_entropy_ref(hidden, weight, targets, temperature, ignore_index)
