"""Fused linear log-prob + entropy: hidden @ weight^T -> log p(target) and entropy per token, never building the
(T, V) logits.

Legend: T tokens, H hidden size, V vocabulary, S vocabulary splits of the forward grid, Tc / Vc token / vocabulary
chunk of the backward scratch. Suffixes give shapes (hidden_TH = (T, H), part_4ST = (4, S, T)). `z` are logits
divided by the temperature; kernels work in base 2 (`z2 = z * log2(e)`) so every exponential is one exp2.

Forward (Triton): program (token block, vocabulary split) streams its split's vocabulary tiles; each tile is a
BLOCK_T x BLOCK_V x H matrix product on tensor cores, followed by an online update of the running max m, sum of
exponentials s = sum 2^(z2 - m), the first moment relative to the max a = sum 2^(z2 - m) (z2 - m) (entropy =
log2 s - a / s, in bits; accumulating relative to m avoids the cancellation of lse - E[z] when logits are huge)
and the target logit. One small kernel merges the S partial statistics (O(S*T) floats). S comes from a cost model
of the working set in L2 (`_num_splits`). No host sync: target values are only checked by `check_targets` (once
per batch, by the caller) or under OVR_CHECK_TARGETS=1; an out-of-range target gives a NaN log-prob.
Backward: d logp_target / dz_v = [v == target] - p_v and d entropy / dz_v = -p_v (log p_v + entropy), so
dz = (g_logp ([v == target] - p) - g_ent p (log p + entropy)) / temperature. A Triton kernel recomputes each logit
tile from the saved statistics (max, log-sum, entropy) and writes dz for one vocabulary chunk (bounded scratch, in
the input dtype); two cuBLAS GEMMs then give dweight[chunk] = dz^T @ hidden (written once, K = T: full GEMM
efficiency) and dhidden += dz @ weight[chunk]. A gradient summed over chunks takes each chunk's GEMM with an fp32
output (cuBLAS accumulates in fp32 anyway), so it is rounded to the input dtype once, at the end. Chunking the
vocabulary rather than the tokens keeps dweight's reduction inside one GEMM instead of re-reading and re-writing a
(V, H) fp32 accumulator per token chunk (the memory-bound step of token-chunked implementations such as Liger's). A fully fused dz-GEMM-GEMM kernel
would need atomics on both gradients; cuBLAS at K = T already runs at peak, so only the recompute GEMM is ours.
CPU (and OVR_BACKEND=reference): the same algorithm in plain PyTorch over token chunks, as exact as the reference.
"""

import os

import torch

from ovr_kernels._checks import check_scalar, check_tensor
from ovr_kernels._triton import HAS_TRITON, INTERPRET, compute_dtype, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

LOG2E = 1.4426950408889634
# Scratch budgets. GPU: the backward's dz chunk (Tc x Vc, input dtype). CPU: fp32 logits of one token chunk (the
# chunk's few temporaries stay well under 10% of the eager path's (T, V) tensors).
SCRATCH_BYTES = 256 * 2**20
CPU_CHUNK_ELEMS = 2**22
# Keep the backward's vocabulary chunk at least this wide so its GEMMs stay efficient; tokens are chunked beyond.
MIN_VOCAB_CHUNK = 4096
# Forward grid: at most this many vocabulary splits; the merge kernel holds (splits x tokens) <= MERGE_TILE values.
MAX_SPLITS = 64
MERGE_TILE = 1024

if HAS_TRITON:

    # ------------------------------------------------------------------------------------------------------------
    # Kernels
    # ------------------------------------------------------------------------------------------------------------

    @triton.jit
    def _logits_tile(hidden_ptr, weight_ptr, rows, cols, T, V, H, stride_h_t, stride_w_v,
                     BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr):
        """fp32 (BLOCK_T, BLOCK_V) tile of hidden[rows] @ weight[cols]^T; out-of-range rows/cols read as 0."""
        ks = tl.arange(0, BLOCK_K)
        h_ptrs = hidden_ptr + rows[:, None].to(tl.int64) * stride_h_t + ks[None, :]
        w_ptrs = weight_ptr + cols[:, None].to(tl.int64) * stride_w_v + ks[None, :]
        if ALIGNED:  # rows start 16-byte aligned (checked by the launcher): vectorised, cp.async/TMA-able loads
            h_ptrs = tl.max_contiguous(tl.multiple_of(h_ptrs, [16, 16]), [1, BLOCK_K])
            w_ptrs = tl.max_contiguous(tl.multiple_of(w_ptrs, [16, 16]), [1, BLOCK_K])
        row_ok = rows[:, None] < T
        col_ok = cols[:, None] < V
        acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if EVEN_K:
                h = tl.load(h_ptrs, mask=row_ok, other=0.0)
                w = tl.load(w_ptrs, mask=col_ok, other=0.0)
            else:
                k_ok = (k0 + ks[None, :]) < H
                h = tl.load(h_ptrs, mask=row_ok & k_ok, other=0.0)
                w = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0)
            if UPCAST:  # interpreter: its bf16/fp16 arithmetic works on raw bits, so compute in fp32
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        return acc

    @triton.jit
    def _online_softmax_step(z2, col_ok, cols, target, m, s, a, z_target, WITH_ENTROPY: tl.constexpr):
        """One (rows, BLOCK_V) tile of base-2 logits z2 into the running (max m, sum s = sum 2^(z2 - m), first
        moment a = sum 2^(z2 - m) (z2 - m), target logit); columns outside col_ok are skipped. Start from
        m = -1e30 (finite: (m - m_new) never forms 0 * inf), s = a = z_target = 0."""
        z2 = tl.where(col_ok, z2, float("-inf"))
        m_new = tl.maximum(m, tl.max(z2, axis=1))
        alpha = tl.exp2(m - m_new)
        e = tl.exp2(z2 - m_new[:, None])  # 0 on masked columns
        if WITH_ENTROPY:
            d = tl.where(col_ok, z2 - m_new[:, None], 0.0)
            a = alpha * (a + s * (m - m_new)) + tl.sum(e * d, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        z_target += tl.sum(tl.where(cols[None, :] == target[:, None], z2, 0.0), axis=1)
        return m_new, s, a, z_target

    @triton.jit
    def _softmax_results(m, s, a, z_target, target, V):
        """(log2 s, log p(target), entropy) in natural units from the merged statistics; an out-of-range target
        matches no column, so it gets NaN, not the finite log-prob of a zero logit."""
        log2s = tl.log2(s)
        in_vocab = (target >= 0) & (target < V)
        logprob = tl.where(in_vocab, (z_target - m - log2s) * 0.6931471805599453, float("nan"))
        return log2s, logprob, (log2s - a / s) * 0.6931471805599453

    @triton.jit
    def _linear_logprob_fwd_kernel(
        hidden_ptr, weight_ptr, targets_ptr, part_ptr,  # part: (4, S, T) fp32 rows m, s, a, z2_target
        T, V, H, stride_h_t, stride_w_v, scale2, vocab_per_split, num_splits,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
        WITH_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    ):
        # Split fastest: the programs in flight cover a few token blocks x all splits, so both the hidden slabs
        # (re-read once per vocabulary tile) and the weight tiles are shared through L2.
        pid = tl.program_id(0)
        split = pid % num_splits
        rows = (pid // num_splits) * BLOCK_T + tl.arange(0, BLOCK_T)
        target = tl.load(targets_ptr + rows, mask=rows < T, other=-1)
        # Finite start for m: (m - m_new) stays finite, so a rescale never forms 0 * inf.
        m = tl.full((BLOCK_T,), -1.0e30, dtype=tl.float32)
        s = tl.zeros((BLOCK_T,), dtype=tl.float32)
        a = tl.zeros((BLOCK_T,), dtype=tl.float32)
        z_target = tl.zeros((BLOCK_T,), dtype=tl.float32)
        v_start = split * vocab_per_split
        v_end = tl.minimum(v_start + vocab_per_split, V)
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            acc = _logits_tile(hidden_ptr, weight_ptr, rows, cols, T, V, H, stride_h_t, stride_w_v,
                               BLOCK_T, BLOCK_V, BLOCK_K, EVEN_K, UPCAST, INPUT_PRECISION, ALIGNED)
            m, s, a, z_target = _online_softmax_step(acc * scale2, (cols < v_end)[None, :], cols, target, m, s, a,
                                                    z_target, WITH_ENTROPY)
        out = part_ptr + split * T + rows
        row_ok = rows < T
        stride_stat = num_splits * T
        tl.store(out, m, mask=row_ok)
        tl.store(out + stride_stat, s, mask=row_ok)
        tl.store(out + 2 * stride_stat, a, mask=row_ok)
        tl.store(out + 3 * stride_stat, z_target, mask=row_ok)

    @triton.jit
    def _merge_splits_kernel(
        part_ptr, targets_ptr, logprob_ptr, entropy_ptr, max2_ptr, log2sum_ptr,  # part: (4, S, T) fp32
        T, V, num_splits, ignore_index,
        BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    ):
        """Per-split (m, s, a, z2_target) (base 2) -> logprob and entropy (natural units) and the backward's
        stats (m, log2 s), BLOCK tokens per program, all splits of a token in one (BLOCK_S, BLOCK) tile."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row_ok = rows < T
        splits = tl.arange(0, BLOCK_S)
        ok = (splits[:, None] < num_splits) & row_ok[None, :]
        offs = splits[:, None].to(tl.int64) * T + rows[None, :]
        stride_stat = tl.cast(num_splits, tl.int64) * T  # tl.cast: a launch with one split passes the constant 1
        # Padding splits read m = -1e30 (the forward's finite start) and s = 0: their weight 2^(m - m_T) is 0.
        m = tl.load(part_ptr + offs, mask=ok, other=-1.0e30)
        s = tl.load(part_ptr + stride_stat + offs, mask=ok, other=0.0)
        z_target = tl.sum(tl.load(part_ptr + 3 * stride_stat + offs, mask=ok, other=0.0), axis=0)
        m_T = tl.max(m, axis=0)
        scale = tl.exp2(m - m_T[None, :])
        s_T = tl.where(row_ok, tl.sum(s * scale, axis=0), 1.0)  # padding rows: no log2(0)
        a_T = s_T * 0.0
        if WITH_ENTROPY:
            a = tl.load(part_ptr + 2 * stride_stat + offs, mask=ok, other=0.0)
            a_T = tl.sum(scale * (a + s * (m - m_T[None, :])), axis=0)
        target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
        valid = target != ignore_index
        log2s, logprob, entropy = _softmax_results(m_T, s_T, a_T, z_target, target, V)
        tl.store(logprob_ptr + rows, tl.where(valid, logprob, 0.0), mask=row_ok)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + rows, tl.where(valid, entropy, 0.0), mask=row_ok)
        tl.store(max2_ptr + rows, m_T, mask=row_ok)
        tl.store(log2sum_ptr + rows, log2s, mask=row_ok)

    @triton.jit
    def _linear_logprob_bwd_kernel(
        hidden_ptr, weight_ptr, targets_ptr, max2_ptr, log2sum_ptr, entropy_ptr, grad_logprob_ptr,
        grad_entropy_ptr, dz_ptr,
        T, V, H, stride_h_t, stride_w_v, stride_dz_t, v_offset, scale2, inv_temperature, ignore_index,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
        GROUP_T: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    ):
        """dz[t, v - v_offset] for the vocabulary chunk [v_offset, V): hidden/targets/stats/grads are T rows;
        weight_ptr points at the chunk's first row and V is the chunk width."""
        # Grouped ordering (Triton matmul tutorial): GROUP_T token blocks sweep the chunk's columns together.
        pid = tl.program_id(0)
        num_t = tl.cdiv(T, BLOCK_T)
        num_v = tl.cdiv(V, BLOCK_V)
        per_group = GROUP_T * num_v
        first_t = (pid // per_group) * GROUP_T
        group_size = tl.minimum(num_t - first_t, GROUP_T)
        pid_t = first_t + (pid % per_group) % group_size
        pid_v = (pid % per_group) // group_size
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < T
        acc = _logits_tile(hidden_ptr, weight_ptr, rows, cols, T, V, H, stride_h_t, stride_w_v,
                           BLOCK_T, BLOCK_V, BLOCK_K, EVEN_K, UPCAST, INPUT_PRECISION, ALIGNED)
        target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
        valid = row_ok & (target != ignore_index)
        max2 = tl.load(max2_ptr + rows, mask=row_ok, other=0.0)
        log2sum = tl.load(log2sum_ptr + rows, mask=row_ok, other=0.0)
        g_logp = tl.where(valid, tl.load(grad_logprob_ptr + rows, mask=row_ok, other=0.0), 0.0)
        # (z2 - m) first, then - log2(s), as log_softmax does: z2 - m is exact near the max, so p stays accurate
        # when |logits| ~ 1e4 (a single fp32 lse would lose ~1e-3 there).
        log2p = (acc * scale2 - max2[:, None]) - log2sum[:, None]
        p = tl.exp2(log2p)
        onehot = (cols[None, :] + v_offset) == target[:, None]
        dz = g_logp[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
        if HAS_GRAD_ENTROPY:
            ent = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
            g_ent = tl.where(valid, tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0), 0.0)
            dz -= (g_ent[:, None] * p) * (log2p * 0.6931471805599453 + ent[:, None])
        dz = dz * inv_temperature
        dz_ptrs = dz_ptr + rows[:, None].to(tl.int64) * stride_dz_t + cols[None, :]
        if ALIGNED:  # the launcher's dz scratch rows are BLOCK_V-multiples: vectorised stores
            dz_ptrs = tl.max_contiguous(tl.multiple_of(dz_ptrs, [16, 16]), [1, BLOCK_V])
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < V))


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(hidden_TH, weight_VH, targets_T, temperature):
    """Static checks (shapes, dtypes, devices, temperature); compile-friendly (no data-dependent host sync)."""
    check_tensor("hidden", hidden_TH, ndim=2, dtypes=(torch.bfloat16, torch.float16, torch.float32, torch.float64))
    check_tensor("weight", weight_VH, ndim=2, dtypes=(hidden_TH.dtype,), device=hidden_TH.device,
                 shape=(None, hidden_TH.shape[1]))
    check_tensor("targets", targets_T, ndim=1, dtypes=(torch.int64, torch.int32), device=hidden_TH.device,
                 shape=(hidden_TH.shape[0],))
    if weight_VH.shape[0] == 0:
        raise ValueError(f"weight must have at least one vocabulary row, got shape {tuple(weight_VH.shape)}")
    check_scalar("temperature", temperature, low=0.0, low_open=True)


def check_targets(targets, vocab_size, ignore_index=-100):
    """ValueError unless every target is ignore_index or in [0, vocab_size). Reads the values: on a CUDA tensor
    that is one host sync, so callers run it once per batch (best on the CPU copy, before it moves to the GPU)."""
    bad_T = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if targets.numel() and bool(bad_T.any()):
        i = int(torch.nonzero(bad_T)[0, 0])
        raise ValueError(f"targets[{i}]={int(targets[i])} is outside [0, {vocab_size}) and is not "
                         f"ignore_index={ignore_index}")


def _sync_checks(x):
    """Whether the op validates target values itself: always on CPU tensors (no device to wait for), on CUDA only
    under OVR_CHECK_TARGETS=1 (a debug switch: the check costs a host sync per call). Unchecked, an out-of-range
    target gives a NaN log-prob on the Triton path (never a silent number)."""
    return x.device.type == "cpu" or os.environ.get("OVR_CHECK_TARGETS", "0") == "1"


def _fwd_config(hidden_TH):
    """(BLOCK_T, BLOCK_V, BLOCK_K, num_warps, num_stages) of the forward kernel; BLOCK_T and BLOCK_K equal the
    backward's so that it recomputes the forward's logits bit for bit (same rows, same K order; the tile width
    does not change the chain of k-steps that forms each logit)."""
    if INTERPRET:  # few programs, big tiles: the interpreter pays per program and per loop iteration
        return 64, 128, 64, 4, 1
    if hidden_TH.dtype == torch.float32:
        return 64, 128, 32, 8, 3
    if torch.cuda.get_device_properties(hidden_TH.device).major >= 9:
        # Twice the logits per hidden-slab read. sm_90: 255 registers, no spills, 144 KiB shared (3 stages);
        # on sm_80 this tile spills (ptxas), so it keeps 128 x 128.
        return 128, 256, 64, 8, 3
    return 128, 128, 64, 8, 4


def _bwd_config(hidden_TH):
    """(BLOCK_T, BLOCK_V, BLOCK_K, GROUP_T, num_warps, num_stages) of the backward dz kernel."""
    if INTERPRET:
        return 64, 128, 64, 4, 4, 1
    if hidden_TH.dtype == torch.float32:
        return 64, 128, 32, 8, 8, 3
    return 128, 128, 64, 8, 8, 4


def _upcast(hidden_TH):
    """Whether kernels cast loaded tiles to fp32 (under the interpreter, see `compute_dtype`)."""
    return compute_dtype(hidden_TH.dtype) == tl.float32 and hidden_TH.dtype != torch.float32


def _aligned(*tensors):
    """Every row of these 2-D tensors starts on a 16-byte boundary (base pointer and row stride)."""
    return all(x.data_ptr() % 16 == 0 and (x.stride(0) * x.element_size()) % 16 == 0 for x in tensors)


def _num_splits(num_t_blocks, num_v_tiles, slab_bytes, device):
    """Vocabulary splits S of the forward grid: the fewest that give several waves and keep the hidden slabs in
    flight in L2, each split still streaming at least 4 vocabulary tiles.

    Programs run split fastest, one per SM (their shared memory allows no second), so those in flight cover
    min(token blocks, SMs / S) hidden slabs (BLOCK_T x H, `slab_bytes`), each re-read once per vocabulary tile for
    the program's whole life; weight tiles only stream through (the token blocks of a split read each one at about
    the same time). With S = 2 at T = 64k the slabs alone (60 MB) exceed an H100's 50 MB L2 and come from HBM
    again per tile, so S grows until they fit in half of L2, leaving the rest to the weight stream. Among the
    counts that fit, the one whose last wave of programs is fullest. A cost model, not a measurement."""
    if INTERPRET:
        return min(num_v_tiles, 2)  # exercises the split merge at test sizes
    props = torch.cuda.get_device_properties(device)
    num_sms = props.multi_processor_count
    cap = max(1, min(num_v_tiles // 4, MAX_SPLITS))
    target = min(cap, max(1, triton.cdiv(4 * num_sms, num_t_blocks)))  # ~4 waves when T is small
    fewest = target
    while fewest < cap and min(num_t_blocks, triton.cdiv(num_sms, fewest)) * slab_bytes > props.L2_cache_size // 2:
        fewest += 1

    def wave_efficiency(splits):  # busy share of the SM slots over the waves (a partial last wave idles SMs)
        programs = num_t_blocks * triton.cdiv(num_v_tiles, triton.cdiv(num_v_tiles, splits))
        return programs / (triton.cdiv(programs, num_sms) * num_sms)

    # Within a factor 2 of the target, the fullest last wave (T = 4096, H100: S = 17 gives 4.12 waves, 82% busy;
    # S = 33 gives 8 full waves); ties go to fewer splits.
    candidates = range(max(fewest, (target + 1) // 2), max(fewest, min(cap, 2 * target)) + 1)
    return max(candidates, key=lambda n: (round(wave_efficiency(n), 3), -n))


def _merge_splits(part_4ST, targets_T, vocab_size, ignore_index, with_entropy):
    """One launch: (logprob_T, entropy_T or None) in natural units and the backward's stats (m_T, log2(s)_T) in
    base 2 from the per-split statistics."""
    num_splits, num_tokens = part_4ST.shape[1:]
    logprob_T, max2_T, log2sum_T = (torch.empty(num_tokens, dtype=torch.float32, device=part_4ST.device)
                                    for _ in range(3))
    entropy_T = torch.empty_like(logprob_T) if with_entropy else None
    block_s = triton.next_power_of_2(num_splits)
    block = max(16, min(MERGE_TILE // block_s, 1024))
    _merge_splits_kernel[(triton.cdiv(num_tokens, block),)](
        part_4ST, targets_T, logprob_T, entropy_T if with_entropy else logprob_T, max2_T, log2sum_T,
        num_tokens, vocab_size, num_splits, ignore_index,
        BLOCK=block, BLOCK_S=block_s, WITH_ENTROPY=with_entropy, num_warps=4,
    )
    return logprob_T, entropy_T, (max2_T, log2sum_T)


def _triton_fwd(hidden_TH, weight_VH, targets_T, temperature, ignore_index, with_entropy):
    num_tokens, hidden_size = hidden_TH.shape
    vocab_size = weight_VH.shape[0]
    hidden_TH, weight_VH, targets_T = hidden_TH.contiguous(), weight_VH.contiguous(), targets_T.contiguous()
    block_t, block_v, block_k, num_warps, num_stages = _fwd_config(hidden_TH)
    num_t_blocks = triton.cdiv(num_tokens, block_t)
    num_v_tiles = triton.cdiv(vocab_size, block_v)
    num_splits = _num_splits(num_t_blocks, num_v_tiles, block_t * hidden_size * hidden_TH.element_size(),
                             hidden_TH.device)
    vocab_per_split = triton.cdiv(num_v_tiles, num_splits) * block_v
    num_splits = triton.cdiv(vocab_size, vocab_per_split)  # no empty split
    part_4ST = torch.empty((4, num_splits, num_tokens), dtype=torch.float32, device=hidden_TH.device)
    _linear_logprob_fwd_kernel[(num_t_blocks * num_splits,)](
        hidden_TH, weight_VH, targets_T, part_4ST,
        num_tokens, vocab_size, hidden_size, hidden_TH.stride(0), weight_VH.stride(0), LOG2E / temperature,
        vocab_per_split, num_splits,
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_K=block_k, EVEN_K=hidden_size % block_k == 0,
        WITH_ENTROPY=with_entropy, UPCAST=_upcast(hidden_TH), ALIGNED=_aligned(hidden_TH, weight_VH),
        INPUT_PRECISION="ieee" if hidden_TH.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return _merge_splits(part_4ST, targets_T, vocab_size, ignore_index, with_entropy)


def _triton_bwd(hidden_TH, weight_VH, targets_T, temperature, ignore_index, max2_T, log2sum_T, entropy_T,
                grad_logprob_T, grad_entropy_T):
    num_tokens, hidden_size = hidden_TH.shape
    vocab_size = weight_VH.shape[0]
    hidden_TH, weight_VH, targets_T = hidden_TH.contiguous(), weight_VH.contiguous(), targets_T.contiguous()
    block_t, block_v, block_k, group_t, num_warps, num_stages = _bwd_config(hidden_TH)
    assert (block_t, block_k) == _fwd_config(hidden_TH)[0:3:2], "forward and backward must tile T and K alike"
    # Scratch dz (Tc, Vc): Tc = all tokens up to the point where Vc would drop below MIN_VOCAB_CHUNK. Token chunks
    # start on forward block boundaries: the recomputed logit tiles then match the forward's bit for bit (same
    # rows, same K order), which matters when |logits| ~ 1e4 and one ulp shifts p by 1e-3.
    elt = hidden_TH.element_size()
    chunk_t = max(block_t, SCRATCH_BYTES // (elt * MIN_VOCAB_CHUNK) // block_t * block_t)
    chunk_t = min(chunk_t, num_tokens)
    chunk_v = max(block_v, SCRATCH_BYTES // (elt * chunk_t) // block_v * block_v)
    chunk_v = min(chunk_v, triton.cdiv(vocab_size, block_v) * block_v)
    dz_TV = torch.empty((chunk_t, chunk_v), dtype=hidden_TH.dtype, device=hidden_TH.device)
    grad_logprob_T = grad_logprob_T.to(torch.float32).contiguous()
    has_grad_entropy = grad_entropy_T is not None
    if has_grad_entropy:
        grad_entropy_T, entropy_T = grad_entropy_T.to(torch.float32).contiguous(), entropy_T.contiguous()
    one_pass_t = chunk_t >= num_tokens
    grad_hidden_TH = torch.empty_like(hidden_TH)
    # dweight: written by one GEMM per vocabulary chunk when all tokens fit one chunk, else accumulated in fp32.
    grad_weight_VH = torch.empty_like(weight_VH) if one_pass_t else torch.empty_like(weight_VH, dtype=torch.float32)
    for t0 in range(0, num_tokens, chunk_t):
        t1 = min(t0 + chunk_t, num_tokens)
        h_TH = hidden_TH[t0:t1]
        one_pass_v = chunk_v >= vocab_size
        dh_TH = None
        for v0 in range(0, vocab_size, chunk_v):
            v1 = min(v0 + chunk_v, vocab_size)
            w_VH = weight_VH[v0:v1]
            grid = (triton.cdiv(t1 - t0, block_t) * triton.cdiv(v1 - v0, block_v),)
            _linear_logprob_bwd_kernel[grid](
                h_TH, w_VH, targets_T[t0:t1], max2_T[t0:t1], log2sum_T[t0:t1],
                entropy_T[t0:t1] if has_grad_entropy else max2_T, grad_logprob_T[t0:t1],
                grad_entropy_T[t0:t1] if has_grad_entropy else max2_T, dz_TV,
                t1 - t0, v1 - v0, hidden_size, hidden_TH.stride(0), weight_VH.stride(0), dz_TV.stride(0), v0,
                LOG2E / temperature, 1.0 / temperature, ignore_index,
                BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_K=block_k, EVEN_K=hidden_size % block_k == 0,
                GROUP_T=group_t, HAS_GRAD_ENTROPY=has_grad_entropy, UPCAST=_upcast(hidden_TH),
                ALIGNED=_aligned(h_TH, w_VH, dz_TV),
                INPUT_PRECISION="ieee" if hidden_TH.dtype == torch.float32 else "tf32",
                num_warps=num_warps, num_stages=num_stages,
            )
            dz_tv = dz_TV[: t1 - t0, : v1 - v0]
            # A gradient summed over chunks takes each chunk's GEMM in fp32 (no rounding to the input dtype per
            # chunk); the first chunk writes the accumulator, later ones add to it.
            if one_pass_t:
                torch.mm(dz_tv.t(), h_TH, out=grad_weight_VH[v0:v1])
            elif t0 == 0:
                _mm_fp32(dz_tv.t(), h_TH, out=grad_weight_VH[v0:v1])
            else:
                grad_weight_VH[v0:v1] += _mm_fp32(dz_tv.t(), h_TH)
            if one_pass_v:
                torch.mm(dz_tv, w_VH, out=grad_hidden_TH[t0:t1])
            elif dh_TH is None:
                dh_TH = _mm_fp32(dz_tv, w_VH)
            else:
                dh_TH += _mm_fp32(dz_tv, w_VH)
        if dh_TH is not None:
            grad_hidden_TH[t0:t1] = dh_TH
    return grad_hidden_TH, grad_weight_VH.to(weight_VH.dtype)


def _mm_fp32(a, b, out=None):
    """a @ b as fp32 from bf16/fp16/fp32 inputs: fp32 accumulation, no rounding to the input dtype in between.
    CUDA: cuBLAS writes fp32 directly through torch.mm's out_dtype (since torch 2.8; aten/src/ATen/native/cuda/
    Blas.cpp `_mm_dtype_out_cuda` accepts out_dtype = the input dtype, or fp32 for fp16/bf16 inputs). CPU (the
    interpreter tests), where aten::mm.dtype has no kernel: the same product of fp32 copies, exact for bf16/fp16."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _safe_targets(targets_T, vocab_size, ignore_index):
    """Targets as gather indices: ignored and out-of-range ids read column 0 (their log-prob is replaced)."""
    ok_T = (targets_T != ignore_index) & (targets_T >= 0) & (targets_T < vocab_size)
    return torch.where(ok_T, targets_T, 0).long()


def _chunk_rows(vocab_size):
    return max(1, CPU_CHUNK_ELEMS // vocab_size)


def _chunk_logits(h_TH, weight_VH, temperature):
    """Logits of one token chunk exactly as the reference forms them: matmul in the input dtype, then fp32/fp64."""
    acc_dtype = torch.float64 if h_TH.dtype == torch.float64 else torch.float32
    return (h_TH @ weight_VH.t()).to(acc_dtype) / temperature


def _torch_fwd(hidden_TH, weight_VH, targets_T, temperature, ignore_index, with_entropy):
    """Token-chunked PyTorch forward (CPU path): only (rows, V) logits exist at a time."""
    num_tokens = hidden_TH.shape[0]
    acc_dtype = torch.float64 if hidden_TH.dtype == torch.float64 else torch.float32
    valid_T = targets_T != ignore_index
    safe_T = _safe_targets(targets_T, weight_VH.shape[0], ignore_index)
    logprob_T = torch.zeros(num_tokens, dtype=acc_dtype, device=hidden_TH.device)
    max_T = torch.zeros_like(logprob_T)
    logsum_T = torch.zeros_like(logprob_T)
    entropy_T = torch.zeros_like(logprob_T) if with_entropy else None
    rows = _chunk_rows(weight_VH.shape[0])
    for t0 in range(0, num_tokens, rows):
        t1 = min(t0 + rows, num_tokens)
        logp_TV = _chunk_logits(hidden_TH[t0:t1], weight_VH, temperature)
        # log p = (z - max) - log sum exp(z - max), in place (one (rows, V) tensor per chunk), as log_softmax does:
        # z - max is exact near the max, so huge logits lose nothing to a rounded lse.
        max_T[t0:t1] = logp_TV.amax(-1)
        logp_TV -= max_T[t0:t1, None]
        logsum_T[t0:t1] = torch.logsumexp(logp_TV, dim=-1)
        logp_TV -= logsum_T[t0:t1, None]
        logprob_T[t0:t1] = logp_TV.gather(1, safe_T[t0:t1, None]).squeeze(1)
        if with_entropy:
            # -sum p log p from log p directly (not lse - E[z]): no cancellation for huge logits.
            entropy_T[t0:t1] = -(logp_TV.exp() * logp_TV).sum(-1)
    in_vocab_T = (targets_T >= 0) & (targets_T < weight_VH.shape[0])
    logprob_T = torch.where(valid_T, torch.where(in_vocab_T, logprob_T, torch.nan), 0.0)
    if with_entropy:
        entropy_T = torch.where(valid_T, entropy_T, 0.0)
    return logprob_T, entropy_T, (max_T, logsum_T)


def _torch_bwd(hidden_TH, weight_VH, targets_T, temperature, ignore_index, max_T, logsum_T, entropy_T,
               grad_logprob_T, grad_entropy_T):
    """Token-chunked PyTorch backward (CPU path): recompute each chunk's log p from the stats, form dz, matmuls."""
    num_tokens = hidden_TH.shape[0]
    acc_dtype = max_T.dtype
    valid_T = targets_T != ignore_index
    safe_T = _safe_targets(targets_T, weight_VH.shape[0], ignore_index)
    g_logp_T = torch.where(valid_T, grad_logprob_T.to(acc_dtype), 0.0)
    onehot_T = torch.where(safe_T == targets_T, g_logp_T, 0.0)  # an out-of-range target has no one-hot term
    g_ent_T = None if grad_entropy_T is None else torch.where(valid_T, grad_entropy_T.to(acc_dtype), 0.0)
    grad_hidden_TH = torch.empty_like(hidden_TH)
    grad_weight_VH = torch.zeros(weight_VH.shape, dtype=acc_dtype, device=weight_VH.device)
    rows = _chunk_rows(weight_VH.shape[0])
    for t0 in range(0, num_tokens, rows):
        t1 = min(t0 + rows, num_tokens)
        h_TH = hidden_TH[t0:t1]
        logp_TV = _chunk_logits(h_TH, weight_VH, temperature)
        logp_TV -= max_T[t0:t1, None]
        logp_TV -= logsum_T[t0:t1, None]
        p_TV = logp_TV.exp()
        if g_ent_T is None:
            dz_TV = p_TV.mul_(-g_logp_T[t0:t1, None])
        else:
            # dz = -g_logp p - g_ent p (log p + entropy), built in place in logp's buffer
            logp_TV += entropy_T[t0:t1, None]
            logp_TV.mul_(g_ent_T[t0:t1, None]).add_(g_logp_T[t0:t1, None]).mul_(p_TV).neg_()
            dz_TV = logp_TV
        dz_TV.scatter_add_(1, safe_T[t0:t1, None], onehot_T[t0:t1, None])
        dz_TV /= temperature
        # Same precision split as the reference's autograd: dz in the input dtype times weight for dhidden;
        # dweight accumulates over chunks in fp32 (fp64 for fp64 inputs).
        grad_hidden_TH[t0:t1] = dz_TV.to(hidden_TH.dtype) @ weight_VH
        grad_weight_VH.addmm_(dz_TV.t(), h_TH.to(acc_dtype))
    return grad_hidden_TH, grad_weight_VH.to(weight_VH.dtype)


def linear_logprob_fwd(hidden, weight, targets, temperature, ignore_index, with_entropy: bool):
    """Forward launcher (no autograd): returns (logprob_T fp32, entropy_T fp32 or None, stats).

    hidden (T, H) bf16/fp16/fp32 (fp64 on the PyTorch path), weight (V, H) same dtype, targets (T,) int64/int32.
    `stats` = (max_T, logsum_T, entropy_T or None) is what `linear_logprob_bwd` needs: an opaque tuple (the max
    logit and log sum exp(z - max), base 2 on the Triton path, natural on the PyTorch path) to pass back unchanged,
    on the same backend. Entropy is skipped (None) unless `with_entropy`. Rows whose target is ignore_index give 0.
    Triton on CUDA tensors or OVR_BACKEND=triton, the token-chunked PyTorch path otherwise. Validates its inputs
    (ValueError) without reading CUDA tensors' values; target values are checked as `_sync_checks` says.
    """
    _check_inputs(hidden, weight, targets, temperature)
    if _sync_checks(targets):
        check_targets(targets, weight.shape[0], ignore_index)
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        entropy = empty.clone() if with_entropy else None
        return empty, entropy, (empty.clone(), empty.clone(), entropy)
    if use_triton(hidden):
        if hidden.dtype == torch.float64:
            raise ValueError("hidden dtype torch.float64 is only supported on the PyTorch (CPU) path")
        logprob_T, entropy_T, (max_T, logsum_T) = _triton_fwd(hidden, weight, targets, float(temperature),
                                                              int(ignore_index), bool(with_entropy))
    else:
        logprob_T, entropy_T, (max_T, logsum_T) = _torch_fwd(hidden, weight, targets, float(temperature),
                                                             int(ignore_index), bool(with_entropy))
    return logprob_T, entropy_T, (max_T, logsum_T, entropy_T)


def linear_logprob_bwd(hidden, weight, targets, temperature, ignore_index, stats, grad_logprob_T,
                       grad_entropy_T=None):
    """Backward launcher: (grad_hidden (T, H), grad_weight (V, H)), both in the input dtype.

    `stats` comes from `linear_logprob_fwd` on the same inputs; grad_logprob_T (T,) and grad_entropy_T (T,) or None
    (no entropy term) are the upstream gradients; ignore_index rows contribute nothing. Needs stats' entropy when
    grad_entropy_T is given (forward with_entropy=True). Scratch is bounded by SCRATCH_BYTES (GPU) or
    CPU_CHUNK_ELEMS (PyTorch path) whatever T is.
    """
    max_T, logsum_T, entropy_T = stats
    check_tensor("grad_logprob", grad_logprob_T, ndim=1, shape=(hidden.shape[0],), device=hidden.device)
    if grad_entropy_T is not None:
        check_tensor("grad_entropy", grad_entropy_T, ndim=1, shape=(hidden.shape[0],), device=hidden.device)
        if entropy_T is None:
            raise ValueError("grad_entropy was given but stats hold no entropy: run linear_logprob_fwd with "
                             "with_entropy=True")
    if hidden.shape[0] == 0:
        return torch.zeros_like(hidden), torch.zeros_like(weight)
    args = (hidden, weight, targets, float(temperature), int(ignore_index), max_T, logsum_T, entropy_T,
            grad_logprob_T, grad_entropy_T)
    return _triton_bwd(*args) if use_triton(hidden) else _torch_bwd(*args)


# ----------------------------------------------------------------------------------------------------------------
# Autograd: one torch.library custom op (works eagerly and under torch.compile)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("ovr::linear_logprob_fwd", mutates_args=())
def _linear_logprob_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                       ignore_index: int, with_entropy: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob_T, entropy_T (empty when not with_entropy), max_T, logsum_T): the last two are backward stats."""
    logprob_T, entropy_T, (max_T, logsum_T, _) = linear_logprob_fwd(hidden, weight, targets, temperature,
                                                                    ignore_index, with_entropy)
    return logprob_T, (entropy_T if with_entropy else logprob_T.new_empty(0)), max_T, logsum_T


@_linear_logprob_op.register_fake
def _(hidden, weight, targets, temperature, ignore_index, with_entropy):
    _check_inputs(hidden, weight, targets, temperature)
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    num_tokens = hidden.shape[0]
    return (hidden.new_empty(num_tokens, dtype=acc_dtype), hidden.new_empty(num_tokens if with_entropy else 0,
            dtype=acc_dtype), hidden.new_empty(num_tokens, dtype=acc_dtype), hidden.new_empty(num_tokens,
            dtype=acc_dtype))


@torch.library.custom_op("ovr::linear_logprob_bwd", mutates_args=())
def _linear_logprob_bwd_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                           ignore_index: int, max_T: torch.Tensor, logsum_T: torch.Tensor, entropy_T: torch.Tensor,
                           grad_logprob: torch.Tensor, grad_entropy: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    stats = (max_T, logsum_T, entropy_T if grad_entropy is not None else None)
    return linear_logprob_bwd(hidden, weight, targets, temperature, ignore_index, stats, grad_logprob, grad_entropy)


@_linear_logprob_bwd_op.register_fake
def _(hidden, weight, targets, temperature, ignore_index, max_T, logsum_T, entropy_T, grad_logprob, grad_entropy):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, temperature, ignore_index, with_entropy = inputs
    _, entropy_T, max_T, logsum_T = output
    # Only save_for_backward references: with FSDP2 `weight` is the gathered lm_head weight, freed after use.
    ctx.save_for_backward(hidden, weight, targets, max_T, logsum_T, entropy_T)
    ctx.temperature, ctx.ignore_index, ctx.with_entropy = temperature, ignore_index, with_entropy
    ctx.mark_non_differentiable(max_T, logsum_T)


def _backward(ctx, grad_logprob_T, grad_entropy_T, _grad_max_T, _grad_logsum_T):
    hidden, weight, targets, max_T, logsum_T, entropy_T = ctx.saved_tensors
    if grad_logprob_T is None:
        grad_logprob_T = torch.zeros_like(max_T)
    if not ctx.with_entropy:
        grad_entropy_T = None
    grad_hidden, grad_weight = _linear_logprob_bwd_op(hidden, weight, targets, ctx.temperature, ctx.ignore_index,
                                                      max_T, logsum_T, entropy_T, grad_logprob_T, grad_entropy_T)
    return (grad_hidden if ctx.needs_input_grad[0] else None, grad_weight if ctx.needs_input_grad[1] else None,
            None, None, None, None)


_linear_logprob_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def linear_logprob_entropy(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """Per-token log p(target) and entropy of softmax(hidden @ weight^T / temperature), without (T, V) logits.

    hidden (T, H) bf16/fp16/fp32, weight (V, H) same dtype and device (e.g. the FSDP2-gathered lm_head weight),
    targets (T,) int64/int32 in [0, V) or == ignore_index. Returns (logprob_T, entropy_T), fp32 (fp64 for fp64
    inputs on the PyTorch path); rows with target == ignore_index give 0 for both and no gradient.
    Gradients flow to hidden and weight from both outputs; targets get none. Logits are formed in the input
    dtype's matrix product with fp32 accumulation, softmax statistics in fp32. ValueError on bad shapes, dtypes,
    devices or temperature <= 0. A target outside [0, V) is a ValueError on CPU tensors; on CUDA tensors it gives a
    NaN log-prob (no host sync per call): validate a batch once with `check_targets`, or set OVR_CHECK_TARGETS=1.
    CUDA -> Triton kernels; CPU -> token-chunked PyTorch (peak extra memory ~CPU_CHUNK_ELEMS fp32 values).
    """
    _check_inputs(hidden, weight, targets, temperature)
    logprob_T, entropy_T, _, _ = _linear_logprob_op(hidden, weight, targets, float(temperature),
                                                    int(ignore_index), True)
    return logprob_T, entropy_T


def linear_logprob_nograd(hidden, weight, targets, temperature=1.0, ignore_index=-100, with_entropy=False):
    """Forward-only scoring (old / reference log-probs): (logprob_T, entropy_T or None), no autograd graph.

    Same inputs and outputs as `linear_logprob_entropy`, but runs under torch.no_grad (outputs never require grad)
    and skips the entropy accumulation unless `with_entropy` (entropy_T is then None).
    """
    _check_inputs(hidden, weight, targets, temperature)
    with torch.no_grad():
        logprob_T, entropy_T, _, _ = _linear_logprob_op(hidden, weight, targets, float(temperature),
                                                        int(ignore_index), bool(with_entropy))
    return logprob_T, (entropy_T if with_entropy else None)


__all__ = [
    "check_targets", "linear_logprob_bwd", "linear_logprob_entropy", "linear_logprob_fwd", "linear_logprob_nograd",
]
