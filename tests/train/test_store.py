"""Token store: same samples and batches as the in-memory loader (text, images, truncation, the tiny default's corpus),
1 worker == 2 workers byte for byte, atomic builds (a killed build is rebuilt), a store of other inputs refused,
waiting ranks, counted skips, resume refused on other data."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovr_train import store as store_mod
from ovr_train.config import DataCfg
from ovr_train.data import StepSampler, collate, load_sft_samples, step_plan
from ovr_train.store import TokenStore, build_store, key_parts, open_store
from ovr_train.synth_text import ensure_corpus
from ovr_train.tokenizer import load_tokenizer, special_ids


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _mixed(tmp_path) -> Path:
    """Text, image (path, two sizes) and over-long rows."""
    Image.new("RGB", (130, 100), (200, 30, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (224, 112), (0, 30, 200)).save(tmp_path / "b.png")
    rows = []
    for i in range(23):
        if i % 3 == 1:
            rows.append({"conversations": [{"from": "human", "value": f"<image>\nWhat colour {i}?"},
                                           {"from": "gpt", "value": "Red, I think. " * (i % 4 + 1)}],
                         "images": ["a.png" if i % 2 else "b.png"]})
        else:
            rows.append({"messages": [{"role": "user", "content": f"Compute {i} + {i}."},
                                      {"role": "assistant", "content": f"<think>{i} + {i} = {2 * i}</think> "
                                                                       * (1 + 9 * (i == 6)) + f"\\boxed{{{2 * i}}}"}]})
    return _write(tmp_path / "mixed.jsonl", rows)


def _cfg(tmp_path, **kw) -> DataCfg:
    return DataCfg(cache_dir=str(tmp_path / "cache"), **{"answer_instruction": "", **kw})


def _same(a, b):
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert torch.equal(a.mrope_ids, b.mrope_ids)
    assert (a.pixel_values is None) == (b.pixel_values is None)
    if a.pixel_values is not None:
        assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.grid_thw, b.grid_thw)


@pytest.mark.parametrize("packing", [True, False])
def test_store_equals_in_memory_loader(tmp_path, tok, proc, packing):
    ids = special_ids(tok)
    f = _mixed(tmp_path)
    cfg = _cfg(tmp_path, max_seq_len=64, token_budget=256, overlong="truncate")
    want, stats = load_sft_samples([f], tok, ids, proc, cfg)
    store = open_store([f], tok, ids, proc, cfg)
    assert len(store) == len(want) and stats.truncated >= 1 and store.stats == stats
    assert store.lengths.tolist() == [s.length for s in want]
    assert store.meta["image_samples"] == 8 and store.meta["num_tokens"] == sum(s.length for s in want)
    for i in range(len(want)):
        _same(store.read(i), want[i])
    # a step's micro-batches collate to the same tensors
    sampler = StepSampler(len(store), 8, seed=3)
    for step in range(4):
        plan_a = step_plan(sampler.batch_indices(step), store.lengths, 2, cfg.token_budget, packing)
        plan_b = step_plan(sampler.batch_indices(step), [s.length for s in want], 2, cfg.token_budget, packing)
        assert plan_a == plan_b
        for mb in (mb for rank in plan_a for mb in rank if mb is not None):
            a = collate([store.read(i) for i in mb], packing, ids["endoftext"])
            b = collate([want[i] for i in mb], packing, ids["endoftext"])
            for key, value in b.__dict__.items():
                got = getattr(a, key)
                assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, key


def test_tiny_default_corpus_same_samples_and_order(tmp_path, tok, proc):
    """The generated text corpus the tiny default trains on (small here): identical samples in the same order."""
    ids = special_ids(tok)
    train, _ = ensure_corpus(str(tmp_path), 120, 10, 0)
    cfg = _cfg(tmp_path)
    want, _ = load_sft_samples([train], tok, ids, proc, cfg)
    store = open_store([train], tok, ids, proc, cfg)
    assert len(store) == len(want)
    for i in range(len(want)):
        _same(store.read(i), want[i])


def test_two_workers_build_the_same_bytes_and_reuse(tmp_path, tok, proc):
    ids = special_ids(tok)
    train, _ = ensure_corpus(str(tmp_path), 700, 10, 0)  # > 2 chunks per worker
    one = open_store([train], tok, ids, proc, _cfg(tmp_path, store_dir=str(tmp_path / "s1")))
    two = open_store([train], tok, ids, proc, _cfg(tmp_path, store_dir=str(tmp_path / "s2"), build_workers=2))
    for name in ("tokens.bin", "loss.bin", "offsets.bin", "lengths.bin", "image_offsets.bin", "images.bin"):
        assert (one.path / name).read_bytes() == (two.path / name).read_bytes(), name
    assert one.key == two.key  # build_workers is not part of the key
    # a second open reuses the store: nothing is rebuilt
    mtime = (one.path / "meta.json").stat().st_mtime_ns
    again = open_store([train], tok, ids, proc, _cfg(tmp_path, store_dir=str(tmp_path / "s1")))
    assert (again.path / "meta.json").stat().st_mtime_ns == mtime


def test_killed_build_leaves_nothing_half_read(tmp_path, tok, proc, monkeypatch):
    ids = special_ids(tok)
    train, _ = ensure_corpus(str(tmp_path), 600, 10, 0)
    cfg = _cfg(tmp_path, store_dir=str(tmp_path / "s"))
    real, calls = store_mod._encode_chunk, []

    def dies_on_third_chunk(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would, mid-build
        return real(*args)

    monkeypatch.setattr(store_mod, "_encode_chunk", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        open_store([train], tok, ids, proc, cfg)
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob("s.tmp-*"))
    # a build killed with -9 leaves its tmp directory (a dead pid): the next build removes it and builds in full
    dead = tmp_path / f"s.tmp-{store_mod.socket.gethostname()}-999999999"
    dead.mkdir()
    (dead / "tokens.bin").write_bytes(b"\0" * 10)
    monkeypatch.setattr(store_mod, "_encode_chunk", real)
    store = open_store([train], tok, ids, proc, cfg)
    assert len(store) == 600 and not dead.exists()


def test_store_of_other_inputs_is_refused(tmp_path, tok, proc):
    ids = special_ids(tok)
    f = _mixed(tmp_path)
    cfg = _cfg(tmp_path, store_dir=str(tmp_path / "s"), max_seq_len=64, overlong="truncate")
    open_store([f], tok, ids, proc, cfg)
    other_tok = load_tokenizer(kind="bpe", vocab_size=400, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="built with a different tokenizer"):
        open_store([f], other_tok, special_ids(other_tok), proc, cfg)
    with pytest.raises(ValueError, match="different data options"):
        open_store([f], tok, ids, proc, _cfg(tmp_path, store_dir=str(tmp_path / "s"), max_seq_len=80,
                                             overlong="truncate"))
    with pytest.raises(ValueError, match="different chat template, system prompt or answer instruction"):
        open_store([f], tok, ids, proc, _cfg(tmp_path, store_dir=str(tmp_path / "s"), max_seq_len=64,
                                             overlong="truncate", system_prompt="Be brief."))
    # without store_dir each input key gets its own store: a changed file is re-encoded, not reused
    auto = _cfg(tmp_path, max_seq_len=64, overlong="truncate")
    first = open_store([f], tok, ids, proc, auto)
    f.write_text(f.read_text() + json.dumps({"messages": [{"role": "user", "content": "x"},
                                                          {"role": "assistant", "content": "y"}]}) + "\n")
    second = open_store([f], tok, ids, proc, auto)
    assert second.path != first.path and len(second) == len(first) + 1


def test_waiting_rank_opens_after_builder_and_sees_failures(tmp_path, tok, proc):
    ids = special_ids(tok)
    train, _ = ensure_corpus(str(tmp_path), 50, 10, 0)
    cfg = _cfg(tmp_path, store_dir=str(tmp_path / "s"))
    parts = key_parts([train], tok, ids, proc, cfg)
    builder = threading.Timer(0.5, build_store, (tmp_path / "s", [train], tok, ids, proc, cfg, parts, False))
    builder.start()
    t0 = time.perf_counter()
    waiter = open_store([train], tok, ids, proc, cfg, rank=1, local_rank=1, poll_s=0.05)  # not a builder: waits
    builder.join()
    assert len(waiter) == 50 and time.perf_counter() - t0 >= 0.5
    # the builder's failure reaches the waiting ranks as an error, not an endless wait
    bad = _write(tmp_path / "bad.jsonl", ["{oops"])
    bcfg = _cfg(tmp_path, store_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"bad.jsonl:1: malformed JSON"):
        open_store([bad], tok, ids, proc, bcfg)
    with pytest.raises(ValueError, match=r"failed on the builder rank: ValueError: .*bad.jsonl:1: malformed"):
        threading.Timer(0.2, (tmp_path / "b.failed").touch).start()  # a fresh failure while this rank waits
        open_store([bad], tok, ids, proc, bcfg, rank=1, local_rank=1, poll_s=0.05)


def test_bad_rows_raise_or_are_counted_in_the_store(tmp_path, tok, proc):
    ids = special_ids(tok)
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    f = _write(tmp_path / "bad.jsonl", [good, "{not json", {"messages": [{"role": "user", "content": [
        {"type": "image", "image": "corrupt.png"}]}, {"role": "assistant", "content": "a"}]}, good])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        open_store([f], tok, ids, proc, _cfg(tmp_path))
    store = open_store([f], tok, ids, proc, _cfg(tmp_path, on_error="skip", build_workers=2))
    stats = store.stats
    assert len(store) == 2 and stats.lines == 4 and stats.skipped_malformed == 1 and stats.skipped_image == 1
    assert "bad.jsonl:3" in stats.errors[1] and "cannot be decoded" in stats.errors[1]
    # an image that changed after the build is caught when the sample is read, naming it
    img = _write(tmp_path / "img.jsonl", [{"messages": [{"role": "user", "content": [
        {"type": "image", "image": "x.png"}, "?"]}, {"role": "assistant", "content": "a"}]}])
    Image.new("RGB", (112, 112)).save(tmp_path / "x.png")
    store = open_store([img], tok, ids, proc, _cfg(tmp_path, store_dir=str(tmp_path / "img")))
    Image.new("RGB", (224, 112)).save(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"img.jsonl:1: image .*x.png' now preprocesses to grid"):
        TokenStore(store.path, proc).read(0)


def test_release_keeps_reads_and_sampler_order(tmp_path, tok, proc):
    ids = special_ids(tok)
    train, _ = ensure_corpus(str(tmp_path), 60, 10, 0)
    store = open_store([train], tok, ids, proc, _cfg(tmp_path))
    before = [store.read(i) for i in range(len(store))]
    store.release()
    for i, enc in enumerate(before):
        _same(store.read(i), enc)
    # the sampler's int32 permutation is the one the int64 default draws (the order training used before)
    for n in (7, 1000, 65537):
        g = torch.Generator().manual_seed(3 * 100_003 + 1)
        want = torch.randperm(n, generator=g)
        assert StepSampler(n, 7, seed=3).batch_indices(n // 7) == want[:7].tolist()


def test_sampler_refuses_resume_on_other_data():
    a = StepSampler(100, 8, 0, data_key="abc")
    a.step = 7
    b = StepSampler(100, 8, 0, data_key="abd")
    with pytest.raises(ValueError, match="data_key=abc differs"):
        b.load_state_dict(a.state_dict())
    c = StepSampler(100, 8, 0, data_key="abc")
    c.load_state_dict(a.state_dict())
    assert c.step == 7 and c.batch_indices(7) == a.batch_indices(7)


def test_loss_bits_cross_byte_boundaries(tmp_path):
    """Samples of odd lengths: each sample's loss bits come back exactly, whatever its bit offset."""
    rng = np.random.default_rng(0)
    w = store_mod.StoreWriter(tmp_path / "s")
    want = []
    for n in (1, 3, 8, 9, 15, 17, 2, 31):
        ids, mask = rng.integers(0, 1000, n).astype(np.int32), rng.random(n) < 0.5
        mask[-1] = False  # the last position never has a target
        want.append((ids, mask))
    for chunk in (want[:3], want[3:4], want[4:]):  # chunks of several samples, and of one
        w.add(np.concatenate([c[0] for c in chunk]), np.concatenate([c[1] for c in chunk]), [len(c[0]) for c in chunk],
              [b""] * len(chunk))
    w.finish({"key": "k", "parts": {"options": {"merge_size": 2, "image_root": ""}}, "ids": {"image_pad": -1},
              "stats": {}})
    s = TokenStore(tmp_path / "s")
    for i, (ids, mask) in enumerate(want):
        enc = s.read(i)
        assert enc.input_ids.tolist() == ids.tolist()
        assert (enc.targets[:-1] != -100).tolist() == mask[:-1].tolist()
        assert enc.targets[:-1][torch.from_numpy(mask[:-1])].tolist() == ids[1:][mask[:-1]].tolist()
