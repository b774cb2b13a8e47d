"""Packing: lengths -> cu_seqlens and position ids, pack/unpack padded batches, token-budget micro-batches and
DP-balanced partitions.

The loops (cu_seqlens / position ids on CPU, first-fit decreasing, Karmarkar-Karp) run in the C++ extension
`ovr_kernels._C` when it is built; each has a plain-Python twin here with the same algorithm and tie-breaks, so both
give identical results. `use_ext=None` picks the extension when present, `use_ext=False` forces the Python path
(tests compare the two), `OVR_DISABLE_EXT=1` hides the extension entirely.

Legend: B sequences, L padded length, T packed tokens (sum of lengths), X any trailing feature dims.
Suffixes give shapes (padded_BLX = (B, L, *X), packed_TX = (T, *X)).
"""

import heapq

import torch

from ovr_kernels import _ext
from ovr_kernels._checks import check_cu_seqlens, check_tensor, max_seqlen_of
from ovr_kernels.reference import cu_seqlens_ref, position_ids_ref

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
_COSTS = ("tokens", "quadratic")


def _want_ext(use_ext) -> bool:
    """Resolve `use_ext` (None: the extension when built; True: require it; False: pure Python)."""
    if use_ext is None:
        return _ext.HAS_EXT
    if use_ext and not _ext.HAS_EXT:
        raise ValueError("use_ext=True but the compiled module ovr_kernels._C is not available "
                         "(not built, or OVR_DISABLE_EXT=1)")
    return bool(use_ext)


def _lengths_tensor(name: str, lengths, check_values: bool = True) -> torch.Tensor:
    """Sequence lengths (list, tuple or 1-D integer tensor) -> 1-D int64 tensor; ValueError on bad values.

    check_values=False skips the >= 0 check for callers whose C++ op checks it (with the same message)."""
    if isinstance(lengths, torch.Tensor):
        check_tensor(name, lengths, ndim=1, dtypes=_INT_DTYPES)
        out = lengths.to(torch.int64)
    else:
        try:
            values = list(lengths)
        except TypeError:
            raise ValueError(f"{name} must be a 1-D integer tensor or a sequence of ints, got "
                             f"{type(lengths).__name__}") from None
        try:
            out = torch.tensor(values) if values else torch.zeros(0, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            out = None
        if out is None or out.dim() != 1 or out.dtype not in _INT_DTYPES:
            bad = next((i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, int)), 0)
            raise ValueError(f"{name}[{bad}] must be an int, got {values[bad]!r}") from None
        out = out.to(torch.int64)
    if check_values and out.numel() and bool((out < 0).any()):
        i = int(torch.nonzero(out < 0)[0, 0])
        raise ValueError(f"{name}[{i}] must be >= 0, got {int(out[i])}")
    return out


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# cu_seqlens, position ids
# ----------------------------------------------------------------------------------------------------------------


def cu_seqlens_from_lengths(lengths, use_ext=None) -> torch.Tensor:
    """Sequence lengths (B,) -> int32 cu_seqlens (B+1,) = [0, l0, l0+l1, ...].

    lengths: list/tuple of ints or a 1-D integer tensor (any device), all >= 0, summing to < 2**31.
    Returns an int32 tensor on lengths' device (CPU for lists). Zero lengths give repeated entries (empty segments).
    """
    device = lengths.device if isinstance(lengths, torch.Tensor) else torch.device("cpu")
    lengths_B = _lengths_tensor("lengths", lengths)
    total = int(lengths_B.sum()) if lengths_B.numel() else 0
    if total > _INT32_MAX:
        raise ValueError(f"lengths sum to {total}, more than int32 cu_seqlens can hold ({_INT32_MAX})")
    if lengths_B.device.type != "cpu" or not _want_ext(use_ext):
        return cu_seqlens_ref(lengths_B).to(device)
    lengths_B = lengths_B.contiguous()
    cu = torch.empty(lengths_B.numel() + 1, dtype=torch.int32)
    _ext._C.cu_seqlens_from_lengths(lengths_B.data_ptr(), lengths_B.numel(), cu.data_ptr())
    return cu


def position_ids_from_cu_seqlens(cu_seqlens, use_ext=None) -> torch.Tensor:
    """int32 cu_seqlens (B+1,) -> int64 position ids (T,): 0..len-1 within each packed sequence.

    cu_seqlens must start at 0 and be non-decreasing (checked); T = cu_seqlens[-1]. Output on cu_seqlens' device.
    """
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    total = int(cu_seqlens[-1]) if cu_seqlens.numel() else 0
    check_cu_seqlens("cu_seqlens", cu_seqlens, total)
    if cu_seqlens.device.type != "cpu" or not _want_ext(use_ext):
        return position_ids_ref(cu_seqlens).to(cu_seqlens.device)
    cu = cu_seqlens.contiguous()
    pos_T = torch.empty(total, dtype=torch.int64)
    _ext._C.position_ids(cu.data_ptr(), cu.numel() - 1, pos_T.data_ptr())
    return pos_T


# ----------------------------------------------------------------------------------------------------------------
# pack / unpack (index ops: autograd flows through both)
# ----------------------------------------------------------------------------------------------------------------


def _token_index(cu_seqlens, max_len: int, device) -> torch.Tensor:
    """Flat index b * max_len + position of every packed token, (T,) int64."""
    lengths_B = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(device)
    seq_T = torch.repeat_interleave(torch.arange(lengths_B.numel(), device=device), lengths_B)
    return seq_T * max_len + position_ids_ref(cu_seqlens.to(device)).to(device)


def pack(padded_BLX, lengths):
    """Padded batch -> packed tokens: returns (packed_TX, cu_seqlens, max_seqlen).

    padded_BLX: (B, L, *X) any dtype, row b valid in [:lengths[b]]; lengths: B ints / 1-D int tensor in [0, L].
    packed_TX (T, *X) keeps the valid rows in order (gradients flow back to padded_BLX; padding gets zero grad),
    cu_seqlens int32 (B+1,) on padded_BLX's device, max_seqlen a Python int (max length, 0 for no tokens).
    """
    check_tensor("padded", padded_BLX)
    if padded_BLX.dim() < 2:
        raise ValueError(f"padded must have at least 2 dims (B, L, ...), got shape {tuple(padded_BLX.shape)}")
    num_B, max_L = padded_BLX.shape[0], padded_BLX.shape[1]
    lengths_B = _lengths_tensor("lengths", lengths)
    if lengths_B.numel() != num_B:
        raise ValueError(f"lengths has {lengths_B.numel()} entries but padded has batch size {num_B}")
    if num_B and int(lengths_B.max()) > max_L:
        i = int(lengths_B.argmax())
        raise ValueError(f"lengths[{i}]={int(lengths_B[i])} exceeds the padded length {max_L}")
    cu = cu_seqlens_from_lengths(lengths_B.cpu())
    index_T = _token_index(cu, max_L, padded_BLX.device)
    packed_TX = padded_BLX.reshape(num_B * max_L, *padded_BLX.shape[2:]).index_select(0, index_T)
    max_seqlen = int(lengths_B.max()) if num_B else 0
    return packed_TX, cu.to(padded_BLX.device), max_seqlen


def unpack(packed_TX, cu_seqlens, max_len, pad_value=0):
    """Packed tokens -> padded batch (B, max_len, *X) filled with pad_value past each sequence's length.

    packed_TX: (T, *X); cu_seqlens: int32 (B+1,) ending at T; max_len: int >= the longest sequence.
    Gradients flow back to packed_TX (pad positions get none).
    """
    check_tensor("packed", packed_TX)
    if packed_TX.dim() < 1:
        raise ValueError(f"packed must have at least 1 dim (T, ...), got shape {tuple(packed_TX.shape)}")
    check_cu_seqlens("cu_seqlens", cu_seqlens, packed_TX.shape[0])
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
        raise ValueError(f"max_len must be a non-negative int, got {max_len!r}")
    longest = max_seqlen_of(cu_seqlens)
    if longest > max_len:
        raise ValueError(f"max_len={max_len} is shorter than the longest sequence ({longest})")
    num_B = cu_seqlens.numel() - 1
    index_T = _token_index(cu_seqlens, max_len, packed_TX.device)
    out = packed_TX.new_full((num_B * max_len, *packed_TX.shape[1:]), pad_value)
    out = out.index_copy(0, index_T, packed_TX)  # out-of-place: differentiable w.r.t. packed_TX
    return out.reshape(num_B, max_len, *packed_TX.shape[1:])


# ----------------------------------------------------------------------------------------------------------------
# Token-budget micro-batches: first-fit decreasing
# ----------------------------------------------------------------------------------------------------------------


def _ffd_python(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Twin of ffd_microbatches_cpu (csrc/packing.cpp): first fit found with a max segment tree over bin room."""
    n = len(lengths)
    bins: list[list[int]] = []
    if n == 0:
        return bins
    max_bins = min(n, 2 * (sum(lengths) // max_tokens) + 2)  # first fit never has two bins at most half full
    size = 1
    while size < max_bins:
        size <<= 1
    tree = [max_tokens] * (2 * size)  # tree[size + b] = room left in bin b; unopened bins are empty
    for i in sorted(range(n), key=lambda j: (-lengths[j], j)):
        length = lengths[i]
        node = 1
        while node < size:  # leftmost leaf with room >= length
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= length
        node >>= 1
        while node >= 1:
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = max(left, right)
            node >>= 1
    return bins


def token_budget_microbatches(lengths, max_tokens, use_ext=None) -> list[list[int]]:
    """Group sequences into micro-batches of at most `max_tokens` tokens (first-fit decreasing).

    lengths: B non-negative ints (list/tuple/1-D int tensor); max_tokens: positive int.
    Returns bins (lists of sequence indices): sequences are taken longest first (ties: lower index first) and each
    goes to the first bin with room; bins are in opening order, indices within a bin in insertion order. Every index
    appears exactly once. Deterministic. ValueError when a sequence is longer than max_tokens.
    """
    max_tokens = _positive_int("max_tokens", max_tokens)
    ext = _want_ext(use_ext)
    lengths_B = _lengths_tensor("lengths", lengths, check_values=not ext).cpu().contiguous()
    if ext:  # the C++ op checks 0 <= length <= max_tokens with the messages below
        return _ext._C.ffd_microbatches(lengths_B.data_ptr(), lengths_B.numel(), max_tokens)
    if lengths_B.numel() and int(lengths_B.max()) > max_tokens:
        i = int(torch.nonzero(lengths_B > max_tokens)[0, 0])
        raise ValueError(f"sequence {i} has length {int(lengths_B[i])} > max_tokens={max_tokens}")
    return _ffd_python(lengths_B.tolist(), max_tokens)


# ----------------------------------------------------------------------------------------------------------------
# Balanced partitions: Karmarkar-Karp largest differencing
# ----------------------------------------------------------------------------------------------------------------


def _kk_python(weights: list[int], num_parts: int) -> list[list[int]]:
    """Twin of kk_partition_cpu (csrc/packing.cpp); see there for the algorithm and tie-breaks.

    A tuple is the list of its non-empty parts [load, smallest index, indices] sorted by (load descending, smallest
    index); its remaining parts are empty (load 0). The heap holds (-spread, tuple id).
    """
    n, k = len(weights), num_parts
    if n == 0:
        return [[] for _ in range(k)]
    sets = [[[w, i, [i]]] for i, w in enumerate(weights)]
    heap = [(-(w if k > 1 else 0), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    while len(heap) > 1:
        a = heapq.heappop(heap)[1]
        b = heapq.heappop(heap)[1]
        pa, pb = sets[a], sets[b]
        merged = []
        for j in range(k):  # heaviest of a with lightest of b; slots past a tuple's length are empty
            x = pa[j] if j < len(pa) else None
            y = pb[k - 1 - j] if k - 1 - j < len(pb) else None
            if x is not None and y is not None:
                big, small = (x[2], y[2]) if len(x[2]) >= len(y[2]) else (y[2], x[2])
                big.extend(small)  # small into large: each index moves O(log n) times
                merged.append([x[0] + y[0], min(x[1], y[1]), big])
            elif x is not None or y is not None:
                merged.append(x if x is not None else y)
        merged.sort(key=lambda p: (-p[0], p[1]))
        lightest = merged[-1][0] if len(merged) == k else 0
        sets[a] = sets[b] = None
        sets.append(merged)
        heapq.heappush(heap, (-(merged[0][0] - lightest), len(sets) - 1))
    parts = [sorted(p[2]) for p in sets[heap[0][1]]]
    return parts + [[] for _ in range(k - len(parts))]


def balanced_partition(lengths, num_parts, cost="tokens", use_ext=None) -> tuple[list[list[int]], float]:
    """Split sequences into `num_parts` groups of near-equal cost (Karmarkar-Karp largest differencing).

    lengths: B non-negative ints (list/tuple/1-D int tensor); num_parts: positive int (e.g. the data-parallel size);
    cost: "tokens" (a sequence costs its length: MLP-bound steps) or "quadratic" (its length squared: attention-
    bound steps). Returns (parts, imbalance): num_parts lists of sequence indices, each sorted ascending, in order of
    decreasing load, every index exactly once, every part non-empty when B >= num_parts; imbalance = max part load /
    mean part load (1.0 is perfect; 1.0 when the total cost is 0). Deterministic (ties: lower index first).
    """
    num_parts = _positive_int("num_parts", num_parts)
    if cost not in _COSTS:
        raise ValueError(f"cost must be one of {_COSTS}, got {cost!r}")
    ext = _want_ext(use_ext)
    lengths_B = _lengths_tensor("lengths", lengths, check_values=not ext).cpu().contiguous()
    if ext:  # the C++ op checks lengths >= 0 and the int64 overflow below, and returns the part loads
        parts, loads = _ext._C.kk_partition(lengths_B.data_ptr(), lengths_B.numel(), num_parts, cost == "quadratic")
    else:
        lengths_list = lengths_B.tolist()
        weights = lengths_list if cost == "tokens" else [x * x for x in lengths_list]
        if sum(weights) > _INT64_MAX:
            raise ValueError(f"total {cost} cost overflows int64; lengths are too large for cost={cost!r}")
        parts = _kk_python(weights, num_parts)
        loads = [sum(weights[i] for i in p) for p in parts]
    total = sum(loads)
    imbalance = max(loads) * num_parts / total if total > 0 else 1.0
    return parts, imbalance
