"""Which device a loaded model runs on, from the ``device.accelerator`` setting, and waiting
for it before a clock is read (``synchronize``, ``wait_for``).

Inference (``predict``, ``ensemble``) runs the members on one device; what is asked for but
absent falls back to the CPU with a warning that says so, so a plant's script written for a GPU
server still runs on a CPU one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

ACCELERATORS = ("cpu", "cuda", "gpu", "mps", "auto")


def resolve_device(accelerator: str) -> torch.device:
    """The torch device for ``accelerator`` (cpu | cuda | gpu | mps | auto); the CPU, with a
    warning, where the accelerator asked for is not available (or not one inference uses)."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if accelerator == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if accelerator in ("cuda", "gpu"):
        if cuda:
            return torch.device("cuda")
        log.warning(
            "device.accelerator=%s was asked for, but no CUDA device is available "
            "(torch.cuda.is_available() is False): running on the CPU",
            accelerator,
        )
    elif accelerator == "mps":
        if mps:
            return torch.device("mps")
        log.warning(
            "device.accelerator=mps was asked for, but MPS is not available: running on the CPU"
        )
    return torch.device("cpu")


def synchronize(device: str | torch.device) -> None:
    """Wait for ``device``'s queued work: CUDA returns before its kernels finish, so a time
    read without this times their launch. Nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wait_for(outputs: Any) -> None:
    """Wait for the devices that hold ``outputs`` (a tensor, or tuples, lists and dicts of them;
    anything else is ignored): a model's call returns before a GPU has done its work, so a
    clock read after it without this times the launch."""
    if isinstance(outputs, torch.Tensor):
        synchronize(outputs.device)
    elif isinstance(outputs, (tuple, list)):
        for item in outputs:
            wait_for(item)
    elif isinstance(outputs, dict):
        for item in outputs.values():
            wait_for(item)
