"""llama.cpp as the third library of the benchmark, through its Python binding ``llama_cpp`` (never a
dependency of the project: :func:`unavailable_reason` says why it is left out where it does not import, and it
is only measured on a CPU), running the same weights written as a GGUF.

The file: a GGUF ``--model`` is used as it is when its type is the one being measured (``f32`` for a float32
run, ``bf16`` for bfloat16, ``q8_0`` against llama_core's int8-weight-only); otherwise the weights are
written with ``checkpoints_convert.write_gguf`` from the checkpoint both other libraries loaded, read in the
run's dtype (so the F32 norm vectors of a bf16 file hold exactly the bf16 values llama_core uses), with the
model's vocabulary, or a minimal byte-level one for random-weight presets (llama.cpp refuses a file without
a vocabulary, and its sampler needs one entry per logit).

How it runs (:class:`LlamaCppModel`): one ``llama_cpp.Llama`` per file, created once, with
``n_threads = n_threads_batch = torch.get_num_threads()``, one ``n_batch`` large enough for the longest prompt
(``n_ubatch`` stays llama.cpp's default, 512: it computes longer prompts in 512-token slices, as it always
does) and the KV cache in the activation dtype (f32 or bf16; llama.cpp's default f16 cache would read half
the bytes llama_core and transformers read). Token ids go in and come out, nothing is re-tokenised:

- ``prefill(ids)``: ``reset()`` + ``eval(ids)``. ``eval`` first removes every cached position from
  ``n_tokens`` = 0 on, so each call computes the whole prompt into an empty cache (no prefix reuse), and only
  the last position's logits (``logits_all=False``), like llama_core's ``logits_to_keep=1``.
- ``generate(ids, n)``: ``reset()`` + ``Llama.generate(ids, temp=0)`` (the greedy sampler; repeat penalty
  1.0, top-k/top-p unused), stopped after the n-th token: the prompt's eval, then n - 1 one-token evals, the
  same work as ``generate(max_new_tokens=n)`` of the other two. ``reset()`` matters: without it ``generate``
  reuses the KV cache of a previous call with the same prompt prefix and skips the prefill.
EOS never stops it (``Llama.generate`` has no stopping; that is ``create_completion``'s).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model_io.gguf_file import GGUFFile, find_gguf, import_gguf

logger = logging.getLogger(__name__)

IMPL = "llama_cpp"
Q8_0 = "q8_0"
# The GGUF type of the weights that matches a run's dtype.
FLOAT_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def unavailable_reason(device: str, wanted: bool = True) -> str | None:
    """Why llama.cpp is not measured in this run, or None when it is."""
    if not wanted:
        return "not requested (--no-llama-cpp)"
    if torch.device(device).type != "cpu":
        return "llama.cpp is measured on a CPU only"
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # ImportError, or an OSError from a build for another CPU
        return f"the llama_cpp binding does not import ({type(e).__name__}: {e})"
    return None


def version() -> str | None:
    try:
        import llama_cpp
    except Exception:
        return None
    return getattr(llama_cpp, "__version__", None)


def float_type(dtype: str) -> str:
    if dtype not in FLOAT_TYPES:
        raise ValueError(f"llama.cpp has no GGUF type for dtype {dtype!r}")
    return FLOAT_TYPES[dtype]


def counterpart(mode: str, dtype: str) -> str:
    """The llama.cpp candidate a llama_core mode is compared with: Q8_0 for int8 modes, else the float type."""
    return f"{IMPL}/{Q8_0 if mode.startswith('int8') else float_type(dtype)}"


# ------------------------------------------------------------------------------------------ the GGUF file
def gguf_file_type(path: Path) -> str | None:
    """The weights' type of a GGUF file from its ``general.file_type``, as ``write_gguf`` names types (f32,
    bf16, q8_0, q4_1, ...); None when the file does not say."""
    code = GGUFFile(path).get("general.file_type", None)
    try:
        name = import_gguf().LlamaFileType(code).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def minimal_vocab(vocab_size: int) -> dict[str, Any]:
    """GGUF tokenizer metadata for a model without a tokenizer: a sentencepiece-style ("llama") vocabulary of
    ``vocab_size`` entries, the 256 byte tokens first, then placeholders. Only the ids matter here."""
    from ..tokenizer.gguf_export import GGUFMetadataValue

    n_bytes = min(vocab_size, 256)
    tokens = [f"<0x{i:02X}>" for i in range(n_bytes)] + [f"<t{i}>" for i in range(n_bytes, vocab_size)]
    byte, normal = 6, 1  # llama.cpp's token types
    return {"tokenizer.ggml.model": GGUFMetadataValue("llama", "STRING"),
            "tokenizer.ggml.tokens": GGUFMetadataValue(tokens, "ARRAY", "STRING"),
            "tokenizer.ggml.scores": GGUFMetadataValue([0.0] * vocab_size, "ARRAY", "FLOAT32"),
            "tokenizer.ggml.token_type": GGUFMetadataValue([byte] * n_bytes + [normal] * (vocab_size - n_bytes),
                                                           "ARRAY", "INT32")}


def prepare_gguf(checkpoint: Path, outtype: str, dtype: str, tokenizer: Any, workdir: Path,
                 name: str) -> tuple[Path, bool]:
    """(GGUF file of ``checkpoint``'s weights in ``outtype``, whether it was written): the checkpoint itself
    when it is a GGUF of that type, else a file written into ``workdir``."""
    from checkpoints_convert.gguf import read_gguf
    from checkpoints_convert.gguf_write import write_gguf
    from checkpoints_convert.hf import read_hf

    from ..tokenizer.gguf_export import add_tokenizer_metadata, gguf_tokenizer_metadata

    gguf = find_gguf(checkpoint)
    if gguf is not None and gguf_file_type(gguf) == outtype:
        return gguf, False
    # Read in the run's dtype for float files (exact), in fp32 for Q8_0 (quantised from the best weights).
    source_dtype = torch.float32 if outtype == Q8_0 else getattr(torch, dtype)
    source = read_gguf(gguf, source_dtype) if gguf is not None else read_hf(checkpoint, source_dtype)
    meta: Mapping[str, Any] = (gguf_tokenizer_metadata(tokenizer) if tokenizer is not None
                               else minimal_vocab(source.config.vocab_size))
    out = workdir / f"{name.removesuffix('.gguf')}-{outtype}.gguf"
    logger.info("writing %s for llama.cpp", out)
    write_gguf(source, out, outtype, add_metadata=lambda w: add_tokenizer_metadata(w, meta), progress=False)
    return out, True


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of weights one decode step reads from a GGUF: every tensor but an untied input embedding (only
    its looked-up rows are read); a tied one is read in full as the output matrix."""
    tensors = {t.name: t.nbytes for t in GGUFFile(path).tensors}
    untied = "output.weight" in tensors
    return sum(n for name, n in tensors.items() if not (untied and name == "token_embd.weight"))


# ------------------------------------------------------------------------------------------ running it
@dataclass
class LlamaCppModel:
    """One GGUF in llama.cpp, driven with token ids (see the module docstring)."""

    path: Path
    mode: str  # the GGUF type: f32, bf16, q8_0
    n_ctx: int
    n_batch: int
    kv_dtype: str  # f32, bf16 or f16: the KV cache's type
    written: bool  # written for this run (else the --model file itself)
    threads: int = field(default_factory=torch.get_num_threads)

    def __post_init__(self) -> None:
        import llama_cpp

        kv = int(import_gguf().GGMLQuantizationType[self.kv_dtype.upper()])
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=self.n_batch,
                                   n_threads=self.threads, n_threads_batch=self.threads, type_k=kv, type_v=kv,
                                   seed=0, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.weight_bytes = gguf_weight_bytes(self.path)

    def prefill(self, ids: list[int]) -> None:
        """The whole prompt into an empty cache; the last position's logits are then :meth:`last_logits`."""
        self.llm.reset()
        self.llm.eval(ids)

    def last_logits(self) -> torch.Tensor:
        """``[vocab]`` fp32 logits of the last position evaluated (a copy)."""
        import llama_cpp
        import numpy as np

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def generate(self, ids: list[int], n: int) -> list[int]:
        """``n`` greedy tokens after ``ids`` (prompt eval + n - 1 one-token evals)."""
        self.llm.reset()
        out: list[int] = []
        steps = self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        for token in steps:
            out.append(int(token))
            if len(out) == n:
                break
        steps.close()
        return out

    def info(self) -> dict[str, Any]:
        params = self.llm.context_params  # what llama.cpp was given (the binding caps n_batch at n_ctx)
        return {"mode": self.mode, "file": self.path.name, "written_for_run": self.written, "n_ctx": params.n_ctx,
                "n_batch": params.n_batch, "n_ubatch": params.n_ubatch, "kv_cache": self.kv_dtype,
                "threads": self.threads, "weight_bytes": self.weight_bytes}

    def close(self) -> None:
        self.llm.close()


@torch.inference_mode()
def logits_check(runner: LlamaCppModel, model: torch.nn.Module, ids: torch.Tensor, strict: bool) -> dict[str, Any]:
    """llama.cpp's last-position logits on ``ids`` ``[1, n]`` against ``model``'s: recorded for every file,
    and a RuntimeError when ``strict`` (f32: the same numbers, up to summation order) and they disagree."""
    runner.prefill(ids[0].tolist())
    theirs = runner.last_logits()
    ours = model(ids, use_cache=False, logits_to_keep=1).logits[0, -1].float().cpu()
    diff = (theirs - ours).abs().max().item()
    scale = ours.abs().max().item()
    same_argmax = bool(theirs.argmax() == ours.argmax())
    # fp32 on both sides differs only by summation order: relative error ~1e-6; 1e-3 catches a wrong layout.
    if strict and (diff > 1e-3 * max(scale, 1.0) or not same_argmax):
        raise RuntimeError(f"llama.cpp ({runner.path.name}) and llama_core disagree on the same weights (max "
                           f"|logit diff| {diff:.3g} of logits up to {scale:.3g}, same argmax: {same_argmax}): "
                           "refusing to benchmark")
    return {"file": runner.path.name, "max_abs_logit_diff": diff, "max_abs_logit": scale,
            "same_argmax": same_argmax, "prompt_tokens": ids.shape[1]}
