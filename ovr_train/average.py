"""Checkpoint averaging: the final OVR model is a uniform average of several RL checkpoints (the paper's recipe).

    python -m ovr_train.average CKPT1 CKPT2 ... --out DIR [--weights w1,w2,...] [--max-shard-gb 5]

Inputs are HF model dirs (config.json + model.safetensors or a sharded safetensors index), or DCP dirs when
`ovr_train.checkpoint` offers `open_dcp_weights(path)` (see `_open`). The output is an HF model dir in the layout
`save_pretrained` writes (config.json, safetensors shards + index, the first input's tokenizer/processor files),
so `AutoModel*.from_pretrained(DIR)` loads it.

Memory: parameters are streamed one tensor at a time from memory-mapped safetensors and written shard by shard, so
peak memory is one output shard plus one tensor per input, never N full models (a 7B model is 15 GB in bf16).

Averaging happens in fp32 (fp64 for fp64 tensors) and is cast back to the first input's dtype; integer/bool
tensors (buffers) must be identical across inputs and are copied. Architectures must match exactly: the config
(minus bookkeeping keys), the set of parameter names and every shape; the first difference is named in the error.
"""

import argparse
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Config keys that say how/when a checkpoint was written, not what the architecture is.
_BOOKKEEPING_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                     "use_cache", "output_attentions", "output_hidden_states", "return_dict"}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


class CheckpointMismatch(ValueError):
    """The inputs cannot be averaged: different config, parameter names or shapes."""


@dataclass
class _Weights:
    """Read-only view of one checkpoint's tensors: names, shapes, dtypes, and per-tensor loads."""
    path: str
    config: dict
    shapes: dict  # name -> tuple[int, ...]
    dtypes: dict  # name -> torch.dtype
    load: object  # callable(name) -> torch.Tensor (CPU)
    aux_dir: str | None  # dir whose non-weight files (tokenizer, processor, generation config) are copied


def _open_hf(path: str) -> _Weights:
    """An HF dir with safetensors weights (single file or sharded index); tensors are memory-mapped, loaded lazily."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"checkpoint {path!r}: no config.json (expected an HF model dir or an ovr DCP dir)")
    with open(cfg_path) as f:
        config = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            name_to_file = json.load(f)["weight_map"]
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        name_to_file = None
    else:
        raise ValueError(f"checkpoint {path!r}: no model.safetensors or model.safetensors.index.json "
                         f"(only safetensors checkpoints can be averaged; re-save with save_pretrained)")
    files = sorted(set(name_to_file.values())) if name_to_file else ["model.safetensors"]
    handles = {fn: safe_open(os.path.join(path, fn), framework="pt", device="cpu") for fn in files}
    shapes, dtypes, where = {}, {}, {}
    for fn, h in handles.items():
        for name in h.keys():  # noqa: SIM118  (safe_open handles are not iterable)
            sl = h.get_slice(name)
            shapes[name] = tuple(sl.get_shape())
            dtypes[name] = _SAFE_DTYPES[sl.get_dtype()]
            where[name] = fn
    return _Weights(path, config, shapes, dtypes, lambda name: handles[where[name]].get_tensor(name), path)


def _open(path: str) -> _Weights:
    """An HF safetensors dir; a DCP dir is refused with what to do instead."""
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is not a directory")
    if any(os.path.isfile(os.path.join(path, f)) for f in _WEIGHT_FILES):
        return _open_hf(path)
    if os.path.isfile(os.path.join(path, ".metadata")):  # torch.distributed.checkpoint marker
        raise ValueError(f"checkpoint {path!r} is a DCP dir: average HF exports (checkpoint.export_hf; "
                         "`--stage eval --model.path DCP_DIR` writes one under <run>/eval/)")
    return _open_hf(path)  # raises a clear error naming the missing files


def _first_config_diff(a, b, prefix: str = ""):
    """(key path, value a, value b) of the first difference between two JSON-like configs; None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted((set(a) | set(b)) - _BOOKKEEPING_KEYS):
            sub = f"{prefix}.{key}" if prefix else key
            if key not in a or key not in b:
                return sub, a.get(key, "<missing>"), b.get(key, "<missing>")
            d = _first_config_diff(a[key], b[key], sub)
            if d is not None:
                return d
        return None
    return None if a == b else (prefix, a, b)


def check_compatible(ckpts: list) -> None:
    """Raise CheckpointMismatch naming the first config key, parameter name or shape that differs from ckpts[0]."""
    ref = ckpts[0]
    for other in ckpts[1:]:
        d = _first_config_diff(ref.config, other.config)
        if d is not None:
            raise CheckpointMismatch(f"config mismatch between {ref.path!r} and {other.path!r}: "
                                     f"{d[0]} = {d[1]!r} vs {d[2]!r}")
        only_ref = sorted(set(ref.shapes) - set(other.shapes))
        only_other = sorted(set(other.shapes) - set(ref.shapes))
        if only_ref or only_other:
            name, holder = (only_ref[0], ref.path) if only_ref else (only_other[0], other.path)
            raise CheckpointMismatch(f"parameter names differ between {ref.path!r} and {other.path!r}: "
                                     f"{name!r} only in {holder!r} ({len(only_ref) + len(only_other)} differ)")
        for name in sorted(ref.shapes):
            if ref.shapes[name] != other.shapes[name]:
                raise CheckpointMismatch(f"shape mismatch for {name!r}: {ref.shapes[name]} in {ref.path!r} vs "
                                         f"{other.shapes[name]} in {other.path!r}")
            if ref.dtypes[name].is_floating_point != other.dtypes[name].is_floating_point:
                raise CheckpointMismatch(f"dtype mismatch for {name!r}: {ref.dtypes[name]} in {ref.path!r} vs "
                                         f"{other.dtypes[name]} in {other.path!r}")


def _normalized_weights(weights, n: int) -> list:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"weights: got {len(weights)} values for {n} checkpoints")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and sum to > 0, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def _average_tensor(name: str, ckpts: list, weights: list) -> torch.Tensor:
    """Weighted mean of one tensor over checkpoints, accumulated in fp32 (fp64 stays fp64), in ckpts[0]'s dtype."""
    out_dtype = ckpts[0].dtypes[name]
    if not out_dtype.is_floating_point:  # integer buffers (e.g. position ids): must agree, averaging is meaningless
        first = ckpts[0].load(name)
        for c in ckpts[1:]:
            if not torch.equal(first, c.load(name)):
                raise CheckpointMismatch(f"non-float tensor {name!r} differs between {ckpts[0].path!r} and "
                                         f"{c.path!r}; integer tensors cannot be averaged")
        return first.clone()
    acc_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    acc = None
    for c, w in zip(ckpts, weights):
        t = c.load(name).to(acc_dtype)
        acc = t.mul_(w) if acc is None else acc.add_(t, alpha=w)
    return acc.to(out_dtype).contiguous()


def _plan_shards(shapes: dict, dtypes: dict, max_shard_bytes: int) -> list:
    """Group tensor names (sorted) into shards of at most max_shard_bytes (a bigger single tensor gets its own)."""
    shards, cur, cur_bytes = [], [], 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * torch.empty((), dtype=dtypes[name]).element_size()
        if cur and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    return shards


def _copy_aux_files(src: str | None, out: str) -> None:
    """Tokenizer, processor, chat template and generation config of the first input, so the output is usable."""
    if src is None:
        return
    for fn in sorted(os.listdir(src)):
        full = os.path.join(src, fn)
        weights_or_config = fn.endswith((".safetensors", ".bin", ".pt", ".distcp")) or fn in (
            "model.safetensors.index.json", "config.json", "averaged_from.json")
        if not os.path.isfile(full) or weights_or_config or fn.startswith("."):
            continue
        shutil.copy2(full, os.path.join(out, fn))


def average_checkpoints(paths: list, out: str, weights=None, max_shard_bytes: int = 5 * 2**30) -> dict:
    """Write the (weighted) parameter average of `paths` to `out` as an HF model dir.

    paths: >= 1 checkpoint dirs (HF safetensors, or DCP via ovr_train.checkpoint). weights: None (uniform) or
    one non-negative float per path (normalised to sum 1). Returns a summary dict (num_tensors, num_params,
    weights, shards). Raises CheckpointMismatch (a ValueError) if the architectures differ.
    """
    if len(paths) < 1:
        raise ValueError("average_checkpoints: need at least one checkpoint path")
    weights = _normalized_weights(weights, len(paths))
    out_abs = os.path.abspath(out)
    if any(os.path.abspath(p) == out_abs for p in paths):
        raise ValueError(f"out {out!r} is one of the inputs; choose a fresh directory")
    ckpts = [_open(p) for p in paths]
    check_compatible(ckpts)
    ref = ckpts[0]
    os.makedirs(out, exist_ok=True)
    shards = _plan_shards(ref.shapes, ref.dtypes, max_shard_bytes)
    weight_map, total_bytes = {}, 0
    for i, names in enumerate(shards):
        fn = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = {name: _average_tensor(name, ckpts, weights) for name in names}
        total_bytes += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, os.path.join(out, fn), metadata={"format": "pt"})
        weight_map.update({name: fn for name in names})
        del shard
    if len(shards) > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
    _copy_aux_files(ref.aux_dir, out)
    config = dict(ref.config)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    summary = {"inputs": list(paths), "weights": weights, "num_tensors": len(ref.shapes),
               "num_params": sum(math.prod(s) for s in ref.shapes.values()), "shards": len(shards), "out": out}
    with open(os.path.join(out, "averaged_from.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ovr_train.average", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="HF (safetensors) or DCP checkpoint dirs")
    p.add_argument("--out", required=True, help="output HF model dir")
    p.add_argument("--weights", default=None, help="comma-separated weights, one per checkpoint (default uniform)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="max size of one output safetensors shard")
    args = p.parse_args(argv)
    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError as e:
            raise SystemExit(f"--weights {args.weights!r}: not a comma-separated list of numbers") from e
    try:
        summary = average_checkpoints(args.checkpoints, args.out, weights, int(args.max_shard_gb * 2**30))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    print(f"averaged {len(args.checkpoints)} checkpoints (weights {[round(w, 4) for w in summary['weights']]}): "
          f"{summary['num_tensors']} tensors, {summary['num_params'] / 1e6:.1f}M params -> {args.out} "
          f"({summary['shards']} shard(s))")


if __name__ == "__main__":
    main()
