"""Triton kernels, one op per file, each beside its pure-PyTorch reference.

- ``rms_norm.rms_norm(x, weight, eps, residual=None)``: fused (residual add +) RMSNorm, forward and backward.
- ``rope.rope(q, k, position_ids, inv_freq, attention_scaling=1.0, interleaved=False)``: rotary embedding of
  q and k in one launch, angles computed in-kernel in fp32; forward and backward.
- ``int8_quant``, ``int8_matmul``, ``int8_weight_only``: per-row int8 quantisation, the W8A8 GEMM with
  in-kernel outliers, and the weight-only int8 GEMM (inference; used by ``llama_core.quant``).

Both are ``torch.library`` custom ops (``llama_core::rms_norm``, ``llama_core::rope`` and their backward
ops) with fake implementations, so ``torch.compile(fullgraph=True)`` sees no graph break. On CPU tensors
the references run, unless ``TRITON_INTERPRET=1`` (Triton's interpreter: how CI tests the kernels).
The model picks them with ``kernels="auto" | "triton" | "torch"`` (see ``_runtime.use_triton_op``).

The lowest layer: may import torch and (lazily, at first launch) triton; nothing of llama_core, so that
``import llama_core`` never imports Triton (setting TRITON_INTERPRET after Triton is imported breaks it).
"""
