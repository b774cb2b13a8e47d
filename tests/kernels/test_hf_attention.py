"""ovr attention inside transformers: a tiny random Qwen2.5-VL on a packed batch (batch 1, cu_seqlens, per-sample
3-D mRoPE ids computed before packing) gives the logits and gradients of "sdpa" on the same samples padded.

The vision tower runs window attention (windows of 16 patches, some partial) and full attention, both through
cu_seqlens; the text layers run causal GQA over the packed samples.
"""

import pytest
import torch
from conftest import skip_if_no_interpreter

from ovr_kernels.hf import (
    ATTN_NAME,
    ovr_varlen_attention_mask,
    packed_forward_kwargs,
    register_ovr_attention,
    use_ovr_attention,
)

transformers = pytest.importorskip("transformers")

VOCAB, IMAGE, VIDEO, VSTART, VEND = 256, 250, 251, 252, 253
MERGE, PATCH, TEMPORAL = 2, 4, 2


def _config():
    return transformers.Qwen2_5_VLConfig(
        text_config={"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 64,
                       "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL,
                       "window_size": 16, "fullatt_block_indexes": [1], "in_channels": 3},
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)


def _models():
    torch.manual_seed(0)
    sdpa = transformers.Qwen2_5_VLForConditionalGeneration(_config()).float()
    sdpa.set_attn_implementation("sdpa")
    ovr = transformers.Qwen2_5_VLForConditionalGeneration(_config()).float()
    ovr.load_state_dict(sdpa.state_dict())
    assert use_ovr_attention(ovr) == ATTN_NAME
    assert ovr.model.visual.config._attn_implementation == ovr.model.language_model.config._attn_implementation == ATTN_NAME
    return sdpa, ovr


def _samples(grids):
    """One sample per entry: None -> text only, (t, h, w) -> text + one image with that patch grid."""
    samples = []
    for i, grid in enumerate(grids):
        head = torch.randint(0, 200, (3 + 2 * i,))
        tail = torch.randint(0, 200, (4 + i,))
        if grid is None:
            samples.append({"ids": torch.cat([head, tail]), "grid": None, "pixels": None})
            continue
        t, h, w = grid
        num_pad = t * h * w // MERGE**2
        ids = torch.cat([head, torch.tensor([VSTART]), torch.full((num_pad,), IMAGE), torch.tensor([VEND]), tail])
        pixels = torch.randn(t * h * w, 3 * TEMPORAL * PATCH * PATCH)
        samples.append({"ids": ids, "grid": torch.tensor([grid]), "pixels": pixels})
    return samples


def _rope_ids(model, sample):
    """(3, L) mRoPE position ids of one sample, computed alone (before packing / padding)."""
    ids = sample["ids"][None]
    if sample["grid"] is None:
        return torch.arange(ids.shape[1]).expand(3, -1)
    mm_types = (ids == IMAGE).int()
    pos, _ = model.model.get_rope_index(ids, image_grid_thw=sample["grid"], mm_token_type_ids=mm_types)
    return pos[:, 0]


def _image_inputs(samples):
    imgs = [s for s in samples if s["grid"] is not None]
    if not imgs:
        return {}
    return {"pixel_values": torch.cat([s["pixels"] for s in imgs]),
            "image_grid_thw": torch.cat([s["grid"] for s in imgs])}


def _padded_forward(model, samples):
    lengths = [s["ids"].numel() for s in samples]
    batch, max_len = len(samples), max(lengths)
    ids = torch.zeros(batch, max_len, dtype=torch.long)
    mask = torch.zeros(batch, max_len, dtype=torch.long)
    pos = torch.ones(3, batch, max_len, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, :lengths[b]] = s["ids"]
        mask[b, :lengths[b]] = 1
        pos[:, b, :lengths[b]] = _rope_ids(model, s)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **_image_inputs(samples)).logits
    return torch.cat([logits[b, :lengths[b]] for b in range(batch)])


def _packed_forward(model, samples, pass_cu_seqlens):
    lengths = [s["ids"].numel() for s in samples]
    ids = torch.cat([s["ids"] for s in samples])[None]
    text_pos = torch.cat([torch.arange(n) for n in lengths])
    rope = torch.cat([_rope_ids(model, s) for s in samples], dim=1)
    pos = torch.cat([text_pos[None], rope])[:, None]  # (4, 1, T): text row + 3 mRoPE rows
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    extra = packed_forward_kwargs(cu, max(lengths)) if pass_cu_seqlens else {}
    return model(input_ids=ids, position_ids=pos, **_image_inputs(samples), **extra).logits[0]


def _logits_and_grads(model, forward, samples, weights):
    model.zero_grad()
    logits = forward(model, samples)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(samples, pass_cu_seqlens, atol):
    sdpa, ovr = _models()
    total = sum(s["ids"].numel() for s in samples)
    weights = torch.randn(total, VOCAB)
    ref_logits, ref_grads = _logits_and_grads(sdpa, _padded_forward, samples, weights)
    logits, grads = _logits_and_grads(ovr, lambda m, s: _packed_forward(m, s, pass_cu_seqlens), samples, weights)
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and any("visual" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=atol, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


GRIDS = [None, (1, 6, 10), None, (1, 4, 4)]  # 6 x 10 patches: partial 16-patch windows


@pytest.mark.parametrize("pass_cu_seqlens", [True, False], ids=["cu_seqlens_kwargs", "from_position_ids"])
def test_packed_ovr_matches_padded_sdpa_reference_path(pass_cu_seqlens):
    torch.manual_seed(1)
    _compare(_samples(GRIDS), pass_cu_seqlens, atol=2e-5)


def test_packed_ovr_matches_padded_sdpa_triton_interpreter(request, monkeypatch):
    skip_if_no_interpreter(request)
    monkeypatch.setenv("OVR_BACKEND", "triton")
    torch.manual_seed(2)
    _compare(_samples([(1, 6, 10), None]), True, atol=5e-5)


def test_registration_and_mask():
    name = register_ovr_attention()
    assert name == ATTN_NAME == register_ovr_attention() and "flash" in name
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.utils.generic import is_flash_attention_requested

    assert name in AttentionInterface._global_mapping and name in AttentionMaskInterface._global_mapping
    assert is_flash_attention_requested(requested_attention_implementation=name)
    # no dense mask, ever: None without padding, the 2-D padding mask with it
    assert ovr_varlen_attention_mask(2, 5, 5, attention_mask=torch.ones(2, 5, dtype=torch.bool)) is None
    pad = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert ovr_varlen_attention_mask(2, 5, 5, attention_mask=pad).shape == (2, 5)
    with pytest.raises(ValueError, match="max_seqlen"):
        packed_forward_kwargs(torch.tensor([0, 3], dtype=torch.int32), 3.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_forward_kwargs(torch.tensor([0, 3]), 3)


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_switch_reaches_every_attention_call(deterministic, monkeypatch):
    """use_ovr_attention(model, deterministic) reaches varlen_attention in the vision blocks and the text layers,
    in both the cu_seqlens path and the padded path (model.deterministic_attention in the trainer)."""
    import ovr_kernels.hf as hf_mod

    calls, real = [], hf_mod.varlen_attention

    def spy(*args, **kwargs):
        calls.append(kwargs["deterministic"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_mod, "varlen_attention", spy)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(_config()).float()
    use_ovr_attention(model, deterministic=deterministic)
    samples = _samples(GRIDS)
    _packed_forward(model, samples, True)
    vision_layers, text_layers = 2, 2
    assert len(calls) == vision_layers + text_layers and set(calls) == {deterministic}
    calls.clear()
    _padded_forward(model, samples)
    assert len(calls) == vision_layers + text_layers and set(calls) == {deterministic}
