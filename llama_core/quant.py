"""int8 quantisation of a model's linear layers: W8A8 with LLM.int8() outliers, or weight-only int8.

    model = quantize(model, mode="int8")                    # in place; returns the model
    model = LlamaForCausalLM.from_pretrained(path, quantize="int8-weight-only")   # shard by shard
    model.save_pretrained(out)                              # int8 checkpoint, reloads as int8
    model = dequantize(model)                               # back to nn.Linear in full precision

Modes:
- ``"int8"``: weights int8 per output channel; activations quantised per token at run time (absmax);
  activation columns with any |x| > ``threshold`` (default 6.0; 0 disables) stay in the activation's
  dtype (LLM.int8()'s mixed decomposition). For prefill / large batches (int8 tensor cores).
- ``"int8-weight-only"``: weights int8 per output channel, activations stay bf16/fp16/fp32. For
  memory-bound decoding, and the more accurate of the two.

Checkpoint layout (safetensors, HF names): each quantised linear stores ``<name>.weight`` as I8 ``[N, K]``
and ``<name>.weight_scale`` as F32 ``[N]`` (``weight ~= weight_int8 * weight_scale[:, None]``); everything
else (embeddings, norms, skipped linears such as W8A8's ``lm_head``, biases) in the model's dtype. A
quantised head of a model with tied embeddings is an int8 copy of the embedding, stored as ``lm_head.*``
(the embedding itself stays in full precision). config.json
gets ``"quantization_config": {"quant_method": "llama_core_int8", "mode", "threshold", "skip"}``;
transformers cannot load this layout (``dequantize`` + ``save_pretrained`` gives one it can).

May import: torch and, lazily, the int8 ops of ``kernels``; nothing else of llama_core (it works on any
module's nn.Linear layers, so ``modeling`` and ``model_io`` build on it).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

# The kernels are imported where used, so `import llama_core` does not import Triton (which also lets a test
# set TRITON_INTERPRET=1 after importing the model: Triton reads it when triton.language is imported).

QUANT_METHOD = "llama_core_int8"
MODES = ("int8", "int8-weight-only")
DEFAULT_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold (as kernels.int8_matmul.DEFAULT_THRESHOLD)

__all__ = ["MODES", "Int8Config", "Int8Linear", "dequantize", "quantize"]


@dataclasses.dataclass(frozen=True)
class Int8Config:
    """What to quantise and how. ``skip``: module names (fnmatch patterns) kept in full precision."""

    mode: str = "int8"
    threshold: float = DEFAULT_THRESHOLD
    # None: the mode's default. W8A8 keeps lm_head in full precision (per-token activation quantisation
    # of the final hidden state costs the most accuracy there); weight-only quantises it too: on a 49k-token
    # head it is a fifth of a small model's bytes per decode step, for a perplexity change of <0.1% measured
    # on SmolLM2-135M and stories260K.
    skip: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"quantization mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ValueError(f"quantization threshold must be a number >= 0, got {self.threshold!r}")
        skip = self.skip if self.skip is not None else (("lm_head",) if self.mode == "int8" else ())
        object.__setattr__(self, "skip", tuple(skip))

    @classmethod
    def parse(cls, spec: str | dict | Int8Config) -> Int8Config:
        """From a mode name, a config.json ``quantization_config`` dict or an Int8Config."""
        if isinstance(spec, Int8Config):
            return spec
        if isinstance(spec, str):
            return cls(mode=spec)
        if isinstance(spec, dict):
            method = spec.get("quant_method", QUANT_METHOD)
            if method != QUANT_METHOD:
                raise ValueError(f"quantization_config.quant_method {method!r} is not supported "
                                 f"(llama_core reads its own {QUANT_METHOD!r} layout)")
            unknown = set(spec) - {"quant_method", "mode", "threshold", "skip"}
            if unknown:
                raise ValueError(f"quantization_config has unknown keys {sorted(unknown)}")
            return cls(**{k: v for k, v in spec.items() if k != "quant_method"})
        raise TypeError(f"quantize must be a mode name, a dict or an Int8Config, got {type(spec).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "mode": self.mode, "threshold": self.threshold, "skip": list(self.skip)}

    def skips(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.skip)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights ``[out, in]`` and fp32 per-output-channel scales (buffers, so they
    are saved and moved with the model but never trained). Output dtype = input dtype. The weights are
    frozen; the weight-only mode passes gradients to its input (a frozen base under LoRA adapters, QLoRA
    style), the W8A8 mode is inference only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, mode: str = "int8",
                 threshold: float = DEFAULT_THRESHOLD, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Int8Linear mode must be one of {MODES}, got {mode!r}")
        self.in_features, self.out_features, self.mode, self.threshold = in_features, out_features, mode, threshold
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "int8", threshold: float = DEFAULT_THRESHOLD) -> Int8Linear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, threshold, device="meta")
        q.set_weight(linear.weight.detach())
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    def set_weight(self, weight: Tensor) -> None:
        """Quantise a full-precision ``[out, in]`` weight into this layer (on the weight's device)."""
        from kernels.int8_quant import quantize_weight

        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Int8Linear: weight shape {tuple(weight.shape)} != ({self.out_features}, "
                             f"{self.in_features})")
        self.weight, self.weight_scale = quantize_weight(weight)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "int8-weight-only":
            if torch.is_grad_enabled() and x.requires_grad:
                return _WeightOnlyMatmul.apply(x, self.weight, self.weight_scale, self.bias)
            from kernels.int8_weight_only import int8_weight_only_matmul

            return int8_weight_only_matmul(x, self.weight, self.weight_scale, self.bias)
        from kernels.int8_matmul import int8_linear

        return int8_linear(x, self.weight, self.weight_scale, self.bias, self.threshold)

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) casts floating buffers too; the scales stay fp32 (a bf16 scale would add
        # up to 0.4% error per output channel on top of the quantisation).
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = self.weight_scale.float()
        return self

    def extra_repr(self) -> str:
        extra = f", threshold={self.threshold}" if self.mode == "int8" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}{extra}")


class _WeightOnlyMatmul(torch.autograd.Function):
    """The weight-only int8 matmul, differentiable w.r.t. its input only (the int8 weight, its scales and the
    bias are frozen buffers/parameters): ``dx = (dy * scale) @ w_int8``, the gradient of the dequantised
    linear the forward computes. In x's dtype, as autograd of a plain linear in that dtype would be (int8
    values are exact in bf16/fp16), so a backward holds a 2-byte, not a 4-byte, copy of one weight at a time."""

    @staticmethod
    def forward(ctx, x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
        from kernels.int8_weight_only import int8_weight_only_matmul

        ctx.save_for_backward(w_q, w_scale)
        ctx.x_dtype = x.dtype
        return int8_weight_only_matmul(x, w_q, w_scale, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w_q, w_scale = ctx.saved_tensors
        dtype = ctx.x_dtype
        dx = (grad.float() * w_scale).to(dtype) @ w_q.to(dtype)  # [..., N] * [N] @ [N, K] -> [..., K]
        return dx, None, None, None


def _linears(model: nn.Module, kind: type) -> list[tuple[nn.Module, str, str]]:
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if type(child) is kind:
                found.append((module, child_name, f"{name}.{child_name}" if name else child_name))
    return found


def replace_linears(model: nn.Module, config: Int8Config) -> list[str]:
    """Swap every ``nn.Linear`` not skipped for an empty Int8Linear of the same shape on the meta device
    (the loader fills them); records ``config`` on ``model.config``. Returns the replaced names."""
    names = []
    for parent, child_name, name in _linears(model, nn.Linear):
        if config.skips(name):
            continue
        linear = getattr(parent, child_name)
        setattr(parent, child_name, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                               config.mode, config.threshold, device="meta"))
        names.append(name)
    model.config.quantization_config = config.to_dict()
    return names


def quantize(model: nn.Module, mode: str | dict | Int8Config = "int8", threshold: float | None = None,
             skip: Sequence[str] | None = None) -> nn.Module:
    """Quantise ``model``'s linear layers in place, one layer at a time (each full-precision weight is freed
    as its int8 copy is made); returns the model. See the module docstring for the modes."""
    config = Int8Config.parse(mode)
    if threshold is not None or skip is not None:
        config = dataclasses.replace(config, **({"threshold": threshold} if threshold is not None else {}),
                                     **({"skip": tuple(skip)} if skip is not None else {}))
    if getattr(model.config, "quantization_config", None):
        raise ValueError("model is already quantized; dequantize() it first")
    for parent, child_name, name in _linears(model, nn.Linear):
        if not config.skips(name):
            setattr(parent, child_name, Int8Linear.from_linear(getattr(parent, child_name), config.mode,
                                                               config.threshold))
    model.config.quantization_config = config.to_dict()
    return model


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every Int8Linear by an nn.Linear holding its dequantised weight (in ``dtype``, default the
    model's); in place, returns the model, which then saves as a plain HF checkpoint."""
    dtype = dtype or model.dtype
    for parent, child_name, _ in _linears(model, Int8Linear):
        q = getattr(parent, child_name)
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        linear.weight = nn.Parameter(q.dequantized_weight(dtype))
        if q.bias is not None:
            linear.bias = nn.Parameter(q.bias.detach().to(dtype))
        setattr(parent, child_name, linear)
    model.config.quantization_config = None
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # a tied head was quantised from the embedding, which is still exact: share it again
    return model
