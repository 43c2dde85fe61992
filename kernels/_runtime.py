"""When the Triton kernels run: on CUDA tensors when Triton is installed, and on CPU tensors only under
``TRITON_INTERPRET=1`` (Triton's interpreter, which is how CI tests the kernels without a GPU). Otherwise
the public ops fall back to their pure-PyTorch references."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.cache
def _jit(fn: Callable[..., Any], interpret: bool) -> Any:
    import triton

    return triton.jit(fn)


def jitted(fn: Callable[..., Any]) -> Any:
    """``triton.jit(fn)``, compiled or interpreted as ``TRITON_INTERPRET`` says *now*.

    ``@triton.jit`` decides between the compiler and the interpreter when it decorates, i.e. at import time;
    the kernel files keep their kernels as plain functions and jit them here at launch, cached per mode,
    so that setting ``TRITON_INTERPRET=1`` after the model imported the kernels (a test module) still
    takes effect. No private Triton API is involved."""
    return _jit(fn, interpreting())


@functools.cache
def _autotune(fn: Callable[..., Any], configs: Callable[[], list], key: tuple[str, ...]) -> Any:
    import triton

    return triton.autotune(configs(), key=list(key))(_jit(fn, False))


def autotuned(fn: Callable[..., Any], configs: Callable[[], list], key: tuple[str, ...],
              interpreter_config: dict[str, int]) -> tuple[Any, dict[str, int]]:
    """``(kernel, meta-parameters to pass at launch)``: compiled, ``fn`` autotuned over ``configs()`` keyed
    on the ``key`` arguments (nothing to pass); under the interpreter, plain ``fn`` with one small fixed
    configuration, since autotuning there would run every configuration."""
    if interpreting():
        return jitted(fn), interpreter_config
    return _autotune(fn, configs, key), {}


def triton_runs_on(t: torch.Tensor) -> bool:
    """True when the Triton kernel (not the reference) handles a tensor on ``t``'s device."""
    if not HAS_TRITON:
        return False
    return t.device.type == "cuda" or (t.device.type == "cpu" and interpreting())


KERNEL_SETTINGS = ("auto", "triton", "torch")
# "auto" leaves tensors smaller than this to PyTorch in eager mode: a custom-op call costs about 0.1 ms of
# host time (measured on an H100: 0.11 ms median vs 0.03 ms of GPU time for a 16384x1024 RMSNorm), which
# would slow eager one-token decoding; prefill and training shapes are far above it.
AUTO_MIN_ELEMENTS = 1 << 20


def auto_prefers_triton(device_type: str, numel: int, compiling: bool) -> bool:
    """What "auto" picks: Triton on CUDA when compiled (graphs remove the host cost) or for large tensors."""
    return HAS_TRITON and device_type == "cuda" and (compiling or numel >= AUTO_MIN_ELEMENTS)


def use_triton_op(setting: str, t: torch.Tensor) -> bool:
    """The model's ``kernels=`` setting at an op boundary: "triton" always calls the Triton op (which itself
    falls back to its reference where Triton cannot run), "auto" as :func:`auto_prefers_triton`, "torch"
    never."""
    if setting == "auto":
        return auto_prefers_triton(t.device.type, t.numel(), torch.compiler.is_compiling())
    return setting == "triton"
