"""Launching a 2-process gloo worker under torchrun for the distributed tests, and the workers' common ending.

    data, tok, results = launch_workers("train_dist_worker.py", root)   # in a test fixture
    finish(out, results)                                                # at the end of a worker's main()
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.train_corpus import write_corpus, write_tokenizer

FP32_NOISE = dict(atol=2e-5, rtol=2e-5)  # reduction order differs across ranks; everything else is equal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(worker: str, root: Path, timeout: int = 300) -> tuple[Path, Path, dict]:
    """Write the story corpus and its tokenizer under ``root``, run ``tests/<worker> DATA TOKENIZER OUT`` on 2
    processes (one launch for every scenario: process start-up dominates on a 2-core CPU) and return
    ``(data, tokenizer, results)``, the results being what rank 0 wrote to OUT/results.json."""
    data = write_corpus(root / "corpus")
    tok = write_tokenizer(root / "tokenizer", data)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(REPO / "tests" / worker), str(data), str(tok), str(root / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out after {timeout} s:\n{(e.stdout or b'')[-3000:]}\n{(e.stderr or b'')[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return data, tok, json.loads((root / "out" / "results.json").read_text())


def finish(out: Path, results: dict) -> None:
    """A worker's ending: rank 0 writes ``results`` for the test, then every rank leaves the process group."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
