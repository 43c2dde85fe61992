"""Hub ids resolve through huggingface_hub's cache, offline and without network.

The cache is built by hand in huggingface_hub's real layout (blobs, snapshots/<commit> symlinks, refs/main)
around a checkpoint written by our own save_pretrained.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub.constants
import huggingface_hub.hf_api
import pytest
import torch
from huggingface_hub.errors import OfflineModeIsEnabled

from llama_core import LlamaForCausalLM
from tests.conftest import random_model

REPO_ID = "org/name"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 0]])


def build_hub_cache(cache: Path, model, repo_id: str = REPO_ID, commit: str = COMMIT) -> Path:
    """Write ``model`` into ``cache`` as huggingface_hub would have downloaded it; return the snapshot dir."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    staged = model.save_pretrained(cache / "staging")
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in sorted(staged.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        file.rename(blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    staged.rmdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    """Asking the Hub about a repo while huggingface_hub is not in offline mode (so the request would go
    out) fails the test; in offline mode the call fails as huggingface_hub's own HTTP hook would."""
    def refuse(*args, **kwargs):
        if huggingface_hub.constants.is_offline_mode():
            raise OfflineModeIsEnabled("offline mode is enabled")
        raise AssertionError("huggingface_hub tried to reach the network")

    monkeypatch.setattr(huggingface_hub.hf_api.HfApi, "repo_info", refuse)
    monkeypatch.setattr(huggingface_hub.hf_api.HfApi, "list_repo_tree", refuse)


OFFLINE_MODES = ["env-and-hub-constant", "env-set-after-import", "hub-constant-only"]


@pytest.fixture(params=OFFLINE_MODES)
def offline(request, monkeypatch, no_network):
    """Offline mode, however it was switched on: HF_HUB_OFFLINE=1 before huggingface_hub was imported (it
    reads the variable once, at import), only after (huggingface_hub still thinks it is online), or only
    in huggingface_hub's constant (e.g. from TRANSFORMERS_OFFLINE or set in code)."""
    env, constant = {"env-and-hub-constant": (True, True), "env-set-after-import": (True, False),
                     "hub-constant-only": (False, True)}[request.param]
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    if env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", constant)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS).logits


def test_hub_id_loads_from_cache_dir(tmp_path, offline):
    """from_pretrained("org/name", cache_dir=...) finds the cached snapshot and loads the same model,
    without trying the network."""
    model = random_model()
    snapshot = build_hub_cache(tmp_path / "hub", model)
    assert (snapshot / "model.safetensors").is_symlink()
    loaded = LlamaForCausalLM.from_pretrained(REPO_ID, cache_dir=tmp_path / "hub")
    assert torch.equal(logits(loaded), logits(model))


def test_hub_cache_from_hf_hub_cache(tmp_path, monkeypatch, offline):
    """Without cache_dir the default cache (HF_HUB_CACHE) is searched."""
    model = random_model(seed=1)
    build_hub_cache(tmp_path / "hub", model)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = LlamaForCausalLM.from_pretrained(REPO_ID)
    assert torch.equal(logits(loaded), logits(model))


def test_revision_selects_the_snapshot(tmp_path, offline):
    """revision=<commit> loads that snapshot, not the one refs/main points at."""
    main, old = random_model(seed=0), random_model(seed=1)
    build_hub_cache(tmp_path / "hub", main)
    old_commit = "f" * 40
    repo = tmp_path / "hub" / "models--org--name"
    old.save_pretrained(repo / "snapshots" / old_commit)
    loaded = LlamaForCausalLM.from_pretrained(REPO_ID, cache_dir=tmp_path / "hub", revision=old_commit)
    assert torch.equal(logits(loaded), logits(old))
    assert not torch.equal(logits(loaded), logits(main))


def test_missing_from_cache_offline(tmp_path, offline):
    """An uncached hub id while offline is an OSError saying so and pointing at HF_HUB_OFFLINE (also when
    only huggingface_hub's constant says offline)."""
    (tmp_path / "hub").mkdir()
    with pytest.raises(OSError, match="not in the local Hugging Face cache") as info:
        LlamaForCausalLM.from_pretrained("org/absent", cache_dir=tmp_path / "hub")
    assert "HF_HUB_OFFLINE" in str(info.value)
    assert not any((tmp_path / "hub").iterdir()), "a failed offline lookup wrote into the cache"


def test_local_directory_wins_over_hub_id(tmp_path, monkeypatch, offline):
    """A relative path that looks like a hub id but exists locally is loaded from disk."""
    model = random_model(seed=3)
    model.save_pretrained(tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(REPO_ID, cache_dir=tmp_path / "empty-cache")
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("name", ["no/such/dir/x", "./org/absent", "/definitely/not/here"])
def test_not_a_hub_id_nor_a_directory(name, no_network):
    """A name that is neither an existing directory nor shaped like a hub id is a FileNotFoundError,
    without asking the Hub."""
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        LlamaForCausalLM.from_pretrained(name)
