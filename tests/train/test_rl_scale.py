"""The RL step's scale defects, each on the tiny default: one prompt format for SFT, RL and eval, over-long prompts
dropped at pool load, a curriculum that cannot fit the budget rejected, one pixel copy and one ViT pass per
distinct image (losses and every gradient equal to a ViT pass per sample), the NaN/inf update guard, the process
group timeout, the reward worker default and the RL memory plan of --dry-run."""

import json
from datetime import timedelta

import pytest
import torch
from PIL import Image

from ovr_train.config import DataCfg, ModelCfg, load_config, longest_response
from ovr_train.data import ImageProcessor, ImageRef, PromptFormat, collate, encode_messages
from ovr_train.model import build_model
from ovr_train.tasks import Item, build_prompt, fitting_prompts, load_items, prompt_length, prompt_pool
from ovr_train.tokenizer import load_tokenizer, special_ids

SYSTEM, INSTRUCTION = "You are a careful solver.", "Put the final answer in \\boxed{}."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(kind="bpe", cache_dir=str(tmp_path_factory.mktemp("tok")))


def _png(path, size, seed=0):
    Image.effect_noise(size, 40 + seed).convert("RGB").save(path)
    return str(path)


# ---- one prompt format -----------------------------------------------------------------------------------------------


def test_one_prompt_format_for_sft_rl_and_eval(tok, tmp_path):

    ids = special_ids(tok)
    proc = ImageProcessor(112 * 112, 112 * 224)
    _png(tmp_path / "a.png", (140, 100))
    rows = [{"id": "t", "question": "Compute 2 + 3.", "answer": "5"},
            {"id": "i", "question": "How many dots?", "answer": "3", "image": "a.png"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(None, [f"--data.system_prompt={SYSTEM}", f"--data.answer_instruction={INSTRUCTION}",
                             f"--rl.prompt_files=[{tmp_path / 'p.jsonl'}]"])
    fmt = PromptFormat.of(cfg.data)
    rl_items = prompt_pool(cfg.rl, 0)  # what the RL stage trains on
    eval_items = load_items(tmp_path / "p.jsonl")  # what the eval stage measures
    assert [it.messages for it in rl_items] == [it.messages for it in eval_items]
    for item in rl_items:
        prompt = build_prompt(item, tok, ids, proc, fmt)
        # SFT on the same question with a reply: its tokens up to the reply are the rollout prompt, token for token
        sft = encode_messages(fmt.apply(item.messages + [("assistant", ["\\boxed{5}"])]), tok, ids, proc)
        assert sft.input_ids[:len(prompt.token_ids)].tolist() == prompt.token_ids
        text = tok.decode(prompt.token_ids)
        assert text.count(SYSTEM) == 1 and text.count(INSTRUCTION) == 1
        assert prompt_length(item, tok, ids, proc, fmt) == len(prompt.token_ids)
    # the instruction is not doubled where the question asks for \boxed already, nor is the system turn
    asked = [("system", ["own"]), ("user", ["Solve; answer in \\boxed{}."])]
    assert PromptFormat(SYSTEM, INSTRUCTION).apply(asked) == asked
    # the tiny default's format is unchanged: no system turn, no instruction (its image questions carry one)
    tiny = PromptFormat.of(load_config(None).data)
    assert tiny.apply([("user", ["Compute 2 + 3."])]) == [("user", ["Compute 2 + 3."])]


def test_7b_cold_start_and_rl_configs_share_the_prompt_format():
    from ovr_train.config import CONFIG_DIR

    sft, rl = (PromptFormat.of(load_config(str(CONFIG_DIR / f"ovr_7b_{n}.yaml")).data) for n in ("coldstart", "rl"))
    assert sft == rl == PromptFormat("You are a helpful assistant.", INSTRUCTION)


def test_prompt_length_counts_resized_images(tok, tmp_path):
    ids = special_ids(tok)
    proc = ImageProcessor(28 * 28 * 4, 28 * 28 * 40)
    fmt = PromptFormat(SYSTEM, INSTRUCTION)
    for i, size in enumerate([(30, 500), (333, 77), (640, 480), (28, 28)]):
        refs = [ImageRef(_png(tmp_path / f"{i}.png", size, i))] * (1 + i % 2)
        item = Item(str(i), [("user", [*refs, "Which?"])], "1")
        assert prompt_length(item, tok, ids, proc, fmt) == len(build_prompt(item, tok, ids, proc, fmt).token_ids)


# ---- length: the pool filter and the config check --------------------------------------------------------------------


def test_curriculum_must_leave_room_for_a_prompt():
    with pytest.raises(ValueError, match=r"rl.length_curriculum=\[\[0, 96\], \[5, 4096\]\]: its longest response "
                                         r"\(4096 tokens\) leaves no room for a prompt in data.token_budget=4096"):
        load_config(None, ["--rl.length_curriculum=[[0, 96], [5, 4096]]"])
    cfg = load_config(str(__import__("ovr_train.config").config.CONFIG_DIR / "ovr_7b_rl.yaml"))
    assert longest_response(cfg.rl) == 49152 < cfg.data.token_budget
    cfg.rl.length_curriculum, cfg.rl.max_new_tokens = [[10, 64]], 128  # max_new_tokens holds until step 10
    assert longest_response(cfg.rl) == 128


def test_fitting_prompts_counts_and_names_the_limit():

    kept, dropped = fitting_prompts(["a", "b", "c"], [10, 50, 20], 20)
    assert (kept, dropped) == (["a", "c"], 1)
    with pytest.raises(ValueError, match="every one of the 2 RL prompts is longer than 5 tokens.*shortest prompt: 9"):
        fitting_prompts(["a", "b"], [9, 12], 5)


# ---- one pixel copy and one ViT pass per distinct image --------------------------------------------------------------


def _rollout_like(tok, tmp_path, n):
    """n samples of each of two image prompts and one text prompt, built as rl.py builds them."""
    from ovr_train.rl import rollout_sequence

    ids = special_ids(tok)
    proc = ImageProcessor(112 * 112, 112 * 224)
    items = [Item("a", [("user", [ImageRef(_png(tmp_path / "a.png", (224, 112))), "How many?"])], "1"),
             Item("b", [("user", ["Compute 2 + 3."])], "5"),
             Item("c", [("user", ["Which colour?", ImageRef(_png(tmp_path / "c.png", (112, 112), 3))])], "2")]
    prompts = [build_prompt(it, tok, ids, proc, PromptFormat()) for it in items]
    g = torch.Generator().manual_seed(0)
    first = max(ids.values()) + 1  # ordinary tokens: a sampled image pad would need an image
    seqs = [rollout_sequence(p, torch.randint(first, first + 200, (3 + j,), generator=g).tolist(), ids, 2)
            for p in prompts for j in range(n)]
    return ids, prompts, seqs


def test_samples_share_their_prompts_pixels_in_one_copy(tok, tmp_path):
    ids, prompts, seqs = _rollout_like(tok, tmp_path, 4)
    assert all(s.pixel_values is prompts[0].pixel_values for s in seqs[:4])  # references, no copy per sample
    batch = collate(seqs, True, ids["endoftext"])
    distinct = prompts[0].pixel_values.shape[0] + prompts[2].pixel_values.shape[0]
    assert batch.pixel_values.shape[0] == distinct  # was 4x: one copy per sample
    assert batch.image_grid_thw.shape[0] == 2
    assert batch.num_image_tokens == 4 * (32 + 16) == int((batch.input_ids == ids["image_pad"]).sum())
    assert batch.image_feature_index.shape == (batch.num_image_tokens,)
    # distinct images (SFT's samples): no index, the old one-to-one layout
    assert collate(seqs[::4], True, ids["endoftext"]).image_feature_index is None


def _copies(seqs):
    """The same sequences, each with its own copy of the pixels (the one-ViT-pass-per-sample path)."""
    from dataclasses import replace

    return [replace(s, pixel_values=s.pixel_values.clone()) if s.pixel_values is not None else s for s in seqs]


@pytest.mark.parametrize("packing", [True, False])
def test_vit_once_per_distinct_image_equals_once_per_sample(tok, tmp_path, packing):
    ids, prompts, seqs = _rollout_like(tok, tmp_path, 3)
    attn = "ovr_flash_varlen" if packing else "sdpa"
    model = build_model(ModelCfg(freeze_vision=False, init_seed=3, attn_implementation=attn), ids, len(tok))
    patches = []
    model.visual.register_forward_pre_hook(lambda mod, args: patches.append(args[0].shape[0]))
    results = []
    for batch in (collate(seqs, packing, ids["endoftext"]), collate(_copies(seqs), packing, ids["endoftext"])):
        model.zero_grad(set_to_none=True)
        out = model(**batch.model_inputs(), targets=batch.targets)
        loss = -out.logprobs.sum() / batch.num_loss_tokens
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    distinct = prompts[0].pixel_values.shape[0] + prompts[2].pixel_values.shape[0]
    assert patches == [distinct, 3 * distinct]  # the ViT ran on each image once, not once per sample
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    assert set(grads_a) == set(grads_b) and any(n.startswith("hf.model.visual.") for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ---- the process group timeout and the reward workers ----------------------------------------------------------------


def test_process_group_timeout_is_passed(monkeypatch):
    from ovr_train import dist

    seen = {}

    def fake_init(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(dist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.dist, "init_process_group", fake_init)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so what init_distributed sets is undone after the test
        monkeypatch.delenv(key)
    cfg = load_config(None, ["--dist.timeout_s=1234"])
    with pytest.raises(RuntimeError, match="stop here"):
        dist.init_distributed(cfg.dist)
    assert seen["timeout"] == timedelta(seconds=1234)
    assert load_config(None).dist.timeout_s >= 3600  # a 48k-token rollout skew, not NCCL's 10 minutes
    with pytest.raises(ValueError, match="dist.timeout_s=0.0: must be > 0"):
        load_config(None, ["--dist.timeout_s=0"])


def test_reward_workers_default_to_cores_per_rank(monkeypatch):
    from ovr_train import rewards

    monkeypatch.setattr(rewards.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert load_config(None).rl.reward_workers == 0  # auto
    assert rewards.default_num_workers(0) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert rewards.default_num_workers(0) == 1
    assert rewards.default_num_workers(5) == 5
    with pytest.raises(ValueError, match="rl.num_prompts/reward_workers"):
        load_config(None, ["--rl.reward_workers=-1"])


# ---- one vision switch -----------------------------------------------------------------------------------------------


def test_one_vision_switch():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['rl.train_vision'\]"):
        load_config(None, ["--rl.train_vision=false"])
    assert not load_config(None).model.freeze_vision  # the tiny default trains the ViT in RL, as before
    assert DataCfg().answer_instruction == INSTRUCTION


# ---- the RL memory plan of --dry-run ----------------------------------------------------------------------------------


def test_dry_run_prints_the_rl_memory_plan_at_7b(capsys):
    from ovr_train import launch
    from ovr_train.config import CONFIG_DIR

    seven_b = str(CONFIG_DIR / "ovr_7b_rl.yaml")
    launch.main(["--stage", "rl", "--config", seven_b, "--dry-run"])
    out = capsys.readouterr().out
    assert "RL step memory plan per GPU (FORMULA, an estimate from parameter counts, not measured; 8 GPUs" in out
    for what in ("policy fp32 shard + AdamW", "critic fp32 shard + AdamW", "vLLM weights (bf16, full copy)",
                 "vLLM KV cache", "gradients (fp32 shard)", "LLM activations", "ViT activations",
                 "largest parameter, gathered (streamed push)"):
        assert what in out, what
    assert "-> the RL step fits in 80 GiB (formula" in out
    cfg = load_config(seven_b)
    est = launch.dry_run(cfg, "rl")
    plan, p = est["rl"], 8.292e9  # Qwen2.5-VL-7B: 8.29B parameters, all trained in RL
    assert plan["policy_shard_adamw"] == pytest.approx(12 * p / 8 / 2**30, rel=1e-3)
    assert plan["rollout_vllm_weights"] == pytest.approx(2 * p / 2**30, rel=1e-3)
    assert plan["kv_bytes_per_token"] == 2 * 28 * 4 * 128 * 2
    assert plan["vit_patches"] == (65536 - 49152) * 4
    assert plan["reference_shard"] == 0.0 and "KL reference" not in out  # rl.kl_coef = 0: no reference model
    with_kl = launch.dry_run(load_config(seven_b, ["--rl.kl_coef=0.001"]), "rl")["rl"]
    assert with_kl["reference_shard"] == pytest.approx(4 * p / 8 / 2**30, rel=1e-3)
    assert with_kl["train_peak"] == pytest.approx(plan["train_peak"] + with_kl["reference_shard"])
    capsys.readouterr()
    launch.main(["--stage", "rl", "--config", seven_b, "--dry-run", "--run.gpu_memory_gib=60"])
    assert "-> the RL step does NOT fit (train) in 60 GiB" in capsys.readouterr().out
    launch.main(["--stage", "sft", "--config", seven_b, "--dry-run"])
    assert "RL step memory plan" not in capsys.readouterr().out
