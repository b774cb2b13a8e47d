"""Packed variable-length attention (placeholder: reference path only until the Triton kernel lands)."""

from ovr_kernels.reference import varlen_attention_ref


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                     softmax_scale=None, return_lse=False):
    """See DESIGN.md's contract."""
    return varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, return_lse)
