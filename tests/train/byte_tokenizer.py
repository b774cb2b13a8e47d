"""A byte-level Qwen2.5-VL-style tokenizer for tests: 256 bytes + the special tokens and the chat template, no BPE
training (instant, deterministic)."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ovr_train.tokenizer import CHAT_TEMPLATE, EOS, IM_END, SPECIAL_TOKENS


def byte_chat_tokenizer(path=None, specials=tuple(SPECIAL_TOKENS)):
    """The tokenizer (ids 0-255 are bytes, then `specials` in order), also saved to `path` when given."""
    backend = Tokenizer(models.BPE(vocab={ch: b for b, ch in bytes_to_unicode().items()}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.eos_token, tok.pad_token, tok.chat_template = IM_END, EOS, CHAT_TEMPLATE
    if path is not None:
        tok.save_pretrained(path)
    return tok
