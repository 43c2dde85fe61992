"""Finding a checkpoint: a local directory, or a Hugging Face hub id fetched with snapshot_download."""

from __future__ import annotations

import os
import re
from pathlib import Path

# Only what loading needs: no optimizer states, no original/consolidated Meta files.
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json",
                "pytorch_model*.bin", "pytorch_model.bin.index.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    """Offline mode as the environment says now, or as huggingface_hub read it when it was imported
    (it reads HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE once, at import)."""
    if any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
           for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def trusted_roots(directory: Path) -> list[Path]:
    """Where the files of a checkpoint in ``directory`` may really live (symlinks resolved): the directory
    itself, and for a hub cache snapshot (``models--org--name/snapshots/<rev>``) its repository's blob store,
    which the snapshot's files link into."""
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--"):
        roots.append((directory.parent.parent / "blobs").resolve())
    return roots


def resolve_checkpoint(path_or_hub_id: str | os.PathLike, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                       allow_patterns: list[str] | None = None, what: str = "checkpoint",
                       allow_file: bool = False) -> Path:
    """A local directory (or file, with ``allow_file``) holding the ``what``; hub ids are downloaded (only
    ``allow_patterns``, default: the weights and config) or found in the cache."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir() and not allow_file:
            raise ValueError(f"{path} is a file; pass the {what} directory that holds config.json")
        return path
    name = str(path_or_hub_id)
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such {what} directory{' or file' if allow_file else ''}: {name}")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        # local_files_only: never reach the network when offline, even if the variable was set after import.
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                      allow_patterns=allow_patterns or HUB_PATTERNS, local_files_only=_offline()))
    except LocalEntryNotFoundError as e:
        if _offline():
            raise OSError(
                f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so its {what} cannot "
                f"be downloaded; download it once online or pass a local directory"
            ) from e
        raise OSError(f"could not download the {what} of {name} from the Hugging Face hub (and it is not "
                      f"cached): {e}") from e
    except HfHubHTTPError as e:
        raise OSError(f"could not download the {what} of {name} from the Hugging Face hub: {e}") from e
