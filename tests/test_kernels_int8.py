"""int8 kernels (activation quantisation, W8A8 GEMM with outlier columns, weight-only GEMM) against their
references, and the W8A8 linear against full precision within its derived quantisation bound.

On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before any launch; kernels
are jitted at first launch). On a GPU the same tests run compiled, plus `gpu`-marked ones at Llama shapes.

Tolerances, derived:
- quantisation is bit-exact (fp32 math, IEEE divisions, explicit round-half-up), any input dtype;
- the int8 product is exact (int32), and without bias or outliers the fp32 epilogue is the same two
  multiplications in the same order, so the GEMM output equals the reference bit for bit — except that
  Triton's interpreter converts fp32 to bf16 by truncation (1 ulp instead of 1/2);
- sums of floating products (the outlier columns, weight-only, a bias add that may fuse into an FMA) differ
  from the reference by summation order only: at most 2 * K * eps32 * sum_k |x_k w_k| (the gamma_K bound of
  recursive summation, for both sides), plus one rounding of the output dtype.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from kernels import int8_matmul as MM
from kernels import int8_split_k as SK
from kernels import int8_weight_only as WO
from kernels._runtime import HAS_TRITON, interpreting
from kernels.int8_quant import quantize_rows, quantize_rows_ref, quantize_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
EPS32 = torch.finfo(torch.float32).eps
# (M, K, N): one row; odd K and N; several M- and N-blocks with a partial GROUP_M group (interpreter blocks
# are 16 x 32 x 32); K spanning several K-blocks.
SHAPES = [(1, 64, 32), (5, 70, 33), (33, 257, 96), (16, 32, 16)]


def out_rtol(dtype: torch.dtype) -> float:
    """One rounding of the output dtype; two where the interpreter truncates bf16."""
    eps = torch.finfo(dtype).eps
    return 2 * eps if dtype == torch.bfloat16 and interpreting() else eps / 2 if dtype != torch.float32 else 0.0


def assert_bound(actual, expected, rtol, atol) -> None:
    actual, expected = actual.double(), expected.double()
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    assert excess.max().item() <= 0, (f"max excess {excess.max().item():.3g}, "
                                      f"max err {(actual - expected).abs().max().item():.3g}")


def activations(m: int, k: int, dtype: torch.dtype, outlier_cols=(3,), zero_row: bool = True) -> torch.Tensor:
    x = torch.randn(m, k, device=DEVICE) * 2
    for c in outlier_cols:
        if c < k:
            x[:, c] *= 10  # |x| ~ 20: above the default threshold
    if zero_row and m > 2:
        x[2] = 0  # scale 0
    return x.to(dtype)


def int8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_weight(torch.randn(n, k, device=DEVICE) * 0.05)


# ------------------------------------------------------------------------------------------------ quantise
@needs_triton
@pytest.mark.parametrize("outliers", [False, True], ids=["plain", "outliers"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k", [(1, 7), (5, 70), (3, 5000)])  # 5000 > 4096: the kernel loops over K
def test_quantize_rows_bit_exact(m, k, dtype, outliers):
    torch.manual_seed(0)
    x = activations(m, k, dtype)
    cols = (x.abs() > 6).any(0) if outliers else None
    q, s = quantize_rows(x, cols)
    q_ref, s_ref = quantize_rows_ref(x, cols)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q.abs().max() <= 127
    if outliers and cols.any():
        assert (q[:, cols] == 0).all()


def test_quantize_rows_reconstructs_within_half_a_step():
    torch.manual_seed(1)
    x = torch.randn(9, 300, device=DEVICE)
    x[4] = 0
    q, s = quantize_rows_ref(x)
    assert torch.equal(s, x.abs().amax(1) / 127)
    assert ((q.float() * s[:, None] - x).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()
    assert (q.abs().amax(1)[s > 0] == 127).all() and (q[4] == 0).all() and s[4] == 0


# ------------------------------------------------------------------------------------------------ W8A8 GEMM
def float_part_bound(x, cols, w_q, w_scale, k):
    return 2 * k * EPS32 * ((x.float() * cols).abs() @ w_q.float().abs().t()) * w_scale


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_matmul_exact_without_outliers(m, k, n, dtype):
    torch.manual_seed(2)
    a_q, a_s = quantize_rows(activations(m, k, torch.float32, outlier_cols=()))
    w_q, w_s = int8_weight(n, k)
    got = MM.int8_matmul(a_q, a_s, w_q, w_s, out_dtype=dtype)
    ref = MM.int8_matmul_ref(a_q, a_s, w_q, w_s, out_dtype=dtype)
    assert got.dtype == dtype and got.shape == (m, n)
    if dtype == torch.bfloat16 and interpreting():
        assert_bound(got, ref, out_rtol(dtype), 0.0)
    else:
        assert torch.equal(got, ref)


@needs_triton
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_matmul_outliers_and_bias(m, k, n, dtype, bias):
    torch.manual_seed(3)
    x = activations(m, k, dtype, outlier_cols=(3, k - 1))
    cols = (x.abs() > 6).any(0)
    assert cols.any()
    a_q, a_s = quantize_rows(x, cols)
    w_q, w_s = int8_weight(n, k)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    got = MM.int8_matmul(a_q, a_s, w_q, w_s, b, x, cols, dtype)
    ref = MM.int8_matmul_ref(a_q, a_s, w_q, w_s, b, x, cols, dtype)
    atol = float_part_bound(x, cols, w_q, w_s, k) + EPS32 * ref.float().abs()  # + an FMA-fused bias add
    assert_bound(got, ref, out_rtol(dtype) + EPS32, atol)


@needs_triton
@pytest.mark.parametrize("m,k,n", SHAPES[:3])
def test_int8_matmul_torch_fallback_equals_reference(m, k, n, monkeypatch):
    """The non-Triton path (torch._int_mm + gathered outlier columns) against the same definition."""
    torch.manual_seed(4)
    x = activations(m, k, torch.float32)
    cols = (x.abs() > 6).any(0)
    a_q, a_s = quantize_rows_ref(x, cols)
    w_q, w_s = int8_weight(n, k)
    got = MM._int8_matmul_torch(a_q, a_s, w_q, w_s, None, x, cols, torch.float32)
    ref = MM.int8_matmul_ref(a_q, a_s, w_q, w_s, None, x, cols, torch.float32)
    assert_bound(got, ref, EPS32, float_part_bound(x, cols, w_q, w_s, k))
    no_outliers = MM._int8_matmul_torch(a_q, a_s, w_q, w_s, None, None, None, torch.float32)
    assert torch.equal(no_outliers, MM.int8_matmul_ref(a_q, a_s, w_q, w_s, out_dtype=torch.float32))


@pytest.mark.parametrize("threshold", [0.0, 6.0], ids=["w8a8", "llm.int8"])
def test_int8_linear_within_quantisation_bound(threshold):
    """|x w - int8(x) int8(w)| <= sum_k |x_k| s_w/2 + |q_w s_w| s_a/2 (non-outlier columns; outlier columns
    carry only the weight's error). Fails if a scale, the rounding or the outlier split is wrong."""
    torch.manual_seed(5)
    m, k, n = 6, 130, 40
    x = activations(m, k, torch.float32)
    w = torch.randn(n, k, device=DEVICE) * 0.05
    w_q, w_s = quantize_weight(w)
    got = MM.int8_linear(x, w_q, w_s, threshold=threshold)
    cols = (x.abs() > threshold).any(0) if threshold > 0 else torch.zeros(k, dtype=torch.bool, device=DEVICE)
    _, a_s = quantize_rows_ref(x, cols if threshold > 0 else None)
    w_deq = w_q.float() * w_s[:, None]
    bound = x.abs() @ (w_s[:, None] / 2).expand(n, k).t() + (a_s[:, None] / 2) * ((~cols).float() @ w_deq.abs().t())
    assert_bound(got, x @ w.t(), 0.0, bound * (1 + 1e-4) + 1e-5)


def test_outlier_decomposition_beats_plain_w8a8():
    torch.manual_seed(6)
    x = torch.randn(8, 256, device=DEVICE)
    x[:, 7] = 60.0  # one LLM.int8()-style outlier feature
    w = torch.randn(64, 256, device=DEVICE) * 0.05
    w_q, w_s = quantize_weight(w)
    exact = x @ w.t()
    err_mixed = (MM.int8_linear(x, w_q, w_s, threshold=6.0) - exact).abs().mean()
    err_plain = (MM.int8_linear(x, w_q, w_s, threshold=0.0) - exact).abs().mean()
    assert err_mixed < err_plain / 4, (err_mixed, err_plain)


# ------------------------------------------------------------------------------------------------ weight-only
@needs_triton
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_weight_only_matches_reference(m, k, n, dtype, bias):
    torch.manual_seed(7)
    x = activations(m, k, dtype)
    w_q, w_s = int8_weight(n, k)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    got = WO.int8_weight_only_matmul(x, w_q, w_s, b)
    ref = WO.int8_weight_only_matmul_ref(x, w_q, w_s, b)
    assert got.dtype == dtype and got.shape == (m, n)
    atol = 2 * k * EPS32 * (x.float().abs() @ w_q.float().abs().t()) * w_s + EPS32 * ref.float().abs()
    assert_bound(got, ref, out_rtol(dtype) + EPS32, atol)


@needs_triton
@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,bias", [(1, 600, 33, False), (16, 1030, 40, True)])  # K not a slice multiple
def test_weight_only_split_k_matches_reference(m, k, n, bias, dtype, split):
    """The decode path (K split over programs, slots summed in order by a second kernel): within the same
    summation-order bound as the plain kernel, and bit-identical from one call to the next (no atomics)."""
    torch.manual_seed(3)
    x = activations(m, k, dtype)
    w_q, w_s = int8_weight(n, k)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    got = WO._weight_only_triton(x, w_q, w_s, b, split_k=split)
    ref = WO.int8_weight_only_matmul_ref(x, w_q, w_s, b)
    atol = 2 * k * EPS32 * (x.float().abs() @ w_q.float().abs().t()) * w_s + EPS32 * ref.float().abs()
    assert_bound(got, ref, out_rtol(dtype) + EPS32, atol)
    assert torch.equal(got, WO._weight_only_triton(x, w_q, w_s, b, split_k=split))
    if dtype == torch.float32:  # the plain kernel sums the same K-blocks in another grouping: close, not equal
        plain = WO._weight_only_triton(x, w_q, w_s, b, split_k=1)
        assert_bound(got, plain, 0.0, atol)


@needs_triton
def test_autotune_candidates_are_pruned_by_rows():
    """Decode shapes tune only 16-row tiles and prefill shapes never do (each candidate costs a compilation and
    a timing per new shape on the GPU)."""
    for module in (MM, WO):
        decode = {c.kwargs["BLOCK_M"] for c in module._configs_for(1)()}
        prefill = {c.kwargs["BLOCK_M"] for c in module._configs_for(4096)()}
        middle = {c.kwargs["BLOCK_M"] for c in module._configs_for(48)()}
        assert decode == {16} and 16 not in prefill and max(prefill) >= 128
        assert 16 in middle and len(middle) > 1  # between the two, both kinds are timed


@needs_triton
@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("m,k,n", [(1, 600, 33), (16, 1030, 40)])
def test_w8a8_split_k_is_exact(m, k, n, split):
    """int32 partial sums add up to the exact product: the split-K output equals the reference bit for bit
    (fp32 out; bf16 within the interpreter's truncation), and with outliers and bias stays within the bound."""
    torch.manual_seed(4)
    a_q, a_s = quantize_rows(activations(m, k, torch.float32, outlier_cols=()))
    w_q, w_s = int8_weight(n, k)
    got = MM._int8_matmul_triton(a_q, a_s, w_q, w_s, None, None, None, torch.float32, split_k=split)
    assert torch.equal(got, MM.int8_matmul_ref(a_q, a_s, w_q, w_s, out_dtype=torch.float32))
    x = activations(m, k, torch.bfloat16, outlier_cols=(3, k - 1))
    cols = (x.abs() > 6).any(0)
    a_q, a_s = quantize_rows(x, cols)
    b = torch.randn(n, device=DEVICE).to(torch.bfloat16)
    got = MM._int8_matmul_triton(a_q, a_s, w_q, w_s, b, x, cols, torch.bfloat16, split_k=split)
    ref = MM.int8_matmul_ref(a_q, a_s, w_q, w_s, b, x, cols, torch.bfloat16)
    atol = float_part_bound(x, cols, w_q, w_s, k) + EPS32 * ref.float().abs()
    assert_bound(got, ref, out_rtol(torch.bfloat16) + EPS32, atol)
    assert torch.equal(got, MM._int8_matmul_triton(a_q, a_s, w_q, w_s, b, x, cols, torch.bfloat16, split_k=split))


def test_split_k_is_chosen_for_decode_rows_only(monkeypatch):
    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    cuda = torch.device("cuda")
    assert SK.split_k_for(1, 4096, 4096, cuda) == 4  # 64 programs x 4 <= 2 waves of 132 SMs
    assert SK.split_k_for(16, 4096, 14336, cuda) == 4
    assert SK.split_k_for(1, 14336, 4096, cuda) == 1  # 224 programs already fill the device
    assert SK.split_k_for(17, 4096, 4096, cuda) == 1  # above SPLIT_K_MAX_M
    assert SK.split_k_for(1, 4096, 4096, torch.device("cpu")) == 1
    monkeypatch.setattr(SK, "SPLIT_K_MAX_M", 0)  # how the GPU check measures the plain kernel at decode sizes
    assert SK.split_k_for(1, 4096, 4096, cuda) == 1


@pytest.mark.parametrize("rows", [3, 40], ids=["int8pack", "dequant-blas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_only_cpu_path_matches_reference(dtype, rows):
    """The non-Triton paths (torch's _weight_int8pack_mm for few half-precision rows, else dequantised BLAS)
    compute in the activation dtype: one more rounding of it than the fp32 reference."""
    torch.manual_seed(8)
    x = torch.randn(rows, 96).to(dtype)
    w_q, w_s = quantize_weight(torch.randn(40, 96) * 0.05)
    got = WO._weight_only_torch(x, w_q, w_s, None)
    ref = WO.int8_weight_only_matmul_ref(x, w_q, w_s)
    eps = torch.finfo(dtype).eps
    scale_rounding = eps if dtype != torch.float32 else 0.0  # the scale is passed in x's dtype
    atol = 96 * eps * (x.float().abs() @ w_q.float().abs().t()) * w_s
    assert_bound(got, ref, eps + scale_rounding, atol)


# ------------------------------------------------------------------------------------------------ ops, compile
def test_bad_inputs_name_the_problem():
    w_q, w_s = quantize_weight(torch.randn(8, 16))
    with pytest.raises(ValueError, match="int8"):
        MM.int8_matmul(torch.zeros(2, 16), torch.ones(2), w_q, w_s)
    with pytest.raises(ValueError, match="shapes do not fit"):
        MM.int8_matmul(torch.zeros(2, 15, dtype=torch.int8), torch.ones(2), w_q, w_s)
    with pytest.raises(ValueError, match="together"):
        MM.int8_matmul(torch.zeros(2, 16, dtype=torch.int8), torch.ones(2), w_q, w_s, x=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="bool"):
        quantize_rows(torch.zeros(2, 16), torch.zeros(16))
    with pytest.raises(ValueError, match="w_scale"):
        WO.int8_weight_only_matmul(torch.zeros(2, 16), w_q, torch.ones(7))


def test_opcheck():
    torch.manual_seed(9)
    x = torch.randn(4, 48, device=DEVICE)
    cols = (x.abs() > 1.5).any(0)
    a_q, a_s = quantize_rows(x, cols)
    w_q, w_s = quantize_weight(torch.randn(24, 48, device=DEVICE))
    torch.library.opcheck(torch.ops.llama_core.int8_quantize_rows.default, (x, cols))
    torch.library.opcheck(torch.ops.llama_core.int8_matmul.default,
                          (a_q, a_s, w_q, w_s, None, x, cols, torch.float32))
    torch.library.opcheck(torch.ops.llama_core.int8_weight_only_matmul.default, (x, w_q, w_s, None))


def test_compile_fullgraph():
    """W8A8 with outliers is one graph: the outlier mask stays on the device, no data-dependent shapes."""
    torch.manual_seed(10)
    x = activations(5, 64, torch.float32)
    w_q, w_s = quantize_weight(torch.randn(32, 64, device=DEVICE))

    def both(x):
        return MM.int8_linear(x, w_q, w_s, threshold=6.0), WO.int8_weight_only_matmul(x, w_q, w_s)

    torch._dynamo.reset()
    got = torch.compile(both, backend="aot_eager", fullgraph=True)(x)
    ref = both(x)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# ------------------------------------------------------------------------------------------------ GPU, real shapes
@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("m", [1, 16, 512])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 14336), (14336, 4096)])
def test_gpu_llama_shapes(m, k, n):
    torch.manual_seed(11)
    x = activations(m, k, torch.bfloat16, outlier_cols=(5, 1000))
    w_q, w_s = int8_weight(n, k)
    a_q, a_s = quantize_rows(x)
    assert torch.equal(MM.int8_matmul(a_q, a_s, w_q, w_s), MM.int8_matmul_ref(a_q, a_s, w_q, w_s))
    cols = (x.abs() > 6).any(0)
    a_q, a_s = quantize_rows(x, cols)
    got = MM.int8_matmul(a_q, a_s, w_q, w_s, None, x, cols, torch.bfloat16)
    ref = MM.int8_matmul_ref(a_q, a_s, w_q, w_s, None, x, cols, torch.bfloat16)
    assert_bound(got, ref, out_rtol(torch.bfloat16) + EPS32, float_part_bound(x, cols, w_q, w_s, k))
    got = WO.int8_weight_only_matmul(x, w_q, w_s)
    ref = WO.int8_weight_only_matmul_ref(x, w_q, w_s)
    assert_bound(got, ref, out_rtol(torch.bfloat16) + EPS32,
                 2 * k * EPS32 * (x.float().abs() @ w_q.float().abs().t()) * w_s)


# ------------------------------------------------------------------------------------------------ benchmark
def test_benchmark_sweep_rows():
    """The int8 benchmark's sweep (llama_core.bench.int8) runs every implementation it can and relates
    each to the dense matmul of the same shape."""
    from llama_core.bench.int8 import int8_matmul_rows

    rows = int8_matmul_rows(DEVICE, m_values=(1, 20), shapes=((64, 32),), dtype="float32", repeats=1)
    impls = {(r["impl"], r["m"]) for r in rows}
    assert {("dense_matmul", 1), ("w8a8_gemm", 20), ("w8a8_linear", 1), ("weight_only", 20)} <= impls
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] == pytest.approx(2 * r["m"] * 32 * 64 / r["ms"] / 1e9)
        dense = next(d for d in rows if d["impl"] == "dense_matmul" and d["m"] == r["m"])
        assert r["speedup_vs_dense"] == pytest.approx(dense["ms"] / r["ms"])
