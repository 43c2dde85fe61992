"""Worker for tests/test_train_distributed.py, run under torchrun with 2 gloo processes.

    python -m torch.distributed.run --nproc-per-node 2 tests/train_dist_worker.py DATA TOKENIZER OUT_DIR

Trains the same run under FSDP2, DDP and tensor parallelism, and compares tensor-parallel logits with the
unsharded model's; rank 0 writes everything to OUT_DIR/results.json for the test to check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llama_core import LlamaConfig, LlamaForCausalLM
from llama_core.train import TrainConfig, tensor_parallel, train
from llama_core.train.distributed import init_distributed
from tests.torchrun_launch import finish


def run_config(data: str, tok: str, out: Path, **kw) -> TrainConfig:
    """Shared with the test's single-process reference (imported there): keep them identical."""
    base = dict(data=data, tokenizer=tok, preset="tiny", output_dir=str(out), doc_separator="\n\n", seq_len=64,
                global_batch_size=4, micro_batch_size=2, max_steps=4, lr=3e-3, warmup_steps=2, progress=False,
                checkpoint_every=2, keep_checkpoints=3, seed=0, device="cpu")
    return TrainConfig(**{**base, **kw})


def tp_inference(attn: str) -> dict:
    """TP vs single-device: max |logits difference| and whether greedy decoding (KV cache) gives the same
    tokens, for a random tiny model (every rank builds the same one)."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_preset("tiny", attn_implementation=attn)).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, ref_tokens = model(ids).logits, model.generate(ids, max_new_tokens=8)
        tensor_parallel(model, init_device_mesh("cpu", (dist.get_world_size(),)))
        local_heads = model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0] // model.config.head_dim
        sharded, tokens = model(ids).logits, model.generate(ids, max_new_tokens=8)
    assert local_heads == model.config.num_attention_heads // dist.get_world_size()
    return {"logits_error": float((sharded - reference).abs().max()),
            "same_tokens": bool(torch.equal(tokens, ref_tokens))}


def main() -> None:
    data, tok, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    init_distributed("cpu", "fsdp")
    results: dict = {}
    for mode in ("fsdp", "ddp", "tp"):
        results[mode] = train(run_config(data, tok, out / mode, parallel=mode)).losses
    # bf16 compute through FSDP's MixedPrecisionPolicy (fp32 master weights and gradient reduction)
    results["fsdp_bf16"] = train(run_config(data, tok, out / "fsdp_bf16", parallel="fsdp", dtype="bfloat16",
                                            gradient_checkpointing=True, export_hf=False)).losses
    # resume the FSDP run from its step-2 checkpoint on the same 2 ranks: must be bit-identical
    step2 = out / "fsdp" / "checkpoints" / "step_00000002"
    results["fsdp_resumed"] = train(run_config(data, tok, out / "fsdp_resumed", parallel="fsdp", resume=str(step2),
                                               export_hf=False)).losses
    results["tp_inference"] = {attn: tp_inference(attn) for attn in ("sdpa", "eager")}
    try:  # 6 sequences over 2 ranks x micro batch 2: refused on every rank before any step
        train(run_config(data, tok, out / "uneven", global_batch_size=6), on_step=lambda log: sys.exit(3))
        results["uneven_error"] = None
    except ValueError as e:
        results["uneven_error"] = str(e)
    finish(out, results)


if __name__ == "__main__":
    main()
