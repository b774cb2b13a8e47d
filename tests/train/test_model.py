"""Model: packed (varlen kernel, fused log-prob head) == padded (sdpa) == HF's own per-sample forward, in loss and
every gradient (ViT trainable, images in the batch); the HF export loads back through the sharded-load path."""

import pytest
import torch
from PIL import Image

from ovr_train.config import DataCfg, ModelCfg
from ovr_train.data import IGNORE, ImageProcessor, ImageRef, collate, encode_messages
from ovr_train.model import build_model, flops_per_token, hf_config, param_counts
from ovr_train.tokenizer import load_tokenizer, special_ids


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model")
    tok = load_tokenizer(kind="bpe", cache_dir=str(tmp))
    ids = special_ids(tok)
    proc = ImageProcessor(112 * 112, 112 * 224)
    Image.new("RGB", (224, 112), (10, 200, 30)).save(tmp / "g.png")
    Image.effect_noise((112, 112), 60).convert("RGB").save(tmp / "n.png")
    convs = [
        [("user", ["Compute (3 + 4) * 2."]), ("assistant", ["<think>3 + 4 = 7. Then 7 * 2 = 14.</think> \\boxed{14}"])],
        [("user", [ImageRef(str(tmp / "g.png")), "What colour?"]), ("assistant", ["Green, \\boxed{green}."])],
        [("user", ["x"]), ("assistant", ["y"])],
        [("user", ["How many dots?", ImageRef(str(tmp / "n.png"))]), ("assistant", ["Wait, let me look. \\boxed{3}"])],
    ]
    encs = [encode_messages(c, tok, ids, proc) for c in convs]
    return tok, ids, encs


def _models(ids, vocab):
    torch.manual_seed(0)
    packed = build_model(ModelCfg(freeze_vision=False, init_seed=7), ids, vocab)
    padded = build_model(ModelCfg(freeze_vision=False, init_seed=7, attn_implementation="sdpa"), ids, vocab)
    assert all(torch.equal(a, b) for a, b in zip(packed.state_dict().values(), padded.state_dict().values()))
    return packed, padded


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch.model_inputs(), targets=batch.targets)
    loss = -out.logprobs.sum() / batch.num_loss_tokens
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out


def test_packed_equals_padded_loss_and_every_gradient(setup):
    tok, ids, encs = setup
    packed_model, padded_model = _models(ids, len(tok))
    packed = collate(encs, packing=True, pad_id=ids["endoftext"])
    padded = collate(encs, packing=False, pad_id=ids["endoftext"])
    assert packed.num_image_tokens == padded.num_image_tokens == 16 + 32
    loss_a, grads_a, out_a = _loss_and_grads(packed_model, packed)
    loss_b, grads_b, out_b = _loss_and_grads(padded_model, padded)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert set(grads_a) == set(grads_b)
    assert any(n.startswith("hf.model.visual.") for n in grads_a)  # the ViT got gradients through the images
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # per-token log-probs agree too (padded rows flattened, pads dropped)
    valid = padded.targets != IGNORE
    torch.testing.assert_close(out_a.logprobs[packed.targets != IGNORE], out_b.logprobs[valid], rtol=1e-5, atol=1e-5)


def test_packed_logprobs_match_hf_forward_per_sample(setup):
    """Packed mRoPE ids + varlen attention + fused head == HF's own forward (its get_rope_index, full logits)."""
    tok, ids, encs = setup
    model, _ = _models(ids, len(tok))
    model.eval()
    packed = collate(encs, packing=True)
    with torch.no_grad():
        got = model(**packed.model_inputs(), targets=packed.targets).logprobs
        hf = model.hf
        hf.config._attn_implementation = "sdpa"
        start = 0
        for e in encs:
            mm = (e.input_ids == ids["image_pad"]).int()[None]
            logits = hf(input_ids=e.input_ids[None], pixel_values=e.pixel_values, image_grid_thw=e.grid_thw,
                        mm_token_type_ids=mm).logits[0]
            want = torch.log_softmax(logits.float(), -1).gather(1, e.targets.clamp_min(0)[:, None])[:, 0]
            want = torch.where(e.targets != IGNORE, want, torch.zeros_like(want))
            torch.testing.assert_close(got[start:start + e.length], want, rtol=1e-4, atol=1e-4)
            start += e.length


def test_vision_freeze_counts_and_errors(setup):
    tok, ids, encs = setup
    model = build_model(ModelCfg(), ids, len(tok))
    counts = param_counts(model)
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert counts["trainable"] == counts["total"] - counts["vision"]
    assert flops_per_token(model, 100) > 6 * counts["llm_layers"]
    batch = collate(encs[:2], packing=True)
    batch.num_image_tokens += 1
    with pytest.raises(ValueError, match="do not match the 17 <|image_pad|> tokens"):
        model(**batch.model_inputs(), targets=batch.targets)
    padded = collate(encs[:1], packing=False)
    inputs = padded.model_inputs()
    inputs["cu_seqlens"] = torch.tensor([0, encs[0].length], dtype=torch.int32)
    model_sdpa = build_model(ModelCfg(attn_implementation="sdpa"), ids, len(tok))
    with pytest.raises(ValueError, match="packed batches need model.attn_implementation"):
        model_sdpa(**inputs, targets=padded.targets)
    with pytest.raises(ValueError, match="model.path='/nonexistent' has no config.json"):
        build_model(ModelCfg(path="/nonexistent"), ids, len(tok))
    assert DataCfg().packing


@pytest.mark.parametrize("std", [0.02, 0.09])
def test_init_std_sets_every_weight_matrix_and_embedding(setup, std):
    """model.init_std reaches the LLM, the ViT, the merger and the head alike; norms start at one, biases at zero."""
    tok, ids, _ = setup
    model = build_model(ModelCfg(freeze_vision=False, init_std=std), ids, len(tok))
    parts = {"hf.model.language_model.", "hf.model.visual.blocks.", "hf.model.visual.patch_embed.",
             "hf.model.visual.merger.", "hf.lm_head."}
    seen = set()
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            assert abs(p.std().item() / std - 1) < 0.1, (name, p.std().item())
            seen |= {part for part in parts if name.startswith(part)}
        elif "norm" in name or name.endswith(("ln_q.weight",)):
            assert torch.all(p == 1), name
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name
    assert seen == parts
    with pytest.raises(ValueError, match="model.init_std"):
        ModelCfg(init_std=0.0)


def test_checkpoint_with_fewer_vocab_rows_than_the_tokenizer_is_refused(setup, tmp_path):
    """Targets are tokenizer ids: a model.path whose embedding has fewer rows would send out-of-range targets to
    the fused head, so the build refuses it (one check per run instead of a host sync per batch)."""
    tok, ids, _ = setup
    hf_config(ModelCfg(), 64, ids).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="64 vocabulary rows, fewer than the tokenizer's"):
        build_model(ModelCfg(path=str(tmp_path)), ids, len(tok))
    build_model(ModelCfg(path=str(tmp_path)), ids, 64, meta=True)  # exactly enough rows: accepted


def test_deterministic_attention_switch(setup):
    tok, ids, _ = setup
    for flag in (False, True):
        model = build_model(ModelCfg(deterministic_attention=flag), ids, len(tok), meta=True)
        attn = [m for n, m in model.named_modules() if n.endswith(("self_attn", ".attn"))]
        assert attn and all(m.ovr_deterministic is flag for m in attn)


def test_freeze_llm_layers(setup):
    """model.freeze_llm_layers=N freezes exactly the first N decoder layers (the rest, the embeddings and the head
    train); the base stage trains every layer; N must leave a layer to train and cannot be negative."""
    from ovr_train.config import load_config
    from ovr_train.sft import base_stage_config

    tok, ids, _ = setup
    model = build_model(ModelCfg(freeze_llm_layers=2), ids, len(tok))
    layers = model.hf.model.language_model.layers
    assert [any(p.requires_grad for p in layer.parameters()) for layer in layers] == [False, False, True, True]
    assert model.hf.lm_head.weight.requires_grad and model.hf.model.language_model.embed_tokens.weight.requires_grad
    cfg = load_config(overrides=["--model.freeze_llm_layers=3"])
    assert base_stage_config(cfg).model.freeze_llm_layers == 0 and cfg.model.freeze_llm_layers == 3
    with pytest.raises(ValueError, match="model.freeze_llm_layers=4: the model has 4 decoder layers"):
        build_model(ModelCfg(freeze_llm_layers=4), ids, len(tok))
    with pytest.raises(ValueError, match="model.freeze_llm_layers=-1: must be >= 0"):
        ModelCfg(freeze_llm_layers=-1)
