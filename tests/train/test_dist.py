"""dist.all_reduce_sums: a dict of per-rank sums reduced in one collective, names and float64 values kept."""

import torch

from ovr_train import dist


def test_all_reduce_sums_is_one_float64_collective(monkeypatch):
    calls = []

    def fake_all_reduce(t, op=None):  # a world of 3 where every rank holds the same sums
        calls.append((t.dtype, t.shape))
        t.mul_(3)

    monkeypatch.setattr(dist.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(dist.dist, "all_reduce", fake_all_reduce)
    sums = {"count": 7, "third": 0.1, "loss": torch.tensor(0.25, dtype=torch.float64),
            "entropy": torch.tensor(1.5, dtype=torch.float32), "big": 2**40 + 1}
    got = dist.all_reduce_sums(sums, torch.device("cpu"))
    assert calls == [(torch.float64, (5,))]
    assert list(got) == list(sums)
    # float64 end to end: 0.1 and 2**40 + 1 survive exactly (a float32 detour would round both)
    assert got == {"count": 21.0, "third": 0.1 * 3, "loss": 0.75, "entropy": 4.5, "big": float(3 * (2**40 + 1))}
    assert all(type(v) is float for v in got.values())


def test_all_reduce_sums_without_a_process_group_returns_the_sums():
    assert dist.all_reduce_sums({"a": 2, "b": torch.tensor(0.5)}, torch.device("cpu")) == {"a": 2.0, "b": 0.5}
