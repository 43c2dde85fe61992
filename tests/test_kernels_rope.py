"""Fused RoPE kernel against its pure-PyTorch reference and llama_core's rotary embedding.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set below before the kernel is
imported) at tiny shapes; ``test_triton_path_runs`` proves the kernel, not the reference, produced them.

Tolerances (DESIGN.md "Numerics contract"):
* fp32: 1e-5 absolute. Kernel and reference do the same fp32 ops; only cos/sin implementations and FMA
  contraction differ, a few 1e-7 at |x| ~ 4.
* fp16/bf16: the kernel computes in fp32 and rounds once, so it is the fp32 reference correctly rounded
  up to the fp32 error (~1e-7 relative, far below a half ulp of 2^-11 / 2^-8): at most 1 ulp from the
  fp32 reference cast to the dtype (1 only where the fp32 value sits on a rounding midpoint), plus 1e-5 for
  outputs near zero where the rotation cancels and fp32 rounding exceeds the dtype's ulp. The other
  side: the kernel must be at least as close to an fp64 truth as llama_core's torch path in that dtype
  (which rounds cos/sin, both products and the sum), so a kernel that lost precision fails.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before kernels.rope creates its @triton.jit kernel

import kernels.rope as rope_module
from kernels._runtime import HAS_TRITON
from kernels.rope import rope, rope_ref
from llama_core.modeling.rope import ROPE_FUNCTIONS, RotaryEmbedding, apply_rope
from tests.conftest import small_config

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF_DTYPES = (torch.float16, torch.bfloat16)


def inv_freq_for(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return ROPE_FUNCTIONS["default"](head_dim, theta, None, 2048)[0]


def make_inputs(batch=3, seq=2, n_heads=4, n_kv=2, head_dim=64, dtype=torch.float32, per_row_freq=False):
    q = torch.randn(batch, seq, n_heads, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(batch, seq, n_kv, head_dim, dtype=dtype, device=DEVICE)
    # Left-padding style: each row starts at a different offset (and positions reach a few hundred radians).
    offsets = torch.tensor([0, 5, 300, 17, 1000][:batch], device=DEVICE)[:, None]
    position_ids = torch.arange(seq, device=DEVICE)[None, :] + offsets  # [batch, seq] int64
    inv_freq = inv_freq_for(head_dim).to(DEVICE)
    if per_row_freq:  # dynamic NTK: a different base per row
        inv_freq = inv_freq[None, :] ** torch.linspace(1.0, 1.1, batch, device=DEVICE)[:, None]
    return q, k, position_ids, inv_freq


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of the dtype's values at |x|, as fp32."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).float()


def assert_half_close(out: torch.Tensor, ref32: torch.Tensor, ref_dtype_path: torch.Tensor | None = None,
                      truth: torch.Tensor | None = None) -> None:
    ref = ref32.to(out.dtype)
    err = (out.float() - ref.float()).abs()
    # + 1e-5 (the fp32 contract): near-zero outputs (x1 cos - x2 sin cancelling) have ulps below fp32's
    # rounding error of the products, so there the fp32 references themselves differ by more than 1 ulp.
    bound = torch.maximum(ulp(ref), ulp(out)) + 1e-5
    assert (err <= bound).all(), f"max error {(err / bound).max().item():.2f} ulp"
    # Triton's interpreter casts fp32 -> bf16 by truncation (triton/runtime/interpreter.py cast_impl), the GPU
    # rounds to nearest: still within the 1-ulp bound above, but not more accurate than the torch path.
    if ref_dtype_path is not None and not (out.dtype == torch.bfloat16 and out.device.type == "cpu"):
        kernel_err = (out.double() - truth).abs().mean()
        torch_err = (ref_dtype_path.double() - truth).abs().mean()
        assert kernel_err <= torch_err, (kernel_err.item(), torch_err.item())


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("n_heads, n_kv", [(4, 4), (4, 2), (8, 2), (4, 1)], ids=["mha", "gqa2", "gqa4", "mqa"])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_forward(head_dim, n_heads, n_kv, interleaved, dtype):
    q, k, pos, inv_freq = make_inputs(n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, dtype=dtype)
    q_out, k_out = rope(q, k, pos, inv_freq, 1.0, interleaved)
    assert q_out.dtype == dtype and q_out.shape == q.shape and k_out.shape == k.shape
    ref32 = rope_ref(q.float(), k.float(), pos, inv_freq, 1.0, interleaved)
    if dtype == torch.float32:
        torch.testing.assert_close(q_out, ref32[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(k_out, ref32[1], atol=1e-5, rtol=0)
        return
    truth = rope_ref(q.double(), k.double(), pos, inv_freq.double(), 1.0, interleaved)
    in_dtype = rope_ref(q, k, pos, inv_freq, 1.0, interleaved)
    for out, r32, rd, t in zip((q_out, k_out), ref32, in_dtype, truth, strict=True):
        assert_half_close(out, r32, rd, t)


@pytest.mark.parametrize("attention_scaling", [1.0, 1.2079], ids=["scale1", "yarn_mscale"])
@pytest.mark.parametrize("per_row_freq", [False, True], ids=["shared_freq", "per_row_freq"])
@pytest.mark.parametrize("batch", [1, 3])
def test_rows_frequencies_scaling(batch, per_row_freq, attention_scaling):
    q, k, pos, inv_freq = make_inputs(batch=batch, seq=3, per_row_freq=per_row_freq)
    out = rope(q, k, pos, inv_freq, attention_scaling)
    ref = rope_ref(q, k, pos, inv_freq, attention_scaling)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=0)
    # Each row is rotated as if it were alone (left padding does not leak across rows).
    row = rope(q[-1:], k[-1:], pos[-1:], inv_freq[-1:] if per_row_freq else inv_freq, attention_scaling)
    torch.testing.assert_close(row[0], out[0][-1:], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ backward
def grads(fn, q, k, pos, inv_freq, scaling, interleaved, grad_dtype=torch.float32):
    """Gradients of q and k under a fixed random upstream gradient (values representable in grad_dtype)."""
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_out, k_out = fn(q, k, pos, inv_freq, scaling, interleaved)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    gq = torch.randn(q_out.shape, generator=gen, device=DEVICE).to(grad_dtype).to(q_out.dtype)
    gk = torch.randn(k_out.shape, generator=gen, device=DEVICE).to(grad_dtype).to(k_out.dtype)
    return torch.autograd.grad((q_out, k_out), (q, k), (gq, gk))


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("n_heads, n_kv", [(4, 2), (4, 1)], ids=["gqa2", "mqa"])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_backward_fp32(head_dim, n_heads, n_kv, interleaved):
    q, k, pos, inv_freq = make_inputs(n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, per_row_freq=True)
    got = grads(rope, q, k, pos, inv_freq, 1.2079, interleaved)
    want = grads(rope_ref, q, k, pos, inv_freq, 1.2079, interleaved)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_backward_half(dtype):
    # The backward is the same kernel (sin negated), so the same 1-ulp bound holds against fp32 autograd.
    q, k, pos, inv_freq = make_inputs(head_dim=80, dtype=dtype)
    got = grads(rope, q, k, pos, inv_freq, 1.0, False, dtype)
    want = grads(rope_ref, q.float(), k.float(), pos, inv_freq, 1.0, False, dtype)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        assert_half_close(g, w)


# ------------------------------------------------------------------------------------------ layouts
def test_non_contiguous_inputs():
    batch, seq, n_heads, n_kv, head_dim = 2, 3, 4, 2, 80
    qkv = torch.randn(batch, seq, n_heads + 2 * n_kv, head_dim, device=DEVICE)  # a fused qkv projection
    q, k = qkv[:, :, :n_heads], qkv[:, :, n_heads:n_heads + n_kv]  # strided views, read in place
    q_t = torch.randn(batch, n_heads, seq, head_dim, device=DEVICE).transpose(1, 2)  # [b, s, h, d] view
    k_odd = torch.randn(batch, seq, n_kv, 2 * head_dim, device=DEVICE)[..., ::2]  # last dim strided: copied
    pos = torch.arange(seq, device=DEVICE)[None].expand(batch, seq)
    inv_freq = inv_freq_for(head_dim).to(DEVICE)
    for qq, kk in ((q, k), (q_t, k_odd)):
        assert not qq.is_contiguous() and not kk.is_contiguous()
        out = rope(qq, kk, pos, inv_freq)
        ref = rope_ref(qq.contiguous(), kk.contiguous(), pos, inv_freq)
        for o, r in zip(out, ref, strict=True):
            assert o.is_contiguous()
            torch.testing.assert_close(o, r, atol=1e-5, rtol=0)
        got = grads(rope, qq, kk, pos, inv_freq, 1.0, False)
        want = grads(rope_ref, qq, kk, pos, inv_freq, 1.0, False)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_broadcast_position_ids_and_empty():
    q, k, pos, inv_freq = make_inputs(batch=2, seq=3)
    shared = pos[:1]  # [1, seq], as HF passes it for an unpadded batch
    out = rope(q, k, shared, inv_freq)
    ref = rope_ref(q, k, shared.expand(2, 3), inv_freq)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=0)
    q0, k0 = q[:, :0], k[:, :0]
    assert rope(q0, k0, pos[:, :0], inv_freq)[0].shape == q0.shape


def test_rejects_bad_shapes():
    q, k, pos, inv_freq = make_inputs()
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        rope(q[:, :, :3], k, pos, inv_freq)
    with pytest.raises(ValueError, match="inv_freq"):
        rope(q, k, pos, inv_freq[:-1])
    with pytest.raises(ValueError, match="position_ids"):
        rope(q, k, pos[:, :1], inv_freq)


# ------------------------------------------------------------------------------------------ llama_core
ROPES = {
    "default": {},
    "linear": dict(rope_scaling=dict(rope_type="linear", factor=2.0)),
    "dynamic": dict(rope_scaling=dict(rope_type="dynamic", factor=2.0), max_position_embeddings=8),
    "llama3": dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                          high_freq_factor=4.0, original_max_position_embeddings=8)),
    "yarn": dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8)),
}


@pytest.mark.parametrize("rope_type", list(ROPES))
def test_llama_core_rope_types(rope_type):
    config = small_config(**ROPES[rope_type])
    rotary = RotaryEmbedding(config).to(DEVICE)
    batch, seq = 2, 3
    # Row 1 is left-padded far past max_position_embeddings, so dynamic NTK gives it its own frequencies.
    pos = torch.arange(seq, device=DEVICE)[None] + torch.tensor([[0], [20]], device=DEVICE)
    q = torch.randn(batch, seq, config.num_attention_heads, config.head_dim, device=DEVICE)
    k = torch.randn(batch, seq, config.num_key_value_heads, config.head_dim, device=DEVICE)
    inv_freq = rotary.frequencies(pos)
    if rope_type == "dynamic":
        assert inv_freq.shape == (batch, config.head_dim // 2)
    if rope_type == "yarn":
        assert rotary.attention_scaling != 1.0
    angles = rotary(pos, torch.float32)
    # llama_core's attention rotates [batch, heads, seq, head_dim].
    want_q = apply_rope(q.transpose(1, 2), angles.cos, angles.sin).transpose(1, 2)
    want_k = apply_rope(k.transpose(1, 2), angles.cos, angles.sin).transpose(1, 2)
    got_q, got_k = rope(q, k, pos, inv_freq, rotary.attention_scaling)
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ dispatch
@pytest.mark.skipif(DEVICE != "cpu", reason="checks the interpreter path on CPU")
def test_triton_path_runs(monkeypatch):
    q, k, pos, inv_freq = make_inputs()
    want = rope_ref(q, k, pos, inv_freq)

    def fail(*args, **kwargs):
        raise AssertionError("the torch reference ran instead of the kernel")

    monkeypatch.setattr(rope_module, "_rope_torch", fail)
    got = rope(q, k, pos, inv_freq)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    grads(rope, q, k, pos, inv_freq, 1.0, False)  # the backward op runs the kernel too


def test_reference_fallback_with_autograd(monkeypatch):
    monkeypatch.setattr(rope_module, "triton_runs_on", lambda t: False)
    monkeypatch.setattr(rope_module, "_rope_triton", None)  # calling it would raise
    q, k, pos, inv_freq = make_inputs(per_row_freq=True)
    got = grads(rope, q, k, pos, inv_freq, 1.5, True)
    want = grads(rope_ref, q, k, pos, inv_freq, 1.5, True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(backend):
    q, k, pos, inv_freq = make_inputs(seq=2)
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: rope(*a, attention_scaling=1.1), fullgraph=True, backend=backend)
    got = grads(lambda q, k, p, f, s, i: fn(q, k, p, f), q, k, pos, inv_freq, 1.1, False)
    want = grads(rope_ref, q, k, pos, inv_freq, 1.1, False)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_opcheck():
    q, k, pos, inv_freq = make_inputs(batch=2, seq=2, n_heads=2, n_kv=1, head_dim=64)
    q.requires_grad_()
    k.requires_grad_()
    torch.library.opcheck(torch.ops.llama_core.rope.default, (q, k, pos, inv_freq, 1.1, False))
    torch.library.opcheck(torch.ops.llama_core.rope_backward.default, (q, k, pos, inv_freq[None].expand(2, -1), 1.1, True))


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=str)
def test_gpu_llama3_8b_shapes(dtype):
    batch, seq, n_heads, n_kv, head_dim = 2, 8192, 32, 8, 128  # 16384 tokens
    q = torch.randn(batch, seq, n_heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, seq, n_kv, head_dim, device="cuda", dtype=dtype)
    pos = torch.arange(seq, device="cuda")[None] + torch.tensor([[0], [100_000]], device="cuda")
    config = small_config(rope_theta=500000.0, rope_scaling=ROPES["llama3"]["rope_scaling"])
    inv_freq = ROPE_FUNCTIONS["llama3"](head_dim, 500000.0, config.rope_scaling, 131072)[0].cuda()
    out = rope(q, k, pos, inv_freq)
    ref32 = rope_ref(q.float(), k.float(), pos, inv_freq)
    for o, r in zip(out, ref32, strict=True):
        if dtype == torch.float32:
            # Angles reach 1e5 rad: libdevice and torch range reductions differ by a few fp32 ulp of the angle.
            torch.testing.assert_close(o, r, atol=1e-4, rtol=0)
        else:
            assert_half_close(o, r)
    got = grads(rope, q, k, pos, inv_freq, 1.0, False, dtype)
    want = grads(rope_ref, q.float(), k.float(), pos, inv_freq, 1.0, False, dtype)
    for g, w in zip(got, want, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
        else:
            assert_half_close(g, w)
