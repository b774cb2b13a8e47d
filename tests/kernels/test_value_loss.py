"""value_loss: loss, metrics and d(values) of the Triton kernels (OVR_BACKEND=triton; the interpreter on CPU) vs the
same-dtype reference vs the float64 reference (S1); clip edges, masks, normalisers, bad inputs.
"""

import math

import pytest
import torch
from conftest import assert_close, assert_close_3way

from ovr_kernels.reference import value_loss_ref
from ovr_kernels.value_loss import value_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METRICS = ("vf_clip_frac", "vf_mse")


def make_inputs(T, dtype, mask_kind="bool"):
    values = torch.randn(T)
    inputs = {"values": values, "old_values": values + torch.randn(T) * 0.3, "returns": torch.randn(T)}
    inputs = {k: v.to(dtype).to(DEVICE) for k, v in inputs.items()}
    keep = torch.rand(T) >= 0.3
    inputs["mask"] = (keep if mask_kind == "bool" else (keep * torch.rand(T)).to(dtype)).to(DEVICE)
    return inputs


def run(fn, inputs, cast=None, **kwargs):
    """(loss, metrics, grad_values) of fn on (optionally cast) copies of the inputs."""
    x = {k: (v.to(cast) if cast is not None and v.is_floating_point() else v).detach().clone()
         for k, v in inputs.items()}
    x["values"].requires_grad_()
    loss, metrics = fn(x["values"], x["old_values"], x["returns"], x["mask"], **kwargs)
    assert loss.dim() == 0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, [x["values"]])
    return loss.detach(), metrics, grad


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("case", ["aligned", "odd", "all_options"])
def test_matches_reference(triton_backend, case):
    if case == "aligned":
        inputs, kwargs, atol = make_inputs(1024, torch.float32), {}, (1e-6, 1e-8)
    elif case == "odd":  # three programs, bf16, float mask, no clipping
        inputs, kwargs, atol = make_inputs(2503, torch.bfloat16, "float"), {"clip": None}, (1e-5, 1e-7)
    else:  # sequence mean with empty, one-token and all-masked sequences; a device normaliser
        lengths = [3, 0, 1, 200, 2, 91]
        inputs = make_inputs(sum(lengths), torch.float32)
        inputs["mask"][3:4] = True
        inputs["mask"][204:206] = False
        kwargs = {"clip": 0.5, "cu_seqlens": cu(lengths), "normalizer": torch.tensor(7, device=DEVICE)}
        atol = (1e-6, 1e-8)
    got, ref = run(value_loss, inputs, **kwargs), run(value_loss_ref, inputs, **kwargs)
    truth = run(value_loss_ref, inputs, cast=torch.float64, **kwargs)
    assert_close_3way("loss", got[0], ref[0], truth[0], atol=atol[0])
    for name in METRICS:
        assert got[1][name].dim() == 0 and not got[1][name].requires_grad
        assert_close_3way(name, got[1][name], ref[1][name], truth[1][name], atol=atol[0])
    assert got[2].dtype == inputs["values"].dtype
    assert_close_3way("grad_values", got[2], ref[2], truth[2], factor=3.0, atol=atol[1])
    if kwargs.get("clip", 0.2) is not None:
        assert float(got[1]["vf_clip_frac"]) > 0.02, "inputs should exercise the clipped branch"


def test_clip_edges_exact(triton_backend):
    """V - V_old exactly +-clip (dyadic values: every difference is exact) is unclipped-equivalent and keeps its
    gradient; beyond the edge the clipped term wins only when it is the larger error."""
    clip = 0.25
    old = torch.tensor([0.5, 0.5, -1.0, -1.0, 0.5, 0.5, -1.0, -1.0])
    values = old + torch.tensor([clip, -clip, clip, -clip, 0.375, -0.375, 0.375, -0.375])
    returns = torch.tensor([2.0, 2.0, -3.0, -3.0, 2.0, -2.0, -3.0, 3.0])
    inputs = {"values": values, "old_values": old, "returns": returns, "mask": torch.ones(8, dtype=torch.bool)}
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    got, ref = run(value_loss, inputs, clip=clip), run(value_loss_ref, inputs, clip=clip)
    v_clip = old + (values - old).clamp(-clip, clip)
    clipped = (v_clip - returns).square() > (values - returns).square()
    expected = torch.where(clipped, v_clip - returns, values - returns) * torch.where(
        clipped, ((values - old).abs() <= clip).float(), torch.ones(8)) / 8
    assert 0 < int(clipped.sum()) < 8
    assert_close("grad", got[2], expected.to(DEVICE), atol=1e-7)
    assert_close("grad vs reference", got[2], ref[2], atol=1e-7)
    assert float(got[1]["vf_clip_frac"]) == pytest.approx(float(clipped.float().mean()))


def test_all_masked_is_zero_and_finite(triton_backend):
    inputs = make_inputs(40, torch.float32)
    inputs["mask"] = torch.zeros(40, dtype=torch.bool, device=DEVICE)
    inputs["values"][5] = math.nan
    for kwargs in ({}, {"cu_seqlens": cu([10, 30])}):
        loss, metrics, grad = run(value_loss, inputs, **kwargs)
        assert float(loss) == 0.0 and all(float(metrics[k]) == 0.0 for k in METRICS)
        assert bool((grad == 0).all())


def test_global_normalizer_micro_batches_sum_to_full_batch(triton_backend):
    T, split = 500, 123
    inputs = make_inputs(T, torch.float32)
    count = inputs["mask"].sum().to(torch.float32)
    full = run(value_loss, inputs)
    parts = [run(value_loss, {k: v[sl] for k, v in inputs.items()}, normalizer=count)
             for sl in (slice(0, split), slice(split, T))]
    assert_close("loss", parts[0][0] + parts[1][0], full[0], atol=1e-6)
    assert_close("grad", torch.cat([parts[0][2], parts[1][2]]), full[2], atol=1e-9)



@pytest.mark.parametrize("seq_mean", [False, True], ids=["token_mean", "seq_mean"])
def test_torch_compile(triton_backend, seq_mean):
    """value_loss traces with fullgraph=True (its Triton path is the ovr::value_loss_fwd / _bwd custom ops) and
    the compiled loss, metrics and gradient equal eager bit for bit (same deterministic kernels)."""
    torch._dynamo.reset()
    lengths = [3, 0, 1, 200, 2, 91]
    inputs = make_inputs(sum(lengths), torch.float32)
    kwargs = {"clip": 0.5, "cu_seqlens": cu(lengths), "normalizer": torch.tensor(7, device=DEVICE)} if seq_mean \
        else {}
    eager = run(value_loss, inputs, **kwargs)
    compiled = run(torch.compile(value_loss, fullgraph=True, backend="aot_eager"), inputs, **kwargs)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[2], compiled[2])
    for name in METRICS:
        assert torch.equal(eager[1][name], compiled[1][name]), name


def test_opcheck(triton_backend):
    """torch.library.opcheck: schema, fake and autograd registrations of ovr::value_loss_fwd are consistent."""
    lengths = [7, 0, 40, 1]
    x = make_inputs(sum(lengths), torch.float32)
    values = x["values"].requires_grad_()
    torch.library.opcheck(torch.ops.ovr.value_loss_fwd.default,
                          (values, x["old_values"], x["returns"], x["mask"], cu(lengths),
                           torch.tensor(3.0, device=DEVICE), None, 0.2))
    torch.library.opcheck(torch.ops.ovr.value_loss_fwd.default,
                          (values, x["old_values"], x["returns"], x["mask"], None, None, 11.0, None))

@pytest.mark.parametrize("change, match", [
    ({"values": torch.zeros(4, 2)}, "values must have 1 dims"),
    ({"returns": torch.zeros(5)}, r"returns must have shape \(4,\)"),
    ({"old_values": torch.zeros(4, dtype=torch.int32)}, "old_values must have dtype"),
    ({"mask": torch.ones(4, dtype=torch.int8)}, "mask must have dtype"),
    ({"clip": -0.1}, "clip must be >= 0.0"),
    ({"clip": "big"}, "clip must be a number"),
    ({"normalizer": -2.0}, "normalizer must be > 0.0"),
    ({"cu_seqlens": torch.tensor([0, 2, 3], dtype=torch.int32)}, r"cu_seqlens\[-1\]=3 must equal"),
])
def test_bad_inputs_raise(triton_backend, change, match):
    args = {"values": torch.zeros(4), "old_values": torch.zeros(4), "returns": torch.zeros(4),
            "mask": torch.ones(4, dtype=torch.bool)}
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        value_loss(**args)
