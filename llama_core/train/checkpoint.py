"""Training checkpoints (sharded, through torch.distributed.checkpoint) and the final HF (or LoRA) export.

A checkpoint is a directory ``checkpoints/step_00000100/`` holding the DCP shards of the model and the
optimizer (each rank writes its own part, any world size can read them back), ``rng/rank_NNNNN.pt``
(every rank's RNG states) and ``trainer_state.json`` (step, data position, model shape, run config).

Saving is crash-safe: everything is written under ``.step_N.tmp`` and renamed to ``step_N`` only after
every rank has finished, so a directory named ``step_N`` is always complete and the previous one is
untouched until then; leftover ``.tmp`` directories are ignored and cleared by the next save. A full disk
is reported as such (``NoSpaceLeftError``) and its partial directory removed.

Resuming never unpickles arbitrary objects: DCP stores its ``.metadata`` as a pickle and the optimizer's
non-tensor values (learning rate, betas) as pickles too, which plain DCP loads with ``pickle.load`` and
``torch.load(weights_only=False)``. A crafted checkpoint could run code that way, so ``load_checkpoint``
reads the metadata with an unpickler that knows only DCP's own metadata types and the values with
``weights_only=True``; anything else is refused with ``UnsafeCheckpointError`` naming the file.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, Metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..lora import LoraConfig, add_lora, is_adapter_key, merge_and_unload, save_adapter
from ..model_io.atomic import find_no_space, no_space_names, raise_if_no_space, replace_directory
from ..modeling.config import LlamaConfig
from ..modeling.model import LlamaForCausalLM
from ..quant import Int8Config, replace_linears
from .distributed import Dist

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Config fields that decide parameter shapes: a checkpoint only resumes into a model that agrees on all.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias")


def _barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (in-progress ``.tmp`` directories never match)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], d: Dist, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
    if d.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*.tmp"):  # a crashed earlier save (train() holds the directory's lock)
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier(d)
    model_sd, optim_sd = _training_state(model, optimizer)
    with _no_space_reported(tmp, final, d):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=d.world == 1)
        # through a Python file: torch.save to a path reports a full disk as "unexpected pos", losing errno
        rng_file = tmp / "rng" / f"rank_{d.rank:05d}.pt"
        with no_space_names(rng_file), open(rng_file, "wb") as f:
            torch.save(rng_state(d.device), f)
    _barrier(d)  # every rank's shards are on disk
    if d.is_main:
        with _no_space_reported(tmp, final, d):
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        # re-saving a step (e.g. after resuming from it) swaps the directories, then drops the old copy
        replace_directory(tmp, final)
        for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    _barrier(d)
    return final


class _no_space_reported:
    """A full disk while writing ``tmp``: remove the partial checkpoint (it holds the space the user needs)
    and raise NoSpaceLeftError naming the file. Other failures leave it for the next save to clear."""

    def __init__(self, tmp: Path, final: Path, d: Dist):
        self.tmp, self.final, self.d = tmp, final, d

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None or find_no_space(exc) is None:
            return
        shutil.rmtree(self.tmp, ignore_errors=True)
        raise_if_no_space(exc, self.tmp, self.final)


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint: no {STATE_FILE} in it")
    try:
        state = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(state).__name__}")
    return state


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that would need arbitrary unpickling (code execution) to read."""


# Everything DCP's ``.metadata`` pickle names: its own dataclasses and the torch values inside them
# (dtypes are allowed separately). Each is plain data or a pure lookup; none runs code it is given.
_METADATA_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
       ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")])


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refusing to read {self.path}: it names {module}.{name}, which checkpoint "
                                    f"metadata never holds (unpickling it could run code)")


class SafeCheckpointReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` read through the allow-list above instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes()), path).load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError,
                TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a readable checkpoint metadata file: {e}") from None
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
        metadata.storage_meta = metadata.storage_meta or dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner with non-tensor values read by ``torch.load(weights_only=True)`` (plain DCP unpickles
    them fully)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"refusing to read {read_item.dest_index.fqn} of {self.path}: it is "
                                        f"not plain data (unpickling it could run code): {e}") from None
        self._commit_bytes(read_item, loaded)

    def _commit_bytes(self, read_item, loaded: Any) -> None:
        # DefaultLoadPlanner.load_bytes, minus its own unpickling
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def check_same_shape(saved: dict[str, Any], config: LlamaConfig, path: str | os.PathLike) -> None:
    """A clear error, before any tensor is read, when the checkpoint's model differs in shape."""
    ours = config.to_dict()
    theirs = LlamaConfig.from_dict(saved).to_dict()
    diff = [f"{k}: checkpoint {theirs.get(k)!r}, model {ours.get(k)!r}" for k in SHAPE_FIELDS
            if theirs.get(k) != ours.get(k)]
    if diff:
        raise ValueError(f"cannot resume from {path}: it holds a model of a different shape ({'; '.join(diff)})")


def _lora_of(model: nn.Module) -> Any:
    """The LoRA config of a (possibly DDP-wrapped) model, or None."""
    return getattr(getattr(model, "module", model), "lora_config", None)


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state dicts to checkpoint. A LoRA run's model part is its adapters only: the
    frozen base (of any size, int8 buffers included) is rebuilt from the run's model source on resume, which
    ``check_same_adapters`` requires to be the same."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if _lora_of(model) is not None:
        model_sd = {k: v for k, v in model_sd.items() if is_adapter_key(k)}
    return model_sd, optim_sd


# What decides a LoRA run's frozen base: a checkpoint of adapters resumes only over the same one.
_BASE_SOURCE_FIELDS = ("init_from", "preset", "model_config", "config_overrides")


def check_same_adapters(state: dict[str, Any], model: nn.Module, config: LlamaConfig, path: str | os.PathLike,
                        base_source: dict[str, Any] | None = None) -> None:
    """A clear error when a checkpoint's LoRA adapters or int8 base differ from the model's (DCP would only
    report the first missing tensor), or, given this run's ``base_source`` (its TrainConfig as a dict), when
    the adapters would resume over another base model."""
    lora = _lora_of(model)
    ours = (lora.r, sorted(lora.target_modules)) if lora is not None else None
    train_config = state.get("train_config", {})
    rank = train_config.get("lora_rank", 0)
    theirs = (rank, sorted(train_config.get("lora_targets", []))) if rank else None
    if ours != theirs:
        raise ValueError(f"cannot resume from {path}: its LoRA adapters ({_describe(theirs)}) differ from this "
                         f"run's ({_describe(ours)})")
    if lora is not None and base_source is not None:
        fields = _BASE_SOURCE_FIELDS + (() if base_source.get("init_from") else ("seed",))  # random init: seeded
        diff = [f"{k}: checkpoint {train_config.get(k)!r}, this run {base_source.get(k)!r}" for k in fields
                if _source_key(train_config.get(k)) != _source_key(base_source.get(k))]
        if diff:
            raise ValueError(f"cannot resume from {path}: a LoRA checkpoint holds only the adapters, so it resumes "
                             f"over the same base model ({'; '.join(diff)})")
    saved_quant = (state.get("model_config", {}).get("quantization_config") or {}).get("mode")
    our_quant = (config.quantization_config or {}).get("mode")
    if saved_quant != our_quant:
        raise ValueError(f"cannot resume from {path}: its base is {saved_quant or 'full precision'}, this run's is "
                         f"{our_quant or 'full precision'} (--quantize-base)")


def _source_key(value: Any) -> Any:
    """A model source as compared on resume: an existing local path by its resolved location (a relative and
    an absolute spelling of one directory are the same base), anything else (hub ids, presets) as given."""
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def _describe(adapters: tuple[int, list[str]] | None) -> str:
    return f"rank {adapters[0]} on {','.join(adapters[1])}" if adapters else "none"


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    config: LlamaConfig, d: Dist, base_source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG in place; returns the trainer state. Collective.
    ``base_source``: this run's TrainConfig as a dict, to check a LoRA checkpoint resumes over its own base."""
    path = Path(path)
    state = read_trainer_state(path)
    check_same_shape(state["model_config"], config, path)
    check_same_adapters(state, model, config, path, base_source)
    model_sd, optim_sd = _training_state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load_safely({"model": model_sd, "optim": optim_sd}, path, d)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(strict=not _lora_of(model)))
    rng_file = path / "rng" / f"rank_{d.rank:05d}.pt"
    if state.get("world_size") == d.world and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True), d.device)
    else:  # weights and data position still resume exactly; only dropout/sampling noise differs
        logger.warning("%s was saved by %s ranks, resuming on %d: RNG states not restored", path,
                       state.get("world_size"), d.world)
    logger.info("resumed from %s (step %d)", path, state["step"])
    return state


def _load_safely(state: dict[str, Any], path: Path, d: Dist) -> None:
    reader = SafeCheckpointReader(path)
    reader.read_metadata()  # here, not inside DCP, which would flatten our error into an AssertionError string
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(path), no_dist=d.world == 1)
    except dcp.api.CheckpointException as e:
        # DCP wraps every rank's error in a BaseException with tracebacks; surface ours, named and clear
        for err, _ in e.failures.values():
            if isinstance(err, (ValueError, OSError)):
                raise err from None
        raise


def export_hf(model: nn.Module, config: LlamaConfig, directory: str | os.PathLike, d: Dist,
              tokenizer: Any = None) -> Path | None:
    """Gather the full weights on rank 0 and ``save_pretrained`` them (safetensors that transformers loads),
    with ``tokenizer``'s files in the same atomic directory swap, so the export is complete or absent.

    Collective; returns the directory on rank 0, None elsewhere.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = None
    if d.is_main:
        with torch.device("meta"):
            plain = LlamaForCausalLM(config.replace(dtype=None), init=False)
        plain.load_state_dict(full, assign=True)
        plain.tie_weights()
        plain.model.rotary_emb.reset_buffers("cpu")
        out = plain.save_pretrained(directory, tokenizer=tokenizer)
    _barrier(d)
    return out


def export_lora(model: nn.Module, config: LlamaConfig, lora: LoraConfig, out_dir: str | os.PathLike, d: Dist,
                quantize_base: str | None = None, quantize_skip: tuple[str, ...] = (), merge: bool = False,
                tokenizer: Any = None) -> tuple[Path | None, Path | None]:
    """A LoRA run's outputs: the adapter in PEFT's format in ``out_dir/adapter``; with ``merge``, also the base
    with the adapter folded in (dequantised if the base was int8) as a full-precision HF model in ``out_dir/hf``.

    Collective (the full weights are gathered from every rank); returns ``(adapter_dir, hf_dir)`` on rank 0,
    ``(None, None)`` elsewhere.
    """
    out_dir = Path(out_dir)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    adapter_dir = hf_dir = None
    if d.is_main:
        adapters = {k: v for k, v in full.items() if is_adapter_key(k)}
        adapter_dir = save_adapter(model, out_dir / "adapter", config=lora, state=adapters)
        if merge:
            with torch.device("meta"):
                plain = LlamaForCausalLM(config.replace(dtype=None, quantization_config=None), init=False)
            if quantize_base:  # the same module tree as the trained model, so the gathered names fit
                replace_linears(plain, Int8Config(quantize_base, skip=quantize_skip))
            add_lora(plain, lora)
            plain.load_state_dict(full, assign=True)
            plain.tie_weights()
            plain.model.rotary_emb.reset_buffers("cpu")
            hf_dir = merge_and_unload(plain, torch.float32).save_pretrained(out_dir / "hf", tokenizer=tokenizer)
    _barrier(d)
    return adapter_dir, hf_dir
