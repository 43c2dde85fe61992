"""Training llama_core models: one loop for a single device and for torchrun (FSDP2, DDP, tensor parallel).

Read in this order: ``config.py`` (every knob), ``data.py`` (packed documents), ``schedule.py``,
``build.py`` (model, tokenizer, optimizer, wrapping), ``distributed.py``, ``loop.py`` (the step),
``checkpoint.py`` (exact resume, HF export), ``metrics.py`` (MFU). Training checkpoints (sharded model,
optimizer, schedule, RNG and data position) live here; model checkpoints are ``llama_core.model_io``'s.

May import: ``llama_core.modeling``, ``llama_core.model_io`` (HF export), ``llama_core.tokenizer`` and
torch.distributed. Only the CLI imports this package.

    from llama_core.train import TrainConfig, train
    result = train(TrainConfig(data="corpus/", tokenizer="tok/", preset="tiny", output_dir="run/", max_steps=200))
    result.losses, result.hf_dir
"""

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
    "load_checkpoint",
    "load_token_stream",
    "lr_at",
    "pack_windows",
    "save_checkpoint",
    "tensor_parallel",
    "train",
]
