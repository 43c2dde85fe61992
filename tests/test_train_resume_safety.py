"""Resuming never runs code from a checkpoint (issue 15): DCP's ``.metadata`` pickle and its pickled
non-tensor values are read through allow-lists, so a crafted checkpoint is refused, named, and inert."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from llama_core.train import list_checkpoints, train
from llama_core.train.checkpoint import UnsafeCheckpointError, load_checkpoint, save_checkpoint
from llama_core.train.distributed import Dist
from tests.conftest import random_model, small_config
from tests.test_train import make_config


class _RunsCommand:
    """Unpickling this runs a shell command, as an attacker's pickle would."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def trained(seed: int = 0):
    model = random_model(small_config(num_hidden_layers=1), seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(seed))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


def checkpoint(tmp_path):
    model, optimizer = trained(0)
    state = {"step": 1, "model_config": model.config.to_dict(), "world_size": 1}
    return save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, state, Dist()), model, optimizer


def test_a_real_checkpoint_resumes_exactly(tmp_path):
    path, model, optimizer = checkpoint(tmp_path)
    fresh, fresh_opt = trained(1)
    load_checkpoint(path, fresh, fresh_opt, model.config, Dist())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    saved, loaded = optimizer.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"][0]["lr"] == loaded["param_groups"][0]["lr"]
    for i, s in saved["state"].items():
        assert torch.equal(s["exp_avg"], loaded["state"][i]["exp_avg"])


def test_metadata_that_would_run_code_is_refused(tmp_path):
    path, model, _ = checkpoint(tmp_path)
    marker = tmp_path / "marker"
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCommand(f"touch {marker}")))
    fresh, fresh_opt = trained(1)
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata.*posix\.system"):
        load_checkpoint(path, fresh, fresh_opt, model.config, Dist())
    assert not marker.exists()


def test_optimizer_value_that_would_run_code_is_refused(tmp_path):
    """DCP pickles non-tensor values (the learning rate) and plain DCP loads them with weights_only=False."""
    path, model, optimizer = checkpoint(tmp_path)
    marker = tmp_path / "marker"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    optim_sd["param_groups"][0]["lr"] = _RunsCommand(f"touch {marker}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process, and overwriting the checkpoint: both intended
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path, no_dist=True)
    fresh, fresh_opt = trained(1)
    with pytest.raises(UnsafeCheckpointError, match=r"optim\.param_groups\.0\.lr"):
        load_checkpoint(path, fresh, fresh_opt, model.config, Dist())
    assert not marker.exists()


def test_corrupt_metadata_is_a_clear_error(tmp_path):
    path, model, _ = checkpoint(tmp_path)
    (path / ".metadata").write_bytes(b"\x80\x04garbage")
    fresh, fresh_opt = trained(1)
    with pytest.raises(ValueError, match=r"\.metadata is not a readable checkpoint metadata file"):
        load_checkpoint(path, fresh, fresh_opt, model.config, Dist())


def test_resume_auto_refuses_a_crafted_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    train(make_config(corpus, out, max_steps=2, checkpoint_every=2))
    (path,) = list_checkpoints(out / "checkpoints")
    marker = tmp_path / "marker"
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCommand(f"touch {marker}")))
    with pytest.raises(UnsafeCheckpointError, match=str(path / ".metadata")):
        train(make_config(corpus, out, max_steps=4, checkpoint_every=2, resume="auto"))
    assert not marker.exists()


def test_a_second_run_into_the_same_output_dir_fails_at_once(corpus, tmp_path):
    """One training run per output directory: while a live process holds it, another run is refused at once
    (naming the holder), nothing of it written; a killed holder (kill -9) does not block the next run."""
    import signal
    import subprocess
    import sys

    from llama_core.model_io.atomic import BusyError, exclusive_directory

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from llama_core.model_io.atomic import exclusive_directory\n"
        f"with exclusive_directory({str(out)!r}, 'training run'):\n"
        "    print('held', flush=True); time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=rf"in use by another training run \(pid {holder.pid}\)"):
            train(make_config(corpus, out, max_steps=2))
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    result = train(make_config(corpus, out, max_steps=2))
    assert len(result.logs) == 2
    with exclusive_directory(out, "training run"):  # released at the end of the run
        pass
