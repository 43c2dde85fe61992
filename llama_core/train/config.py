"""TrainConfig: every knob of a training run, in one dataclass (the CLI maps flags onto it 1:1).

Plain Python, no torch: ``llama-core train --help`` builds its flags and defaults from this module alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DATA_FORMATS = ("auto", "text", "chat")
# How the model is spread over torchrun's processes; "auto" is fsdp under torchrun, none on one process.
PARALLEL_MODES = ("auto", "fsdp", "ddp", "tp", "none")


@dataclass
class TrainConfig:
    # What to train on.
    data: str  # a text file or a directory of *.txt / *.md files
    output_dir: str  # checkpoints/, metrics.jsonl and the exported hf/ model go here
    tokenizer: str | None = None  # default: the --init-from checkpoint's directory
    doc_separator: str | None = None  # split files into documents on this string (default: one file = one doc)
    # "text" (plain documents), "chat" (JSONL {"messages": [...]}, loss on assistant replies only) or "auto"
    # (chat for .jsonl data, text otherwise)
    data_format: str = "auto"

    # The model: exactly one of a preset name, a config.json, or a checkpoint from_pretrained loads.
    preset: str | None = None
    model_config: str | None = None
    init_from: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"vocab_size": 512}

    # Batch: global_batch_size windows of seq_len tokens per optimizer step, micro_batch_size per rank per
    # forward; gradient accumulation = global / (micro * data-parallel ranks).
    seq_len: int = 256
    global_batch_size: int = 8
    micro_batch_size: int = 8
    max_steps: int = 100

    # AdamW with linear warmup and cosine decay.
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1  # matrices only; norms, biases stay undecayed
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)

    # Speed.
    dtype: str = "auto"  # "auto" (bf16 where the device supports it), "bfloat16" or "float32" compute
    parallel: str = "auto"  # "auto" (fsdp under torchrun), "fsdp", "ddp", "tp", "none"
    gradient_checkpointing: bool = False
    kernels: str = "auto"
    attn_implementation: str = "sdpa"
    compile: bool = False
    fused_loss: bool = True  # the loss in chunks of tokens, never the full [tokens, vocab] logits (same values)
    device: str = "auto"

    # LoRA: train low-rank adapters on a frozen base instead of every weight (lora_rank 0: full training).
    # The adapter is exported in PEFT's format to output_dir/adapter; merge_lora also writes the base with the
    # adapter folded in to output_dir/hf (an unmerged LoRA run exports no hf/: its base is the input model).
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the adapter's update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # HF linear names
    use_rslora: bool = False  # scale by lora_alpha / sqrt(lora_rank) (rank-stabilised LoRA)
    quantize_base: str | None = None  # "int8-weight-only": keep the frozen base in int8 (QLoRA-style)
    merge_lora: bool = False

    # Checkpoints and logging.
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto" (latest in output_dir) or a checkpoint directory
    export_hf: bool = True  # save_pretrained into output_dir/hf at the end
    log_every: int = 1
    peak_tflops: float | None = None  # per device, for MFU; default from a table of known GPUs
    progress: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Errors a run would otherwise hit late; checked before anything is loaded."""
        sources = [s for s in (self.preset, self.model_config, self.init_from) if s]
        if len(sources) != 1:
            raise ValueError("give exactly one model source: a preset, a config.json or a checkpoint to init from")
        for name in ("seq_len", "global_batch_size", "micro_batch_size", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError(f"need lr > 0 and warmup_steps >= 0, got lr={self.lr}, warmup_steps={self.warmup_steps}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be one of {', '.join(DATA_FORMATS)}, got {self.data_format!r}")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16 or float32, got {self.dtype!r}")
        if self.tokenizer is None and self.init_from is None:
            raise ValueError("a model built from a preset or config.json needs --tokenizer")
        self.check_lora()

    def check_lora(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 trains every weight), got {self.lora_rank}")
        if not self.lora_rank:
            for name in ("quantize_base", "merge_lora"):
                if getattr(self, name):
                    raise ValueError(f"{name} applies to LoRA runs only: set --lora-rank")
            return
        if self.quantize_base not in (None, "int8-weight-only"):
            raise ValueError(f"quantize_base must be 'int8-weight-only' (the frozen base in int8), got "
                             f"{self.quantize_base!r}")
        if self.parallel == "tp":
            raise ValueError("LoRA under tensor parallelism is not supported: use --parallel fsdp or ddp")
        # Lazy import: LoraConfig checks rank, alpha, dropout and target names; importing it loads torch, which
        # building the CLI's flags from this module must not.
        from ..lora.config import LoraConfig

        LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                   target_modules=tuple(self.lora_targets), use_rslora=self.use_rslora)

    def accumulation_steps(self, dp_world: int) -> int:
        """Micro-batches per rank per optimizer step; the global batch must split evenly."""
        per_step = self.micro_batch_size * dp_world
        if self.global_batch_size % per_step:
            raise ValueError(f"global batch {self.global_batch_size} does not divide across {dp_world} data-parallel "
                             f"rank(s) x micro batch {self.micro_batch_size}; make it a multiple of {per_step}")
        return self.global_batch_size // per_step
