"""What a benchmark record must say about where and with what it ran."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

_REPO = Path(__file__).resolve().parents[2]


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # platform.processor() is often just "x86_64" on Linux
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return "-".join(filter(None, re.split(r"[^a-z0-9.]+", text.lower())))


def git_sha() -> str:
    """Short sha of the source checkout, "-dirty" when tracked files differ; LLAMA_CORE_GIT_SHA where there
    is no .git (a copied tree on a remote GPU machine, an installed wheel)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=_REPO,
                              capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LLAMA_CORE_GIT_SHA", "unknown")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(device: str) -> dict[str, Any]:
    from .._version import __version__

    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "llama_core": __version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # what else was running: on a shared machine, the first thing to read beside a surprising number
        "load_average": load_average(),
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (as ``uptime`` prints them), None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
