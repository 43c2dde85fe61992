"""What to benchmark where: settings per device, and the model pair (llama_core and transformers on the
same weights, checked equal before anything is timed)."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..modeling.model import LlamaForCausalLM

logger = logging.getLogger(__name__)


@dataclass
class BenchSettings:
    """One benchmark run of one preset. Defaults come from :func:`default_settings`."""

    preset: str
    device: str
    dtype: str
    layers: int | None = None  # override num_hidden_layers (a shallower model of the same width)
    prompt_lens: list[int] = field(default_factory=lambda: [128, 512])
    decode_prompt_len: int = 64
    decode_tokens: int = 32  # new tokens per generate call (decode steps = this - 1)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    repeats: int = 3
    compile: bool = False  # llama_core compiled prefill/decode (and transformers' static cache + compile)
    transformers: bool = True
    load: bool = True
    quick: bool = False
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_settings(device: str, quick: bool) -> list[BenchSettings]:
    """Presets and sizes that suit the device: the ~100M synthetic model in fp32 on a CPU (``--quick``
    finishes in under two minutes on two cores, transformers included); 1B- and 8B-shaped bf16 models on
    a GPU, with compiled paths (8B only with the memory for two copies of it)."""
    if torch.device(device).type != "cuda":
        if quick:
            return [BenchSettings("synthetic-100m", device, "float32", prompt_lens=[64, 256], decode_prompt_len=32,
                                  decode_tokens=17, batch_sizes=[1, 4], repeats=3, quick=True)]
        return [BenchSettings("synthetic-100m", device, "float32", prompt_lens=[128, 512, 1024],
                              decode_prompt_len=64, decode_tokens=65, batch_sizes=[1, 8], repeats=5,
                              compile=True)]
    gpu = BenchSettings("llama3.2-1b", device, "bfloat16", prompt_lens=[128, 512, 2048], decode_prompt_len=128,
                        decode_tokens=129, batch_sizes=[1, 16], repeats=5, compile=True)
    if quick:
        return [replace(gpu, prompt_lens=[512, 2048], decode_tokens=65, repeats=3, quick=True)]
    total = torch.cuda.get_device_properties(device).total_memory
    big = [replace(gpu, preset="llama3-8b")] if total > 40e9 else []  # two bf16 8B copies + KV: ~35 GB
    return [gpu, *big]


@dataclass
class ModelPair:
    """llama_core's model and transformers' (None when not compared) on the same weights."""

    ours: LlamaForCausalLM
    theirs: Any
    checkpoint: Path  # the saved checkpoint both were loaded from (also used by the load benchmark)
    sanity: dict[str, Any]


def build_pair(settings: BenchSettings, workdir: Path) -> ModelPair:
    """Random-init the preset, save it, load it back into llama_core and (optionally) transformers, and
    check their logits agree on a random prompt: a benchmark of two different models would be meaningless."""
    dtype = getattr(torch, settings.dtype)
    overrides = {"num_hidden_layers": settings.layers} if settings.layers else {}
    torch.manual_seed(settings.seed)
    with torch.device(settings.device):
        model = LlamaForCausalLM.from_preset(settings.preset, **overrides).to(dtype)
    checkpoint = Path(tempfile.mkdtemp(prefix=f"{settings.preset}-", dir=workdir))
    model.save_pretrained(checkpoint)
    ours = model.eval()
    theirs = None
    if settings.transformers:
        theirs = load_transformers(checkpoint, dtype, settings.device)
    return ModelPair(ours, theirs, checkpoint, same_weights_check(ours, theirs, settings))


def load_transformers(checkpoint: Path, dtype: torch.dtype, device: str) -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa",
                                                          **transformers_placement(device))
    model = model.to(device)
    # Greedy and no EOS stop from the saved generation config: decoding must produce the full count.
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def transformers_placement(device: str) -> dict[str, Any]:
    """transformers loads straight onto an accelerator only through ``device_map``, which needs the
    ``accelerate`` package; without it the model is loaded on the CPU and moved."""
    import importlib.util

    if torch.device(device).type == "cpu" or importlib.util.find_spec("accelerate") is None:
        return {}
    return {"device_map": device}


@torch.inference_mode()
def same_weights_check(ours: LlamaForCausalLM, theirs: Any, settings: BenchSettings) -> dict[str, Any]:
    """Max |logit difference| and argmax agreement on a random prompt; raises if fp32 logits disagree."""
    if theirs is None:
        return {"compared": False}
    g = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=g).to(settings.device)
    a, b = ours(ids).logits.float(), theirs(ids).logits.float()
    diff = (a - b).abs().max().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    # fp32 parity is 1e-4 in the test suite; low precision only needs to pick (almost) the same tokens.
    limit = 1e-3 if settings.dtype == "float32" else None
    ok = diff <= limit if limit is not None else agree >= 0.9
    if not ok:
        raise RuntimeError(f"llama_core and transformers disagree on the same weights (max |logit diff| "
                           f"{diff:.3g}, argmax agreement {agree:.0%}): refusing to benchmark")
    return {"compared": True, "max_abs_logit_diff": diff, "argmax_agreement": agree, "ok": ok}
