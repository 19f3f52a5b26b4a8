"""Where inference runs: what is asked for, or the CPU with a warning that says why; timings
that wait for the device."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from members.device import resolve_device, wait_for


def test_cuda_asked_for_and_absent_falls_back_to_the_cpu_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator in ("cuda", "gpu"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="members.device"):
            assert resolve_device(accelerator) == torch.device("cpu")
        assert f"device.accelerator={accelerator} was asked for" in caplog.text
        assert "no CUDA device is available" in caplog.text


def test_cuda_is_used_where_present(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.WARNING, logger="members.device"):
        assert resolve_device("cuda") == torch.device("cuda")
        assert resolve_device("auto") == torch.device("cuda")
    assert not caplog.text


def test_cpu_and_auto_without_an_accelerator_are_quiet(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="members.device"):
        assert resolve_device("cpu") == torch.device("cpu")
        assert resolve_device("auto") == torch.device("cpu")
    assert not caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_timed_region_on_the_gpu_includes_its_work():
    """A model's call returns once its kernels are queued: the clock read after ``wait_for``
    of its outputs covers the work, as CUDA's own events measure it."""
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    started = time.perf_counter()
    start.record()
    outputs = {"maps": [a @ a for _ in range(20)]}  # about 2.7 TFLOP: tens of milliseconds
    end.record()
    wait_for(outputs)
    seconds = time.perf_counter() - started
    torch.cuda.synchronize()
    assert seconds * 1000 >= 0.9 * start.elapsed_time(end)
