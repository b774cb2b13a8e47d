"""Shared test setup: interpreter mode before triton loads, fixed seeds, gpu/nvcc auto-skip, 3-way comparison.

TRITON_INTERPRET must be in the environment before triton is imported anywhere, so it is set at the
top of this file, before torch / ovr_kernels are imported.
"""

import os
import shutil
import subprocess

if shutil.which("nvidia-smi") is None or subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=False).returncode != 0:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A worker of `pytest -n N` (make test): one thread per worker (and for what it launches), so N workers on N cores
# are not oversubscribed
XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

if XDIST_WORKER:  # also when a plugin imported torch before the variable was set
    torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()


INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def _worker_group(item) -> str:
    """The tests `pytest -n N --dist loadgroup` (make test) keeps on one worker: a file's tests, except that every
    test reading the RL start point (`init_dir`) and the RL runs launched under it (tests/train/shared_runs.py) joins
    one group, so each of those launches still runs once per session."""
    return "rl-runs" if "init_dir" in getattr(item, "fixturenames", ()) else str(item.path)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the added markers must count for `-m gpu`
def pytest_collection_modifyitems(config, items):
    """`gpu` also marks every test of a module that runs on CUDA when it can (module-level DEVICE == "cuda"), so
    `-m gpu` selects every test that touches the GPU; without CUDA `gpu` tests skip."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_nvcc = pytest.mark.skip(reason="needs nvcc")
    if XDIST_WORKER:  # each worker collects
        # the multi-process (slow) tests first, so that no worker is left alone with a long one at the end
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
        for item in items:
            item.add_marker(pytest.mark.xdist_group(_worker_group(item)))
    for item in items:
        if getattr(getattr(item, "module", None), "DEVICE", None) == "cuda":
            item.add_marker(pytest.mark.gpu)
        # markers, not keywords: a keyword also matches a folder of that name
        if item.get_closest_marker("gpu") and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("nvcc") and shutil.which("nvcc") is None:
            item.add_marker(skip_nvcc)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Runs a test twice: on the default backend (CPU tensors -> the torch path) and with OVR_BACKEND=triton (the
    Triton kernels, under the interpreter without a GPU)."""
    if request.param == "triton":
        skip_if_no_interpreter(request)
        monkeypatch.setenv("OVR_BACKEND", "triton")
    else:
        monkeypatch.delenv("OVR_BACKEND", raising=False)
    return request.param


@pytest.fixture
def triton_backend(request, monkeypatch):
    """OVR_BACKEND=triton for one test: the Triton kernels (under the interpreter without a GPU)."""
    skip_if_no_interpreter(request)
    monkeypatch.setenv("OVR_BACKEND", "triton")


def skip_if_no_interpreter(request):
    """Tests that force Triton on CPU tensors need the interpreter, which is off on a machine with a GPU (the
    compiled kernels run there instead, and the `gpu` tests check them): skip rather than raise."""
    if not INTERPRETER and getattr(request.module, "DEVICE", "cpu") != "cuda":
        pytest.skip("forces Triton on CPU tensors: needs TRITON_INTERPRET=1, which is off on a GPU machine")


@pytest.fixture(autouse=True)
def _restore_environ():
    """A test that initialises torch.distributed in-process sets RANK/WORLD_SIZE/...: later tests must not see them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _describe(name, actual, expected):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        return f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    bad_nan = torch.isnan(a) != torch.isnan(e)
    diff = (a - e).abs().nan_to_num(nan=float("inf"))
    diff = torch.where(torch.isnan(a) & torch.isnan(e), torch.zeros_like(diff), diff)
    if diff.numel() == 0:
        return f"{name}: empty"
    worst = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
    return (f"{name}: max abs err {diff.max().item():.3e} at {idx} (got {a.flatten()[worst].item():.6g}, "
            f"want {e.flatten()[worst].item():.6g}), mean abs err {diff.mean().item():.3e}, "
            f"nan mismatches {int(bad_nan.sum())}, inf in result {int(torch.isinf(a).sum())}")


def max_err(actual, expected):
    """max |actual - expected| in float64, NaN-aware (a NaN on either side only is an infinite error)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.numel() == 0:
        return 0.0
    both_nan = torch.isnan(a) & torch.isnan(e)
    d = (a - e).abs().nan_to_num(nan=float("inf"))
    return float(torch.where(both_nan, torch.zeros_like(d), d).max())


def assert_close_3way(name, kernel_out, ref_out, truth_out, factor=2.0, atol=1e-5):
    """S1: kernel error vs float64 truth <= factor * (same-dtype reference error) + atol."""
    k_err = max_err(kernel_out, truth_out)
    r_err = max_err(ref_out, truth_out)
    if not k_err <= factor * r_err + atol:
        raise AssertionError(f"{name}: kernel err {k_err:.3e} > {factor} * ref err {r_err:.3e} + {atol:.1e}\n"
                             + _describe(name + " (kernel vs truth)", kernel_out, truth_out))


def assert_close(name, actual, expected, atol=1e-5, rtol=1e-5):
    """allclose with a verbose message (max/mean abs err and worst index)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    ok = a.shape == e.shape and torch.allclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if not ok:
        raise AssertionError(_describe(name, actual, expected))


# ---- fixtures of the training tests (tests/train; one conftest: a second `conftest` module would shadow this one
# for the test files that import helpers from it)
@pytest.fixture(scope="session")
def hub_ckpt():
    """A hub-layout miniature of Qwen2.5-VL-7B-Instruct (tests/train/hub_fixture.py), built offline once and cached."""
    from hub_fixture import hub_miniature

    return hub_miniature()


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The tiny default's offline BPE tokenizer."""
    from ovr_train.tokenizer import load_tokenizer

    return load_tokenizer(kind="bpe", cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def proc():
    """An image processor with small bounds (112x112 .. 224x112 pixels)."""
    from ovr_train.data import ImageProcessor

    return ImageProcessor(112 * 112, 224 * 112)
