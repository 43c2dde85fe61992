"""``llama-core train``: the command-line face of :func:`llama_core.train.train` (flags map 1:1 onto TrainConfig).

One process:        llama-core train --preset tiny --data corpus/ --tokenizer tok/ --output-dir run/
Several GPUs/nodes: torchrun --nproc-per-node 8 -m llama_core.cli train ... (FSDP2 by default)
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from ..modeling.presets import preset_names
from ..train.config import DATA_FORMATS, PARALLEL_MODES, TrainConfig


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated module names, e.g. q_proj,v_proj")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(data="", output_dir="")
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True, help="a text file or a directory of *.txt / *.md files; or chat "
                      "data: a .jsonl file (or directory of them) of {\"messages\": [...]} per line")
    data.add_argument("--format", dest="data_format", choices=DATA_FORMATS, default=d.data_format,
                      help="chat: render each conversation with the tokenizer's chat template and train on the "
                      "assistant replies only; auto: chat for .jsonl data")
    data.add_argument("--tokenizer", help="tokenizer file or directory (default: the --init-from checkpoint's)")
    data.add_argument("--doc-separator", help="split files into documents on this string, e.g. $'\\n\\n' "
                      "(default: each file is one document)")
    model = p.add_argument_group("model (exactly one source)")
    src = model.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=preset_names(), help="random init of a known shape")
    src.add_argument("--model-config", help="random init from a config.json")
    src.add_argument("--init-from", help="fine-tune a checkpoint (directory, hub id, Meta dir, llama2.c .bin)")
    model.add_argument("--set", dest="config_overrides", type=_override, action="append", default=[],
                       metavar="KEY=VALUE", help="override a config field, e.g. --set vocab_size=512 (repeatable)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--seq-len", type=int, default=d.seq_len)
    opt.add_argument("--global-batch-size", type=int, default=d.global_batch_size,
                     help="sequences per optimizer step, over all ranks")
    opt.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size,
                     help="sequences per forward per rank (accumulation makes up the rest)")
    opt.add_argument("--max-steps", type=int, default=d.max_steps)
    opt.add_argument("--lr", type=float, default=d.lr)
    opt.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    opt.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    opt.add_argument("--beta1", type=float, default=d.beta1)
    opt.add_argument("--beta2", type=float, default=d.beta2)
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 disables")
    opt.add_argument("--seed", type=int, default=d.seed)
    speed = p.add_argument_group("speed and scale")
    speed.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default=d.dtype,
                       help="compute dtype; auto = bf16 where the GPU supports it (weights stay fp32)")
    speed.add_argument("--parallel", choices=PARALLEL_MODES, default=d.parallel,
                       help="under torchrun: fsdp (auto), ddp or tp (tensor parallel)")
    speed.add_argument("--gradient-checkpointing", action="store_true")
    speed.add_argument("--kernels", choices=["auto", "triton", "torch"], default=d.kernels)
    speed.add_argument("--attn-implementation", choices=["sdpa", "eager"], default=d.attn_implementation)
    speed.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    speed.add_argument("--no-fused-loss", dest="fused_loss", action="store_false",
                       help="compute the loss from the full [tokens, vocab] logits (default: in chunks of "
                       "tokens, never building them; same loss, a fraction of the memory)")
    speed.add_argument("--device", default=d.device, help="auto = cuda if available")
    speed.add_argument("--peak-tflops", type=float, help="per-device bf16 peak for MFU (default: known GPUs)")
    lora = p.add_argument_group("LoRA (adapters on a frozen base; exported in PEFT's format to OUTPUT_DIR/adapter)")
    lora.add_argument("--lora-rank", type=int, default=d.lora_rank, help="adapter rank; 0 (default) trains every weight")
    lora.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="updates are scaled by alpha / rank")
    lora.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    lora.add_argument("--lora-targets", type=_names, default=d.lora_targets, metavar="NAMES",
                      help="comma-separated linears: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj "
                      f"(default {','.join(d.lora_targets)})")
    lora.add_argument("--use-rslora", action="store_true", help="scale by alpha / sqrt(rank) (rank-stabilised)")
    lora.add_argument("--quantize-base", choices=["int8-weight-only"],
                      help="keep the frozen base in int8 (QLoRA-style; lm_head stays full precision)")
    lora.add_argument("--merge-lora", action="store_true",
                      help="also export the base with the adapter merged in to OUTPUT_DIR/hf (full precision)")
    out = p.add_argument_group("checkpoints and logging")
    out.add_argument("--output-dir", required=True)
    out.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps; 0 = only at the end")
    out.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    out.add_argument("--resume", help="'auto' (latest checkpoint in --output-dir, if any) or a checkpoint directory")
    out.add_argument("--no-export-hf", dest="export_hf", action="store_false",
                     help="skip the final save_pretrained into OUTPUT_DIR/hf (LoRA runs: the adapter export)")
    out.add_argument("--log-every", type=int, default=10)
    out.add_argument("--no-progress", dest="progress", action="store_false")


def cmd_train(args: argparse.Namespace) -> int:
    # Here, not at the top: building the parser (--help, argument errors) must not wait for torch.
    import torch.distributed as dist
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..train import train

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    fields["config_overrides"] = dict(args.config_overrides)
    cfg = TrainConfig(**fields)
    # Step lines at INFO from rank 0 only; the progress bar stays below them.
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.getLogger("llama_core.train").setLevel(logging.INFO if rank0 else logging.WARNING)
    try:
        with logging_redirect_tqdm():
            result = train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank0 and result.logs:
        first, last = result.logs[0], result.logs[-1]
        logging.getLogger("llama_core.train").info(
            "done: loss %.4f (step %d) -> %.4f (step %d); checkpoint %s%s%s", first.loss, first.step, last.loss,
            last.step, result.checkpoint, f"; adapter {result.adapter_dir}" if result.adapter_dir else "",
            f"; model {result.hf_dir}" if result.hf_dir else "")
    return 0


EXAMPLES = """examples:
  llama-core train --preset tiny --data corpus/ --tokenizer tok/ --output-dir run/
  llama-core train --init-from SmolLM2-135M-Instruct.Q4_1.gguf --data corpus/ --output-dir run/ --max-steps 200
  llama-core train --init-from SmolLM2-135M-Instruct.Q4_1.gguf --data chat.jsonl --format chat --output-dir run/
  torchrun --nproc-per-node 8 -m llama_core.cli train ...        (several GPUs: FSDP2 by default)
  llama-core train --init-from SmolLM2-135M/ --data corpus/ --output-dir run/ --lora-rank 16 --lora-alpha 32
      --lora-targets q_proj,v_proj --quantize-base int8-weight-only --merge-lora   (LoRA on an int8 base)
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="pretrain or fine-tune on text files (single device or torchrun)",
                       description="Pretrain or fine-tune on text files; the flags map 1:1 onto TrainConfig.",
                       epilog=EXAMPLES)
    add_arguments(t)
    t.set_defaults(func=cmd_train)
