"""A rollout prompt packed once with its samples (rl.share_prompts): the packed layout (branches, key segments, key
rows), log-probs, entropies and every gradient equal to packing the prompt once per sample, the token budget
splitting a group, and pack_rollouts' order and boundaries with and without sharing."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from ovr_kernels.hf import packed_forward_kwargs
from ovr_train import rl
from ovr_train.config import DataCfg, ModelCfg
from ovr_train.data import IGNORE, Encoded, ImageProcessor, ImageRef, PromptFormat, collate
from ovr_train.model import build_model
from ovr_train.tasks import Item, build_prompt
from ovr_train.tokenizer import load_tokenizer, special_ids


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(kind="bpe", cache_dir=str(tmp_path_factory.mktemp("tok")))


def _prompts(tok, tmp_path):
    """Two image prompts (one wide image, one square) and a text prompt, built as rl.py builds them."""
    proc = ImageProcessor(112 * 112, 112 * 224)
    paths = []
    for name, size, seed in (("a.png", (224, 112), 0), ("c.png", (112, 112), 3)):
        Image.effect_noise(size, 40 + seed).convert("RGB").save(tmp_path / name)
        paths.append(str(tmp_path / name))
    items = [Item("a", [("user", [ImageRef(paths[0]), "How many?"])], "1"),
             Item("b", [("user", ["Compute 2 + 3."])], "5"),
             Item("c", [("user", ["Which colour?", ImageRef(paths[1])])], "2")]
    ids = special_ids(tok)
    return ids, [build_prompt(it, tok, ids, proc, PromptFormat()) for it in items]


def _responses(ids, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = max(ids.values()) + 1  # ordinary tokens: a sampled image pad would need an image
    return [torch.randint(first, first + 200, (n,), generator=g).tolist() for n in lengths]


def test_group_layout_matches_one_sequence_per_response(tok, tmp_path):
    ids, prompts = _prompts(tok, tmp_path)
    prompt, responses = prompts[0], _responses(ids, [3, 0, 5])
    group = rl.rollout_group(prompt, responses, ids, 2)
    p = len(prompt.token_ids)
    assert group.branches == (4, 1, 6) and group.length == p - 1 + 11
    assert group.pixel_values is prompt.pixel_values
    at = p - 1
    for response, n in zip(responses, group.branches):
        alone = rl.rollout_sequence(prompt, response, ids, 2)
        # the branch is the single sequence's tail from the prompt's last token on: tokens, targets, positions
        assert torch.equal(group.input_ids[at:at + n], alone.input_ids[p - 1:])
        assert torch.equal(group.targets[at:at + n], alone.targets[p - 1:])
        assert torch.equal(group.mrope_ids[:, at:at + n], alone.mrope_ids[:, p - 1:])
        assert torch.equal(group.mrope_ids[:, :p - 1], alone.mrope_ids[:, :p - 1])
        at += n
    assert group.num_loss_tokens == 8
    one = rl.rollout_group(prompt, responses[:1], ids, 2)  # one response: the plain sequence
    assert one.branches == () and torch.equal(one.input_ids, rl.rollout_sequence(prompt, responses[0], ids, 2).input_ids)


def test_collate_key_segments_and_rows():
    """A 3-token prefix with branches of 2 and 1 tokens beside a plain 2-token sample: query segments
    [prefix + branch 1, branch 2, plain], key segments [prefix + branch 1, prefix + branch 2, plain]."""
    branched = Encoded(torch.arange(6), torch.full((6,), IGNORE), torch.zeros(3, 6, dtype=torch.long),
                       branches=(2, 1))
    plain = Encoded(torch.arange(2), torch.full((2,), IGNORE), torch.zeros(3, 2, dtype=torch.long))
    batch = collate([branched, plain])
    assert batch.cu_seqlens.tolist() == [0, 5, 6, 8] and batch.max_seqlen == 5
    assert batch.key_cu_seqlens.tolist() == [0, 5, 9, 11] and batch.key_max_seqlen == 5
    assert batch.key_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7]
    assert batch.position_ids[0, 0].tolist() == [0, 1, 2, 3, 4, 3, 0, 1]  # branch 2 continues the prefix
    assert collate([plain, plain]).key_index is None  # no branch: keys are the queries, as before
    with pytest.raises(ValueError, match="need packing=True"):
        collate([branched], packing=False)
    with pytest.raises(ValueError, match="do not fit a sample of 6 tokens"):
        collate([Encoded(torch.arange(6), torch.full((6,), IGNORE), torch.zeros(3, 6, dtype=torch.long),
                         branches=(5, 2))])


def test_forward_kwargs_validate_the_key_layout():
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="key_cu_seqlens needs key_index"):
        packed_forward_kwargs(cu, 4, key_cu_seqlens=cu)
    with pytest.raises(ValueError, match="key_cu_seqlens must be an int32 tensor shaped like"):
        packed_forward_kwargs(cu, 4, key_cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32),
                              key_index=torch.arange(4))
    with pytest.raises(ValueError, match="key_index must be a 1-D int64"):
        packed_forward_kwargs(cu, 4, key_cu_seqlens=cu, key_index=torch.arange(4, dtype=torch.int32))
    kw = packed_forward_kwargs(cu, 4, key_cu_seqlens=cu, key_max_seqlen=4, key_index=torch.arange(4))
    assert kw["max_length_k"] == 4 and kw["ovr_key_index"].tolist() == [0, 1, 2, 3]


def _run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch.model_inputs(), targets=batch.targets)
    keep = batch.targets != IGNORE
    logprobs, entropy = out.logprobs[keep], out.entropy[keep]
    (-(logprobs * torch.linspace(0.5, 1.5, logprobs.numel(), device=logprobs.device)).sum() + 0.1 * entropy.sum()).backward()
    return logprobs.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None}


def test_shared_prompt_logprobs_and_gradients_equal_one_copy_per_sample(tok, tmp_path):
    """Three prompts (two with images) x samples of 1, 0, 4, 17 tokens, with GQA, the model in float64: the shared
    packing gives the log-probs, entropies and every gradient (ViT included) of one prompt copy per sample, in the
    same token order. The log-prob head returns fp32, so gradients agree to ~1e-7 of their scale, not to fp64's."""
    ids, prompts = _prompts(tok, tmp_path)
    model = build_model(ModelCfg(freeze_vision=False, init_seed=5, init_std=0.1), ids, len(tok)).double().train()
    for p in prompts:
        if p.pixel_values is not None:
            p.pixel_values = p.pixel_values.double()
    lengths = [1, 0, 4, 17]
    groups = [(p, _responses(ids, lengths, seed=k)) for k, p in enumerate(prompts)]
    shared = collate([rl.rollout_group(p, rs, ids, 2) for p, rs in groups], True, ids["endoftext"])
    single = collate([rl.rollout_sequence(p, r, ids, 2) for p, rs in groups for r in rs], True, ids["endoftext"])
    assert shared.num_tokens < single.num_tokens - 2 * (len(prompts[0].token_ids) - 1)
    assert shared.num_loss_tokens == single.num_loss_tokens == 3 * sum(lengths)
    lp_a, ent_a, grads_a = _run(model, shared)
    lp_b, ent_b, grads_b = _run(model, single)
    assert lp_a.abs().max() > 1.0  # an untrained model: the comparison is over real values
    torch.testing.assert_close(lp_a, lp_b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent_a, ent_b, rtol=1e-10, atol=1e-10)
    assert set(grads_a) == set(grads_b) and any(n.startswith("hf.model.visual.") for n in grads_a)
    for name in grads_a:
        scale = float(grads_b[name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=2e-6 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
def test_shared_prompt_logprobs_equal_one_copy_per_sample_gpu(tok, tmp_path):
    """The same on CUDA, fp32: ovr's Triton varlen kernel (query segments shorter than their key segments, causal
    aligned bottom-right) and the Triton log-prob head; agreement to fp32 accumulation order."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ids, prompts = _prompts(tok, tmp_path)
    model = build_model(ModelCfg(freeze_vision=True, init_seed=5, init_std=0.1, liger=False), ids,
                        len(tok)).cuda().train()
    groups = [(p, _responses(ids, [1, 0, 4, 17, 70], seed=k)) for k, p in enumerate(prompts)]
    shared = collate([rl.rollout_group(p, rs, ids, 2) for p, rs in groups], True, ids["endoftext"]).to("cuda")
    single = collate([rl.rollout_sequence(p, r, ids, 2) for p, rs in groups for r in rs], True,
                     ids["endoftext"]).to("cuda")
    lp_a, ent_a, grads_a = _run(model, shared)
    lp_b, ent_b, grads_b = _run(model, single)
    torch.testing.assert_close(lp_a, lp_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent_a, ent_b, rtol=1e-4, atol=1e-4)
    for name in grads_a:
        scale = float(grads_b[name].abs().max())
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-3, atol=1e-4 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _samples(ids, per_prompt, lengths):
    out = []
    for p in range(per_prompt):
        for r in _responses(ids, lengths, seed=p):
            out.append(SimpleNamespace(prompt_index=p, token_ids=r))
    return out


@pytest.mark.parametrize("share", [True, False])
def test_pack_rollouts_order_and_boundaries(tok, tmp_path, share):
    """Every trained sample once, response boundaries in token order, the targets of each response where its
    boundaries say; a group longer than the budget is split into runs that each carry the prompt."""
    ids, prompts = _prompts(tok, tmp_path)
    samples = _samples(ids, 3, [5, 9, 2, 30])
    trained = [b for b in range(len(samples)) if b != 6]
    longest = max(len(p.token_ids) for p in prompts)
    budget = longest + 40  # a whole group (~longest + 50) does not fit: it is split
    dcfg = DataCfg(token_budget=budget, max_seq_len=budget)
    micro, order, cu_T, num_tokens, _ = rl.pack_rollouts(prompts, samples, trained, prompts[0], ids, 2, dcfg,
                                                         torch.device("cpu"), share)
    assert sorted(order) == trained and num_tokens == sum(len(samples[b].token_ids) for b in trained)
    assert cu_T.tolist() == [0, *torch.tensor([len(samples[b].token_ids) for b in order]).cumsum(0).tolist()]
    got = torch.cat([mb.batch.targets[mb.loss_index] for mb in micro])
    want = torch.tensor([t for b in order for t in samples[b].token_ids])
    assert torch.equal(got, want)
    assert all(mb.batch.num_tokens <= budget for mb in micro)
    branched = [s for mb in micro for s in [mb.batch] if s.key_index is not None]
    assert bool(branched) == share
    if share:
        packed = sum(mb.batch.num_tokens for mb in micro)
        single = sum(len(prompts[samples[b].prompt_index].token_ids) + len(samples[b].token_ids) for b in trained)
        assert packed < single
