"""Token store: SFT samples encoded once on disk, then memory-mapped read-only by every rank and every restart.

Legend: N samples, T tokens of all samples, M image samples.

A store directory (little-endian, written once):
  tokens.bin         int32 (T,)    token ids of all samples back to back
  loss.bin           uint8 (T/8,)  bit mask (np.packbits order): bit t set iff position t has a loss target, i.e.
                                   it predicts token t+1 and that token is an assistant token (targets[t] != -100)
  offsets.bin        int64 (N+1,)  sample i is tokens[offsets[i]:offsets[i+1]]
  lengths.bin        int32 (N,)    offsets' differences: all the step planner reads
  image_offsets.bin  int64 (N+1,)  sample i's image record is images.bin[image_offsets[i]:image_offsets[i+1]]
  images.bin         utf-8 JSON per image sample: {"where", "images": [[source, base_dir, [t, h, w]], ...]}
  meta.json          the key and its parts (files, tokenizer, template, options), counts, load stats
Targets, position ids (3-D mRoPE for image samples) and pixel values are made when a sample is read (`read`), so a
step touches only its own samples' pages, and a store of any size opens in milliseconds.

A store is keyed by its inputs (`key_parts`: source files' paths, sizes and mtimes; the tokenizer's serialised
vocabulary and merges; the chat format and system prompt; the encoding options). It is built under
`<dir>.tmp-<host>-<pid>` and renamed into place when complete, so `meta.json` in a final directory means a complete
store and a killed build is rebuilt, never half-read. Builds stream the sources in chunks of rows that
`data.build_workers` processes encode (in file order, so sample i is the same as the in-memory loader's sample i).
One process builds: local rank 0 of each node (or global rank 0 with `data.store_shared_fs`); the others wait for
the directory to appear, then open it.
"""

import collections
import hashlib
import json
import mmap
import multiprocessing
import os
import shutil
import socket
import time
from array import array
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ovr_train.data import (
    IGNORE,
    DataStats,
    Encoded,
    ImageRef,
    chat_sample,
    encode_sft_sample,
    load_image,
    mrope_position_ids,
    no_samples_error,
)
from ovr_train.sources import iter_rows
from ovr_train.synth_text import default_cache_dir

FORMAT = "ovr-token-store/1"
# Bump when data.encode_messages changes what it produces: stores built by the old encoder must not be reused.
CHAT_FORMAT = "qwen2.5-vl-chat/2"
_CHUNK_ROWS = 256  # rows per worker task: large enough to amortise pickling, small enough to bound memory


# ----------------------------------------------------------------------------------------------------------------
# Key
# ----------------------------------------------------------------------------------------------------------------


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _file_id(path) -> list:
    p = Path(path).resolve()
    if not p.exists():
        raise ValueError(f"data file {str(path)!r} does not exist")
    members = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [str(p)] + [[str(f.relative_to(p)) if p.is_dir() else "", f.stat().st_size, f.stat().st_mtime_ns]
                       for f in members]


def key_parts(files: list, tok, ids: dict, image_proc, cfg) -> dict:
    """What a store depends on: source files (path, size, mtime), tokenizer, chat format, encoding options."""
    return {
        "format": FORMAT,
        "files": _sha(json.dumps([_file_id(f) for f in files])),
        "tokenizer": _sha(tok.backend_tokenizer.to_str()),
        "template": _sha(json.dumps([CHAT_FORMAT, cfg.system_prompt, cfg.answer_instruction, sorted(ids.items())])),
        "options": {"max_seq_len": cfg.max_seq_len, "overlong": cfg.overlong, "on_error": cfg.on_error,
                    "image_root": cfg.image_root,  # the image settings in force (resolved from the checkpoint too)
                    "min_pixels": image_proc.min_pixels if image_proc else 0,
                    "max_pixels": image_proc.max_pixels if image_proc else 0,
                    "patch_size": image_proc.patch_size if image_proc else 0,
                    "merge_size": image_proc.merge_size if image_proc else 2,
                    "temporal_patch_size": image_proc.temporal_patch_size if image_proc else 0},
    }


def store_key(parts: dict) -> str:
    return _sha(json.dumps(parts, sort_keys=True))[:24]


_PART_NAMES = {"format": "store format", "files": "source files (paths, sizes or mtimes)",
               "tokenizer": "tokenizer", "template": "chat template, system prompt or answer instruction",
               "options": "data options"}


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def _map(path: Path, dtype, count: int, maps: list):
    """A read-only array over a file's pages (the mmap object goes to `maps`, for `TokenStore.release`)."""
    if count == 0:  # mmap refuses empty files
        return np.zeros(0, dtype=dtype)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    maps.append(mm)
    return np.frombuffer(mm, dtype=dtype, count=count)


class TokenStore:
    """A built store, memory-mapped read-only. `lengths[i]` (int32 array) is all the planner needs; `read(i)` makes
    sample i's Encoded (targets, position ids, images decoded and preprocessed by `image_proc`)."""

    def __init__(self, path, image_proc=None):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise ValueError(f"{self.path} is not a complete token store (no meta.json)")
        self.meta = json.loads(meta_file.read_text())
        n, total = self.meta["num_samples"], self.meta["num_tokens"]
        self._maps = []
        self.tokens = _map(self.path / "tokens.bin", "<i4", total, self._maps)
        self.loss = _map(self.path / "loss.bin", np.uint8, (total + 7) // 8, self._maps)
        self.offsets = _map(self.path / "offsets.bin", "<i8", n + 1, self._maps)
        self.lengths = _map(self.path / "lengths.bin", "<i4", n, self._maps)
        self.image_offsets = _map(self.path / "image_offsets.bin", "<i8", n + 1, self._maps)
        self.images = _map(self.path / "images.bin", np.uint8, self.meta["image_bytes"], self._maps)
        self.image_proc = image_proc
        self.image_pad_id = self.meta["ids"]["image_pad"]
        self.merge_size = self.meta["parts"]["options"]["merge_size"]
        self.image_root = self.meta["parts"]["options"]["image_root"]

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def stats(self) -> DataStats:
        return DataStats(**self.meta["stats"])

    def __len__(self) -> int:
        return self.meta["num_samples"]

    def check(self, parts: dict):
        """ValueError naming what differs when this store was built from other inputs than `parts` describe."""
        for name, label in _PART_NAMES.items():
            if self.meta["parts"].get(name) != parts[name]:
                raise ValueError(f"token store {self.path} was built with a different {label} than this run "
                                 f"({self.meta['parts'].get(name)!s:.80} vs {parts[name]!s:.80}): delete it, or set "
                                 "data.store_dir to another directory (empty: one per input key)")

    def release(self):
        """Unmap the pages this process has touched (the kernel's page cache keeps them, shared by all ranks).

        Each touch of a mapped file maps a whole fault-around window (64 KiB by default) into this process, so
        random reads over a large store would grow resident memory with the store's size; the training loop calls
        this once per step, which bounds it by one step's samples instead.
        """
        for mm in self._maps:
            mm.madvise(mmap.MADV_DONTNEED)

    def loss_bits(self, i: int) -> np.ndarray:
        """Sample i's loss-target mask (L,) bool, unpacked from its bytes of loss.bin."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.unpackbits(self.loss[a // 8:(b + 7) // 8])[a % 8:a % 8 + (b - a)].astype(bool)

    def read(self, i: int) -> Encoded:
        """Sample i: input ids, targets, position ids (3-D mRoPE) and, for image samples, decoded pixel values."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        input_ids = torch.from_numpy(self.tokens[a:b].astype(np.int64))
        targets = torch.full_like(input_ids, IGNORE)
        has_target = torch.from_numpy(self.loss_bits(i)[:-1])
        targets[:-1] = torch.where(has_target, input_ids[1:], targets[:-1])
        pixel_values = grid_thw = None
        ia, ib = int(self.image_offsets[i]), int(self.image_offsets[i + 1])
        if ib > ia:
            pixel_values, grid_thw = self._read_images(json.loads(self.images[ia:ib].tobytes()))
        mrope = mrope_position_ids(input_ids, grid_thw, self.image_pad_id, self.merge_size)
        return Encoded(input_ids, targets, mrope, pixel_values, grid_thw)

    def _read_images(self, record: dict):
        if self.image_proc is None:
            raise ValueError(f"{record['where']}: sample has an image but the model has no image processor")
        pixels, grids = [], []
        for source, base_dir, grid in record["images"]:
            try:
                pv, got = self.image_proc(load_image(ImageRef(source, base_dir), self.image_root))
            except ValueError as e:
                raise ValueError(f"{record['where']}: {e}") from None
            if got.tolist() != grid:
                raise ValueError(f"{record['where']}: image {source[:80]!r} now preprocesses to grid {got.tolist()}"
                                 f" but the store {self.path} was built with {grid}: the image changed; delete the "
                                 "store to rebuild it")
            pixels.append(pv)
            grids.append(got)
        return torch.cat(pixels), torch.stack(grids)


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------


class StoreWriter:
    """Appends encoded samples to a store directory's files; `finish(meta)` writes the index and meta.json."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._tokens = open(self.dir / "tokens.bin", "wb")  # noqa: SIM115 (closed in finish)
        self._loss = open(self.dir / "loss.bin", "wb")  # noqa: SIM115
        self._images = open(self.dir / "images.bin", "wb")  # noqa: SIM115
        self._bits = np.zeros(0, dtype=bool)  # loss bits not yet a whole byte
        self.offsets, self.image_offsets = array("q", [0]), array("q", [0])
        self.longest = self.loss_tokens = self.image_samples = 0

    def add(self, input_ids: np.ndarray, has_target: np.ndarray, lengths: list, image_records: list):
        """A chunk of samples back to back: int32 ids (sum L,), bool loss-target mask (sum L,), their lengths, and
        one image record (JSON bytes, b"" for a text sample) each. One write per file per chunk."""
        self._tokens.write(np.ascontiguousarray(input_ids, dtype="<i4").tobytes())
        bits = np.concatenate([self._bits, has_target])
        whole = len(bits) // 8 * 8
        self._loss.write(np.packbits(bits[:whole]).tobytes())
        self._bits = bits[whole:]
        self._images.write(b"".join(image_records))
        for n, record in zip(lengths, image_records):
            self.offsets.append(self.offsets[-1] + n)
            self.image_offsets.append(self.image_offsets[-1] + len(record))
        self.longest = max(self.longest, *lengths) if lengths else self.longest
        self.loss_tokens += int(has_target.sum())
        self.image_samples += sum(bool(r) for r in image_records)

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    def finish(self, meta: dict):
        self._loss.write(np.packbits(self._bits).tobytes())  # the last partial byte, zero-padded
        for f in (self._tokens, self._loss, self._images):
            f.close()
        offsets = np.frombuffer(self.offsets, dtype=np.int64)
        offsets.astype("<i8").tofile(self.dir / "offsets.bin")
        np.diff(offsets).astype("<i4").tofile(self.dir / "lengths.bin")
        np.frombuffer(self.image_offsets, dtype=np.int64).astype("<i8").tofile(self.dir / "image_offsets.bin")
        meta = dict(meta, num_samples=self.num_samples, num_tokens=int(offsets[-1]), longest=self.longest,
                    loss_tokens=self.loss_tokens, image_samples=self.image_samples,
                    image_bytes=int(self.image_offsets[-1]))
        (self.dir / "meta.json").write_text(json.dumps(meta, indent=1))  # last: its presence marks completeness


_WORKER = {}  # the encoder's tokenizer, ids, image processor and DataCfg, in a build worker process


def _init_worker(tok, ids, image_proc, cfg):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the worker processes
    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)
    _WORKER.update(tok=tok, ids=ids, image_proc=image_proc, cfg=cfg)


def _encode_chunk(base_dir: str, rows: list) -> tuple:
    """Rows [(where, obj)] -> ((ids int32, has_target bool, lengths, image records), DataStats of the chunk), the
    arguments of StoreWriter.add: one array per chunk keeps the pickling between processes cheap."""
    tok, ids, image_proc, cfg = _WORKER["tok"], _WORKER["ids"], _WORKER["image_proc"], _WORKER["cfg"]
    stats, tokens, masks, records = DataStats(), [], [], []
    for where, obj in rows:
        sample = chat_sample(where, obj, base_dir, cfg.on_error, stats)
        enc = sample and encode_sft_sample(sample, tok, ids, image_proc, cfg, stats)
        if enc is None:
            continue
        record = b""
        if enc.grid_thw is not None:
            refs = [p for _, parts in sample.messages for p in parts if isinstance(p, ImageRef)]
            record = json.dumps({"where": where, "images": [[r.source, r.base_dir, g] for r, g in
                                                            zip(refs, enc.grid_thw.tolist())]}).encode()
        tokens.append(enc.input_ids)
        masks.append(enc.targets != IGNORE)
        records.append(record)
    stats.samples = len(records)
    if not records:
        return (np.zeros(0, np.int32), np.zeros(0, bool), [], []), stats
    return (torch.cat(tokens).numpy().astype(np.int32), torch.cat(masks).numpy(), [len(t) for t in tokens],
            records), stats


def _chunks(files: list):
    for path in files:
        base_dir, rows = str(Path(path).parent), []
        for row in iter_rows(path):
            rows.append(row)
            if len(rows) == _CHUNK_ROWS:
                yield base_dir, rows
                rows = []
        if rows:
            yield base_dir, rows


def _encoded_chunks(files: list, workers: int, init_args: tuple):
    """Encoded chunks in file order; with workers > 1, at most 2 x workers chunks in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(*init_args)
        try:
            for chunk in _chunks(files):
                yield _encode_chunk(*chunk)
        finally:
            _WORKER.clear()
        return
    # fork: workers inherit the tokenizer and image processor instead of unpickling them (and re-importing torch)
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, init_args) as pool:
        pending = collections.deque()
        for chunk in _chunks(files):
            pending.append(pool.apply_async(_encode_chunk, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_store(path, files: list, tok, ids: dict, image_proc, cfg, parts: dict, show: bool = True) -> Path:
    """Encode `files` into a store at `path` (DataCfg `cfg`, `cfg.build_workers` processes): written under a
    temporary directory, renamed into place when complete. Returns `path`."""
    path = Path(path)
    tmp = path.parent / f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for stale in path.parent.glob(f"{path.name}.tmp-{socket.gethostname()}-*"):  # builds killed on this host
        if not _alive(int(stale.name.rsplit("-", 1)[1])):
            shutil.rmtree(stale, ignore_errors=True)
    writer, stats = StoreWriter(tmp), DataStats()
    t0 = time.perf_counter()
    pbar = tqdm(desc=f"building token store ({cfg.build_workers} worker(s))", unit="tok", unit_scale=True,
                disable=not show, dynamic_ncols=True)
    try:
        for samples, chunk_stats in _encoded_chunks(files, cfg.build_workers, (tok, ids, image_proc, cfg)):
            writer.add(*samples)
            stats.merge(chunk_stats)
            pbar.update(len(samples[0]))
            pbar.set_postfix(samples=writer.num_samples, refresh=False)
        pbar.close()
        if writer.num_samples == 0:
            raise no_samples_error(files, stats)
        seconds = time.perf_counter() - t0
        writer.finish({"key": store_key(parts), "parts": parts, "ids": ids, "files": [str(f) for f in files],
                       "stats": stats.__dict__, "build_seconds": round(seconds, 3),
                       "build_workers": cfg.build_workers})
        try:
            os.rename(tmp, path)
        except OSError:  # another builder (another node on a shared filesystem) finished first
            if not (path / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        pbar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if show:
        total = int(writer.offsets[-1])
        print(f"[data] token store {path}: {writer.num_samples} samples, {total} tokens in {seconds:.1f}s "
              f"({total / max(seconds, 1e-9):.0f} tokens/s, {cfg.build_workers} worker(s))")
    return path


def open_store(files: list, tok, ids: dict, image_proc, cfg, rank: int = 0, local_rank: int = 0,
               poll_s: float = 0.2) -> TokenStore:
    """The store of (files, tokenizer, template, options): built by this process if it is the builder (local rank 0,
    or rank 0 with cfg.store_shared_fs) and it does not exist yet, else waited for; then opened and checked."""
    parts = key_parts(files, tok, ids, image_proc, cfg)
    path = Path(cfg.store_dir) if cfg.store_dir else default_cache_dir(cfg.cache_dir) / "stores" / store_key(parts)
    failed = path.parent / f"{path.name}.failed"
    builder = rank == 0 if cfg.store_shared_fs else local_rank == 0
    if not (path / "meta.json").is_file():
        if builder:
            path.parent.mkdir(parents=True, exist_ok=True)
            failed.unlink(missing_ok=True)
            try:
                build_store(path, files, tok, ids, image_proc, cfg, parts, show=rank == 0)
            except BaseException as e:  # tell the waiting ranks instead of leaving them polling
                failed.write_text(f"{type(e).__name__}: {e}")
                raise
        else:
            t0 = time.time()
            while not (path / "meta.json").is_file():
                if failed.is_file() and failed.stat().st_mtime >= t0 - 1:
                    raise ValueError(f"building the token store {path} failed on the builder rank: "
                                     f"{failed.read_text()[:2000]}")
                time.sleep(poll_s)
    store = TokenStore(path, image_proc)
    store.check(parts)
    return store
