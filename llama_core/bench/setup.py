"""What to benchmark where: settings per device, and the models (llama_core, transformers and llama.cpp on the
same weights: a random-init preset or real weights from ``--model``, checked equal before anything is timed)."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..model_io.gguf_file import find_gguf
from ..modeling.model import LlamaForCausalLM
from . import llamacpp
from .prompts import Prompts, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class BenchSettings:
    """One benchmark run of one model: a random-init ``preset``, or real weights from ``model`` (an HF checkpoint
    directory or a GGUF file; then ``preset`` is None). Defaults come from :func:`default_settings`."""

    preset: str | None
    device: str
    dtype: str
    model: str | None = None
    layers: int | None = None  # override num_hidden_layers (a shallower model of the same width)
    prompt_lens: list[int] = field(default_factory=lambda: [128, 512])
    decode_prompt_len: int = 64
    decode_tokens: int = 32  # new tokens per generate call (decode steps = this - 1)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    repeats: int = 3
    compile: bool = False  # llama_core compiled prefill/decode (and transformers' static cache + compile)
    transformers: bool = True
    llama_cpp: bool = True  # llama.cpp as a third library, where its binding imports and the device is a CPU
    int8: bool = False  # also llama_core int8-weight-only (and llama.cpp Q8_0 beside it)
    load: bool = True
    quick: bool = False
    seed: int = 0
    # Only these prefill/decode candidates ("llama_core/compiled", "transformers/eager", ...; None: all that
    # apply): a time-boxed run (the GPU check) drops the ones whose compilation it cannot afford.
    only: list[str] | None = None

    def keep(self, fns: dict[str, Any]) -> dict[str, Any]:
        """``fns`` restricted to :attr:`only` (unchanged when it is None)."""
        return fns if self.only is None else {k: v for k, v in fns.items() if k in self.only}

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.model is None):
            raise ValueError(f"benchmark settings need exactly one of preset and model (got {self.preset!r} and "
                             f"{self.model!r})")

    @property
    def name(self) -> str:
        """What the record calls the model: the preset, or the checkpoint's file or directory name."""
        return self.preset if self.model is None else Path(self.model).name

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name}


QUICK_CPU_REPEATS = 5  # interleaved repeats of --quick on a CPU: a [min, max] of five ratios per verdict


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_settings(device: str, quick: bool) -> list[BenchSettings]:
    """Presets and sizes that suit the device: the ~100M synthetic model in fp32 on a CPU; 1B- and 8B-shaped
    bf16 models on a GPU, with compiled paths (8B only with the memory for two copies of it).

    ``quick`` on a CPU measures what the targets are about, on the same model, and little else, so that it
    finishes in about 30 s on two idle cores (75 s at load average 3.5): one prompt length, batch-1 decode
    (no batched decode, no compile: a compile alone is 25-40 s), one round of loads. Five interleaved repeats
    keep a spread behind every speed verdict (the one-round load RSS ratio gets none; see ``targets``); 16
    decode steps (~0.4 s between the two timed generate calls on an idle machine) stay well above the
    timer's noise."""
    if torch.device(device).type != "cuda":
        if quick:
            return [BenchSettings("synthetic-100m", device, "float32", prompt_lens=[128], decode_prompt_len=32,
                                  decode_tokens=17, batch_sizes=[1], repeats=QUICK_CPU_REPEATS, quick=True)]
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
    """The models of one benchmark on the same weights: llama_core's, transformers' (None when not compared),
    llama.cpp's (by GGUF type; empty when not measured) and, with ``int8``, llama_core int8-weight-only."""

    ours: LlamaForCausalLM
    theirs: Any
    checkpoint: Path  # what llama_core and transformers loaded (also used by the load benchmark)
    owned: bool  # the checkpoint is a temporary of this run (a preset saved), not the user's --model
    prompts: Prompts
    sanity: dict[str, Any]
    ours_int8: LlamaForCausalLM | None = None
    llama_cpp: dict[str, llamacpp.LlamaCppModel] = field(default_factory=dict)
    llama_cpp_skipped: str | None = None  # why llama.cpp is not measured, if it is not

    def close(self) -> None:
        for runner in self.llama_cpp.values():
            runner.close()
        self.llama_cpp.clear()


def build_pair(settings: BenchSettings, workdir: Path) -> ModelPair:
    """llama_core's model (a preset, random-init and saved; or ``settings.model`` loaded), transformers' from
    the same checkpoint, llama.cpp's from a GGUF of it; logits checked to agree before anything is timed: a
    benchmark of different models would be meaningless."""
    dtype = getattr(torch, settings.dtype)
    if settings.model is None:
        overrides = {"num_hidden_layers": settings.layers} if settings.layers else {}
        torch.manual_seed(settings.seed)
        with torch.device(settings.device):
            model = LlamaForCausalLM.from_preset(settings.preset, **overrides).to(dtype)
        checkpoint = Path(tempfile.mkdtemp(prefix=f"{settings.preset}-", dir=workdir))
        model.save_pretrained(checkpoint)
        ours, tokenizer, owned = model.eval(), None, True
    else:
        if settings.layers:
            raise ValueError("--layers changes a preset's shape; it does not apply to --model")
        checkpoint, owned = Path(settings.model).expanduser(), False
        ours = LlamaForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=settings.device).eval()
        tokenizer = load_tokenizer(checkpoint)
    prompts = Prompts(ours.config.vocab_size, tokenizer)
    theirs = load_transformers(checkpoint, dtype, settings.device) if settings.transformers else None
    check_ids = prompts.ids(2, 16, torch.Generator().manual_seed(settings.seed), settings.device)
    pair = ModelPair(ours, theirs, checkpoint, owned, prompts, same_weights_check(ours, theirs, settings, check_ids))
    pair.sanity["prompts"] = prompts.describe()
    if settings.int8:
        pair.ours_int8 = LlamaForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=settings.device,
                                                          quantize="int8-weight-only").eval()
    attach_llama_cpp(pair, settings, tokenizer, workdir)
    return pair


def attach_llama_cpp(pair: ModelPair, settings: BenchSettings, tokenizer: Any, workdir: Path) -> None:
    """Open llama.cpp on GGUFs of the pair's weights (the run's float type, and Q8_0 with ``int8``) and check
    its logits against ours; or record why not."""
    pair.llama_cpp_skipped = llamacpp.unavailable_reason(settings.device, settings.llama_cpp)
    if pair.llama_cpp_skipped is not None:
        logger.info("llama.cpp not measured: %s", pair.llama_cpp_skipped)
        return
    longest = max([*settings.prompt_lens, settings.decode_prompt_len + settings.decode_tokens])
    kv = llamacpp.float_type(settings.dtype)
    ids = pair.prompts.ids(1, settings.decode_prompt_len, torch.Generator().manual_seed(settings.seed + 2))
    checks = {}
    for outtype in (kv, llamacpp.Q8_0) if settings.int8 else (kv,):
        path, written = llamacpp.prepare_gguf(pair.checkpoint, outtype, settings.dtype, tokenizer, workdir,
                                                settings.name)
        runner = llamacpp.LlamaCppModel(path, outtype, n_ctx=longest + 1, n_batch=max([*settings.prompt_lens, 512]),
                                        kv_dtype=kv, written=written)
        pair.llama_cpp[outtype] = runner
        model = pair.ours_int8 if outtype == llamacpp.Q8_0 else pair.ours
        checks[outtype] = llamacpp.logits_check(runner, model, ids, strict=outtype == "f32")
    pair.sanity["llama_cpp"] = checks


def transformers_from_pretrained(checkpoint: str | Path, dtype: torch.dtype, device: str) -> Any:
    """transformers' LlamaForCausalLM of an HF directory or a GGUF file (``gguf_file=``: it dequantises into
    ``dtype``)."""
    import transformers

    gguf = find_gguf(checkpoint)
    where = {"pretrained_model_name_or_path": checkpoint} if gguf is None else {
        "pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
    return transformers.LlamaForCausalLM.from_pretrained(**where, dtype=dtype, attn_implementation="sdpa",
                                                         **transformers_placement(device)).to(device)


def load_transformers(checkpoint: Path, dtype: torch.dtype, device: str) -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # its loading bars (the GGUF reader's plain tqdm stays)
    model = transformers_from_pretrained(checkpoint, dtype, device)
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
def same_weights_check(ours: LlamaForCausalLM, theirs: Any, settings: BenchSettings,
                       ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Max |logit difference| and argmax agreement on ``ids`` (default: a random ``[2, 16]`` prompt); raises if
    fp32 logits disagree."""
    if theirs is None:
        return {"compared": False}
    if ids is None:
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
