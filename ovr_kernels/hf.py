"""ovr's varlen attention as a transformers attention implementation (AttentionInterface + AttentionMaskInterface).

Legend: B batch rows, L tokens per row, T packed tokens, Hq / Hkv heads, D head dim.

transformers (5.16 - 5.19) hands cu_seqlens to an attention function only when the implementation's name contains
"flash" (`is_flash_attention_requested`): Qwen2.5-VL's vision blocks then pass `cu_seq_lens_q/k` and
`max_length_q/k` for both window and full attention instead of looping over windows in Python. So the name is
"ovr_flash_varlen". Its mask entry builds no dense mask: it returns None, or the 2-D (B, L) padding mask when some
token is padding (as transformers' flash entry does), so a 64k-token pack never gets an L x L mask.

Packed text (B = 1, no padding) gets its boundaries, in order of preference, from
  1. `cu_seq_lens_q/k` + `max_length_q/k` kwargs, given to the model's forward (`packed_forward_kwargs`) and passed
     through to every decoder layer (no host sync when max_length is a Python int);
  2. the text position ids (each sequence restarts at 0), which Qwen2.5-VL passes to its layers when given
     4-row (text + 3 mRoPE) position ids; this costs one host sync per layer to size the grid;
  3. otherwise each batch row is one sequence (unpadded with the 2-D mask if there is one).
"""

import torch

from ovr_kernels.varlen_attention import varlen_attention

ATTN_NAME = "ovr_flash_varlen"


def _boundaries_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(1, T) or (T,) positions that restart at 0 for each packed sequence -> (cu_seqlens int32, max_seqlen)."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:  # positions not starting at 0: one sequence
        starts = torch.zeros(1, dtype=torch.long, device=pos.device)
    cu = torch.cat([starts, torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())  # host sync: sizes the grid


def _is_packed(position_ids: torch.Tensor | None, batch_size: int) -> bool:
    if position_ids is None or batch_size != 1:
        return False
    pos = position_ids.reshape(-1)
    return pos.numel() > 1 and bool((pos[1:] <= pos[:-1]).any())


def ovr_varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                 sliding_window=None, softcap=None, is_causal=None, cu_seq_lens_q=None,
                                 cu_seq_lens_k=None, max_length_q=None, max_length_k=None, position_ids=None,
                                 ovr_key_index=None, **kwargs):
    """transformers attention function: query (B, Hq, L, D), key / value (B, Hkv, Lk, D) -> ((B, L, Hq, D), None).

    attention_mask: None or a 2-D (B, Lk) padding mask (see `ovr_varlen_attention_mask`); never a dense mask.
    ovr_key_index: with cu_seq_lens_q / k, the packed row of each key (`packed_forward_kwargs`: shared prefixes).
    """
    if dropout:
        raise ValueError(f"{ATTN_NAME} has no attention dropout, got dropout={dropout}")
    if softcap or sliding_window:
        raise ValueError(f"{ATTN_NAME} supports neither softcap ({softcap}) nor sliding_window ({sliding_window})")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{ATTN_NAME} takes a 2-D padding mask or None, got shape {tuple(attention_mask.shape)}: "
                         f"build masks with the '{ATTN_NAME}' mask interface")
    causal = module.is_causal if is_causal is None else is_causal
    det = getattr(module, "ovr_deterministic", False)
    batch, num_q_heads, len_q, head_dim = query.shape
    len_k = key.shape[2]
    q = query.transpose(1, 2)  # (B, L, Hq, D) views: the kernel takes any token / head strides
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)

    if cu_seq_lens_q is not None:  # vision blocks, or packed text with boundaries passed through the forward
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q needs a packed batch of size 1, got batch size {batch}")
        cu_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
        max_q = int(max_length_q) if max_length_q is not None else int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        max_k = int(max_length_k) if max_length_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        k0, v0 = k[0], v[0]
        # shared prefixes: each key segment gathers its prefix's rows and its own. The kwarg reaches here because
        # transformers 5.19 passes a text model's **kwargs through every decoder layer into the attention function
        # (models/qwen2_5_vl/modeling_qwen2_5_vl.py: Qwen2_5_VLTextModel.forward, Qwen2_5_VLAttention.forward).
        if ovr_key_index is not None:
            k0, v0 = k0.index_select(0, ovr_key_index), v0.index_select(0, ovr_key_index)
        out = varlen_attention(q[0], k0, v0, cu_seq_lens_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
                               causal=causal, softmax_scale=scaling, check_cu_seqlens_values=False, deterministic=det)
        return out.unsqueeze(0), None
    if attention_mask is None and _is_packed(position_ids, batch):
        cu, max_len = _boundaries_from_position_ids(position_ids)
        out = varlen_attention(q[0], k[0], v[0], cu, cu, max_len, max_len, causal=causal, softmax_scale=scaling,
                               check_cu_seqlens_values=False, deterministic=det)
        return out.unsqueeze(0), None
    if attention_mask is None:  # each row one full sequence (with a KV cache: bottom-right causal alignment)
        cu_q = torch.arange(0, batch * len_q + 1, len_q, dtype=torch.int32, device=query.device)
        cu_k = torch.arange(0, batch * len_k + 1, len_k, dtype=torch.int32, device=query.device)
        out = varlen_attention(q.reshape(batch * len_q, num_q_heads, head_dim),
                               k.reshape(batch * len_k, k.shape[2], head_dim),
                               v.reshape(batch * len_k, v.shape[2], head_dim), cu_q, cu_k, len_q, len_k,
                               causal=causal, softmax_scale=scaling, check_cu_seqlens_values=False, deterministic=det)
        return out.reshape(batch, len_q, num_q_heads, head_dim), None
    # padded rows: drop the padding, run packed, scatter back (padding rows get 0)
    valid_k = attention_mask[:, -len_k:].bool()
    valid_q = valid_k[:, -len_q:]
    lens_q, lens_k = valid_q.sum(1), valid_k.sum(1)
    cu_q = torch.nn.functional.pad(lens_q.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = torch.nn.functional.pad(lens_k.cumsum(0), (1, 0)).to(torch.int32)
    out_packed = varlen_attention(q[valid_q], k[valid_k], v[valid_k], cu_q, cu_k, int(lens_q.max()),
                                  int(lens_k.max()), causal=causal, softmax_scale=scaling, deterministic=det)
    out = out_packed.new_zeros(batch, len_q, num_q_heads, head_dim)
    out[valid_q] = out_packed
    return out, None


def ovr_varlen_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                              attention_mask=None, **kwargs):
    """transformers mask function: None, or the 2-D (B, kv_length) bool padding mask when it has padding.

    Packed-sequence and causal structure are not materialised: the attention function gets them from cu_seqlens /
    position ids and its causal flag."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register_ovr_attention() -> str:
    """Register ovr's attention with transformers under ATTN_NAME (idempotent); returns the name, to pass as
    `attn_implementation=` or to `model.set_attn_implementation`."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, ovr_varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, ovr_varlen_attention_mask)
    return ATTN_NAME


def use_ovr_attention(model, deterministic: bool = False) -> str:
    """Register ovr's attention and switch `model` (every config its modules hold, text and vision) to it; returns
    the name. deterministic=True gives every attention module of `model` varlen_attention's bit-reproducible
    backward (its `deterministic` argument).

    Not `model.set_attn_implementation(name)` / `from_pretrained(attn_implementation=name)`: for a name containing
    "flash" those try to import the flash-attn package (or a hub kernel) and fail without it. The name must still
    contain "flash" so the models pass cu_seqlens (module docstring); setting the config attribute does just that."""
    name = register_ovr_attention()
    model.config._attn_implementation = name  # the setter recurses into sub-configs
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            config._attn_implementation = name
        module.ovr_deterministic = deterministic  # read by the attention function, which gets the module
    return name


def packed_forward_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int, key_cu_seqlens: torch.Tensor | None = None,
                          key_max_seqlen: int = 0, key_index: torch.Tensor | None = None) -> dict:
    """Keyword arguments for a Qwen2.5-VL / Qwen2 forward on one packed row (input_ids (1, T)): the text layers'
    attention then reads the sequence boundaries directly (no host sync). cu_seqlens int32 (B+1,) on the model's
    device, max_seqlen a Python int. Pass the 4-row position ids (text row + 3 mRoPE rows, computed per sample
    before packing) as `position_ids` beside them.

    Shared prefixes: key_cu_seqlens int32 (B+1,), key_max_seqlen and key_index (long (Tk,): the packed row of each
    key) make query segment b attend to the keys key_index[key_cu_seqlens[b]:key_cu_seqlens[b+1]] (causal, aligned
    bottom-right) instead of its own rows: several continuations of one prefix packed once (`data.Batch`). The
    text layers' keys and values are gathered by key_index; the vision blocks never get it."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens!r}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative Python int, got {max_seqlen!r}")
    if key_index is None:
        if key_cu_seqlens is not None:
            raise ValueError("key_cu_seqlens needs key_index (the packed row of each key)")
        return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": max_seqlen,
                "max_length_k": max_seqlen}
    if not isinstance(key_cu_seqlens, torch.Tensor) or key_cu_seqlens.shape != cu_seqlens.shape \
            or key_cu_seqlens.dtype != torch.int32:
        raise ValueError(f"key_cu_seqlens must be an int32 tensor shaped like cu_seqlens {tuple(cu_seqlens.shape)}, "
                         f"got {key_cu_seqlens!r}")
    if not isinstance(key_index, torch.Tensor) or key_index.dim() != 1 or key_index.dtype != torch.long:
        raise ValueError(f"key_index must be a 1-D int64 tensor, got {key_index!r}")
    if isinstance(key_max_seqlen, bool) or not isinstance(key_max_seqlen, int) or key_max_seqlen < 0:
        raise ValueError(f"key_max_seqlen must be a non-negative Python int, got {key_max_seqlen!r}")
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": key_cu_seqlens, "max_length_q": max_seqlen,
            "max_length_k": key_max_seqlen, "ovr_key_index": key_index}
