"""Fused RMSNorm kernels against their pure-PyTorch reference.

On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before any launch:
the kernels are jitted lazily, at their first launch, and triton.jit reads the flag then). On a GPU the
same tests run compiled, plus the `gpu`-marked ones at real shapes.

Tolerances (DESIGN.md "Numerics contract"): fp32 within 1e-5. Half types are compared with the fp32
reference computed from the same (rounded) inputs and cast to the dtype, with rtol = 2 ulp (2 * eps):
the kernel rounds twice in the forward (x_hat to the dtype, then the product with the weight) where the
fp32 reference rounds once, so its relative error is below 3 unit roundoffs = 1.5 eps. atol is only the
smallest normal number (subnormal outputs have no relative bound), except where a sum cancels:
  dx = rstd * (g - x_hat * mean(g * x_hat)) differs from fp32 by fp32 roundoff of terms of size max|dx|;
  dW = sum_rows dy * cast(x_hat) (the HF order) differs from the fp32 sum_rows dy * x_hat by at most one
  unit roundoff per term, so its bound is eps * sum_rows |dy * x_hat|, element-wise.
Triton's interpreter converts fp32 to bf16 by truncation (GPUs round to nearest even), so each bf16 cast
there errs by up to 1 ulp instead of 1/2: bf16 tolerances double under the interpreter, and the residual
sum, exact on GPU, may be 1 ulp off.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from kernels import rms_norm as K
from kernels._runtime import HAS_TRITON, triton_runs_on

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# name -> (shape, force the column-block loop, make x non-contiguous)
SHAPES = {
    "1x7": ((1, 7), False, False),
    "3x5x64": ((3, 5, 64), False, False),
    "17x320": ((17, 320), False, False),
    "2x4100-loop": ((2, 4100), True, False),
    "noncontig-6x64": ((6, 64), False, True),
}


def make_x(shape, dtype, noncontig: bool) -> torch.Tensor:
    if noncontig:  # a transposed, strided slice: [6, 64] view of a [128, 6] buffer
        return torch.randn(shape[1] * 2, shape[0], device=DEVICE).to(dtype)[::2].t()
    return torch.randn(shape, device=DEVICE).to(dtype)


def assert_bound(actual, expected, rtol: float, atol) -> None:
    """|actual - expected| <= atol + rtol * |expected| element-wise (atol may be a tensor)."""
    actual, expected = actual.double(), expected.double()
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    assert excess.max().item() <= 0, f"max excess {excess.max().item():.3g}, max err {(actual - expected).abs().max():.3g}"


def run(fn, x, w, r, dy, dres):
    """Forward + backward; returns [y, (residual sum), dx, dw, (d residual)] as fp32."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    r = r.detach().requires_grad_() if r is not None else None
    out = fn(x, w, EPS, r)
    outs = list(out) if r is not None else [out]
    grads = torch.autograd.grad(outs, [x, w] + ([r] if r is not None else []),
                                [dy.to(outs[0].dtype)] + ([dres] if r is not None else []))
    return [t.float() for t in outs + list(grads)]


@needs_triton
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_reference(name, dtype, residual, monkeypatch):
    shape, force_loop, noncontig = SHAPES[name]
    if force_loop:  # 4100 columns in blocks of 1024: the two-pass column loop, tail block masked
        monkeypatch.setattr(K, "MAX_SINGLE_PASS_N", 1024)
        monkeypatch.setattr(K, "LOOP_BLOCK_N", 1024)
    x = make_x(shape, dtype, noncontig)
    w = (1 + 0.5 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    r = torch.randn(x.shape, device=DEVICE).to(dtype) if residual else None
    dy = torch.randn(x.shape, device=DEVICE).to(dtype).float()  # upstream grads arrive in the dtype
    dres = torch.randn(x.shape, device=DEVICE).to(dtype) if residual else None
    launched = K.launches["bwd"]

    got = run(K.rms_norm, x, w, r, dy, dres)
    assert K.launches["bwd"] == launched + 1  # the Triton path ran, forward and backward

    # fp32 reference on the same rounded inputs: the residual sum rounds in the dtype first, so feed
    # s = x + r as "x" with a zero residual (same sum exactly, and d x = d residual in the reference too).
    # (The kernel's own sum, checked against x + r below, so a 1-ulp interpreter truncation does not leak.)
    s = got[1].to(dtype) if residual else x
    r32 = torch.zeros_like(s, dtype=torch.float32) if residual else None
    ref = run(K.rms_norm_ref, s.float(), w.float(), r32, dy, dres.float() if residual else None)

    if dtype == torch.float32:
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        return
    finfo = torch.finfo(dtype)
    truncating = dtype == torch.bfloat16 and DEVICE == "cpu"  # the interpreter's bf16 casts truncate
    two_ulp = (4 if truncating else 2) * finfo.eps
    y, *rest = got
    assert_bound(y, ref[0].to(dtype), two_ulp, finfo.tiny)
    if residual:
        torch.testing.assert_close(rest.pop(0), (x + r).float(), atol=0, rtol=finfo.eps if truncating else 0)
    dx, dw = rest[0], rest[1]
    dx_ref, dw_ref = ref[-3:-1] if residual else ref[-2:]
    assert_bound(dx, dx_ref.to(dtype), two_ulp, finfo.tiny + 1e-5 * dx_ref.abs().max())
    x_hat = s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + EPS)
    dw_bound = finfo.eps * (dy.to(dtype).float() * x_hat).abs().reshape(-1, shape[-1]).sum(0)
    assert_bound(dw, dw_ref.to(dtype), two_ulp, finfo.tiny + dw_bound)
    if residual:
        torch.testing.assert_close(rest[2], dx, atol=0, rtol=0)  # x and residual enter only via their sum


@needs_triton
def test_triton_path_runs_not_the_reference(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("reference called")

    monkeypatch.setattr(K, "rms_norm_ref", boom)
    x = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    w = torch.ones(32, device=DEVICE, requires_grad=True)
    before = dict(K.launches)
    K.rms_norm(x, w, EPS).sum().backward()
    assert K.launches == {"fwd": before["fwd"] + 1, "bwd": before["bwd"] + 1}
    assert triton_runs_on(x)


def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)  # fp32 weight: the output promotes to fp32, as in HF
    before = dict(K.launches)
    y, s = K.rms_norm(x, w, EPS, r)
    assert y.dtype == torch.float32 and s.dtype == torch.bfloat16
    (y.sum() + s.float().sum()).backward()
    assert K.launches == before
    y_ref, _ = K.rms_norm_ref(x, w, EPS, r)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    assert x.grad is not None and w.grad is not None and r.grad is not None


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_torch_backward_formula(residual):
    """The ops' pure-PyTorch backward (used off-Triton) is the reference's autograd."""
    x, w = torch.randn(5, 24), torch.randn(24)
    dy, dres = torch.randn(5, 24), torch.randn(5, 24)
    _, _, rstd = K._fwd_torch(x, w, EPS, None)
    dx, dw = K._bwd_torch(dy, x, w, rstd, dres if residual else None)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    dx_ref, dw_ref = torch.autograd.grad(K.rms_norm_ref(xr, wr, EPS), [xr, wr], dy)
    torch.testing.assert_close(dx, dx_ref + (dres if residual else 0))
    torch.testing.assert_close(dw, dw_ref)


@needs_triton
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def block(x, r, w1, w2):
        y, s = K.rms_norm(x, w1, EPS, r)
        return K.rms_norm(y * 2, w2, EPS), s

    x, r = torch.randn(2, 3, 48, device=DEVICE), torch.randn(2, 3, 48, device=DEVICE)
    w1, w2 = torch.randn(48, device=DEVICE), torch.randn(48, device=DEVICE)
    leaves = [t.requires_grad_() for t in (x, r, w1, w2)]
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    out, s = compiled(*leaves)
    grads = torch.autograd.grad(out.sum() + s.sum(), leaves)
    out_e, s_e = block(*leaves)
    grads_e = torch.autograd.grad(out_e.sum() + s_e.sum(), leaves)
    torch.testing.assert_close(out, out_e)
    for a, b in zip(grads, grads_e, strict=True):
        torch.testing.assert_close(a, b)


@needs_triton
def test_opcheck():
    x = torch.randn(3, 40, device=DEVICE, requires_grad=True)
    r = torch.randn(3, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.llama_core.rms_norm.default, (x, w, EPS))
    torch.library.opcheck(torch.ops.llama_core.rms_norm_residual.default, (x, r, w, EPS))
    dy, xd, wd = torch.randn(3, 40, device=DEVICE), x.detach(), w.detach()
    rstd = torch.rsqrt(xd.pow(2).mean(-1) + EPS)
    for dres in (None, torch.randn(3, 40, device=DEVICE)):
        torch.library.opcheck(torch.ops.llama_core.rms_norm_backward.default, (dy, xd, wd, rstd, dres))


# ------------------------------------------------------------------------------------------------------
# GPU, real shapes
# ------------------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("shape,residual", [((16384, 4096), False), ((8, 2048, 4096), True),
                                            ((64, 65536), True), ((4096, 1000), False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_real_shapes(shape, residual, dtype):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], device="cuda")).to(dtype)
    r = torch.randn(shape, device="cuda", dtype=dtype) if residual else None
    dy = torch.randn(shape, device="cuda").to(dtype).float()
    dres = torch.randn(shape, device="cuda", dtype=dtype) if residual else None
    got = run(K.rms_norm, x, w, r, dy, dres)
    s = (x + r) if residual else x
    r32 = torch.zeros_like(s, dtype=torch.float32) if residual else None
    ref = run(K.rms_norm_ref, s.float(), w.float(), r32, dy, dres.float() if residual else None)
    finfo = torch.finfo(dtype)
    # GPU rsqrt is approximate (a few fp32 ulp): allow one more half-type ulp than on CPU.
    assert_bound(got[0], ref[0].to(dtype), 3 * finfo.eps, finfo.tiny)
    dx, dx_ref = got[-3 if residual else -2], ref[-3 if residual else -2]
    assert_bound(dx, dx_ref.to(dtype), 3 * finfo.eps, finfo.tiny + 1e-5 * dx_ref.abs().max())
    x_hat = s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + EPS)
    dw_bound = finfo.eps * (dy.to(dtype).float() * x_hat).abs().reshape(-1, shape[-1]).sum(0)
    dw, dw_ref = got[-2 if residual else -1], ref[-2 if residual else -1]
    assert_bound(dw, dw_ref.to(dtype), 3 * finfo.eps, finfo.tiny + 2 * dw_bound)
