"""LoRA under 2-process training on CPU (gloo, torchrun): FSDP2 (full-precision and int8 base) and DDP give the
single-process loss curves; the FSDP run's gathered adapter and merged export equal the single process's; a
2-rank LoRA checkpoint resumes on 2 ranks bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llama_core.lora import ADAPTER_WEIGHTS
from llama_core.train import train
from tests.lora_dist_worker import run_config
from tests.torchrun_launch import FP32_NOISE, launch_workers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One torchrun launch for every scenario (process start-up dominates on a 2-core CPU)."""
    root = tmp_path_factory.mktemp("lora_dist")
    data, tok, results = launch_workers("lora_dist_worker.py", root)
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
