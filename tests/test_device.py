"""Where inference runs: what is asked for, or the CPU with a warning that says why."""

from __future__ import annotations

import logging

import torch

from members.device import resolve_device


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
