"""Training llama_core models: one loop for a single device and for torchrun (FSDP2, DDP, tensor parallel).

Read in this order: ``config.py`` (every knob), ``data.py`` (packed documents), ``chat_data.py`` (chat
conversations trained on their replies), ``schedule.py``,
``build.py`` (model, tokenizer, optimizer, wrapping), ``distributed.py``, ``loop.py`` (the step),
``checkpoint.py`` (exact resume, HF export), ``metrics.py`` (MFU). Training checkpoints (sharded model,
optimizer, schedule, RNG and data position) live here; model checkpoints are ``llama_core.model_io``'s.

May import: ``llama_core.modeling``, ``llama_core.model_io`` (HF export), ``llama_core.tokenizer`` and
torch.distributed. Only the CLI imports this package.

    from llama_core.train import TrainConfig, train
    result = train(TrainConfig(data="corpus/", tokenizer="tok/", preset="tiny", output_dir="run/", max_steps=200))
    result.losses, result.hf_dir
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import install_lazy_imports

# Lazy (PEP 562): ``llama-core train --help`` takes its defaults from ``config`` (plain Python) without
# importing torch or torch.distributed.checkpoint (together 1-2 s, far more on a loaded machine); the loop
# and its checkpoints load on first use. Module -> names, read by tests/test_import_layers.py as imports; the
# TYPE_CHECKING block says the same for type checkers and IDEs.
_LAZY_IMPORTS = {
    ".chat_data": ("load_chat_stream",),
    ".checkpoint": ("export_hf", "list_checkpoints", "load_checkpoint", "save_checkpoint"),
    ".config": ("TrainConfig",),
    ".data": ("Batch", "PackedWindows", "TokenStream", "load_token_stream", "pack_windows"),
    ".distributed": ("Dist", "clip_grad_norm", "fully_shard_model", "init_distributed", "tensor_parallel"),
    ".loop": ("StepLog", "TrainResult", "train"),
    ".schedule": ("lr_at",),
}
install_lazy_imports(globals(), _LAZY_IMPORTS)  # __getattr__, __dir__ and _MODULE_OF from the table

if TYPE_CHECKING:
    from .chat_data import load_chat_stream
    from .checkpoint import export_hf, list_checkpoints, load_checkpoint, save_checkpoint
    from .config import TrainConfig
    from .data import Batch, PackedWindows, TokenStream, load_token_stream, pack_windows
    from .distributed import Dist, clip_grad_norm, fully_shard_model, init_distributed, tensor_parallel
    from .loop import StepLog, TrainResult, train
    from .schedule import lr_at



__all__ = [
    "Batch",
    "Dist",
    "PackedWindows",
    "StepLog",
    "TokenStream",
    "TrainConfig",
    "TrainResult",
    "clip_grad_norm",
    "export_hf",
    "fully_shard_model",
    "init_distributed",
    "list_checkpoints",
    "load_chat_stream",
    "load_checkpoint",
    "load_token_stream",
    "lr_at",
    "pack_windows",
    "save_checkpoint",
    "tensor_parallel",
    "train",
]
