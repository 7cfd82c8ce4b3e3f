"""Soft-Min-Max's compiled kernel: built with the system's C compiler, or skipped cleanly.

The values are checked in test_losses.py on both paths; here: layers large enough to
split into many chunks, results independent of the thread count, and the build's
failure modes (no compiler, an unwritable cache folder, a corrupt cached library, the
switch) each ending on the eager path with a reason, never an error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from r2sweep.core.losses import functional as F
from r2sweep.core.losses import make_r2_loss, native

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A process that has not loaded the kernel yet, with its cache in ``tmp_path/kernels``."""
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "kernels"))
    monkeypatch.delenv(native.SWITCH_ENV, raising=False)
    yield tmp_path / "kernels"
    native._loaded.clear()  # the next test loads the default build again


def _grads(w, alpha, granularity):
    w, alpha = w.clone().requires_grad_(), alpha.clone().requires_grad_()
    value = F.soft_min_max(w, alpha, granularity=granularity)
    upstream = torch.linspace(0.5, 1.5, value.numel()).reshape(value.shape)
    (value * upstream).sum().backward()
    return value.detach(), w.grad, alpha.grad


def _layer(shape, granularity, alpha_times_max=5.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator) * 0.05
    w.view(-1)[:: max(1, w.numel() // 7)] *= 6  # a few outliers
    size = (shape[0],) if granularity == "channel" else ()
    return w, torch.full(size, alpha_times_max / float(w.abs().max()))


@needs_compiler
def test_the_kernel_builds_into_the_cache_folder_and_is_used(fresh_build):
    assert native.softminmax_library() is not None
    assert native.status().startswith("native kernel")
    built = list(fresh_build.glob("softminmax-*.so"))
    assert len(built) == 1 and not list(fresh_build.glob(".*tmp"))


@needs_compiler
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("shape", [(256, 128, 3, 3), (4, 40000), (1000, 10)])
def test_large_layers_match_the_eager_path_and_float64(shape, granularity):
    # (256, 128, 3, 3) is one row of 18 chunks per tensor; (4, 40000) per channel has
    # rows of several chunks; (1000, 10) many rows of one short chunk.
    w, alpha = _layer(shape, granularity)
    got = _grads(w, alpha, granularity)
    with native.disabled():
        eager = _grads(w, alpha, granularity)
    w64, a64 = w.double().requires_grad_(), alpha.double().requires_grad_()
    rows = w64.reshape(shape[0], -1) if granularity == "channel" else w64.reshape(1, -1)
    a = a64.reshape(-1, 1)
    ref = (rows * torch.softmax(a * rows, 1)).sum(1) - (rows * torch.softmax(-a * rows, 1)).sum(1)
    ref = ref + torch.exp(-a64.reshape(-1))  # eta = 1
    ref = ref if granularity == "channel" else ref.reshape(())
    (ref * torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).reshape(ref.shape)).sum().backward()
    for mine, theirs, want in zip(got, eager, (ref.detach(), w64.grad, a64.grad)):
        scale = float(want.abs().max())
        assert float((mine.double() - want).abs().max()) / scale < 1e-5
        assert float((theirs.double() - want).abs().max()) / scale < 1e-4  # the eager path, for scale


@needs_compiler
def test_results_do_not_depend_on_the_thread_count():
    w, alpha = _layer((128, 64, 3, 3), "tensor")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(w, alpha, "tensor")
        torch.set_num_threads(2)
        two = _grads(w, alpha, "tensor")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_without_a_compiler_the_eager_path_runs_and_says_why(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-r2sweep")
    assert native.softminmax_library() is None
    assert "no C compiler" in native.status() and "no-such-compiler-r2sweep" in native.status()
    w, alpha = _layer((16, 8, 3, 3), "tensor")
    value, grad, _ = _grads(w, alpha, "tensor")
    assert torch.isfinite(value) and bool(torch.isfinite(grad).all())
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
    notes = make_r2_loss(net, "softminmax", 0.1).notes(torch.device("cpu"))
    assert len(notes) == 1 and "no C compiler" in notes[0]
    assert make_r2_loss(net, "softminmax", 0.1).notes(torch.device("cuda")) == []


@needs_compiler
def test_an_unwritable_cache_folder_builds_in_a_temporary_one_and_removes_it(fresh_build, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(native.CACHE_ENV, str(blocker / "kernels"))
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert native.softminmax_library() is not None
    assert "temporary folder, removed" in native.status()
    assert list(temp.iterdir()) == []
    w, alpha = _layer((16, 8, 3, 3), "tensor")
    assert torch.isfinite(_grads(w, alpha, "tensor")[0])


@needs_compiler
def test_a_corrupt_cached_library_is_rebuilt(fresh_build):
    assert native.softminmax_library() is not None
    (built,) = fresh_build.glob("softminmax-*.so")
    built.unlink()  # a new file: this process still maps the old one (os.replace does the same)
    built.write_bytes(b"\x7fELF torn")
    # A fresh process (this one's loader would hand back the library it already holds).
    check = (
        "import torch; from r2sweep.core.losses import functional as F, native\n"
        "assert native.status().startswith('native kernel'), native.status()\n"
        "w = torch.randn(16, 8, 3, 3, requires_grad=True)\n"
        "F.soft_min_max(w, torch.tensor(3.0)).backward()\n"
        "assert bool(torch.isfinite(w.grad).all())\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                          env={**os.environ, native.CACHE_ENV: str(fresh_build)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert built.stat().st_size > 1000


def test_the_switch_turns_the_kernel_off(fresh_build, monkeypatch):
    monkeypatch.setenv(native.SWITCH_ENV, "0")
    assert native.softminmax_library() is None
    assert "switched off" in native.status()
    assert not fresh_build.exists()  # nothing was built
