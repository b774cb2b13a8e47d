"""The RL step's policy forward + backward on image prompts with n samples each, two savings on a prompt group:

1. `vit_dedupe`: the ViT once per distinct image (collate keeps one pixel copy per prompt, features scattered to
   its n samples) vs the baseline "per_sample_vit" (each sample carries its own copy of the pixels and the ViT runs
   on every copy). Tiny default model with the ViT trained and sdpa attention on padded rows, so every op is a
   native torch one on CPU; responses of 24 tokens.
2. `share_prompts`: the prompt packed once beside its n samples (rl.share_prompts: `rl.rollout_group`, the samples
   attend to the one copy through the varlen attention's key index) vs the baseline "copy_per_sample" (prompt +
   response per sample, packed; the ViT once per image in both). Tiny default model, ViT frozen as in RL, ovr's
   packed varlen attention (torch SDPA over padded groups on CPU, the Triton kernel on a GPU); responses of 8-40
   tokens.

Both: 2 prompts with a 224 x 224 image (256 patches, 64 image tokens, ~80-token prompts), n = 4 or 16, one
micro-batch. extra_info: the baseline's median, speedup_vs_<baseline> (baseline median / ours, same run), ViT
patches or packed tokens of each layout. CPU here; the `gpu` variants on a GPU.
"""

from dataclasses import replace

import pytest
import torch
from PIL import Image

from ovr_train.config import ModelCfg
from ovr_train.data import ImageProcessor, ImageRef, PromptFormat, collate
from ovr_train.model import build_model
from ovr_train.rl import rollout_group, rollout_sequence
from ovr_train.tasks import Item, build_prompt
from ovr_train.tokenizer import load_tokenizer, special_ids

PROMPTS = 2


def _groups(tmp_path, n, lengths):
    """(ids, tokenizer size, [(prompt, n responses)]): responses of `lengths(generator)` tokens each."""
    tok = load_tokenizer(kind="bpe", cache_dir=str(tmp_path))
    ids = special_ids(tok)
    proc = ImageProcessor(224 * 224, 224 * 224)
    gen = torch.Generator().manual_seed(0)
    first = max(ids.values()) + 1  # sampled tokens are ordinary ones (a sampled image pad would need an image)
    groups = []
    for g in range(PROMPTS):
        Image.effect_noise((224, 224), 30 + g).convert("RGB").save(tmp_path / f"{g}.png")
        item = Item(str(g), [("user", [ImageRef(str(tmp_path / f"{g}.png")), "How many dots are there?"])], "1")
        prompt = build_prompt(item, tok, ids, proc, PromptFormat())
        groups.append((prompt, [torch.randint(first, first + 300, (lengths(gen),), generator=gen).tolist()
                                for _ in range(n)]))
    return ids, len(tok), groups


def _vit_layouts(tmp_path, n, device):
    ids, vocab, groups = _groups(tmp_path, n, lambda gen: 24)
    seqs = [rollout_sequence(p, r, ids, 2) for p, rs in groups for r in rs]
    copies = [replace(s, pixel_values=s.pixel_values.clone()) for s in seqs]
    model = build_model(ModelCfg(freeze_vision=False, attn_implementation="sdpa"), ids, vocab).to(device)
    ours = collate(seqs, False, ids["endoftext"]).to(device)
    base = collate(copies, False, ids["endoftext"]).to(device)
    assert ours.image_feature_index is not None and base.image_feature_index is None
    return model, ours, base, {"vit_patches": ours.pixel_values.shape[0],
                               "per_sample_vit_patches": base.pixel_values.shape[0]}


def _share_layouts(tmp_path, n, device):
    ids, vocab, groups = _groups(tmp_path, n, lambda gen: int(torch.randint(8, 41, (1,), generator=gen)))
    model = build_model(ModelCfg(freeze_vision=True), ids, vocab).to(device).train()
    ours = collate([rollout_group(p, rs, ids, 2) for p, rs in groups], True, ids["endoftext"]).to(device)
    base = collate([rollout_sequence(p, r, ids, 2) for p, rs in groups for r in rs], True,
                   ids["endoftext"]).to(device)
    assert ours.key_index is not None and ours.num_loss_tokens == base.num_loss_tokens
    return model, ours, base, {"tokens": ours.num_tokens, "copy_per_sample_tokens": base.num_tokens,
                               "response_tokens": ours.num_loss_tokens}


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch.model_inputs(), targets=batch.targets)
    (-out.logprobs.sum() / batch.num_loss_tokens).backward()


def _vit(model, batch):
    model.zero_grad(set_to_none=True)
    model.visual(batch.pixel_values, grid_thw=batch.image_grid_thw).pooler_output.sum().backward()


def _run(bench, layouts, baseline, tmp_path, n, device, rounds, op=_step):
    model, ours, base, info = layouts(tmp_path, n, device)
    op(model, ours)  # untimed: first-call allocations, kernel compiles
    op(model, base)
    bench(op, model, ours, rounds=rounds, warmup_rounds=1)
    base_s = bench.time_baseline(baseline, op, model, base, rounds=rounds)
    ratio = bench.ratio_vs(baseline, base_s)
    bench.extra_info.update(n=n, prompts=PROMPTS, **info)
    if ratio is not None:
        print(f"{layouts.__name__} {op.__name__} n={n}: {bench.median_s() * 1e3:.1f} ms vs {baseline} "
              f"{base_s * 1e3:.1f} ms ({ratio:.2f}x; {info})")


@pytest.mark.parametrize("n", [4, 16])
def test_rl_step_vit_dedupe_cpu(cpu_bench, tmp_path, n):
    torch.set_num_threads(2)
    _run(cpu_bench, _vit_layouts, "per_sample_vit", tmp_path, n, "cpu", rounds=3)


@pytest.mark.parametrize("n", [4, 16])
def test_vit_pass_dedupe_cpu(cpu_bench, tmp_path, n):
    torch.set_num_threads(2)
    _run(cpu_bench, _vit_layouts, "per_sample_vit", tmp_path, n, "cpu", rounds=3, op=_vit)


@pytest.mark.parametrize("n", [4, 16])
def test_rl_step_share_prompts_cpu(cpu_bench, tmp_path, n):
    torch.set_num_threads(2)
    _run(cpu_bench, _share_layouts, "copy_per_sample", tmp_path, n, "cpu", rounds=5)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4, 16])
def test_rl_step_vit_dedupe_gpu(gpu_bench, tmp_path, n):
    _run(gpu_bench, _vit_layouts, "per_sample_vit", tmp_path, n, "cuda", rounds=10)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4, 16])
def test_rl_step_share_prompts_gpu(gpu_bench, tmp_path, n):
    _run(gpu_bench, _share_layouts, "copy_per_sample", tmp_path, n, "cuda", rounds=10)
