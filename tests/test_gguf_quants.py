"""GGML block types: the torch dequantisation and quantisation against gguf's numpy reference (llama.cpp's
``gguf.quants``), bit for bit, on random blocks, on every fp16/bf16 bit pattern and on a real GGUF file.

Random blocks are random bytes with finite fp16 scale fields (zero, subnormal and negative ones among them):
random bytes in a scale would be NaN/inf now and then, which both sides turn into the same NaNs but which
says nothing about the arithmetic. Equality is on the float32 bits (``-0.0 != 0.0``, NaN payloads compared).

Q8_0 round trip bound, derived: per block of 32, d = max|x| / 127 and q = round(x / d), so |q d - x| <= d/2
(up to the rounding of x * (1/d), ~2^-24 relative); the stored scale is fp16(d), off by at most 2^-11 d
(half an fp16 ulp, d in fp16's normal range here), which moves q * d by at most 127 * 2^-11 d. Hence
|x^ - x| <= d * (1/2 + 127 * 2^-11) * (1 + 2^-20).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests.conftest import REPO, assets_dir

gguf = pytest.importorskip("gguf")

from checkpoints_convert import gguf_quants  # noqa: E402
from checkpoints_convert.gguf_quants import dequantize, quantize  # noqa: E402

T = gguf.GGMLQuantizationType
FLOATS = ["F32", "F16", "BF16"]
QUANTS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# byte offsets of the fp16 fields (d, and m/dmin) in each block (llama.cpp's ggml-common.h)
FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
SMOLLM2 = assets_dir() / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def bits(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.array(t)) if isinstance(t, np.ndarray) else t  # a copy: maps are read-only
    return t.contiguous().view(torch.int32)


def random_data(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """What GGUFReader hands out for a tensor of ``shape``: typed elements for F32/F16, else uint8 bytes of
    shape ``(*shape[:-1], bytes per row)``."""
    if name == "F32":
        return (rng.standard_normal(shape) * 3).astype(np.float32)
    if name == "F16":
        return (rng.standard_normal(shape) * 3).astype(np.float16)
    if name == "BF16":
        return rng.integers(0, 256, (*shape[:-1], shape[-1] * 2), dtype=np.uint8)
    block_size, type_size = gguf.GGML_QUANT_SIZES[T[name]]
    data = rng.integers(0, 256, (*shape[:-1], shape[-1] // block_size * type_size), dtype=np.uint8)
    blocks = data.reshape(-1, type_size)
    for offset in FP16_FIELDS[name]:
        scale = (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16)
        scale[::5] = 0
        scale[1::7] = np.float16(3e-6)  # subnormal
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return data


def check(data: np.ndarray, name: str, shape: tuple[int, ...]) -> None:
    expected = bits(gguf.quants.dequantize(data, T[name]).reshape(shape))
    for impl in ("torch", "numpy", "auto"):
        out = dequantize(data, T[name], shape, impl=impl)
        assert out.dtype == torch.float32 and out.shape == shape, impl
        assert torch.equal(bits(out), expected), f"{name} {impl}: differs from gguf"


@pytest.mark.parametrize("name", FLOATS + QUANTS)
def test_dequantize_bit_equal_to_gguf(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    block_size = gguf.GGML_QUANT_SIZES[T[name]][0]
    for shape in [(7, 3 * block_size), (1, block_size), (2, 3, 2 * block_size), (5 * block_size,)]:
        check(random_data(name, shape, rng), name, shape)


@pytest.mark.parametrize("name", ["F16", "Q4_1", "Q6_K"])
@pytest.mark.parametrize("budget_blocks", [1, 2, 5], ids=lambda b: f"chunk{b}")
def test_dequantize_in_chunks(name, budget_blocks, monkeypatch):
    """Chunks of whole rows with a partial last one (budget 5 blocks, rows of 2), and rows longer than the
    budget (chunks of blocks that cut rows)."""
    block_size = gguf.GGML_QUANT_SIZES[T[name]][0]
    monkeypatch.setattr(gguf_quants, "CHUNK_ELEMENTS", budget_blocks * block_size)
    shape = (9, 2 * block_size)
    check(random_data(name, shape, np.random.default_rng(1)), name, shape)


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_every_16_bit_pattern(name):
    """All 65536 patterns: signed zeros, subnormals, infinities, and NaN payloads (torch quiets signalling
    fp16 NaNs on its own; the result must still be numpy's)."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(64, 1024)
    data = patterns.view(np.float16) if name == "F16" else patterns.view(np.uint8)
    check(data, name, (64, 1024))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["F32", "BF16", "Q8_0", "Q4_K"])
def test_dequantize_dtype_casts_at_the_end(name, dtype, monkeypatch):
    monkeypatch.setattr(gguf_quants, "CHUNK_ELEMENTS", 512)  # several chunks through the fp32 scratch
    shape = (6, 512)
    data = random_data(name, shape, np.random.default_rng(2))
    expected = torch.from_numpy(gguf.quants.dequantize(data, T[name]).reshape(shape)).to(dtype)
    for impl in ("torch", "numpy"):
        out = dequantize(data, T[name], shape, dtype=dtype, impl=impl)
        assert out.dtype == dtype and out.shape == shape
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), impl


@pytest.mark.parametrize("name", ["F32", "F16", "Q4_1"])
def test_result_owns_its_memory(name):
    data = random_data(name, (4, 64), np.random.default_rng(3))
    data.flags.writeable = False  # as GGUFReader's memory map
    before = data.copy()
    out = dequantize(data, T[name], (4, 64))
    out.add_(1)  # would crash on a read-only map, or change the source through a view
    assert np.array_equal(data, before)


def test_dequantize_rejects_unsupported_types_and_bad_sizes():
    for name in ["IQ2_XXS", "Q8_1", "Q8_K", "TQ1_0", "I32"]:
        with pytest.raises(ValueError, match=rf"{name}.*supported.*Q4_1.*Q6_K"):
            dequantize(np.zeros(1024, np.uint8), T[name], (256,))
    with pytest.raises(ValueError, match="supported"):
        dequantize(np.zeros(4, np.uint8), 999, (1,))
    with pytest.raises(ValueError, match="takes 40 bytes, got 38"):
        dequantize(np.zeros(38, np.uint8), T.Q4_1, (64,))
    with pytest.raises(ValueError, match="whole blocks of 32"):
        dequantize(np.zeros(40, np.uint8), T.Q4_1, (2, 48))
    with pytest.raises(ValueError, match="impl"):
        dequantize(np.zeros(40, np.uint8), T.Q4_1, (64,), impl="cuda")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ quantise
def quantize_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 96, generator=g) * 2
    x[1] = 0  # zero blocks: d = 0, q = 0
    x[3, :32] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5] + [0.0] * 25)  # d = 1: ties away from 0
    x[3, 32:64] *= 1e7  # fp16 scale overflow: d > 65504 becomes inf
    x[4, :32] *= 1e-6  # subnormal fp16 scale
    return [x, x[0], x[:4].reshape(2, 2, 96), (x * 3).bfloat16(), torch.randn(3, 64, generator=g).requires_grad_()]


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "Q8_0"])
def test_quantize_bit_equal_to_gguf(name):
    for x in quantize_inputs():
        with np.errstate(over="ignore", invalid="ignore"):  # the fp16 overflow row
            expected = gguf.quants.quantize(x.detach().float().numpy(), T[name])
        for impl in ("torch", "numpy", "auto"):
            with np.errstate(over="ignore", invalid="ignore"):
                got = quantize(x, T[name], impl=impl)
            assert got.dtype == expected.dtype and got.shape == expected.shape, (impl, got.shape, expected.shape)
            assert got.tobytes() == expected.tobytes(), (name, impl)


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_quantize_nan_payloads_and_rounding_on_random_bits(name):
    """Random float32 bit patterns (a quarter NaNs with random payloads, infinities, subnormals, ties)."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    x[::4] = (x[::4] & 0x807FFFFF) | 0x7F800000  # NaN exponent (inf where the payload is 0)
    x[1::4] &= 0x8000FFFF if name == "BF16" else 0x80001FFF  # round-to-even ties and sticky bits
    with np.errstate(over="ignore", invalid="ignore"):
        expected = gguf.quants.quantize(x.view(np.float32), T[name])
    assert quantize(torch.from_numpy(x.view(np.float32)), T[name]).tobytes() == expected.tobytes()


def test_q8_0_round_trip_bound():
    x = torch.randn(33, 320) * torch.logspace(-2, 1, 33).unsqueeze(1)  # max|x| spans 3 decades
    q = quantize(x, T.Q8_0)
    x_hat = dequantize(q, T.Q8_0, tuple(x.shape))
    d = x.view(33, 10, 32).abs().amax(-1, keepdim=True) / 127
    bound = d * (0.5 + 127 * 2**-11) * (1 + 2**-20)
    assert ((x_hat - x).view(33, 10, 32).abs() <= bound).all()


def test_quantize_rejects():
    with pytest.raises(ValueError, match=r"Q4_K.*supported.*F32, F16, BF16, Q8_0"):
        quantize(torch.zeros(256), T.Q4_K)
    with pytest.raises(ValueError, match="whole blocks of 32"):
        quantize(torch.zeros(2, 48), T.Q8_0, impl="numpy")
    with pytest.raises(ValueError, match="scalar"):
        quantize(torch.tensor(1.0), T.BF16)
    with pytest.raises(ValueError, match="impl"):
        quantize(torch.zeros(32), T.Q8_0, impl="fast")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ real GGUF file
@pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"asset {SMOLLM2} not present (set LLAMA_CORE_ASSETS)")
def test_smollm2_q4_1_file_both_implementations():
    from llama_core.model_io.gguf_file import GGUFFile

    f = GGUFFile(SMOLLM2)
    tensors = {t.name: t for t in f.tensors}
    picks = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.29.ffn_gate.weight",
             "blk.0.attn_norm.weight"]
    assert [tensors[p].ggml_type.name for p in picks] == ["Q8_0", "Q4_1", "Q4_1", "Q4_1", "F32"]
    for name in picks:
        t = tensors[name]
        data, shape = t.data, t.shape
        if name == "token_embd.weight":  # 49152 x 576: the first 4096 rows keep the test quick
            data, shape = data[:4096], (4096, *shape[1:])
        a = dequantize(data, t.ggml_type, shape, impl="torch")
        b = dequantize(data, t.ggml_type, shape, impl="numpy")
        assert torch.equal(bits(a), bits(b)), name
        assert torch.equal(bits(a), bits(gguf.quants.dequantize(data, t.ggml_type).reshape(shape))), name
        assert a.isfinite().all() and 0 < a.std() < 10, name  # real weights, not garbage


# ------------------------------------------------------------------------------------------------- memory
CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from checkpoints_convert.gguf_quants import dequantize
    from llama_core.model_io.gguf_file import import_gguf

    def status_bytes(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    T = import_gguf().GGMLQuantizationType
    data = np.memmap(sys.argv[1], dtype=np.uint8, mode="r").reshape(4096, -1)
    dequantize(data[:8], T.Q8_0, (8, 2048))  # warm up allocator and imports
    baseline = status_bytes("VmRSS")
    out = dequantize(data, T.Q8_0, (4096, 2048))
    print(json.dumps({"extra": status_bytes("VmHWM") - baseline, "out": out.numel() * 4, "in": data.size}))
""")


def test_dequantize_peak_memory(tmp_path):
    """A 32 MiB fp32 output from a memory-mapped Q8_0 file: the process grows by the output, the mapped input
    pages and chunk temporaries (~ MiB), where gguf's numpy holds two fp32 copies at its peak."""
    path = tmp_path / "q8_0.bin"
    random_data("Q8_0", (4096, 2048), np.random.default_rng(6)).tofile(path)
    run = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=REPO, capture_output=True, text=True,
                         check=True)
    r = json.loads(run.stdout)
    assert r["extra"] <= r["out"] + r["in"] + 12 * 2**20, r
