"""Streaming, bit-exact conversion between Meta, llama2.c, GGUF (llama.cpp) and Hugging Face Llama checkpoints.

    python -m checkpoints_convert meta-to-hf --input llama-3-8b/ --output hf/
    python -m checkpoints_convert hf-to-meta --input hf/ --output meta/ --num-shards 2
    python -m checkpoints_convert llama2c-to-hf --input stories260K.bin --output hf/ --tokenizer tok512.model
    python -m checkpoints_convert reshard --input hf/ --output hf-bf16/ --dtype bfloat16 --max-shard-size 2GB
    python -m checkpoints_convert hf-to-gguf --input hf/ --output model.gguf --dtype q8_0
    python -m checkpoints_convert gguf-to-hf --input model.gguf --output hf/

``LlamaForCausalLM.from_pretrained`` reads GGUF files, Meta directories and llama2.c files directly through
the same readers (``read_gguf``, ``read_meta``, ``read_llama2c``).

Modules: ``source`` (a checkpoint as config + tensor specs + a one-pass stream), one reader per format
(``meta``, ``llama2c``, ``hf``, ``gguf``; ``permute`` holds Meta's interleaved <-> HF rotate-half q/k layout),
``gguf_write``, ``gguf_quants`` / ``gguf_kquants`` (GGML block types), ``gguf_rope`` (Llama 3 rope scaling
in llama.cpp's form), ``convert`` (the conversions) and ``cli``.

May import: ``llama_core.modeling.config``, ``llama_core.tokenizer`` (a model's vocabulary, for formats that
carry it) and ``llama_core.model_io``'s lower modules (hub, dtypes, placement, atomic, safetensors_writer,
hf_checkpoint), never ``llama_core.model_io.loading``: the loader reaches the readers here through a
documented lazy import, so this package sits above model_io's readers and below its loader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llama_core._lazy import install_lazy_imports

# Lazy (PEP 562): ``llama-core convert`` and ``python -m checkpoints_convert`` build their parser from ``cli``
# (plain Python) and answer --help or an argument error without importing torch; the readers and
# conversions load on first use. Module -> names, read by tests/test_import_layers.py as imports; the
# TYPE_CHECKING block says the same for type checkers and IDEs.
_LAZY_IMPORTS = {
    ".convert": ("gguf_to_hf", "hf_to_gguf", "hf_to_meta", "llama2c_to_hf", "meta_to_hf", "reshard"),
    ".gguf": ("read_gguf",),
    ".gguf_write": ("write_gguf",),
    ".hf": ("read_hf", "write_hf"),
    ".llama2c": ("read_llama2c",),
    ".meta": ("read_meta",),
    ".source": ("CheckpointSource", "TensorSpec"),
}
install_lazy_imports(globals(), _LAZY_IMPORTS)  # __getattr__, __dir__ and _MODULE_OF from the table

if TYPE_CHECKING:
    from .convert import gguf_to_hf, hf_to_gguf, hf_to_meta, llama2c_to_hf, meta_to_hf, reshard
    from .gguf import read_gguf
    from .gguf_write import write_gguf
    from .hf import read_hf, write_hf
    from .llama2c import read_llama2c
    from .meta import read_meta
    from .source import CheckpointSource, TensorSpec

__all__ = ["CheckpointSource", "TensorSpec", "gguf_to_hf", "hf_to_gguf", "hf_to_meta", "llama2c_to_hf", "meta_to_hf",
           "read_gguf", "read_hf", "read_llama2c", "read_meta", "reshard", "write_gguf", "write_hf"]
