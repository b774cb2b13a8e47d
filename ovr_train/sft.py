"""Stage 1, the linguistic cold start: `train_sft(cfg, info)` is the whole SFT loop, top to bottom.

The same loop runs the base stage (`train_sft(cfg, info, stage="base")`): perception pretraining on generated
images with `\\boxed{}` answers (`base_stage_config` derives its settings from cfg.base), so the default pipeline
starts RL's cold start from a model that can see, as the real Qwen2.5-VL base can.

Data: the stage's files are encoded once into a token store (`ovr_train.store`) that every rank memory-maps; the
plan needs only its lengths index and each rank reads only its own samples. Per step: the step's global batch (a
pure function of seed and step, so resuming at a step resumes at the same place in the store) is split over ranks
balanced by tokens and packed into token-budget micro-batches; the loss is the sum of -log p(target) over
assistant tokens divided by the GLOBAL number of such tokens in the step (one all-reduce before the micro-batch
loop), so packing, micro-batch count and world size do not change the gradient. No host sync inside the micro-batch loop. A step whose loss or
gradient norm is NaN/inf is skipped (no update) and reported; `sft.max_bad_steps` in a row abort the run.
"""

import copy
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ovr_train.checkpoint import ModelState, export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from ovr_train.config import Config, dump_config
from ovr_train.data import StepSampler, collate, filler, image_processor, step_plan
from ovr_train.dist import DistInfo, all_reduce, barrier, clip_grad_norm, compute_dtype
from ovr_train.metrics import MetricsLogger, Throughput, peak_memory_gib, plot_curves
from ovr_train.model import build_sharded_model, flops_per_token, param_counts
from ovr_train.optim import build_optimizer
from ovr_train.runlock import lock_run_dir
from ovr_train.store import open_store
from ovr_train.synth_images import ensure_perception_corpus
from ovr_train.synth_text import ensure_corpus, ensure_plain_corpus
from ovr_train.tokenizer import load_tokenizer, special_ids


def lr_lambda(ocfg, total_steps: int):
    """Multiplier of optim.lr at a step: linear warmup from 0, then cosine to min_lr_ratio (or constant)."""
    def f(step: int) -> float:
        if step < ocfg.warmup_steps:
            return (step + 1) / (ocfg.warmup_steps + 1)
        if ocfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - ocfg.warmup_steps) / max(1, total_steps - ocfg.warmup_steps - 1))
        return ocfg.min_lr_ratio + (1 - ocfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def base_stage_config(cfg: Config) -> Config:
    """The SFT loop's config for the base stage: cfg.base's steps / batch / lr, the ViT and every layer trained, a
    random init seeded by model.init_seed + run.seed (so seeds differ in init too), the generated perception
    corpus."""
    c = copy.deepcopy(cfg)
    c.sft.steps, c.sft.batch_size = cfg.base.steps, cfg.base.batch_size
    c.optim.lr, c.optim.warmup_steps = cfg.base.lr, cfg.base.warmup_steps
    c.model.freeze_vision = False
    c.model.freeze_llm_layers = 0
    c.model.init_seed = cfg.model.init_seed + cfg.run.seed
    return c


def perception_files(cfg: Config) -> list:
    """The base stage's training files (generated and cached on first use): the images, and base.text_items plain
    worked text problems beside them when > 0."""
    files = [ensure_perception_corpus(cfg.data.cache_dir, cfg.base.num_train, cfg.data.synth_seed,
                                      tuple(cfg.base.tasks), read_first=cfg.base.read_first)]
    if cfg.base.text_items:
        files.append(ensure_plain_corpus(cfg.data.cache_dir, cfg.base.text_items, cfg.data.synth_seed))
    return files


def _corpus(dcfg) -> Path:
    """The generated training corpus of DataCfg `dcfg` (written once, then cached)."""
    return ensure_corpus(dcfg.cache_dir, dcfg.synth_num_train, dcfg.synth_num_eval, dcfg.synth_seed,
                         dcfg.synth_picture_fraction, dcfg.synth_picture_mask_reads)[0]


def resolve_sft_init(cfg: Config, say: bool = False) -> str:
    """The HF dir the SFT stage starts from ("" = random init): a path in sft.init_from, else an explicit
    model.path (it always wins over a base model some earlier run left in the run directory), else with "auto" the
    pipeline's own base model <run.out_dir>/base/hf if the base stage wrote it. `say`: print what "auto" picked."""
    init = cfg.sft.init_from
    if init not in ("auto", "none"):
        if not (Path(init) / "config.json").is_file():
            raise ValueError(f"sft.init_from={init!r} is not an HF model directory (no config.json)")
        return init
    base = Path(cfg.run.out_dir) / "base" / "hf"
    if init == "none" or cfg.model.path or not (base / "config.json").is_file():
        return cfg.model.path
    if say:
        print(f"[sft] sft.init_from=auto: starting from this run's base model {base} (no --model.path given)")
    return str(base)


def setup_tokenizer_and_data(cfg: Config, info: DistInfo, stage: str = "sft"):
    """Tokenizer, special ids and the token store of the stage's files; rank 0 builds the cached corpus /
    tokenizer first, the store's builder rank(s) build it if needed (ovr_train.store.open_store)."""
    if info.is_main:  # build caches once, then every rank reads them
        if stage == "base":
            perception_files(cfg)
        elif not cfg.data.train_files:
            _corpus(cfg.data)
        load_tokenizer(cfg.model.path, cfg.model.tokenizer, cfg.model.bpe_vocab_size, cfg.data.cache_dir,
                       cfg.data.synth_seed)
    barrier()
    tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer, cfg.model.bpe_vocab_size, cfg.data.cache_dir,
                         cfg.data.synth_seed)
    ids = special_ids(tok)
    if stage == "base":
        files = perception_files(cfg)
    else:
        files = cfg.data.train_files or [_corpus(cfg.data)]
    image_proc = image_processor(cfg)
    store = open_store(files, tok, ids, image_proc, cfg.data, info.rank, info.local_rank)
    return tok, ids, store


def train_step(model, params, optim, micro, grad_clip, device, world):
    """One SFT step over this rank's micro-batches (on the host, moved to `device` one at a time): the loss is the
    sum of -log p(target) divided by the GLOBAL number of loss tokens (one all-reduce before the micro-batch loop,
    no host sync inside it), then the gradient clip and the optimizer step unless the loss or the gradient norm is
    NaN/inf (one host sync). Returns (loss, entropy per loss token, grad norm: 0-d tensors; applied; counts: loss
    tokens and tokens over all ranks, float64)."""
    counts = torch.tensor([sum(b.num_loss_tokens for b in micro), sum(b.num_tokens for b in micro)],
                          dtype=torch.float64, device=device)
    all_reduce(counts)  # global loss tokens (and tokens, for throughput)
    num_loss_global = counts[0].clamp_min(1.0).float()
    sums = torch.zeros(2, device=device)  # [sum of -logp over loss tokens, sum of entropy]
    for batch in micro:
        batch = batch.to(device)
        out = model(**batch.model_inputs(), targets=batch.targets)
        nll = -out.logprobs.sum()  # ignored positions contribute exactly 0
        # FSDP averages gradients over ranks; x world makes the total sum(nll over all ranks) / global tokens.
        (nll * (world / num_loss_global)).backward()
        sums += torch.stack([nll.detach(), out.entropy.detach().sum()])
    grad_norm = clip_grad_norm(params, grad_clip)
    all_reduce(sums)
    loss = sums[0] / num_loss_global
    finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))  # one host sync per step
    if finite:
        optim.step()
    optim.zero_grad(set_to_none=True)
    return loss, sums[1] / num_loss_global, grad_norm, finite, counts


def train_sft(cfg: Config, info: DistInfo, stage: str = "sft") -> Path:
    """Run (or resume) the SFT stage, or with stage="base" the base perception stage; returns the stage directory
    <run.out_dir>/<stage> (checkpoints/, metrics.jsonl, curves.png, hf/)."""
    if stage not in ("sft", "base"):
        raise ValueError(f"stage={stage!r}: must be 'sft' or 'base'")
    cfg = base_stage_config(cfg) if stage == "base" else copy.deepcopy(cfg)
    if stage == "sft":
        cfg.model.path = resolve_sft_init(cfg, say=info.is_main)
    stage_dir = Path(cfg.run.out_dir) / stage
    lock_run_dir(info, stage_dir)  # before any file is touched: one live run per directory
    tag = f"[{stage}]"
    ckpt_root = stage_dir / "checkpoints"
    if info.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "config.yaml").write_text(dump_config(cfg))
    rank, world, device = info.rank, info.world_size, info.device
    if cfg.sft.batch_size < world:
        raise ValueError(f"sft.batch_size={cfg.sft.batch_size} must be >= the world size {world}")

    # ---- data ----
    tok, ids, store = setup_tokenizer_and_data(cfg, info, stage)
    stats, lengths = store.stats, store.lengths  # the planner reads only the lengths index
    sampler = StepSampler(len(store), cfg.sft.batch_size, cfg.run.seed, data_key=store.key)
    total_steps = cfg.sft.steps or cfg.sft.epochs * sampler.steps_per_epoch
    pad_id, merge, packing = ids["endoftext"], image_processor(cfg).merge_size, cfg.data.packing
    if info.is_main:
        print(f"{tag} {len(store)} samples ({store.meta['num_tokens']} tokens, longest {store.meta['longest']}; "
              f"token store {store.path}); skipped: malformed "
              f"{stats.skipped_malformed}, image {stats.skipped_image}, overlong {stats.skipped_overlong}, no loss "
              f"{stats.skipped_no_loss}; truncated {stats.truncated}; {total_steps} steps of {cfg.sft.batch_size}")
        for err in stats.errors[:5]:
            print(f"{tag}   skipped: {err}")

    # ---- model, optimizer, schedule ----
    torch.manual_seed(cfg.run.seed)
    model = build_sharded_model(cfg, info, ids, len(tok))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = build_optimizer(params, cfg.optim.offload, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay,
                            cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg.optim, total_steps))
    if info.is_main:
        counts = param_counts(model)
        print(f"{tag} model: {counts['total'] / 1e6:.2f}M params ({counts['trainable'] / 1e6:.2f}M trainable; ViT "
              f"{'frozen' if cfg.model.freeze_vision else 'trained'}), vocab {model.hf.config.text_config.vocab_size}"
              f", {world} rank(s) on {device.type}, compute {compute_dtype(cfg.model, device)}; starting from "
              f"{cfg.model.path or f'a random init (seed {cfg.model.init_seed})'}")

    # ---- resume ----
    start, bad_in_a_row = 0, 0
    latest = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    if latest is not None:
        trainer = load_checkpoint(latest, {"model": ModelState(model, optim)}, rank)
        sched.load_state_dict(trainer["scheduler"])
        sampler.load_state_dict(trainer["sampler"])
        start, bad_in_a_row = trainer["step"], trainer["bad_in_a_row"]
        if info.is_main:
            print(f"{tag} resumed from {latest} at step {start}")
    if start >= total_steps and info.is_main:
        print(f"{tag} nothing to do: checkpoint step {start} >= sft.steps {total_steps} (delete {ckpt_root} or raise "
              "sft.steps to train more)")

    logger = MetricsLogger(stage_dir, info.is_main, resume_step=start)
    meter = Throughput(flops_per_token(model, cfg.data.max_seq_len // 2), device, world)
    pbar = tqdm(total=total_steps, initial=start, disable=not info.is_main, desc=stage, dynamic_ncols=True)
    t_start = time.perf_counter()
    for step in range(start, total_steps):
        meter.start()
        # ---- this rank's micro-batches of the step ----
        plan = step_plan(sampler.batch_indices(step), lengths, world, cfg.data.token_budget, packing)
        mine = [mb for mb in plan[rank] if mb is not None]
        micro = [collate([store.read(i) for i in mb], packing, pad_id, merge) for mb in mine]  # only our samples
        micro += [filler([store.read(mine[0][0])], packing, pad_id, merge)] * (len(plan[rank]) - len(mine))
        store.release()  # resident memory: this step's samples, not the store's size
        # ---- forward / backward over micro-batches, then the update (skipped when non-finite) ----
        lr = sched.get_last_lr()[0]
        loss, entropy, grad_norm, finite, counts = train_step(model, params, optim, micro, cfg.optim.grad_clip,
                                                              device, world)
        if finite:
            bad_in_a_row = 0
        else:
            bad_in_a_row += 1
            if info.is_main:
                tqdm.write(f"{tag} step {step + 1}: non-finite loss {loss.item()} / grad norm {grad_norm.item()}: "
                           f"step skipped ({bad_in_a_row} in a row)")
            if bad_in_a_row >= cfg.sft.max_bad_steps:
                raise RuntimeError(f"{bad_in_a_row} consecutive non-finite steps (sft.max_bad_steps="
                                   f"{cfg.sft.max_bad_steps}): aborting at step {step + 1}")
        sched.step()
        sampler.step = step + 1

        # ---- log ----
        if (step + 1) % cfg.sft.log_every == 0 or step + 1 == total_steps:
            rec = {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(), "skipped": int(not finite),
                   "entropy": entropy.item(), "loss_tokens": int(counts[0]),
                   "micro_batches": len(micro), "peak_mem_gib": peak_memory_gib(device),
                   **meter.stop(int(counts[1]))}
            logger.log(step + 1, rec)
            pbar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        pbar.update(1)

        # ---- checkpoint ----
        last = step + 1 == total_steps
        if (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or last:
            save_checkpoint(ckpt_root, step + 1, {"model": ModelState(model, optim)},
                            {"scheduler": sched.state_dict(), "sampler": sampler.state_dict(),
                             "bad_in_a_row": bad_in_a_row}, rank, cfg.checkpoint.keep, dump_config(cfg))
    pbar.close()
    logger.close()

    # ---- export and plot ----
    if cfg.checkpoint.export_hf and (start < total_steps or not (stage_dir / "hf").exists()):
        export_hf(model, tok, stage_dir / "hf", rank, compute_dtype(cfg.model, info.device), image_processor(cfg))
    if info.is_main:
        plot_curves(stage_dir / "metrics.jsonl", stage_dir / "curves.png",
                    ["loss", "lr", "grad_norm", "entropy", "tokens_per_s"], title="SFT (cold start)" if stage == "sft" else "Base (perception)")
        print(f"{tag} done: steps {start}->{total_steps} in {time.perf_counter() - t_start:.1f}s; outputs in "
              f"{stage_dir} (checkpoints/, metrics.jsonl, tensorboard/, curves.png, hf/)")
    return stage_dir
