"""When the Triton kernels run: on CUDA tensors when Triton is installed, and on CPU tensors only under
``TRITON_INTERPRET=1`` (Triton's interpreter, which is how CI tests the kernels without a GPU). Otherwise
the public ops fall back to their pure-PyTorch references."""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """True when the Triton kernel (not the reference) handles a tensor on ``t``'s device."""
    if not HAS_TRITON:
        return False
    return t.device.type == "cuda" or (t.device.type == "cpu" and interpreting())


KERNEL_SETTINGS = ("auto", "triton", "torch")


def use_triton_op(setting: str, t: torch.Tensor) -> bool:
    """The model's ``kernels=`` setting at an op boundary: "triton" always calls the Triton op (which itself
    falls back to its reference where Triton cannot run), "auto" only on CUDA with Triton installed,
    "torch" never."""
    return setting == "triton" or (setting == "auto" and t.device.type == "cuda" and HAS_TRITON)
