"""LoRA under 2-process training on CPU (gloo, torchrun): FSDP2 (full-precision and int8 base) and DDP give the
single-process loss curves; the FSDP run's gathered adapter and merged export equal the single process's; a
2-rank LoRA checkpoint resumes on 2 ranks bit for bit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llama_core.lora import ADAPTER_WEIGHTS
from llama_core.train import train
from tests.conftest import REPO
from tests.lora_dist_worker import run_config
from tests.train_corpus import write_corpus, write_tokenizer

FP32_NOISE = dict(atol=2e-5, rtol=2e-5)  # reduction order differs across ranks; everything else is equal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One torchrun launch for every scenario (process start-up dominates on a 2-core CPU)."""
    root = tmp_path_factory.mktemp("lora_dist")
    data = write_corpus(root / "corpus")
    tok = write_tokenizer(root / "tokenizer", data)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(REPO / "tests" / "lora_dist_worker.py"), str(data), str(tok),
           str(root / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out after 300 s:\n{(e.stdout or b'')[-3000:]}\n{(e.stderr or b'')[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    results = json.loads((root / "out" / "results.json").read_text())
    single = {"fsdp": train(run_config(str(data), str(tok), root / "single", parallel="none")).losses,
              "fsdp_int8": train(run_config(str(data), str(tok), root / "single_int8", parallel="none",
                                            quantize_base="int8-weight-only", export_hf=False)).losses}
    single["ddp"] = single["fsdp"]
    return root, results, single


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "fsdp_int8", "ddp"])
def test_two_rank_lora_loss_curve_equals_single_process(runs, mode):
    _, results, single = runs
    assert len(results[mode]) == len(single[mode]) == 4
    torch.testing.assert_close(torch.tensor(results[mode]), torch.tensor(single[mode]), **FP32_NOISE)
    assert single[mode][-1] < single[mode][0]


@pytest.mark.slow
def test_fsdp_lora_exports_equal_single_process(runs):
    root, *_ = runs
    for file in ("adapter/" + ADAPTER_WEIGHTS, "hf/model.safetensors"):
        theirs, ours = load_file(root / "out" / "fsdp" / file), load_file(root / "single" / file)
        assert theirs.keys() == ours.keys() and theirs
        for k in ours:
            torch.testing.assert_close(theirs[k], ours[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_fsdp_lora_resume_is_bit_identical(runs):
    _, results, _ = runs
    assert results["fsdp_resumed"] == results["fsdp"][2:]
