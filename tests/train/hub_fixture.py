"""An offline miniature of the Qwen/Qwen2.5-VL-7B-Instruct hub directory, for tests that load a checkpoint as a user
downloads it.

The file set and formats are the hub's: config.json in the original (transformers 4.49-era) format with the legacy
`rope_scaling: {type: mrope, mrope_section}` and the flat `vision_config` keys, weights in the original key layout
(`model.layers.*`, `model.embed_tokens`, `visual.blocks.*`, `visual.merger.*`, `lm_head`, which transformers 5
renames on load) as two bf16 safetensors shards plus model.safetensors.index.json, the real Qwen2.5 tokenizer with
the hub's chat template, generation_config.json with the hub's sampling defaults and repetition_penalty,
preprocessor_config.json. The shapes that matter are real: vocabulary 152,064, text head_dim 128 with GQA, the
7B's mRoPE section, ViT head_dim 80 with window attention and full-attention blocks; the rest is tiny (2 decoder
layers of width 256, 4 ViT blocks of width 160) so it trains on a CPU.

Built once per version of this file under <repo>/.cache/hub_miniature (git-ignored), with the tokenizer build.
"""

import hashlib
import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
VERSION = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]  # any edit here rebuilds it
CACHE = ROOT / ".cache" / "hub_miniature"

# The hub's config.json with the 7B's numbers replaced by tiny ones where the shape does not matter.
CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 256,  # 7B: 3584; 2 query heads of 128
    "initializer_range": 0.02,
    "intermediate_size": 512,  # 7B: 18944
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 2,  # 7B: 28 (head_dim 128)
    "num_hidden_layers": 2,  # 7B: 28
    "num_key_value_heads": 1,  # 7B: 4 (GQA)
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 4,  # 7B: 32
        "hidden_act": "silu",
        "hidden_size": 160,  # 7B: 1280; 2 heads of 80
        "intermediate_size": 64,  # 7B: 3420
        "num_heads": 2,  # 7B: 16 (head_dim 80)
        "in_chans": 3,
        "out_hidden_size": 256,  # the LLM width
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [1, 3],  # 7B: [7, 15, 23, 31]
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}

GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                     "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.1,
                     "top_p": 0.001, "top_k": 1, "transformers_version": "4.37.0"}

PREPROCESSOR_CONFIG = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                       "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                       "image_std": [0.26862954, 0.26130258, 0.27577711],
                       "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}


def _legacy_key(key: str) -> str:
    """transformers 5 key -> the hub checkpoint's original key (what its conversion mapping renames back)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def build(out: Path, cache_dir: Path) -> Path:
    """Write the miniature into `out` (atomically) and return it."""
    from safetensors.torch import save_file
    from test_chat_template import HUB_TEMPLATE
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from ovr_train.tokenizer import load_tokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    tok = load_tokenizer("", "qwen", cache_dir=str(cache_dir))
    tok.save_pretrained(tmp)  # tokenizer.json; the config beside it is written as the hub has it (4.x format)
    for f in ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (tmp / f).unlink(missing_ok=True)
    added = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in sorted(tok.added_tokens_decoder.items())}
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": [t.content for _, t in sorted(tok.added_tokens_decoder.items())][1:],
        "bos_token": None, "chat_template": HUB_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}, indent=2))

    config = AutoConfig.from_pretrained(tmp)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    sd = {_legacy_key(k): v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    names, half, acc, split = sorted(sd), sum(v.numel() for v in sd.values()) / 2, 0, 0
    while acc < half:  # split where half the parameters are reached, names in order
        acc, split = acc + sd[names[split]].numel(), split + 1
    shards = [names[:split], names[split:]]
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: sd[k] for k in part}, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    try:
        os.replace(tmp, out)
    except OSError:  # another process built it first: use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def hub_miniature() -> Path:
    """The cached miniature directory, built on first use."""
    out = CACHE / VERSION / "Qwen2.5-VL-7B-Instruct"
    if not (out / "model.safetensors.index.json").is_file():
        build(out, CACHE)
    return out
