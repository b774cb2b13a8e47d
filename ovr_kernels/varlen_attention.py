"""Packed variable-length attention (flash-attn's varlen API): Triton forward and backward, causal and not, GQA.

Legend: T packed tokens (Tq queries, Tk keys), Hq / Hkv query / key-value heads, D head dim, B segments.
q_THD (Tq, Hq, D), k_THD / v_THD (Tk, Hkv, D), lse_HT (Hq, Tq) fp32 natural log, cu_seqlens int32 (B+1,).

Algorithm (triton tutorial 06, made ragged): base-2 online softmax with log2(e) folded into the scale; the forward
saves LSE. The backward is a preprocess (delta = rowsum(o * do)) and a dK/dV kernel (one program per kv block,
looping over q blocks) that by default also computes dQ = dS K from the dS it already holds, as flash-attention 2
does: 5 GEMMs per (q block, kv block) pair (S = Q K^T, dP = dO V^T, dV += P^T dO, dK += dS^T Q, dQ += dS K). dQ rows
get one share per kv block, summed with fp32 atomics; where every key segment fits one kv block (ViT windows) the
single program stores its dQ. deterministic=True instead leaves dQ to a separate kernel (one program per q block,
looping over kv blocks), which recomputes S and dP: 7 GEMMs, no atomics, bit-reproducible (`_dq_mode`).

Scheduling: the grid is (cdiv(max_seqlen, BLOCK), heads, B): sized from the Python-int max_seqlen, so launching
needs no host sync. Axis 2 walks the segments longest-first (an on-device argsort of the lengths, no sync) and axis 0
walks each segment's blocks heaviest-first (the last q block under causal masking), so the long tiles start first
and the short ones fill the tail instead of one long sequence running alone at the end. Programs past the end of
their segment exit at once.

Head dims: a tile dimension must be a power of two, so D is split into D0 (largest power of two <= D) + D1 (0 or a
power of two >= 16): 64 = 64, 80 = 64 + 16, 96 = 64 + 32, 128 = 128. Every product is then two dots (D0 and D1
parts) instead of one dot padded to 128: for D = 80 this does 80/128 of the padded MMA work and loads no padding.

Causal masks are aligned bottom-right (query i of a segment with sq queries and sk keys sees keys j <= i + sk - sq),
as flash-attn >= 2.1 does; a query row that sees no key gets output 0 and LSE -inf.
"""

import functools
import json
import math
from pathlib import Path

import torch

from ovr_kernels._checks import check_cu_seqlens, check_tensor, max_seqlen_of
from ovr_kernels._triton import HAS_TRITON, INTERPRET, backend, use_triton
from ovr_kernels.reference import varlen_attention_ref

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - a torch build without triton: the reference path only
    triton = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# where the backward's dQ comes from (`_dq_mode`): the separate dQ kernel (7 GEMMs per tile pair, deterministic),
# the dK/dV kernel with fp32 atomics (5 GEMMs), or the dK/dV kernel storing it (5 GEMMs; one kv block per segment)
DQ_SEPARATE, DQ_ATOMIC, DQ_STORE = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------------
# jit kernels
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:
    _LOG2E_K = tl.constexpr(LOG2E)  # kernels may read module globals only as constexpr
    _LN2_K = tl.constexpr(LN2)
    _DQ_SEPARATE_K = tl.constexpr(DQ_SEPARATE)
    _DQ_ATOMIC_K = tl.constexpr(DQ_ATOMIC)

    @triton.jit
    def _load_rows(base, rows, num_rows, stride_t, offs_d, UPCAST: tl.constexpr):
        """Tile base[rows, offs_d] (head dim contiguous); rows >= num_rows read as 0 (they belong to another segment)."""
        x = tl.load(base + rows[:, None] * stride_t + offs_d[None, :], mask=(rows < num_rows)[:, None], other=0.0)
        if UPCAST:  # interpreter: bf16 arithmetic there works on the raw bits, so compute in fp32
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _store_rows(base, rows, num_rows, stride_t, offs_d, x):
        tl.store(base + rows[:, None] * stride_t + offs_d[None, :], x.to(base.dtype.element_ty),
                 mask=(rows < num_rows)[:, None])

    @triton.jit
    def _rows_desc(base, num_rows, stride_t, col0: tl.constexpr, COLS: tl.constexpr, BLOCK: tl.constexpr):
        """TMA descriptor of base[:num_rows, col0:col0 + COLS] (one segment of one head): tiles are clipped to the
        segment, so rows past its end load as 0 and are not stored, with no mask. The caller checks TMA's 16-byte
        alignment of base and stride (`_tma_ok`)."""
        return tl.make_tensor_descriptor(base + col0, shape=[num_rows, COLS], strides=[stride_t, 1],
                                         block_shape=[BLOCK, COLS])

    @triton.jit
    def _load_tile(desc, base, start, rows, num_rows, stride_t, offs_d, TMA: tl.constexpr, UPCAST: tl.constexpr):
        """Rows [start, start + BLOCK) of one segment, through its TMA descriptor or as masked pointer loads."""
        if TMA:
            x = desc.load([start, 0])
            if UPCAST:
                x = x.to(tl.float32)
        else:
            x = _load_rows(base, rows, num_rows, stride_t, offs_d, UPCAST)
        return x

    @triton.jit
    def _segment(cu_q_ptr, cu_k_ptr, seg_order_ptr):
        """(q_start, seqlen_q, k_start, seqlen_k) of the segment this program's grid axis 2 walks (longest first)."""
        seg = tl.load(seg_order_ptr + tl.program_id(2))
        q_start = tl.load(cu_q_ptr + seg)
        k_start = tl.load(cu_k_ptr + seg)
        return q_start, tl.load(cu_q_ptr + seg + 1) - q_start, k_start, tl.load(cu_k_ptr + seg + 1) - k_start

    @triton.jit
    def _head_base(ptr, start, stride_t, head, stride_h):
        """Pointer to token `start`, head `head` of a (T, H, D) tensor. The segment start goes to int64: T * stride
        can pass 2**31 on long packs; offsets inside a segment cannot."""
        return ptr + start.to(tl.int64) * stride_t + head * stride_h

    @triton.jit
    def _causal_kv_bounds(start_m, diag, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Causal kv range of the q block at start_m: (hi, full_end): keys [0, full_end) are fully visible to every
        row of the block (no mask), [full_end, hi) cross the diagonal (masked), keys >= hi are seen by none."""
        hi = tl.minimum(seqlen_k, tl.maximum(start_m + BLOCK_M + diag, 0))
        full_end = tl.minimum(hi, tl.maximum(start_m + diag + 1, 0)) // BLOCK_N * BLOCK_N
        return hi, full_end

    @triton.jit
    def _fwd_kv_loop(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, k_desc0, k_desc1, v_desc0, v_desc1, stride_k_t,
                     stride_v_t, rows, offs_n, offs_d0, offs_d1, seqlen_k, diag, lo, hi, qk_scale,
                     MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_D1: tl.constexpr, BLOCK_N: tl.constexpr,
                     TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Online softmax over kv blocks [lo, hi). MASKED blocks apply the ragged end and the causal diagonal."""
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            k0 = _load_tile(k_desc0, k_base, start_n, cols, seqlen_k, stride_k_t, offs_d0, TMA, UPCAST)
            v0 = _load_tile(v_desc0, v_base, start_n, cols, seqlen_k, stride_v_t, offs_d0, TMA, UPCAST)
            qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
            if HEAD_D1 > 0:
                k1 = _load_tile(k_desc1, k_base, start_n, cols, seqlen_k, stride_k_t, offs_d1, TMA, UPCAST)
                qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PRECISION)
            qk = qk * qk_scale  # log2 units: exp2(qk) = exp(scale * q.k)
            if MASKED:
                keep = cols[None, :] < seqlen_k
                if CAUSAL:
                    keep = keep & (cols[None, :] <= rows[:, None] + diag)
                qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            if MASKED:  # a row that has seen no key keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_use = m_new
            p = tl.math.exp2(qk - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
            if HEAD_D1 > 0:
                v1 = _load_tile(v_desc1, v_base, start_n, cols, seqlen_k, stride_v_t, offs_d1, TMA, UPCAST)
                acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new
        return acc0, acc1, m_i, l_i

    @triton.jit
    def _varlen_attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, seg_order_ptr,
                                stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
                                stride_o_t, stride_o_h, stride_lse_h, qk_scale,
                                GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_D0: tl.constexpr,
                                HEAD_D1: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr,
                                DOT_PRECISION: tl.constexpr):
        """One program per (q block, q head, segment). TMA: q, k, v, o tiles move through per-segment tensor
        descriptors (`_rows_desc`) instead of masked pointer loads and stores."""
        pid_m = tl.program_id(0)
        head = tl.program_id(1)
        q_start, seqlen_q, k_start, seqlen_k = _segment(cu_q_ptr, cu_k_ptr, seg_order_ptr)
        # heaviest block first: under causal masking q block m visits ~m kv blocks
        m_block = tl.cdiv(seqlen_q, BLOCK_M) - 1 - pid_m
        if m_block < 0:
            return
        start_m = m_block * BLOCK_M
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d0 = tl.arange(0, HEAD_D0)
        offs_d1 = HEAD_D0 + tl.arange(0, BLOCK_D1)
        kv_head = head // GROUP
        q_base = _head_base(q_ptr, q_start, stride_q_t, head, stride_q_h)
        k_base = _head_base(k_ptr, k_start, stride_k_t, kv_head, stride_k_h)
        v_base = _head_base(v_ptr, k_start, stride_v_t, kv_head, stride_v_h)
        o_base = _head_base(o_ptr, q_start, stride_o_t, head, stride_o_h)
        # descriptors where TMA is on, else the base pointers as placeholders (never read); likewise the D1 parts
        q_desc0, q_desc1, o_desc0, o_desc1 = q_base, q_base, o_base, o_base
        k_desc0, k_desc1, v_desc0, v_desc1 = k_base, k_base, v_base, v_base
        if TMA:
            # a segment without keys reads none (empty kv loops); one row keeps its descriptors well formed
            kv_rows = tl.maximum(seqlen_k, 1)
            q_desc0 = _rows_desc(q_base, seqlen_q, stride_q_t, 0, HEAD_D0, BLOCK_M)
            o_desc0 = _rows_desc(o_base, seqlen_q, stride_o_t, 0, HEAD_D0, BLOCK_M)
            k_desc0 = _rows_desc(k_base, kv_rows, stride_k_t, 0, HEAD_D0, BLOCK_N)
            v_desc0 = _rows_desc(v_base, kv_rows, stride_v_t, 0, HEAD_D0, BLOCK_N)
            if HEAD_D1 > 0:
                q_desc1 = _rows_desc(q_base, seqlen_q, stride_q_t, HEAD_D0, BLOCK_D1, BLOCK_M)
                o_desc1 = _rows_desc(o_base, seqlen_q, stride_o_t, HEAD_D0, BLOCK_D1, BLOCK_M)
                k_desc1 = _rows_desc(k_base, kv_rows, stride_k_t, HEAD_D0, BLOCK_D1, BLOCK_N)
                v_desc1 = _rows_desc(v_base, kv_rows, stride_v_t, HEAD_D0, BLOCK_D1, BLOCK_N)
        q0 = _load_tile(q_desc0, q_base, start_m, rows, seqlen_q, stride_q_t, offs_d0, TMA, UPCAST)
        if HEAD_D1 > 0:
            q1 = _load_tile(q_desc1, q_base, start_m, rows, seqlen_q, stride_q_t, offs_d1, TMA, UPCAST)
        else:  # placeholder, never read (the D1 branches are compiled out)
            q1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=q0.dtype)
        acc0 = tl.zeros([BLOCK_M, HEAD_D0], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        diag = seqlen_k - seqlen_q  # bottom-right alignment: row i sees keys j <= i + diag
        if CAUSAL:
            hi, full_end = _causal_kv_bounds(start_m, diag, seqlen_k, BLOCK_M, BLOCK_N)
        else:
            hi = seqlen_k
            full_end = seqlen_k // BLOCK_N * BLOCK_N
        acc0, acc1, m_i, l_i = _fwd_kv_loop(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, k_desc0, k_desc1, v_desc0,
                                            v_desc1, stride_k_t, stride_v_t, rows, offs_n, offs_d0, offs_d1,
                                            seqlen_k, diag, 0, full_end, qk_scale, False, CAUSAL, HEAD_D1, BLOCK_N,
                                            TMA, UPCAST, DOT_PRECISION)
        acc0, acc1, m_i, l_i = _fwd_kv_loop(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, k_desc0, k_desc1, v_desc0,
                                            v_desc1, stride_k_t, stride_v_t, rows, offs_n, offs_d0, offs_d1,
                                            seqlen_k, diag, full_end, hi, qk_scale, True, CAUSAL, HEAD_D1, BLOCK_N,
                                            TMA, UPCAST, DOT_PRECISION)
        # rows that saw no key: l = 0 -> output 0, LSE -inf
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        if TMA:
            o_desc0.store([start_m, 0], (acc0 / l_safe[:, None]).to(o_ptr.dtype.element_ty))
            if HEAD_D1 > 0:
                o_desc1.store([start_m, 0], (acc1 / l_safe[:, None]).to(o_ptr.dtype.element_ty))
        else:
            _store_rows(o_base, rows, seqlen_q, stride_o_t, offs_d0, acc0 / l_safe[:, None])
            if HEAD_D1 > 0:
                _store_rows(o_base, rows, seqlen_q, stride_o_t, offs_d1, acc1 / l_safe[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2_K)
        tl.store(lse_ptr + head * stride_lse_h + q_start + rows, lse, mask=rows < seqlen_q)

    @triton.jit
    def _varlen_attn_bwd_preprocess_kernel(o_ptr, do_ptr, delta_ptr, num_tokens, stride_o_t, stride_o_h,
                                           stride_do_t, stride_do_h, stride_delta_h, HEAD_DIM: tl.constexpr,
                                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """delta[h, t] = sum_d o[t, h, d] * do[t, h, d] (fp32), over the packed tokens; segments do not matter."""
        pid_t = tl.program_id(0)
        head = tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_t < num_tokens)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(o_ptr + offs_t[:, None].to(tl.int64) * stride_o_t + head * stride_o_h + offs_d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + offs_t[:, None].to(tl.int64) * stride_do_t + head * stride_do_h + offs_d[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        tl.store(delta_ptr + head * stride_delta_h + offs_t, tl.sum(o * do, 1), mask=offs_t < num_tokens)

    @triton.jit
    def _dq_out(dq_base, rows, num_rows, stride_t, offs_d, x, DQ: tl.constexpr):
        """Write one kv block's share of dQ: added atomically to the fp32 buffer (DQ_ATOMIC) or, when this program
        is the only one that touches these rows (DQ_STORE), stored."""
        if DQ == _DQ_ATOMIC_K:
            # relaxed: the sum is read by a later kernel, so no ordering between programs is needed (no fences)
            tl.atomic_add(dq_base + rows[:, None] * stride_t + offs_d[None, :], x, mask=(rows < num_rows)[:, None],
                          sem="relaxed")
        else:
            _store_rows(dq_base, rows, num_rows, stride_t, offs_d, x)

    @triton.jit
    def _ds_k(ds_t, k, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """dS K (q rows x head dim) of one kv block from dS^T (kv rows x q rows). On tensor cores with fewer than 64
        q rows it is computed as (K^T dS^T)^T, so that the product's M dimension is the head dim: sm_90's wgmma
        needs M >= 64 per warpgroup, and with M = BLOCK_M triton falls back to mma.sync for it (the compile gate's
        PTX). fp32's ieee dots run on the FMA units, where the plain form needs fewer registers."""
        if BLOCK_M < 64 and DOT_PRECISION != "ieee":
            x = tl.trans(tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION))
        else:
            x = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
        return x

    @triton.jit
    def _bwd_dkdv_loop(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, dq_base,
                       stride_q_t, stride_do_t, stride_dq_t, cols, offs_m, offs_d0, offs_d1, seqlen_q, diag, lo, hi,
                       qk_scale, sm_scale, MASKED: tl.constexpr, DQ: tl.constexpr, HEAD_D1: tl.constexpr,
                       BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Accumulate dK/dV of one kv block over q blocks [lo, hi), transposed (kv rows x q rows) like tutorial 06;
        unless DQ is DQ_SEPARATE, also dQ += dS K for each q block (the fifth GEMM, written out by `_dq_out`).

        Padded q rows load q = do = delta = 0 and so add nothing; padded kv rows load k = v = 0 and so add nothing
        to dQ, and are never stored. Only the causal diagonal needs a mask (MASKED). A row with LSE -inf sees no
        key, so it only appears in MASKED blocks."""
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            q0 = _load_rows(q_base, rows, seqlen_q, stride_q_t, offs_d0, UPCAST)
            do0 = _load_rows(do_base, rows, seqlen_q, stride_do_t, offs_d0, UPCAST)
            lse = tl.load(lse_base + rows, mask=rows < seqlen_q, other=0.0) * _LOG2E_K
            delta = tl.load(delta_base + rows, mask=rows < seqlen_q, other=0.0)
            qk_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PRECISION)
            if HEAD_D1 > 0:
                q1 = _load_rows(q_base, rows, seqlen_q, stride_q_t, offs_d1, UPCAST)
                do1 = _load_rows(do_base, rows, seqlen_q, stride_do_t, offs_d1, UPCAST)
                qk_t = tl.dot(k1, tl.trans(q1), qk_t, input_precision=DOT_PRECISION)
            p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
            if MASKED:
                p_t = tl.where(cols[:, None] <= rows[None, :] + diag, p_t, 0.0)
            dv0 = tl.dot(p_t.to(do0.dtype), do0, dv0, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PRECISION)
            if HEAD_D1 > 0:
                dv1 = tl.dot(p_t.to(do1.dtype), do1, dv1, input_precision=DOT_PRECISION)
                dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=DOT_PRECISION)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)
            dk0 = tl.dot(ds_t, q0, dk0, input_precision=DOT_PRECISION)
            if HEAD_D1 > 0:
                dk1 = tl.dot(ds_t, q1, dk1, input_precision=DOT_PRECISION)
            if DQ != _DQ_SEPARATE_K:
                _dq_out(dq_base, rows, seqlen_q, stride_dq_t, offs_d0,
                        _ds_k(ds_t, k0, BLOCK_M, DOT_PRECISION) * sm_scale, DQ)
                if HEAD_D1 > 0:
                    _dq_out(dq_base, rows, seqlen_q, stride_dq_t, offs_d1,
                            _ds_k(ds_t, k1, BLOCK_M, DOT_PRECISION) * sm_scale, DQ)
        return dk0, dk1, dv0, dv1

    @triton.jit
    def _varlen_attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr,
                                     cu_q_ptr, cu_k_ptr, seg_order_ptr,
                                     stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
                                     stride_do_t, stride_do_h, stride_dk_t, stride_dk_h, stride_dv_t, stride_dv_h,
                                     stride_dq_t, stride_dq_h, stride_lse_h, qk_scale, sm_scale,
                                     GROUP: tl.constexpr, ATOMIC: tl.constexpr, DQ: tl.constexpr,
                                     CAUSAL: tl.constexpr,
                                     HEAD_D0: tl.constexpr, HEAD_D1: tl.constexpr, BLOCK_D1: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                                     DOT_PRECISION: tl.constexpr):
        """One program per (kv block, head, segment). Deterministic (ATOMIC False): axis 1 is the kv head and the
        program sums the GROUP query heads itself, in a fixed order. ATOMIC: axis 1 is the query head and the
        partial dK/dV is atomically added to fp32 buffers (GROUP x more programs, order-dependent rounding).
        DQ (`_dq_mode`): DQ_SEPARATE leaves dQ to `_varlen_attn_bwd_dq_kernel`; otherwise this kernel also computes
        dQ from the dS it already has (5 GEMMs per tile pair instead of 7) and writes it through `_dq_out`."""
        pid_n = tl.program_id(0)
        pid_h = tl.program_id(1)
        q_start, seqlen_q, k_start, seqlen_k = _segment(cu_q_ptr, cu_k_ptr, seg_order_ptr)
        start_n = pid_n * BLOCK_N  # causal: the first kv blocks are seen by the most q rows, so they go first
        if start_n >= seqlen_k:
            return
        if ATOMIC:
            kv_head = pid_h // GROUP
            first_q_head = pid_h
        else:
            kv_head = pid_h
            first_q_head = pid_h * GROUP
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d0 = tl.arange(0, HEAD_D0)
        offs_d1 = HEAD_D0 + tl.arange(0, BLOCK_D1)
        k_base = _head_base(k_ptr, k_start, stride_k_t, kv_head, stride_k_h)
        v_base = _head_base(v_ptr, k_start, stride_v_t, kv_head, stride_v_h)
        k0 = _load_rows(k_base, cols, seqlen_k, stride_k_t, offs_d0, UPCAST)
        v0 = _load_rows(v_base, cols, seqlen_k, stride_v_t, offs_d0, UPCAST)
        if HEAD_D1 > 0:
            k1 = _load_rows(k_base, cols, seqlen_k, stride_k_t, offs_d1, UPCAST)
            v1 = _load_rows(v_base, cols, seqlen_k, stride_v_t, offs_d1, UPCAST)
        else:  # placeholders, never read
            k1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=k0.dtype)
            v1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=v0.dtype)
        dk0 = tl.zeros([BLOCK_N, HEAD_D0], dtype=tl.float32)
        dv0 = tl.zeros([BLOCK_N, HEAD_D0], dtype=tl.float32)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        diag = seqlen_k - seqlen_q
        if CAUSAL:
            # q rows that see a key of this block start at start_n - diag; from `mid` on they see all of it
            lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
            mid = lo + tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag - lo, 0), BLOCK_M) * BLOCK_M
            mid_masked = tl.minimum(mid, seqlen_q)
        else:
            mid = 0
            mid_masked = 0
        for g in range(1 if ATOMIC else GROUP):
            q_head = first_q_head + g
            q_base = _head_base(q_ptr, q_start, stride_q_t, q_head, stride_q_h)
            do_base = _head_base(do_ptr, q_start, stride_do_t, q_head, stride_do_h)
            lse_base = lse_ptr + q_head * stride_lse_h + q_start
            delta_base = delta_ptr + q_head * stride_lse_h + q_start
            dq_base = _head_base(dq_ptr, q_start, stride_dq_t, q_head, stride_dq_h)
            if CAUSAL:
                dk0, dk1, dv0, dv1 = _bwd_dkdv_loop(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base,
                                                    delta_base, dq_base, stride_q_t, stride_do_t, stride_dq_t, cols,
                                                    offs_m, offs_d0, offs_d1, seqlen_q, diag, lo, mid_masked,
                                                    qk_scale, sm_scale, True, DQ, HEAD_D1, BLOCK_M, UPCAST,
                                                    DOT_PRECISION)
            dk0, dk1, dv0, dv1 = _bwd_dkdv_loop(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base,
                                                delta_base, dq_base, stride_q_t, stride_do_t, stride_dq_t, cols,
                                                offs_m, offs_d0, offs_d1, seqlen_q, diag, mid, seqlen_q, qk_scale,
                                                sm_scale, False, DQ, HEAD_D1, BLOCK_M, UPCAST, DOT_PRECISION)
        # dS was taken w.r.t. the scaled scores, so dK = scale * dS^T Q
        dk_base = _head_base(dk_ptr, k_start, stride_dk_t, kv_head, stride_dk_h)
        dv_base = _head_base(dv_ptr, k_start, stride_dv_t, kv_head, stride_dv_h)
        if ATOMIC:
            keep = (cols < seqlen_k)[:, None]
            tl.atomic_add(dk_base + cols[:, None] * stride_dk_t + offs_d0[None, :], dk0 * sm_scale, mask=keep)
            tl.atomic_add(dv_base + cols[:, None] * stride_dv_t + offs_d0[None, :], dv0, mask=keep)
            if HEAD_D1 > 0:
                tl.atomic_add(dk_base + cols[:, None] * stride_dk_t + offs_d1[None, :], dk1 * sm_scale, mask=keep)
                tl.atomic_add(dv_base + cols[:, None] * stride_dv_t + offs_d1[None, :], dv1, mask=keep)
        else:
            _store_rows(dk_base, cols, seqlen_k, stride_dk_t, offs_d0, dk0 * sm_scale)
            _store_rows(dv_base, cols, seqlen_k, stride_dv_t, offs_d0, dv0)
            if HEAD_D1 > 0:
                _store_rows(dk_base, cols, seqlen_k, stride_dk_t, offs_d1, dk1 * sm_scale)
                _store_rows(dv_base, cols, seqlen_k, stride_dv_t, offs_d1, dv1)

    @triton.jit
    def _bwd_dq_loop(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_k_t, stride_v_t, rows, offs_n,
                     offs_d0, offs_d1, seqlen_k, diag, lo, hi, qk_scale, MASKED: tl.constexpr,
                     HEAD_D1: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
        """Accumulate dQ of one q block over kv blocks [lo, hi). Padded kv rows load k = v = 0 and so add nothing to
        dQ = dS K; only the causal diagonal needs a mask (MASKED)."""
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            k0 = _load_rows(k_base, cols, seqlen_k, stride_k_t, offs_d0, UPCAST)
            v0 = _load_rows(v_base, cols, seqlen_k, stride_v_t, offs_d0, UPCAST)
            qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
            dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PRECISION)
            if HEAD_D1 > 0:
                k1 = _load_rows(k_base, cols, seqlen_k, stride_k_t, offs_d1, UPCAST)
                v1 = _load_rows(v_base, cols, seqlen_k, stride_v_t, offs_d1, UPCAST)
                qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PRECISION)
                dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PRECISION)
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
            if MASKED:
                p = tl.where(cols[None, :] <= rows[:, None] + diag, p, 0.0)
            ds = p * (dp - delta[:, None])
            dq0 = tl.dot(ds.to(k0.dtype), k0, dq0, input_precision=DOT_PRECISION)
            if HEAD_D1 > 0:
                dq1 = tl.dot(ds.to(k1.dtype), k1, dq1, input_precision=DOT_PRECISION)
        return dq0, dq1

    @triton.jit
    def _varlen_attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                                   cu_q_ptr, cu_k_ptr, seg_order_ptr,
                                   stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
                                   stride_do_t, stride_do_h, stride_dq_t, stride_dq_h, stride_lse_h,
                                   qk_scale, sm_scale,
                                   GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_D0: tl.constexpr,
                                   HEAD_D1: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_M: tl.constexpr,
                                   BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        head = tl.program_id(1)
        q_start, seqlen_q, k_start, seqlen_k = _segment(cu_q_ptr, cu_k_ptr, seg_order_ptr)
        m_block = tl.cdiv(seqlen_q, BLOCK_M) - 1 - pid_m  # heaviest block first, as in the forward
        if m_block < 0:
            return
        start_m = m_block * BLOCK_M
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d0 = tl.arange(0, HEAD_D0)
        offs_d1 = HEAD_D0 + tl.arange(0, BLOCK_D1)
        kv_head = head // GROUP
        q_base = _head_base(q_ptr, q_start, stride_q_t, head, stride_q_h)
        do_base = _head_base(do_ptr, q_start, stride_do_t, head, stride_do_h)
        k_base = _head_base(k_ptr, k_start, stride_k_t, kv_head, stride_k_h)
        v_base = _head_base(v_ptr, k_start, stride_v_t, kv_head, stride_v_h)
        q0 = _load_rows(q_base, rows, seqlen_q, stride_q_t, offs_d0, UPCAST)
        do0 = _load_rows(do_base, rows, seqlen_q, stride_do_t, offs_d0, UPCAST)
        if HEAD_D1 > 0:
            q1 = _load_rows(q_base, rows, seqlen_q, stride_q_t, offs_d1, UPCAST)
            do1 = _load_rows(do_base, rows, seqlen_q, stride_do_t, offs_d1, UPCAST)
        else:  # placeholders, never read
            q1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=q0.dtype)
            do1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=do0.dtype)
        lse = tl.load(lse_ptr + head * stride_lse_h + q_start + rows, mask=rows < seqlen_q, other=0.0) * _LOG2E_K
        delta = tl.load(delta_ptr + head * stride_lse_h + q_start + rows, mask=rows < seqlen_q, other=0.0)
        dq0 = tl.zeros([BLOCK_M, HEAD_D0], dtype=tl.float32)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
        diag = seqlen_k - seqlen_q
        if CAUSAL:
            hi, full_end = _causal_kv_bounds(start_m, diag, seqlen_k, BLOCK_M, BLOCK_N)
            dq0, dq1 = _bwd_dq_loop(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_k_t, stride_v_t,
                                    rows, offs_n, offs_d0, offs_d1, seqlen_k, diag, full_end, hi, qk_scale, True,
                                    HEAD_D1, BLOCK_N, UPCAST, DOT_PRECISION)
        else:
            full_end = seqlen_k
        dq0, dq1 = _bwd_dq_loop(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_k_t, stride_v_t, rows,
                                offs_n, offs_d0, offs_d1, seqlen_k, diag, 0, full_end, qk_scale, False, HEAD_D1,
                                BLOCK_N, UPCAST, DOT_PRECISION)
        dq_base = _head_base(dq_ptr, q_start, stride_dq_t, head, stride_dq_h)
        _store_rows(dq_base, rows, seqlen_q, stride_dq_t, offs_d0, dq0 * sm_scale)
        if HEAD_D1 > 0:
            _store_rows(dq_base, rows, seqlen_q, stride_dq_t, offs_d1, dq1 * sm_scale)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------

# Block configs (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel come from a committed table,
# attention_configs.json, keyed by architecture family (90: H100/H200, 80: A100), dtype, head dim, causal and short
# segments (max_seqlen <= 64: ViT windows, where a 128-row tile would be mostly padding). Kernels: "fwd", "dkdvq"
# (the dK/dV kernel computing dQ too: the default backward), "dkdv" and "dq" (the deterministic backward). The table
# names where its entries came from: benchmarks/autotune.py writes measured winners on a GPU; until then it holds
# hand-chosen defaults (triton tutorial 06's starting points, then the largest tiles that compile without register
# spills at the launched specialisation on both supported tritons, tests/kernels/test_varlen_attention_compile.py).
# dK/dV keeps k, v, dk, dv of BLOCK_N kv rows resident while BLOCK_M q rows stream: on sm_90 128 kv rows in 8 warps
# give each warpgroup 64 rows (m64 wgmma tiles) where the registers allow it (D <= 80; at D = 128 only with 16 q rows
# per step). Short segments use 64 x 64 tiles: one kv block and one q block per window. fp32 inputs (ieee dots, no
# tensor cores) have their own small-tile entries: the bf16 tiles spill tens of KB with fp32 operands.
_TABLE_PATH = Path(__file__).with_name("attention_configs.json")
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# fp32 at D = 128 spills on sm_80 and sm_90 even with 32 x 32 tiles (2 KB on sm_90): such calls are rejected
FP32_MAX_HEAD_DIM = 80
_FALLBACK_CONFIG = (32, 32, 4, 1)  # a key the table lacks, no relative either: small tiles, nothing resident
_INTERPRET_CONFIG = (64, 64, 4, 1)  # interpreter: few, big programs (~10 ms per inner-loop iteration)
_PREPROCESS_BLOCK_T, _PREPROCESS_WARPS = 64, 8  # o and do tiles (64 x 128 fp32) in registers without spills
# With fewer deterministic dK/dV programs than this many per SM, the non-deterministic mode spreads the query heads
# of a group over programs and sums with fp32 atomics.
_ATOMIC_BELOW_PROGRAMS_PER_SM = 2


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """head_dim -> (D0, D1): D0 the largest power of two <= head_dim, D1 the rest (0 or a power of two >= 16)."""
    d0 = 1 << (head_dim.bit_length() - 1)
    return d0, head_dim - d0


def supported_head_dim(head_dim: int) -> bool:
    """16 <= D <= 128, D = D0 + D1 with D1 zero or a power of two >= 16: 16, 32, 48, 64, 80, 96, 128."""
    if not 16 <= head_dim <= 128:
        return False
    d0, d1 = split_head_dim(head_dim)
    return d0 >= 16 and (d1 == 0 or (d1 >= 16 and d1 & (d1 - 1) == 0))


@functools.lru_cache(maxsize=1)
def tuning_table() -> dict:
    """{(arch family, dtype name, head_dim, causal, short): {kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)}}
    parsed from attention_configs.json."""
    doc = json.loads(_TABLE_PATH.read_text())
    table = {}
    for key, kernels in doc["configs"].items():
        arch, dtype, dim, causal, short = key.split("/")
        table[(int(arch[2:]), dtype, int(dim[1:]), causal == "causal", short == "short")] = {
            name: tuple(int(x) for x in cfg) for name, cfg in kernels.items() if name != "source"}
    return table


def block_config(kernel: str, head_dim: int, max_seqlen: int, arch: int, dtype: torch.dtype = torch.bfloat16,
                 causal: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for kernel "fwd" | "dkdvq" | "dkdv" | "dq" on sm_`arch` from the
    tuning table.

    A key the table lacks falls back, in order: the smallest tabled head dim >= head_dim, the other causal flag,
    long segments for short ones, bf16 for fp16 (same element size); never to another element size (fp32 operands
    in bf16 tiles spill), and finally to a small safe config."""
    table = tuning_table()
    family = 90 if arch >= 90 else 80
    short = max_seqlen <= 64
    names = [_DTYPE_NAMES[dtype]] + (["bf16"] if dtype == torch.float16 else [])
    for name in names:
        for sh in ((True, False) if short else (False,)):
            for c in (causal, not causal):
                dims = sorted(k[2] for k in table if k[:2] == (family, name) and k[3:] == (c, sh) and k[2] >= head_dim)
                if dims and kernel in table[(family, name, dims[0], c, sh)]:
                    return table[(family, name, dims[0], c, sh)][kernel]
    return _FALLBACK_CONFIG


def _launch_params(kernel: str, head_dim: int, max_seqlen: int, device: torch.device, dtype: torch.dtype,
                   causal: bool):
    if INTERPRET:
        return _INTERPRET_CONFIG
    major, minor = torch.cuda.get_device_capability(device)
    return block_config(kernel, head_dim, max_seqlen, 10 * major + minor, dtype, causal)


def _segment_order(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """Segment indices, longest first (on the device: no host sync)."""
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]) + (cu_seqlens_k[1:] - cu_seqlens_k[:-1])
    return torch.argsort(lengths, descending=True, stable=True).to(torch.int32)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full-precision products (tf32 would miss the fp32 reference by ~1e-3)
    return "ieee" if dtype == torch.float32 else "tf32"


def _tma_ok(device: torch.device, *tensors: torch.Tensor) -> bool:
    """Whether the forward moves its tiles with TMA: on sm_90+ (and in the interpreter, so that the tests run the
    path sm_90 launches), for 16-bit inputs, when every tensor's base address and token / head strides are 16-byte
    aligned, as a TMA descriptor requires (a view of a fused qkv projection may not be: it then takes the pointer
    path). sm_80 has no TMA: triton would lower the descriptors to the same pointer loads. fp32 (ieee dots on the
    FMA units) with TMA tiles compiles to ~14 KB of local memory on sm_90, so fp32 keeps the pointer loads."""
    if not INTERPRET and torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return all(x.dtype in (torch.bfloat16, torch.float16) and x.data_ptr() % 16 == 0
               and all(x.stride(i) * x.element_size() % 16 == 0 for i in (0, 1)) for x in tensors)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator():
    """Descriptors made inside a kernel live in a per-launch global scratch buffer that triton's launcher takes from
    the allocator set by `triton.set_allocator` (triton/backends/nvidia/driver.py, CudaLauncher.__call__: line 324
    in 3.7.1, 710 in 3.6.0); the default allocator raises. Set a torch-backed one unless the caller set their own
    (triton/runtime/_allocation.py line 26: a ContextVar defaulting to NullAllocator, in both versions)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def varlen_attention_fwd(q_THD, k_THD, v_THD, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                         softmax_scale, seg_order=None):
    """Launch the forward kernel on validated inputs; returns (out_THD contiguous, lse_HT fp32)."""
    num_tokens_q, num_q_heads, head_dim = q_THD.shape
    num_kv_heads = k_THD.shape[1]
    num_segments = cu_seqlens_q.numel() - 1
    out = torch.empty((num_tokens_q, num_q_heads, head_dim), dtype=q_THD.dtype, device=q_THD.device)
    lse = torch.empty((num_q_heads, num_tokens_q), dtype=torch.float32, device=q_THD.device)
    if num_tokens_q == 0 or max_seqlen_q == 0:
        return out, lse
    if seg_order is None:
        seg_order = _segment_order(cu_seqlens_q, cu_seqlens_k)
    d0, d1 = split_head_dim(head_dim)
    block_m, block_n, num_warps, num_stages = _launch_params("fwd", head_dim, max_seqlen_q, q_THD.device,
                                                             q_THD.dtype, causal)
    tma = _tma_ok(q_THD.device, q_THD, k_THD, v_THD, out)
    if tma and not INTERPRET:
        _ensure_scratch_allocator()
    grid = (triton.cdiv(max_seqlen_q, block_m), num_q_heads, num_segments)
    _varlen_attn_fwd_kernel[grid](
        q_THD, k_THD, v_THD, out, lse, cu_seqlens_q, cu_seqlens_k, seg_order,
        q_THD.stride(0), q_THD.stride(1), k_THD.stride(0), k_THD.stride(1), v_THD.stride(0), v_THD.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), softmax_scale * LOG2E,
        GROUP=num_q_heads // num_kv_heads, CAUSAL=causal, HEAD_D0=d0, HEAD_D1=d1, BLOCK_D1=max(d1, 16),
        BLOCK_M=block_m, BLOCK_N=block_n, TMA=tma, UPCAST=INTERPRET, DOT_PRECISION=_dot_precision(q_THD.dtype),
        num_warps=num_warps, num_stages=num_stages)
    return out, lse


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: pretend H100


def use_atomic_dkdv(deterministic: bool, num_q_heads: int, num_kv_heads: int, head_dim: int, num_tokens_k: int,
                    block_n: int, device: torch.device) -> bool:
    """Whether the dK/dV kernel runs one program per query head with fp32 atomics (more parallelism, run-to-run
    rounding differences) instead of one per kv head summing its group in order. Only for GQA, never when
    deterministic, and only when the deterministic grid would be too small to fill the GPU (estimated from the
    token count, which needs no host sync)."""
    if deterministic or num_q_heads == num_kv_heads or head_dim > 96:
        return False  # D = 128: the atomic variant's extra address registers make it spill (compile test)
    programs = triton.cdiv(max(num_tokens_k, 1), block_n) * num_kv_heads
    return programs < _ATOMIC_BELOW_PROGRAMS_PER_SM * _num_sms(device)


def _dq_mode(deterministic: bool, max_seqlen_k: int, block_n: int) -> int:
    """Where dQ comes from. The rule: 5 GEMMs per (q block, kv block) pair wherever that is deterministic or
    determinism was not asked for; the separate dQ kernel (7 GEMMs: it recomputes Q K^T and dO V^T) only on request.

    - every key segment fits one kv block (ViT windows): DQ_STORE. Each (segment, q head) then has exactly one
      dK/dV program, so it stores dQ itself: 5 GEMMs, no atomics, deterministic for free.
    - deterministic=True: DQ_SEPARATE (bit-reproducible; ~7/5 of the MMA work of the fused path, an estimate).
    - otherwise: DQ_ATOMIC, fp32 atomics into a zeroed buffer, then one cast (flash-attention 2's backward does
      the same). Their order, and so the last bits of dQ, vary run to run.
    Where GQA's query heads of a group meet on the same dK/dV rows, the sum stays deterministic (one program sums
    the group in order) unless that grid is too small to fill the GPU (`use_atomic_dkdv`)."""
    if max_seqlen_k <= block_n:
        return DQ_STORE
    return DQ_SEPARATE if deterministic else DQ_ATOMIC


def varlen_attention_bwd(do_THD, q_THD, k_THD, v_THD, out_THD, lse_HT, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, causal, softmax_scale, deterministic=False, seg_order=None):
    """Launch preprocess + dK/dV (+ dQ) [+ dQ] on validated inputs; returns (dq, dk, dv) contiguous, in the inputs'
    dtype. deterministic: bit-reproducible gradients (`_dq_mode`, `use_atomic_dkdv`)."""
    num_tokens_q, num_q_heads, head_dim = q_THD.shape
    num_tokens_k, num_kv_heads = k_THD.shape[0], k_THD.shape[1]
    num_segments = cu_seqlens_q.numel() - 1
    group = num_q_heads // num_kv_heads
    if do_THD.stride(-1) != 1:
        do_THD = do_THD.contiguous()
    # keys of empty query segments get no program writes: zero-init dk/dv (rows of segments with sk > 0 and
    # sq == 0 have a zero gradient)
    dk = torch.zeros((num_tokens_k, num_kv_heads, head_dim), dtype=k_THD.dtype, device=k_THD.device)
    dv = torch.zeros((num_tokens_k, num_kv_heads, head_dim), dtype=v_THD.dtype, device=v_THD.device)
    if num_tokens_q == 0 or num_tokens_k == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return torch.zeros_like(q_THD, memory_format=torch.contiguous_format), dk, dv
    if seg_order is None:
        seg_order = _segment_order(cu_seqlens_q, cu_seqlens_k)
    d0, d1 = split_head_dim(head_dim)
    common = {"CAUSAL": causal, "HEAD_D0": d0, "HEAD_D1": d1, "BLOCK_D1": max(d1, 16), "UPCAST": INTERPRET,
              "DOT_PRECISION": _dot_precision(q_THD.dtype)}
    qk_scale = softmax_scale * LOG2E

    delta = torch.empty_like(lse_HT)
    _varlen_attn_bwd_preprocess_kernel[(triton.cdiv(num_tokens_q, _PREPROCESS_BLOCK_T), num_q_heads)](
        out_THD, do_THD, delta, num_tokens_q, out_THD.stride(0), out_THD.stride(1), do_THD.stride(0),
        do_THD.stride(1), delta.stride(0), HEAD_DIM=head_dim, BLOCK_T=_PREPROCESS_BLOCK_T,
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=_PREPROCESS_WARPS)

    # the fused kernel holds a dQ tile besides dK/dV: its own table entry ("dkdvq"), sized for that
    fused_block_n = _launch_params("dkdvq", head_dim, max_seqlen_k, q_THD.device, q_THD.dtype, causal)[1]
    dq_mode = _dq_mode(deterministic, max_seqlen_k, fused_block_n)
    block_m, block_n, num_warps, num_stages = _launch_params("dkdv" if dq_mode == DQ_SEPARATE else "dkdvq",
                                                             head_dim, max_seqlen_k, q_THD.device, q_THD.dtype,
                                                             causal)
    atomic = use_atomic_dkdv(deterministic, num_q_heads, num_kv_heads, head_dim, num_tokens_k, block_n,
                             q_THD.device)
    if atomic:
        dk_acc = torch.zeros(dk.shape, dtype=torch.float32, device=dk.device)
        dv_acc = torch.zeros(dv.shape, dtype=torch.float32, device=dv.device)
    else:
        dk_acc, dv_acc = dk, dv
    # dK/dV programs write dQ rows only where they visit (DQ_STORE: rows that see no key are never visited), and
    # DQ_ATOMIC adds to what is there: both start from zeros; the separate dQ kernel writes every row
    dq_shape = (num_tokens_q, num_q_heads, head_dim)
    if dq_mode == DQ_SEPARATE:
        dq = torch.empty(dq_shape, dtype=q_THD.dtype, device=q_THD.device)
    else:
        dq = torch.zeros(dq_shape, dtype=torch.float32 if dq_mode == DQ_ATOMIC else q_THD.dtype, device=q_THD.device)
    grid = (triton.cdiv(max_seqlen_k, block_n), num_q_heads if atomic else num_kv_heads, num_segments)
    _varlen_attn_bwd_dkdv_kernel[grid](
        q_THD, k_THD, v_THD, do_THD, lse_HT, delta, dk_acc, dv_acc, dq, cu_seqlens_q, cu_seqlens_k, seg_order,
        q_THD.stride(0), q_THD.stride(1), k_THD.stride(0), k_THD.stride(1), v_THD.stride(0), v_THD.stride(1),
        do_THD.stride(0), do_THD.stride(1), dk_acc.stride(0), dk_acc.stride(1), dv_acc.stride(0), dv_acc.stride(1),
        dq.stride(0), dq.stride(1), lse_HT.stride(0), qk_scale, softmax_scale, GROUP=group, ATOMIC=atomic,
        DQ=dq_mode, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common)
    if atomic:
        dk.copy_(dk_acc)
        dv.copy_(dv_acc)
    if dq_mode != DQ_SEPARATE:
        return dq.to(q_THD.dtype), dk, dv

    block_m, block_n, num_warps, num_stages = _launch_params("dq", head_dim, max_seqlen_q, q_THD.device,
                                                             q_THD.dtype, causal)
    grid = (triton.cdiv(max_seqlen_q, block_m), num_q_heads, num_segments)
    _varlen_attn_bwd_dq_kernel[grid](
        q_THD, k_THD, v_THD, do_THD, lse_HT, delta, dq, cu_seqlens_q, cu_seqlens_k, seg_order,
        q_THD.stride(0), q_THD.stride(1), k_THD.stride(0), k_THD.stride(1), v_THD.stride(0), v_THD.stride(1),
        do_THD.stride(0), do_THD.stride(1), dq.stride(0), dq.stride(1), lse_HT.stride(0), qk_scale, softmax_scale,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# custom ops (torch.compile sees opaque kernels with shape-only fake implementations) + autograd.Function
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("ovr::varlen_attn_fwd", mutates_args=())
def _varlen_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                        softmax_scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                softmax_scale)


@_varlen_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, deterministic):
    return (q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


@torch.library.custom_op("ovr::varlen_attn_bwd", mutates_args=())
def _varlen_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                        max_seqlen_k: int, causal: bool, softmax_scale: float,
                        deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return varlen_attention_bwd(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                causal, softmax_scale, deterministic)


@_varlen_attn_bwd_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
      deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.args = (max_seqlen_q, max_seqlen_k, causal, softmax_scale, deterministic)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    # LSE is an output for inspection (flash-attn's softmax_lse), not differentiable: dlse is ignored
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    max_seqlen_q, max_seqlen_k, causal, softmax_scale, deterministic = ctx.args
    dq, dk, dv = torch.ops.ovr.varlen_attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                               max_seqlen_k, causal, softmax_scale, deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None


_varlen_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class VarlenAttnFn(torch.autograd.Function):
    """Eager autograd wrapper over the same two custom ops (the custom op alone carries its autograd formula for
    torch.compile; both share `_setup_context` / `_backward`). Gradients for q, k, v only."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                deterministic):
        inputs = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                  deterministic)
        output = _varlen_attn_fwd_op(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse)


# ----------------------------------------------------------------------------------------------------------------
# CPU path: torch SDPA over length-sorted groups of padded segments
# ----------------------------------------------------------------------------------------------------------------

# Cap on one group's padded score grid (segments x longest q x longest k): its bool mask is that many bytes.
SDPA_GROUP_ELEMENTS = 1 << 24


def _sdpa_groups(lens_q: list, lens_k: list, budget: int) -> list:
    """Segments with queries, longest keys first, cut into groups whose padded grid n * max_q * max_k stays within
    `budget` (a longer segment alone may exceed it). Sorted lengths keep the padding inside a group small."""
    order = sorted((b for b in range(len(lens_q)) if lens_q[b] > 0), key=lambda b: (-lens_k[b], -lens_q[b]))
    groups, cur, max_q = [], [], 0
    for b in order:  # lens_k of the group's first segment is its max
        new_q = max(max_q, lens_q[b])
        if cur and (len(cur) + 1) * new_q * max(lens_k[cur[0]], 1) > budget:
            groups.append(cur)
            cur, new_q = [], lens_q[b]
        cur.append(b)
        max_q = new_q
    return groups + [cur] if cur else groups


def varlen_attention_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale):
    """varlen attention by torch's scaled_dot_product_attention (the CPU path; any device works): the segments
    that have queries are sorted by length and cut into groups (`SDPA_GROUP_ELEMENTS`); each group is gathered into
    a padded (n, H, L, D) batch with a boolean (n, 1, Lq, Lk) mask (key padding, and the bottom-right causal
    diagonal), run by one SDPA call (torch's fused CPU flash kernel, GQA native), and the outputs are gathered
    back into packed order. Autograd runs through SDPA's own backward. A query row that sees no key (its mask row
    all False) gets output 0 and zero gradients from SDPA itself (torch >= 2.5: a safe softmax, no NaN).

    Same arguments as `varlen_attention` (validated there), the scale resolved; returns out (Tq, Hq, D). Reads the
    lengths on the host: one sync, free on the CPU."""
    num_q, num_k = q.shape[0], k.shape[0]
    if num_q == 0 or num_k == 0:  # nothing to attend to: the reference gives the all-zero output
        return varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    lens_q, lens_k = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    gqa = q.shape[1] != k.shape[1]
    device = q.device
    outs, rows = [], []
    for group in _sdpa_groups(lens_q, lens_k, SDPA_GROUP_ELEMENTS):
        gq = torch.tensor([lens_q[b] for b in group], device=device)
        gk = torch.tensor([lens_k[b] for b in group], device=device)
        max_q, max_k = int(gq.max()), max(int(gk.max()), 1)
        pos_q, pos_k = torch.arange(max_q, device=device), torch.arange(max_k, device=device)
        valid_q = pos_q < gq[:, None]  # (n, Lq)
        idx_q = (torch.tensor([cu_q[b] for b in group], device=device)[:, None] + pos_q).clamp_(max=num_q - 1)
        idx_k = (torch.tensor([cu_k[b] for b in group], device=device)[:, None] + pos_k).clamp_(max=num_k - 1)
        allowed = (pos_k < gk[:, None])[:, None, :].expand(-1, max_q, -1)  # (n, Lq, Lk)
        if causal:
            allowed = allowed & (pos_k[None, None, :] - pos_q[None, :, None] <= (gk - gq)[:, None, None])
        out = torch.nn.functional.scaled_dot_product_attention(
            q[idx_q].transpose(1, 2), k[idx_k].transpose(1, 2), v[idx_k].transpose(1, 2), attn_mask=allowed[:, None],
            scale=softmax_scale, enable_gqa=gqa).transpose(1, 2)  # (n, Lq, Hq, D)
        outs.append(out[valid_q])
        rows.append(idx_q[valid_q])
    # every query row belongs to exactly one group (segments without queries have no rows): undo the length sort
    return torch.cat(outs)[torch.argsort(torch.cat(rows))]


# ----------------------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------------------


def _check_max_seqlen(name: str, value, cu: torch.Tensor, check_values: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative Python int, got {value!r}")
    if check_values:
        actual = max_seqlen_of(cu)
        if value < actual:
            raise ValueError(f"{name}={value} is smaller than the longest segment ({actual})")
    return value


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, check_cu_seqlens_values,
              for_kernel):
    dtypes = _KERNEL_DTYPES if for_kernel else _KERNEL_DTYPES + (torch.float64,)
    check_tensor("q", q, ndim=3, dtypes=dtypes)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=q.device, shape=tuple(k.shape))
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    if k.shape[2] != head_dim:
        raise ValueError(f"k has head_dim {k.shape[2]} but q has {head_dim}")
    if k.shape[1] == 0 or num_q_heads % k.shape[1] != 0:
        raise ValueError(f"the number of q heads ({num_q_heads}) must be a multiple of the number of k/v heads "
                         f"({k.shape[1]})")
    if for_kernel and not supported_head_dim(head_dim):
        raise ValueError(f"head_dim={head_dim} is not supported by the Triton kernel (16, 32, 48, 64, 80, 96, 128)")
    if for_kernel and q.is_cuda and q.dtype == torch.float32 and head_dim > FP32_MAX_HEAD_DIM:
        raise ValueError(f"fp32 q/k/v with head_dim={head_dim} on CUDA: the fp32 (full-precision, no tensor core) "
                         f"kernels spill registers above head_dim {FP32_MAX_HEAD_DIM} in every tile tried; cast q, k, "
                         "v to bf16 or fp16 (softmax and accumulation stay fp32)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape[0] > 0 and x.stride(2) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (strides {tuple(x.stride())}); "
                             "call .contiguous() first")
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=q.device)
        if cu.numel() < 2:
            raise ValueError(f"{name} must have at least 2 entries (B+1 with B >= 1), got {cu.numel()}")
        if not cu.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if check_cu_seqlens_values:
            check_cu_seqlens(name, cu, total, device=q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.numel()}: both must be (B+1,)")
    if for_kernel and cu_seqlens_q.numel() - 1 > 65535:
        raise ValueError(f"at most 65535 segments per call, got {cu_seqlens_q.numel() - 1}")
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q, check_cu_seqlens_values)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k, check_cu_seqlens_values)
    bad_scale = isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or \
        not math.isfinite(softmax_scale) or softmax_scale <= 0
    if softmax_scale is not None and bad_scale:
        raise ValueError(f"softmax_scale must be a positive finite float or None, got {softmax_scale!r}")


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                     softmax_scale=None, return_lse=False, deterministic=False, check_cu_seqlens_values=True):
    """Attention over sequences packed along the token dim (flash-attn's `flash_attn_varlen_func` contract).

    Arguments:
        q: (total_q, nheads, headdim), fp16 / bf16 / fp32 (fp64 on the CPU reference path), last dim contiguous
            (other strides are free: views of a fused qkv projection need no copy).
        k: (total_k, nheads_k, headdim), same dtype / device as q. nheads must be a multiple of nheads_k (GQA / MQA):
            query head h reads kv head h // (nheads // nheads_k).
        v: (total_k, nheads_k, headdim), like k.
        cu_seqlens_q: (batch_size + 1,), int32, on q's device. Segment b's queries are
            q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]; starts at 0, non-decreasing (repeated values are empty segments,
            as in Qwen2.5-VL's window list), ends at total_q.
        cu_seqlens_k: (batch_size + 1,), int32, the same for k and v (segment b attends only to its own keys).
        max_seqlen_q: Python int >= the longest query segment. It sizes the launch grid, so no host sync is needed
            to launch; a larger value only adds programs that exit at once.
        max_seqlen_k: Python int >= the longest key segment.
        causal: causal mask aligned to the bottom-right corner of each segment: with sq queries and sk keys, query i
            sees keys j <= i + sk - sq (flash-attn >= 2.1). A query that sees no key (sk < sq) gets output 0.
        softmax_scale: scaling of q k^T before the softmax; default 1 / sqrt(headdim).
        return_lse: also return the row log-sum-exp.
        deterministic: make the backward bit-reproducible: dQ from a separate kernel (7 GEMMs per tile pair
            instead of 5) and dK/dV summed in a fixed order. The default backward computes dQ inside the dK/dV
            kernel and sums its per-kv-block shares with fp32 atomics (last-bit differences run to run), except
            where every key segment fits one kv block (then it is deterministic too); with GQA it also sums a
            group's query heads into dK/dV with atomics when the dK/dV grid is too small to fill the GPU
            (`_dq_mode`, `use_atomic_dkdv`).
        check_cu_seqlens_values: check the cu_seqlens values (monotone, ending at total, max_seqlen large enough).
            On CUDA this copies them to the host (one sync per call); metadata built by a trusted packer can skip it.

    Returns:
        out: (total_q, nheads, headdim) in q's dtype (contiguous).
        softmax_lse [if return_lse]: (nheads, total_q) fp32, natural log; -inf for rows that see no key. Not
            differentiable.
    Gradients flow to q, k and v (fp32 accumulation, returned in their dtype); never to cu_seqlens.
    CUDA tensors run the Triton kernels; CPU tensors `varlen_attention_sdpa` (torch's fused CPU attention over
    padded groups of segments, deterministic), or `ovr_kernels.reference.varlen_attention_ref` when return_lse is
    asked (SDPA does not return the LSE). `OVR_BACKEND=triton|reference` forces one (`ovr_kernels._triton`).
    Raises ValueError on bad inputs.
    """
    kernel = use_triton(q) if isinstance(q, torch.Tensor) else False
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
              check_cu_seqlens_values and not torch.compiler.is_compiling(), kernel)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not kernel:
        if return_lse or backend() == "reference":
            return varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, return_lse)
        return varlen_attention_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)
    out, lse = VarlenAttnFn.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal),
                                  scale, bool(deterministic))
    return (out, lse) if return_lse else out
