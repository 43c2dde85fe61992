"""A GGUF file (llama.cpp's format), opened with llama.cpp's own reader: metadata as Python values, and
each tensor's type, shape and memory-mapped raw data.

The container is parsed by the ``gguf`` package (kept in step with the format by llama.cpp), an optional
dependency (the ``gguf`` extra) imported only when a GGUF file is opened. What it raises on a damaged file
is turned into a ValueError naming the file; nothing in a GGUF is ever executed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_SUFFIX = ".gguf"
_MISSING = object()


def find_gguf(path_or_hub_id: str | os.PathLike, gguf_file: str | None = None, revision: str | None = None,
              cache_dir: Any = None, token: Any = None) -> Path | None:
    """The GGUF file meant by a from_pretrained argument, or None when it names no GGUF: a ``.gguf`` file, a
    directory holding exactly one ``.gguf`` and no config.json, or ``gguf_file`` inside a directory or hub
    repository (transformers' spelling; only that file is downloaded)."""
    path = Path(path_or_hub_id).expanduser()
    if gguf_file is not None:
        if path.is_dir():
            if not (path / gguf_file).is_file():
                raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {path}")
            return path / gguf_file
        if path.exists():
            raise ValueError(f"gguf_file={gguf_file!r} names a file inside a directory, but {path} is a file")
        from .hub import resolve_checkpoint

        return resolve_checkpoint(path_or_hub_id, revision, cache_dir, token, allow_patterns=[gguf_file],
                                  what="GGUF file") / gguf_file
    if path.is_file():
        with open(path, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        return path if is_gguf or path.suffix == GGUF_SUFFIX else None
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
        if len(found) > 1:
            raise ValueError(f"{path} holds several GGUF files ({', '.join(f.name for f in found)}); "
                             "pick one with gguf_file=")
        return found[0] if found else None
    return None


def import_gguf() -> Any:
    """The ``gguf`` package, or an ImportError saying how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading or writing GGUF files needs the gguf package (llama.cpp's reader and writer): "
                          "pip install 'llama-core[gguf]'") from e
    return gguf


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: Any  # gguf.GGMLQuantizationType (an IntEnum: .name is "Q4_1", "F32", ...)
    shape: tuple[int, ...]  # PyTorch order, outermost first (GGUF lists dimensions innermost first)
    path: Path
    offset: int  # of the data in the file
    nbytes: int
    data_dtype: Any  # numpy dtype of ``data``: float32/float16 elements for F32/F16, uint8 block bytes otherwise
    data_shape: tuple[int, ...]  # as the gguf package shapes it (rows x bytes per row for block types)

    @property
    def data(self) -> Any:
        """The data as a read-only numpy memory map (mapped afresh at each access)."""
        import numpy as np

        return np.memmap(self.path, dtype=self.data_dtype, mode="r", offset=self.offset, shape=self.data_shape)

    def read(self) -> Any:
        """The data as ``data`` holds it, but read into memory of its own instead of paged in through a
        memory map: the loader streams a file much larger than any one tensor, and mapped pages it touched
        would stay resident (and counted) until the whole file is unmapped."""
        import numpy as np

        raw = np.empty(self.nbytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            if f.readinto(memoryview(raw)) != self.nbytes:
                raise ValueError(f"{self.path} is truncated inside tensor {self.name}")
        return raw.view(self.data_dtype).reshape(self.data_shape)


class GGUFFile:
    """An open GGUF file. ``get(key)`` reads metadata; ``tensors`` lists the tensors in file order.

    The metadata is copied into Python values and the gguf package's reader dropped at once: it holds a
    numpy array per string (about 170 MB for a 49k-token vocabulary with its merges) that a loader should
    not keep alive while the weights arrive."""

    def __init__(self, path: str | os.PathLike):
        gguf = import_gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {self.path}")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file: it starts with {magic!r}, not the magic b'GGUF'")
        try:
            reader = gguf.GGUFReader(self.path)
            self._metadata = {k: field.contents() for k, field in reader.fields.items() if not k.startswith("GGUF.")}
        except Exception as e:  # numpy, struct and decoding errors of a damaged header or a file cut short
            if "version" in str(e):
                raise ValueError(f"{self.path}: unsupported GGUF version ({e})") from e
            raise ValueError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): {e}") from e
        size = self.path.stat().st_size
        self.tensors: list[GGUFTensor] = []
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"{self.path} is truncated: tensor {t.name} needs {t.n_bytes} bytes at offset "
                                 f"{t.data_offset}, the file has {size} bytes in all")
            self.tensors.append(GGUFTensor(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())),
                                           self.path, t.data_offset, t.n_bytes, t.data.dtype, tuple(t.data.shape)))
        del reader

    def keys(self) -> list[str]:
        return list(self._metadata)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value of metadata ``key`` (str, int, float, bool, or a list of them); a ValueError naming the
        file and the key when it is missing and no default is given."""
        if key not in self._metadata:
            if default is _MISSING:
                raise ValueError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return self._metadata[key]
