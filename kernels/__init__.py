"""Triton kernels (fused RMSNorm, RoPE, int8 matmul), each beside its pure-PyTorch reference.

Empty until the kernels work lands; llama_core runs entirely on its pure-PyTorch ops meanwhile.
"""
