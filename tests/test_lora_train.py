"""LoRA in the training loop: only adapters train, the loss falls, checkpoints resume exactly, the adapter and
the merged model are exported (and agree), the int8 base trains from the command line, bad settings fail early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama_core import LlamaConfig, LlamaForCausalLM
from llama_core.cli import main as cli_main
from llama_core.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter
from llama_core.train import TrainConfig, train
from llama_core.train.build import build_model, make_optimizer
from llama_core.train.checkpoint import SafeCheckpointReader

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(corpus, out: Path, **overrides) -> TrainConfig:
    data, tok = corpus
    base = dict(data=str(data), tokenizer=str(tok), preset="tiny", output_dir=str(out), doc_separator="\n\n",
                seq_len=64, global_batch_size=4, micro_batch_size=2, max_steps=6, lr=1e-2, warmup_steps=1,
                progress=False, export_hf=False, seed=0, lora_rank=4, lora_alpha=8, lora_targets=ALL)
    return TrainConfig(**{**base, **overrides})


def _never(log):
    raise AssertionError("training must not start")


def test_optimizer_holds_only_adapters(corpus, tmp_path):
    cfg = lora_config(corpus, tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimized = {id(p) for group in make_optimizer(model, cfg).param_groups for p in group["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in optimized}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * len(ALL) * 2


def test_lora_run_exports_adapter_and_merged_model(corpus, tmp_path):
    result = train(lora_config(corpus, tmp_path, export_hf=True, merge_lora=True, max_steps=10))
    assert result.losses[-1] < result.losses[0] - 0.2, result.losses  # 5.58 -> 5.27 measured
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config = json.loads((result.adapter_dir / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == "tiny"
    # the base never moved: the seeded initial model plus the exported adapter is the trained model, and the
    # merged export computes the same logits
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig.from_preset("tiny")).eval()
    load_adapter(base, result.adapter_dir)
    merged = LlamaForCausalLM.from_pretrained(result.hf_dir).eval()
    assert merged.config.quantization_config is None
    ids = torch.randint(3, 192, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, base(ids).logits, atol=1e-4, rtol=0)
    assert (result.hf_dir / "tokenizer.json").is_file()


def test_lora_resume_is_bit_identical(corpus, tmp_path):
    straight = train(lora_config(corpus, tmp_path / "a", max_steps=4, checkpoint_every=2)).losses
    step2 = tmp_path / "a" / "checkpoints" / "step_00000002"
    resumed = train(lora_config(corpus, tmp_path / "b", max_steps=4, resume=str(step2)))
    assert [log.step for log in resumed.logs] == [2, 3]
    assert resumed.losses == straight[2:]
    # the checkpoint holds the adapters (and their AdamW state), not the frozen base
    saved = SafeCheckpointReader(step2).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert len(model_keys) == 2 * len(ALL) * 2 and all(".lora_" in k for k in model_keys)
    for overrides, message in [(dict(seed=1), "holds only the adapters, so it resumes over the same base model "
                                              r"\(seed: checkpoint 0, this run 1\)"),(dict(lora_rank=0), r"LoRA adapters \(rank 4 on .*\) differ from this run's \(none\)"),
                               (dict(lora_targets=["q_proj"]), r"differ from this run's \(rank 4 on q_proj\)"),
                               (dict(quantize_base="int8-weight-only"), "its base is full precision, this run's is "
                                                                        "int8-weight-only")]:
        with pytest.raises(ValueError, match=message):
            train(lora_config(corpus, tmp_path / "c", max_steps=4, resume=str(step2), **overrides), on_step=_never)


@pytest.mark.slow
def test_cli_trains_an_int8_base(corpus, tmp_path):
    data, tok = corpus
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(data), "--tokenizer", str(tok), "--doc-separator", "\n\n",
            "--output-dir", str(out), "--seq-len", "64", "--global-batch-size", "4", "--micro-batch-size", "2",
            "--max-steps", "6", "--lr", "1e-2", "--warmup-steps", "1", "--no-progress", "--lora-rank", "8",
            "--lora-alpha", "16", "--lora-targets", "q_proj,v_proj,up_proj", "--quantize-base", "int8-weight-only",
            "--merge-lora"]
    assert cli_main(args) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.1, losses  # 5.58 -> 5.41 measured
    assert json.loads((out / "adapter" / ADAPTER_CONFIG).read_text())["target_modules"] == ["q_proj", "v_proj",
                                                                                          "up_proj"]
    merged = LlamaForCausalLM.from_pretrained(out / "hf")  # dequantised base + adapter, a plain HF model
    assert merged.config.quantization_config is None and merged.dtype == torch.float32


@pytest.mark.parametrize("overrides, message", [
    (dict(lora_rank=0, quantize_base="int8-weight-only"), "quantize_base applies to LoRA runs only"),
    (dict(lora_rank=0, merge_lora=True), "merge_lora applies to LoRA runs only"),
    (dict(quantize_base="int8"), "quantize_base must be 'int8-weight-only'"),
    (dict(parallel="tp"), "LoRA under tensor parallelism is not supported"),
    (dict(lora_targets=["q_proj", "lm_head"]), r"unsupported LoRA target module\(s\) \['lm_head'\]"),
    (dict(lora_rank=-1), "lora_rank must be >= 0"),
    (dict(lora_dropout=1.5), r"lora_dropout must be in \[0, 1\)"),
])
def test_bad_lora_settings_fail_before_training(corpus, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(lora_config(corpus, tmp_path, **overrides), on_step=_never)


def test_resume_base_check_sees_one_directory_under_two_spellings(corpus, tmp_path, monkeypatch):
    from llama_core.train.checkpoint import check_same_adapters

    model = build_model(lora_config(corpus, tmp_path))
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = {"train_config": {"lora_rank": 4, "lora_targets": ALL, "init_from": "base"}, "model_config": {}}
    check_same_adapters(saved, model, model.config, "ckpt", {"init_from": str(tmp_path / "base")})  # same dir
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match=r"init_from: checkpoint 'base', this run '.*other'"):
        check_same_adapters(saved, model, model.config, "ckpt", {"init_from": str(tmp_path / "other")})
