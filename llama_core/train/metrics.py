"""Throughput and model FLOPs utilisation (MFU), PaLM's definition: model FLOPs / (time * peak FLOPs)."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (no sparsity), per device, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
    "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0,
    "V100": 125.0, "B200": 2250.0,
}


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's bf16 peak in TFLOP/s, or None when unknown (CPUs): MFU is then not reported."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return value
    return None


def mfu(flops: float, seconds: float, devices: int, peak: float | None) -> float | None:
    """Fraction of the devices' combined peak reached by ``flops`` model FLOPs in ``seconds``."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (devices * peak * 1e12)
