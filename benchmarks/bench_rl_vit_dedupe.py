"""The RL step's policy forward + backward on image prompts with n samples each: the ViT once per distinct image
(collate keeps one pixel copy per prompt, features scattered to its n samples) vs the baseline "per_sample_vit"
(each sample carries its own copy of the pixels and the ViT runs on every copy, as before).

Tiny default model (ViT trained, as in RL; sdpa attention on padded rows, so every op is a native torch one on
CPU), 2 prompts with a 224 x 224 image (256 patches, 64 image tokens) and n = 4 or 16 sampled responses of 24
tokens each, in one micro-batch. extra_info: vit_patches of each path
and speedup_vs_per_sample_vit (baseline median / ours, same run). CPU here; the `gpu` variant on a GPU.
"""

from dataclasses import replace

import pytest
import torch
from PIL import Image

from ovr_train.config import ModelCfg
from ovr_train.data import ImageProcessor, ImageRef, PromptFormat, collate
from ovr_train.model import build_model
from ovr_train.rl import rollout_sequence
from ovr_train.tasks import Item, build_prompt
from ovr_train.tokenizer import load_tokenizer, special_ids

PROMPTS, RESPONSE = 2, 24


def _setup(tmp_path, n, device):
    tok = load_tokenizer(kind="bpe", cache_dir=str(tmp_path))
    ids = special_ids(tok)
    proc = ImageProcessor(224 * 224, 224 * 224)
    prompts = []
    for g in range(PROMPTS):
        Image.effect_noise((224, 224), 30 + g).convert("RGB").save(tmp_path / f"{g}.png")
        item = Item(str(g), [("user", [ImageRef(str(tmp_path / f"{g}.png")), "How many dots are there?"])], "1")
        prompts.append(build_prompt(item, tok, ids, proc, PromptFormat()))
    gen = torch.Generator().manual_seed(0)
    first = max(ids.values()) + 1  # sampled tokens are ordinary ones (a sampled image pad would need an image)
    seqs = [rollout_sequence(p, torch.randint(first, first + 300, (RESPONSE,), generator=gen).tolist(), ids, 2)
            for p in prompts for _ in range(n)]
    copies = [replace(s, pixel_values=s.pixel_values.clone()) for s in seqs]
    model = build_model(ModelCfg(freeze_vision=False, attn_implementation="sdpa"), ids, len(tok)).to(device)
    shared = collate(seqs, False, ids["endoftext"]).to(device)
    per_sample = collate(copies, False, ids["endoftext"]).to(device)
    assert shared.image_feature_index is not None and per_sample.image_feature_index is None
    return model, shared, per_sample


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch.model_inputs(), targets=batch.targets)
    (-out.logprobs.sum() / batch.num_loss_tokens).backward()


def _vit(model, batch):
    model.zero_grad(set_to_none=True)
    model.visual(batch.pixel_values, grid_thw=batch.image_grid_thw).pooler_output.sum().backward()


def _run(bench, tmp_path, n, device, rounds, op=_step):
    model, shared, per_sample = _setup(tmp_path, n, device)
    op(model, shared)  # untimed: first-call allocations, kernel compiles
    bench(op, model, shared, rounds=rounds, warmup_rounds=1)
    base = bench.time_baseline("per_sample_vit", op, model, per_sample, rounds=rounds)
    ratio = bench.ratio_vs("per_sample_vit", base)
    bench.extra_info.update(n=n, prompts=PROMPTS, tokens=int(shared.num_tokens), vit_patches=shared.pixel_values.shape[0],
                            per_sample_vit_patches=per_sample.pixel_values.shape[0])
    if ratio is not None:
        print(f"{op.__name__} n={n}: ViT once per image {bench.median_s() * 1e3:.1f} ms vs per sample {base * 1e3:.1f} ms "
              f"({ratio:.2f}x; ViT patches {shared.pixel_values.shape[0]} vs {per_sample.pixel_values.shape[0]})")


@pytest.mark.parametrize("n", [4, 16])
def test_rl_step_vit_dedupe_cpu(cpu_bench, tmp_path, n):
    torch.set_num_threads(2)
    _run(cpu_bench, tmp_path, n, "cpu", rounds=3)


@pytest.mark.parametrize("n", [4, 16])
def test_vit_pass_dedupe_cpu(cpu_bench, tmp_path, n):
    torch.set_num_threads(2)
    _run(cpu_bench, tmp_path, n, "cpu", rounds=3, op=_vit)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4, 16])
def test_rl_step_vit_dedupe_gpu(gpu_bench, tmp_path, n):
    _run(gpu_bench, tmp_path, n, "cuda", rounds=10)
