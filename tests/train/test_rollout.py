"""HF rollout engine on a tiny random Qwen2.5-VL: sampling logprobs match a teacher-forced forward, images work,
blocked tokens are never sampled, the sampler draws from the model's distribution, stops, weight pushes."""

import pytest
import torch
from PIL import Image

from ovr_train.rollout import HFEngine, Prompt, blocked_token_ids

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
EOS, PAD, VSTART, VEND, IMG = 258, 256, 259, 260, 261
VOCAB = 264  # 256 bytes + 7 specials + 1 unused row (must be blocked too)
BLOCKED = [256, 257, 259, 260, 261, 262, 263]


def byte_tokenizer():
    """Byte-level tokenizer without merges: ids 0-255 are bytes, then the Qwen2.5-VL specials (ids 256-262)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    assert fast.convert_tokens_to_ids("<|im_end|>") == EOS
    return fast


def tiny_vl(seed):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": None, "eos_token_id": EOS, "pad_token_id": PAD}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "fullatt_block_indexes": [0], "window_size": 112}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=262,
                           vision_start_token_id=VSTART, vision_end_token_id=VEND)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a random init is nearly uniform: sharpen it so samples differ visibly between models
        model.lm_head.weight.mul_(20.0)
    return model


def image_prompt(tok, color, text="how many?"):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    out = proc(images=[Image.new("RGB", (56, 56), color)], return_tensors="pt")
    num_tokens = int(out["image_grid_thw"].prod()) // 4
    ids = [257] + tok.encode("user\n") + [VSTART] + [IMG] * num_tokens + [VEND] + tok.encode(text) + [EOS, 257]
    return Prompt(ids, pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])


def text_prompt(tok, text):
    return Prompt([257] + tok.encode(text) + [EOS, 257])


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_vl(0)


def engine_for(model, tok, **kw):
    kw.setdefault("stop_token_ids", [EOS])
    return HFEngine(model, tok, pad_token_id=PAD, blocked_token_ids=BLOCKED, **kw)


@torch.no_grad()
def teacher_forced_logprobs(model, prompt, response, temperature):
    """Unpadded forward over prompt + response with the trainer's own 3-D mRoPE ids (ovr_train.data), which are
    what the policy is trained with: the engine must sample from exactly this distribution."""
    from ovr_train.data import mrope_position_ids

    ids = torch.tensor([prompt.token_ids + response])
    kwargs = {"position_ids": mrope_position_ids(ids[0], prompt.image_grid_thw, IMG, 2)[:, None, :]}
    if prompt.pixel_values is not None:
        kwargs |= {"pixel_values": prompt.pixel_values, "image_grid_thw": prompt.image_grid_thw}
    logits = model(input_ids=ids, **kwargs).logits[0].float()
    p = len(prompt.token_ids)
    logp = torch.log_softmax(logits[p - 1: p - 1 + len(response)] / temperature, dim=-1)
    return logp.gather(1, torch.tensor(response)[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forcing_mixed_image_and_text(model, tok, temperature):
    """Left-padded batch mixing image and text prompts of different lengths; every sample's sampling logprobs
    equal the logprobs of a separate, unpadded forward over prompt + response (trainer-vs-rollout gap ~ 0)."""
    prompts = [image_prompt(tok, (255, 0, 0)), text_prompt(tok, "2+3="), image_prompt(tok, (0, 0, 255), "count"),
               text_prompt(tok, "a much longer text prompt here")]
    samples = engine_for(model, tok).generate(prompts, n=2, max_new_tokens=12, temperature=temperature, seed=1)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]
    for s in samples:
        assert len(s.token_ids) == len(s.logprobs) >= 1
        assert s.finish_reason in ("stop", "length")
        assert (s.finish_reason == "length") == (len(s.token_ids) == 12 and EOS not in s.token_ids)
        want = teacher_forced_logprobs(model, prompts[s.prompt_index], s.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=2e-5, rtol=1e-5)
        assert s.text == tok.decode(s.token_ids, skip_special_tokens=True)


def test_image_changes_the_distribution(model, tok):
    red, blue = image_prompt(tok, (255, 0, 0)), image_prompt(tok, (0, 0, 255))
    response = [65, 66, 67]
    assert not torch.allclose(teacher_forced_logprobs(model, red, response, 1.0),
                              teacher_forced_logprobs(model, blue, response, 1.0), atol=1e-4)


def test_seed_reproducible_and_blocked_tokens_never_sampled(model, tok):
    engine = engine_for(model, tok)
    prompts = [text_prompt(tok, "x"), image_prompt(tok, (0, 255, 0))]
    a = engine.generate(prompts, n=8, max_new_tokens=12, seed=5)
    b = engine.generate(prompts, n=8, max_new_tokens=12, seed=5)
    c = engine.generate(prompts, n=8, max_new_tokens=12, seed=6)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]
    sampled = {t for s in a + c for t in s.token_ids}
    assert not sampled & set(BLOCKED)


def test_sampler_draws_from_the_model_distribution(model, tok):
    """One decode step, 4000 samples: empirical token frequencies match softmax(logits / T) renormalised over the
    allowed tokens (total variation well under what a wrong temperature or a greedy pick would give)."""
    prompt = text_prompt(tok, "q")
    temperature = 1.5
    samples = engine_for(model, tok).generate([prompt], n=4000, max_new_tokens=1, temperature=temperature, seed=3)
    counts = torch.bincount(torch.tensor([s.token_ids[0] for s in samples]), minlength=VOCAB).double()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt.token_ids])).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, -1)
    probs[BLOCKED] = 0.0
    probs /= probs.sum()
    tv = 0.5 * (counts / counts.sum() - probs).abs().sum().item()
    assert tv < 0.06, tv
    wrong_t = torch.softmax(logits / 0.5, -1)
    wrong_t[BLOCKED] = 0.0
    assert 0.5 * (counts / counts.sum() - wrong_t / wrong_t.sum()).abs().sum().item() > 2 * tv


def test_top_p_keeps_the_nucleus(model, tok):
    prompt = text_prompt(tok, "q")
    samples = engine_for(model, tok).generate([prompt], n=300, max_new_tokens=1, top_p=0.3, seed=0)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt.token_ids])).logits[0, -1].double(), -1)
    probs[BLOCKED] = 0.0
    probs /= probs.sum()
    p_sorted, order = probs.sort(descending=True)
    nucleus = set(order[: int((p_sorted.cumsum(0) < 0.3).sum()) + 1].tolist())
    assert {s.token_ids[0] for s in samples} <= nucleus


def test_stop_tokens_and_stop_strings(model, tok):
    # Half the vocabulary as end tokens: most samples stop early, so both finish reasons occur.
    stop_ids = list(range(0, 256, 2))
    engine = engine_for(model, tok, stop_token_ids=stop_ids)
    samples = engine.generate([text_prompt(tok, "s")], n=24, max_new_tokens=6, seed=2)
    reasons = {s.finish_reason for s in samples}
    assert reasons == {"stop", "length"}
    for s in samples:
        assert all(t not in stop_ids for t in s.token_ids[:-1])
        assert (s.finish_reason == "stop") == (s.token_ids[-1] in stop_ids)
        assert s.truncated == (s.finish_reason == "length")
        if s.truncated:
            assert len(s.token_ids) == 6

    # Stop string: the same seed regenerates the same tokens, cut right after the first printable character
    # that the free run produced.
    engine = engine_for(model, tok)
    free = engine.generate([text_prompt(tok, "t")], n=1, max_new_tokens=24, seed=4)[0]
    j, stop_char = next((j, chr(t)) for j, t in enumerate(free.token_ids) if 48 <= t < 123 and j >= 1)
    cut = engine.generate([text_prompt(tok, "t")], n=1, max_new_tokens=24, seed=4, stop=[stop_char])[0]
    first = next(k for k, t in enumerate(free.token_ids) if chr(t) == stop_char)
    assert first <= j
    assert cut.token_ids == free.token_ids[: first + 1] and cut.finish_reason == "stop"
    assert cut.text.endswith(stop_char)


def test_load_weights_switches_models(tok):
    """Push model B's weights into an engine holding model A: greedy output becomes B's own HF greedy output."""
    a, b = tiny_vl(1), tiny_vl(2)
    prompts = [text_prompt(tok, "hello"), image_prompt(tok, (9, 9, 9))]
    engine = engine_for(a, tok)
    before = engine.generate(prompts, max_new_tokens=8, temperature=1e-4, seed=0)
    assert engine.load_weights(b.named_parameters()) == len(list(b.parameters()))
    after = engine.generate(prompts, max_new_tokens=8, temperature=1e-4, seed=0)
    ref = engine_for(b, tok).generate(prompts, max_new_tokens=8, temperature=1e-4, seed=123)
    assert [s.token_ids for s in after] == [s.token_ids for s in ref]
    assert [s.token_ids for s in after] != [s.token_ids for s in before]
    with pytest.raises(ValueError, match="unknown parameter"):
        engine.load_weights([("nope.weight", torch.zeros(1))])


def test_bad_sampling_arguments(model, tok):
    engine = engine_for(model, tok)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([text_prompt(tok, "a")], temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([text_prompt(tok, "a")], top_p=1.5)
    with pytest.raises(ValueError, match="n must be"):
        engine.generate([text_prompt(tok, "a")], n=0)
    with pytest.raises(ValueError, match="stop_token_ids"):
        HFEngine(model, tok, stop_token_ids=[], pad_token_id=PAD)


def test_checkpoint_generation_config_adds_no_logits_processor(tmp_path, tok):
    """A checkpoint's generation_config.json (repetition_penalty, as Qwen2.5-VL-Instruct ships) must not reach
    generate(): the engine samples from exactly the distribution the trainer scores."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    src = tiny_vl(3)
    src.generation_config = GenerationConfig(repetition_penalty=1.5, no_repeat_ngram_size=2, bos_token_id=None)
    src.save_pretrained(tmp_path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert model.generation_config.repetition_penalty == 1.5  # the file was read: the test has teeth
    prompts = [text_prompt(tok, "aaaa abab"), image_prompt(tok, (255, 0, 0), "aa")]
    samples = engine_for(model, tok).generate(prompts, n=2, max_new_tokens=12, seed=2)
    for s in samples:
        want = teacher_forced_logprobs(model, prompts[s.prompt_index], s.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=2e-5, rtol=1e-5)


def test_blocked_token_ids_keep_the_end_tokens_and_block_the_rest():
    ids = {"endoftext": 0, "im_start": 1, "im_end": 2, "image_pad": 3, "vision_start": 4}
    assert blocked_token_ids(ids, 10, 13) == [1, 3, 4, 10, 11, 12]  # specials but the two ends, then padding rows
    assert blocked_token_ids(ids, 10, 10) == [1, 3, 4]
