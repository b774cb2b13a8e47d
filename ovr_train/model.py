"""Qwen2.5-VL for training: built from a config (random, seeded) or a local HF directory (meta init + sharded
load), with ovr's varlen attention on packed batches and the fused linear log-prob head (no (T, V) logits).

Legend: T tokens of a micro-batch (packed: batch 1), H hidden size, V vocabulary, P image patches, N images.

`OvrVLM.forward` takes a `data.Batch`'s `model_inputs()` plus `targets` and returns per-token log-probs and entropy
(fp32, (T,)), or values (T,) when built with a value head (the RL critic), or the final hidden states when no
targets are given. It wraps an HF `Qwen2_5_VLForConditionalGeneration` as `.hf`, so `model.hf` is what gets
exported with `save_pretrained` and what HF generate can run.
"""

import importlib.util
import math
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import AutoConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ovr_kernels import linear_logprob_entropy
from ovr_kernels.hf import ATTN_NAME as OVR_ATTENTION
from ovr_kernels.hf import packed_forward_kwargs, use_ovr_attention
from ovr_train.dist import apply_fsdp, compute_dtype

# optional GPU-only speedups, resolved once (cheaply: liger itself is imported only when used, on GPU)
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


class ModelOut(NamedTuple):
    """logprobs/entropy (T,) fp32 (policy with targets), values (T,) fp32 (critic), hidden (T, H) (no targets)."""

    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class OvrVLM(nn.Module):
    """A Qwen2.5-VL model (`self.hf`) whose forward returns log-probs via the fused head, or critic values."""

    def __init__(self, hf_model: nn.Module, value_head: bool = False):
        super().__init__()
        self.hf = hf_model
        cfg = hf_model.config
        self.image_token_id = cfg.image_token_id
        self.merge = cfg.vision_config.spatial_merge_size
        hidden = cfg.text_config.hidden_size
        # The critic's scalar head has no bias (the paper's recipe); the LM head is then unused but kept for weight loading.
        self.value_head = nn.Linear(hidden, 1, bias=False) if value_head else None

    @property
    def visual(self) -> nn.Module:
        return self.hf.model.visual

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.model.language_model.layers

    def _vision_trainable(self) -> bool:
        return self.training and any(p.requires_grad for p in self.visual.parameters())

    def _add_images(self, input_ids, embeds, pixel_values, image_grid_thw, feature_index, num_image_tokens):
        if pixel_values is not None:
            feats = self.visual(pixel_values, grid_thw=image_grid_thw).pooler_output  # (distinct image tokens, H)
            if feature_index is not None:  # samples sharing an image: autograd sums their gradients into one pass
                feats = feats[feature_index]
            if feats.shape[0] != num_image_tokens:
                raise ValueError(f"image features ({feats.shape[0]} tokens from grid_thw) do not match the "
                                 f"{num_image_tokens} <|image_pad|> tokens of the batch")
            mask = (input_ids == self.image_token_id).reshape(-1)
            flat = embeds.reshape(-1, embeds.shape[-1]).clone()
            flat[mask] = feats.to(flat.dtype)
            return flat.view_as(embeds)
        if num_image_tokens:
            raise ValueError(f"batch has {num_image_tokens} <|image_pad|> tokens but no pixel_values")
        if self._vision_trainable() or (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            # A text-only micro-batch still runs the ViT on a 1-token dummy image, so every rank joins the ViT's FSDP
            # collectives (sharded even when frozen) every step: mixed image/text ranks must not hang; it adds 0.
            # The patch size comes from the weight's global shape: indexing a sharded DTensor is a collective.
            s = self.merge
            patch_dim = math.prod(self.visual.patch_embed.proj.weight.shape[1:])
            dummy = torch.zeros(s * s, patch_dim, device=embeds.device, dtype=embeds.dtype)
            feats = self.visual(dummy, grid_thw=torch.tensor([[1, s, s]], device=embeds.device)).pooler_output
            embeds = embeds + 0.0 * feats.sum()
        return embeds

    def forward(self, input_ids, position_ids, targets=None, cu_seqlens=None, max_seqlen=0, attention_mask=None,
                pixel_values=None, image_grid_thw=None, image_feature_index=None, num_image_tokens=0,
                key_cu_seqlens=None, key_max_seqlen=0, key_index=None, temperature=1.0) -> ModelOut:
        """input_ids (B, L) (packed: B = 1 and cu_seqlens (B'+1,) int32 given), position_ids (3 or 4, B, L),
        targets (B*L,) int64 with -100 where no loss; pixel_values of the distinct images, image_feature_index the
        ViT output row of each image token (None: one to one); key_cu_seqlens / key_max_seqlen / key_index: the key
        segments of a packed batch whose samples share a prefix (`data.Batch`; None: keys = queries). Gradients
        reach every trainable parameter."""
        lm = self.hf.model.language_model
        embeds = lm.embed_tokens(input_ids)
        embeds = self._add_images(input_ids, embeds, pixel_values, image_grid_thw, image_feature_index,
                                  num_image_tokens)
        varlen = {}
        if cu_seqlens is not None:
            if self.hf.config._attn_implementation != OVR_ATTENTION:
                raise ValueError(f"packed batches need model.attn_implementation={OVR_ATTENTION!r}, got "
                                 f"{self.hf.config._attn_implementation!r}")
            varlen = packed_forward_kwargs(cu_seqlens, max_seqlen, key_cu_seqlens, key_max_seqlen, key_index)
        hidden = lm(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
                    **varlen).last_hidden_state
        hidden_TH = hidden.reshape(-1, hidden.shape[-1])
        if self.value_head is not None:
            return ModelOut(values=self.value_head(hidden_TH).squeeze(-1).float())
        if targets is None:
            return ModelOut(hidden=hidden_TH)
        logprobs_T, entropy_T = linear_logprob_entropy(hidden_TH, self.hf.lm_head.weight, targets, temperature)
        return ModelOut(logprobs=logprobs_T, entropy=entropy_T)


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------


def hf_config(mcfg, vocab_size: int, ids: dict):
    """A Qwen2_5_VLConfig from ModelCfg numbers (the tiny default, or the paper's 7B written out)."""
    head_dim = mcfg.hidden_size // mcfg.num_heads
    text = {"vocab_size": vocab_size, "hidden_size": mcfg.hidden_size, "intermediate_size": mcfg.intermediate_size,
            "num_hidden_layers": mcfg.num_layers, "num_attention_heads": mcfg.num_heads,
            "num_key_value_heads": mcfg.num_kv_heads, "head_dim": head_dim, "rms_norm_eps": mcfg.rms_norm_eps,
            "max_position_embeddings": mcfg.max_position_embeddings, "tie_word_embeddings": mcfg.tie_word_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": mcfg.rope_theta,
                                "mrope_section": list(mcfg.mrope_section)},
            "bos_token_id": ids["endoftext"], "eos_token_id": ids["im_end"], "pad_token_id": ids["endoftext"]}
    # initializer_range is read per sub-model: the LLM's modules, the ViT's and the top-level head each look at
    # their own config's (transformers PreTrainedModel._init_weights).
    text["initializer_range"] = mcfg.init_std
    vision = {"initializer_range": mcfg.init_std, "depth": mcfg.vision_depth, "hidden_size": mcfg.vision_hidden_size,
              "intermediate_size": mcfg.vision_intermediate_size, "num_heads": mcfg.vision_num_heads,
              "out_hidden_size": mcfg.hidden_size, "patch_size": mcfg.patch_size,
              "spatial_merge_size": mcfg.spatial_merge_size, "window_size": mcfg.vision_window_size,
              "fullatt_block_indexes": list(mcfg.vision_fullatt_blocks)}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_pad"],
                            video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                            vision_end_token_id=ids["vision_end"], tie_word_embeddings=mcfg.tie_word_embeddings,
                            bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"],
                            initializer_range=mcfg.init_std)


def model_vocab_size(mcfg, tokenizer_size: int) -> int:
    """ModelCfg.vocab_size, or the tokenizer's size rounded up to a multiple of 64 (tensor-core friendly)."""
    if mcfg.vocab_size:
        if mcfg.vocab_size < tokenizer_size:
            raise ValueError(f"model.vocab_size={mcfg.vocab_size} < the tokenizer's {tokenizer_size} tokens")
        return mcfg.vocab_size
    return int(math.ceil(tokenizer_size / 64) * 64)


def build_model(mcfg, ids: dict, tokenizer_size: int, *, meta: bool = False, value_head: bool = False) -> OvrVLM:
    """OvrVLM from `mcfg.path` (config only; weights come from `load_hf_weights` after sharding) or from the
    ModelCfg numbers (seeded random init; identical on every rank). meta=True allocates nothing (dry run and the
    sharded load path). The ViT is frozen when mcfg.freeze_vision, the first mcfg.freeze_llm_layers decoder layers
    likewise; activation checkpointing when asked."""
    if mcfg.path:
        if not (Path(mcfg.path) / "config.json").is_file():
            raise ValueError(f"model.path={mcfg.path!r} has no config.json")
        config = AutoConfig.from_pretrained(mcfg.path)
        if config.model_type != "qwen2_5_vl":
            raise ValueError(f"model.path={mcfg.path!r} is a {config.model_type!r} model, not qwen2_5_vl")
        # Every training target is a tokenizer id, so this one check keeps the fused log-prob head's targets in
        # range without a per-batch host sync on the GPU.
        rows = getattr(config, "text_config", config).vocab_size
        if rows < tokenizer_size:
            raise ValueError(f"model.path={mcfg.path!r} has {rows} vocabulary rows, fewer than the tokenizer's "
                             f"{tokenizer_size} tokens (a tokenizer from another model?)")
        meta = True  # weights are loaded shard by shard after fully_shard
    else:
        config = hf_config(mcfg, model_vocab_size(mcfg, tokenizer_size), ids)
    fork = nullcontext() if meta else torch.random.fork_rng(devices=[])
    with fork, torch.device("meta") if meta else nullcontext():
        if not meta:
            torch.manual_seed(mcfg.init_seed)
        # Built with a stock attention, then switched: transformers would look for a flash-attn kernel package
        # for any name containing "flash" at construction time.
        attn = "eager" if mcfg.attn_implementation == "eager" else "sdpa"
        hf = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=torch.float32)
        model = OvrVLM(hf, value_head=value_head)
    if mcfg.attn_implementation == OVR_ATTENTION:
        use_ovr_attention(hf, mcfg.deterministic_attention)
    if mcfg.freeze_vision:
        # Frozen params get no optimizer state; they must be frozen (not just unused) or DCP resume fails.
        model.visual.requires_grad_(False)
    layers = hf.model.language_model.layers
    if mcfg.freeze_llm_layers >= len(layers):
        raise ValueError(f"model.freeze_llm_layers={mcfg.freeze_llm_layers}: the model has {len(layers)} decoder "
                         "layers, at least one must train")
    for layer in layers[:mcfg.freeze_llm_layers]:
        layer.requires_grad_(False)
    if mcfg.activation_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mcfg.liger and HAS_LIGER and torch.cuda.is_available():
        # GPU only: liger's RMSNorm / SwiGLU kernels fail under the Triton interpreter (they call `.to()` on scalar
        # arguments, which it rejects); its loss patches stay off because the fused log-prob head already avoids
        # logits. Its Qwen2.5-VL patch breaks on transformers >= 5.23 (a removed output class): then train without
        # it rather than fail.
        try:  # an optional extra, ~4.5 s to import (measured): only where it is applied
            from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl

            apply_liger_kernel_to_qwen2_5_vl(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                             fused_linear_cross_entropy=False, model=hf)
        except (ImportError, AttributeError, TypeError) as e:
            warnings.warn(f"liger-kernel not applied ({type(e).__name__}: {e}); using the stock modules", stacklevel=2)
    return model


def build_sharded_model(cfg, info, ids: dict, tokenizer_size: int, value_head: bool = False) -> OvrVLM:
    """Build (Config `cfg`), FSDP2-shard over `info.mesh` and materialise on `info.device`: a seeded random init,
    or `cfg.model.path`'s weights loaded shard by shard (meta init; rank 0 reads, every rank gets its shards).
    value_head=True gives the RL critic (LLM weights from the checkpoint, a zero-initialised scalar head)."""
    model = build_model(cfg.model, ids, tokenizer_size, value_head=value_head)
    on_meta = next(model.parameters()).device.type == "meta"
    offload = cfg.optim.offload == "cpu"
    # With optimizer offload the fp32 shards stay in host memory: FSDP2 raises otherwise at its first forward
    # (torch 2.13 torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py:1041 _validate_cpu_offload_params).
    # Buffers (rotary tables) are not sharded and go to the compute device.
    home = torch.device("cpu") if offload else info.device
    if not on_meta:
        model.to(home)
    apply_fsdp(model, info.mesh, compute_dtype(cfg.model, info.device), cfg.dist.reshard_after_forward, offload)
    if on_meta:
        model.to_empty(device=home)
        load_hf_weights(model, cfg.model.path, home, info.is_main)
    if offload:
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(info.device)
    return model


def _hf_key(key: str) -> str:
    """Checkpoint key (original Qwen2.5-VL layout or transformers 5's) -> this model's state-dict key."""
    if key.startswith(("model.language_model.", "model.visual.", "lm_head.")):
        return "hf." + key
    if key.startswith("visual."):
        return "hf.model." + key
    if key.startswith("model."):
        return "hf.model.language_model." + key[len("model."):]
    return "hf." + key


def reset_nonpersistent_buffers(model: nn.Module, device):
    """After `to_empty`, recompute buffers that are not in checkpoints (rotary inv_freq) from fresh modules."""
    for module in model.modules():
        names = getattr(module, "_non_persistent_buffers_set", set())
        if names and hasattr(module, "config"):
            fresh = type(module)(module.config)
            for name in names:
                getattr(module, name).copy_(getattr(fresh, name).to(device))


def load_hf_weights(model: OvrVLM, path: str, device, is_rank0: bool):
    """Fill a sharded (meta -> `to_empty`) model from safetensors in `path`: rank 0 reads the files, every rank
    receives its shards (broadcast from rank 0). Missing LLM/ViT keys raise; a value head stays random (critic)."""
    full = {}
    if is_rank0:
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise ValueError(f"model.path={path!r} has no *.safetensors files")
        for f in files:
            full.update({_hf_key(k): v for k, v in load_file(str(f)).items()})
        want = {k for k in model.state_dict() if not k.startswith("value_head.")}
        if model.hf.config.tie_word_embeddings:
            want.discard("hf.lm_head.weight")
        missing = sorted(want - set(full))
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    if model.value_head is not None:
        with torch.no_grad():  # not in the checkpoint: start the critic's head at 0 (values 0, gradients flow)
            model.value_head.weight.zero_()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               strict=False))
    reset_nonpersistent_buffers(model, device)
    if model.hf.config.tie_word_embeddings:
        model.hf.tie_weights()


def param_counts(model: OvrVLM) -> dict:
    """Parameter counts (works on the meta device): total, trainable, vision, llm layers, embeddings + head."""
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    lm = model.hf.model.language_model
    return {"total": count(model), "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "vision": count(model.visual), "llm_layers": count(lm.layers),
            "embed_and_head": count(lm.embed_tokens) + (0 if model.hf.config.tie_word_embeddings
                                                        else count(model.hf.lm_head))}


def flops_per_token(model: OvrVLM, seq_len: int) -> float:
    """Training FLOPs per token (fwd + bwd = 3x fwd): 6 x (LLM matmul params) + 12 x layers x hidden x seq_len / 2
    (causal attention), the usual MFU convention (PaLM appendix B). The ViT is excluded (text-only SFT)."""
    lm = model.hf.model.language_model
    tc = model.hf.config.text_config
    matmul_params = sum(p.numel() for p in lm.layers.parameters()) + model.hf.lm_head.weight.numel()
    return 6.0 * matmul_params + 6.0 * tc.num_hidden_layers * tc.hidden_size * seq_len
