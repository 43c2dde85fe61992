"""Writers under stress (issue 15): concurrent writers of one target, a writer killed mid-write, a full
disk. Real processes for the first two; the full disk is simulated at Python's ``open`` (no tmpfs here)."""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from checkpoints_convert import hf_to_meta
from llama_core import LlamaForCausalLM
from llama_core.model_io.atomic import NoSpaceLeftError, atomic_file
from llama_core.train.checkpoint import list_checkpoints, save_checkpoint
from llama_core.train.distributed import Dist
from tests.conftest import random_model, small_config

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_BYTES = b"not really sentencepiece, but the user's own file" * 100


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    return random_model(small_config(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=64), seed=seed)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(parent: Path) -> list[str]:
    """Hidden entries: temporaries, old copies, lock files."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def run_python(code: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


# ---- concurrent writers ----------------------------------------------------------------------------------

WRITER = """
    import os, sys, time
    from pathlib import Path
    from tests.test_writers_safety import tiny_model
    target, go, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    real_rename = os.rename

    def slow_rename(*args, **kw):  # a slow file system (NFS): widens any window between two renames
        real_rename(*args, **kw)
        time.sleep(0.02)

    os.rename = slow_rename
    model = tiny_model(seed)
    while not go.exists():  # start together, so the saves overlap
        time.sleep(0.005)
    for _ in range(4):
        model.save_pretrained(target)
"""


def test_concurrent_save_pretrained_loses_nothing(tmp_path):
    target, go = tmp_path / "model", tmp_path / "go"
    tiny_model(99).save_pretrained(target)
    (target / "tokenizer.model").write_bytes(TOKENIZER_BYTES)  # the user's, not the writers'
    (target / "notes.txt").write_text("keep me")
    procs = [run_python(WRITER, target, go, seed) for seed in range(3)]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-2000:]
    assert (target / "tokenizer.model").read_bytes() == TOKENIZER_BYTES
    assert (target / "notes.txt").read_text() == "keep me"
    loaded = LlamaForCausalLM.from_pretrained(target)
    # the last writer's weights, whole: equal to one of the three models, not a mix
    candidates = [tiny_model(seed).state_dict() for seed in range(3)]
    emb = loaded.state_dict()["model.embed_tokens.weight"]
    winner = [c for c in candidates if torch.equal(c["model.embed_tokens.weight"], emb)]
    assert len(winner) == 1
    assert all(torch.equal(t, winner[0][k]) for k, t in loaded.state_dict().items() if k in winner[0])
    assert leftovers(tmp_path) == []


# ---- a writer killed mid-write -----------------------------------------------------------------------------

SLOW_WRITER = """
    import sys, time
    from pathlib import Path
    import llama_core.model_io.saving as saving
    from tests.test_writers_safety import tiny_model
    target, started = Path(sys.argv[1]), Path(sys.argv[2])
    real = saving.write_sharded

    def slow(directory, specs, tensors, *args, **kw):
        def stream():
            for i, item in enumerate(tensors):
                yield item
                if i == 2:  # some tensors are on disk in the temporary directory: die here
                    started.touch()
                    time.sleep(60)
        return real(directory, specs, stream(), *args, **kw)

    saving.write_sharded = slow
    tiny_model(1).save_pretrained(target)
"""


def test_killed_writer_leaves_old_content_and_next_save_cleans_up(tmp_path):
    target, started = tmp_path / "model", tmp_path / "started"
    tiny_model(0).save_pretrained(target)
    (target / "tokenizer.model").write_bytes(TOKENIZER_BYTES)
    before = snapshot(target)
    proc = run_python(SLOW_WRITER, target, started)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the writer never reached the middle of its write"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert snapshot(target) == before  # the old checkpoint, untouched
    stale = [name for name in leftovers(tmp_path) if not name.endswith("lc-lock")]  # its lock: freed by death
    assert len(stale) == 1 and f".{proc.pid}." in stale[0]  # the dead writer's partial temporary
    tiny_model(2).save_pretrained(target)  # the next writer removes it and writes whole
    assert leftovers(tmp_path) == []
    assert (target / "tokenizer.model").read_bytes() == TOKENIZER_BYTES
    emb = LlamaForCausalLM.from_pretrained(target).state_dict()["model.embed_tokens.weight"]
    assert torch.equal(emb, tiny_model(2).state_dict()["model.embed_tokens.weight"])


def test_a_live_writers_temporary_is_not_removed(tmp_path):
    """Only the temporaries of dead processes are cleared: this process is alive, its file stays."""
    target = tmp_path / "file.bin"
    mine = tmp_path / f".file.bin.lc-tmp.{os.getpid()}.0123abcd"
    mine.write_bytes(b"in progress")
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"done")
    assert mine.exists() and target.read_bytes() == b"done"


# ---- a full disk -------------------------------------------------------------------------------------------

class _FullDiskFile:
    """A file whose writes fail with ENOSPC once ``budget`` bytes (shared by all files) are used up."""

    def __init__(self, f, budget: list[int], fileno_full: bool):
        self._f, self._budget, self._fileno_full = f, budget, fileno_full

    def write(self, data) -> int:
        n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if n > self._budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= n
        return self._f.write(data)

    def fileno(self) -> int:
        """numpy's ``tofile`` writes straight to ``fileno()``: sent to /dev/full, it fails as a full disk does."""
        if not self._fileno_full:
            return self._f.fileno()
        self._f.flush()
        self._full = builtins.open("/dev/full", "wb")  # noqa: SIM115 (closed in close())
        return self._full.fileno()

    def close(self) -> None:
        if getattr(self, "_full", None) is not None:
            self._full.close()
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    """``full_disk(n)``: from now on, files opened for writing under tmp_path hold ``n`` more bytes in all."""
    real_open = builtins.open

    def arm(budget_bytes: int, fileno_full: bool = False) -> None:
        budget = [budget_bytes]

        def fake_open(file, mode="r", *args, **kw):
            f = real_open(file, mode, *args, **kw)
            inside = isinstance(file, (str, os.PathLike)) and str(tmp_path) in os.fspath(file)
            return _FullDiskFile(f, budget, fileno_full) if inside and any(c in mode for c in "wax+") else f

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)  # pathlib's Path.open goes through io.open

    return arm


def test_save_pretrained_on_a_full_disk_names_the_file_and_keeps_the_old(tmp_path, full_disk):
    target = tmp_path / "model"
    tiny_model(0).save_pretrained(target)
    before = snapshot(target)
    full_disk(2000)  # config.json fits, the weights do not
    with pytest.raises(OSError, match=f"no space left on device while writing {target}/model.safetensors") as e:
        tiny_model(1).save_pretrained(target)
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, NoSpaceLeftError)
    assert snapshot(target) == before
    assert leftovers(tmp_path) == []


def test_hf_to_meta_on_a_full_disk_names_the_file_and_writes_nothing(tmp_path, full_disk):
    tiny_model(0).save_pretrained(tmp_path / "hf")
    full_disk(5000)  # params.json fits, the torch.save'd shard does not
    with pytest.raises(OSError, match=f"no space left on device while writing {tmp_path}/meta/consolidated.00.pth"):
        hf_to_meta(tmp_path / "hf", tmp_path / "meta", progress=False)
    assert not (tmp_path / "meta").exists()
    assert leftovers(tmp_path) == []


def test_training_checkpoint_on_a_full_disk_names_the_file_and_keeps_the_last(tmp_path, full_disk):
    model = tiny_model(0)
    optimizer = torch.optim.AdamW(model.parameters())
    root, d = tmp_path / "checkpoints", Dist()
    good = save_checkpoint(root, 1, model, optimizer, {"step": 1}, d)
    before = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}
    full_disk(3000)
    with pytest.raises(OSError, match=f"no space left on device while writing {root}/step_00000002"):
        save_checkpoint(root, 2, model, optimizer, {"step": 2}, d)
    assert list_checkpoints(root) == [good]
    assert {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]  # the partial one is gone


def test_gguf_on_a_full_disk_names_the_file_and_keeps_the_old(tmp_path, full_disk, monkeypatch):
    pytest.importorskip("gguf")
    from checkpoints_convert.gguf_write import write_gguf
    from checkpoints_convert.hf import read_hf

    tiny_model(0).save_pretrained(tmp_path / "hf")
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    full_disk(1 << 20, fileno_full=True)  # the header fits, the tensors do not
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 1000, 0, 0, 10, 0, 0, 0, 255)))
    with pytest.raises(OSError, match=f"no space left on device while writing {target}$"):
        write_gguf(read_hf(tmp_path / "hf"), target, "f32", progress=False)
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []
