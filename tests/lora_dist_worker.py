"""Worker for tests/test_lora_distributed.py, run under torchrun with 2 gloo processes.

    python -m torch.distributed.run --nproc-per-node 2 tests/lora_dist_worker.py DATA TOKENIZER OUT_DIR

Trains the same LoRA run under FSDP2 (full-precision and int8 base) and DDP; rank 0 writes the loss curves
to OUT_DIR/results.json for the test to compare with one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llama_core.train import TrainConfig, train
from llama_core.train.distributed import init_distributed
from tests.torchrun_launch import finish

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def run_config(data: str, tok: str, out: Path, **kw) -> TrainConfig:
    """Shared with the test's single-process reference (imported there): keep them identical."""
    base = dict(data=data, tokenizer=tok, preset="tiny", output_dir=str(out), doc_separator="\n\n", seq_len=64,
                global_batch_size=4, micro_batch_size=2, max_steps=4, lr=1e-2, warmup_steps=1, progress=False,
                checkpoint_every=2, keep_checkpoints=3, seed=0, device="cpu", lora_rank=4, lora_alpha=8,
                lora_targets=TARGETS, merge_lora=True)
    return TrainConfig(**{**base, **kw})


def main() -> None:
    data, tok, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    init_distributed("cpu", "fsdp")
    results = {
        "fsdp": train(run_config(data, tok, out / "fsdp", parallel="fsdp")).losses,
        "fsdp_int8": train(run_config(data, tok, out / "fsdp_int8", parallel="fsdp",
                                      quantize_base="int8-weight-only", export_hf=False)).losses,
        "ddp": train(run_config(data, tok, out / "ddp", parallel="ddp", export_hf=False)).losses,
    }
    step2 = out / "fsdp" / "checkpoints" / "step_00000002"
    results["fsdp_resumed"] = train(run_config(data, tok, out / "fsdp_resumed", parallel="fsdp", resume=str(step2),
                                               export_hf=False)).losses
    finish(out, results)


if __name__ == "__main__":
    main()
