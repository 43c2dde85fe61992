"""Single-process training: packing semantics, schedule, loss falling, exact resume, crash-safe saves,
HF export, and the bad-input errors (each raised before the first step)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llama_core import LlamaForCausalLM, Tokenizer
from llama_core.cli import main as cli_main
from llama_core.train import TrainConfig, list_checkpoints, lr_at, pack_windows, train
from llama_core.train import checkpoint as ckpt_module
from llama_core.train.data import IGNORE_INDEX, PackedWindows, TokenStream
from tests.conftest import random_model, small_config


def make_config(corpus, out: Path, **overrides) -> TrainConfig:
    data, tok = corpus
    base = dict(data=str(data), tokenizer=str(tok), preset="tiny", output_dir=str(out), doc_separator="\n\n",
                seq_len=64, global_batch_size=4, micro_batch_size=2, max_steps=6, lr=3e-3, warmup_steps=2,
                progress=False, export_hf=False, seed=0)
    return TrainConfig(**{**base, **overrides})


# ---- data --------------------------------------------------------------------------------------------------

def test_pack_windows_masks_documents():
    tokens = torch.tensor([[1, 10, 11, 2, 1, 20, 21, 22, 2]])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    b = pack_windows(tokens, docs)
    assert b.input_ids.tolist() == [[1, 10, 11, 2, 1, 20, 21, 22]]
    # the BOS that starts document 1 is not a target of document 0's EOS
    assert b.targets.tolist() == [[10, 11, 2, IGNORE_INDEX, 20, 21, 22, 2]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert not hasattr(b, "attention_mask")  # no [b, 1, t, t] tensor travels with a training batch
    mask = b.dense_attention_mask()[0, 0]  # what the position ids stand for
    assert mask[5].tolist() == [False] * 4 + [True, True, False, False]  # own document, causal
    assert mask[3].tolist() == [True] * 4 + [False] * 4


def test_packed_window_equals_documents_alone():
    """The point of the position resets: a packed row gives each document's standalone logits, from the
    position ids alone (the fused document path) and from the explicit 4-D mask callers may still pass."""
    model = random_model(small_config(num_hidden_layers=2))
    docs = [torch.randint(3, 128, (n,)) for n in (5, 9, 3, 7)]
    tokens = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(x),), i) for i, x in enumerate(docs)])[None]
    b = pack_windows(torch.cat([tokens, tokens[:, :1]], 1), torch.cat([doc_ids, doc_ids[:, :1] + 9], 1))
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            alone = torch.cat([model(x[None]).logits[0] for x in docs])
            by_positions = model(b.input_ids, position_ids=b.position_ids).logits[0]
            by_mask = model(b.input_ids, attention_mask=b.dense_attention_mask(), position_ids=b.position_ids)
        torch.testing.assert_close(by_positions, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(by_mask.logits[0], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="4-D attention_mask must be boolean"):
        model(b.input_ids, attention_mask=b.dense_attention_mask().float())


def test_window_order_is_a_function_of_position():
    stream = TokenStream(torch.arange(1001), torch.zeros(1001, dtype=torch.long))
    w = PackedWindows(stream, seq_len=10, seed=3)
    assert w.num_windows == 100
    one = torch.cat([b.input_ids for b in w.step_batches(200, 8, 2, 0, 1)])  # the third epoch
    two = torch.cat([b.input_ids for r in range(2) for b in w.step_batches(200, 8, 4, r, 2)])
    assert torch.equal(one, two)  # any split over ranks and micro-batches: the same global batch
    epoch = torch.stack([w.windows(k, 1).input_ids[0, 0] for k in range(100, 200)])
    assert sorted(epoch.tolist()) == list(range(0, 1000, 10))  # a permutation of every window


def test_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0 and math.isclose(lr_at(13, **kw), 0.1)
    assert lr_at(9, **kw) < lr_at(8, **kw) and math.isclose(lr_at(8.5, **kw), 0.55)


# ---- training ------------------------------------------------------------------------------------------------

def test_loss_falls_and_export_loads_in_transformers(corpus, tmp_path, transformers_module):
    cfg = make_config(corpus, tmp_path, max_steps=20, export_hf=True, global_batch_size=8, micro_batch_size=4)
    result = train(cfg)
    losses = result.losses
    assert len(losses) == 20 and losses[0] > 5.0
    assert losses[-1] < losses[0] - 1.5, losses
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == losses and all(r["tokens_per_s"] > 0 for r in rows)
    # the export is a normal HF checkpoint: transformers and llama_core agree on it, tokenizer included
    ours = LlamaForCausalLM.from_pretrained(result.hf_dir).eval()
    theirs = transformers_module.LlamaForCausalLM.from_pretrained(result.hf_dir).eval()
    ids = torch.tensor([Tokenizer.from_pretrained(result.hf_dir).encode("Once upon a time")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
    # fine-tuning from the export (tokenizer found beside it) starts where the run ended, not from scratch
    tuned = train(make_config(corpus, tmp_path / "tuned", preset=None, tokenizer=None, init_from=str(result.hf_dir),
                              max_steps=1, global_batch_size=8, micro_batch_size=4))
    assert abs(tuned.losses[0] - losses[-1]) < 0.5


def test_accumulation_matches_one_big_batch(corpus, tmp_path):
    big = train(make_config(corpus, tmp_path / "a", micro_batch_size=4, max_steps=3)).losses
    small = train(make_config(corpus, tmp_path / "b", micro_batch_size=1, max_steps=3)).losses
    torch.testing.assert_close(torch.tensor(small), torch.tensor(big), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_bf16_and_compile_keep_the_curve(corpus, tmp_path):
    reference = torch.tensor(train(make_config(corpus, tmp_path / "ref", max_steps=3)).losses)
    checkpointed = train(make_config(corpus, tmp_path / "gc", max_steps=3, gradient_checkpointing=True)).losses
    assert checkpointed == reference.tolist()  # recomputation is exact on CPU
    bf16 = torch.tensor(train(make_config(corpus, tmp_path / "bf16", max_steps=3, dtype="bfloat16")).losses)
    assert not torch.equal(bf16, reference)  # autocast really ran in bf16 ...
    torch.testing.assert_close(bf16, reference, atol=5e-3, rtol=0)  # ... with the loss in fp32


@pytest.mark.slow
def test_compiled_layers_keep_the_curve(corpus, tmp_path):
    pytest.importorskip("torch._inductor")
    reference = torch.tensor(train(make_config(corpus, tmp_path / "ref", max_steps=2)).losses)
    compiled = torch.tensor(train(make_config(corpus, tmp_path / "c", max_steps=2, compile=True)).losses)
    torch.testing.assert_close(compiled, reference, atol=1e-5, rtol=1e-5)


class Crash(RuntimeError):
    pass


def test_interrupted_and_resumed_run_is_bit_identical(corpus, tmp_path):
    straight = train(make_config(corpus, tmp_path / "a", checkpoint_every=3)).losses

    def crash_after_step_4(log):
        if log.step == 4:  # step 3's checkpoint exists; this step's work is lost
            raise Crash

    out = tmp_path / "b"
    with pytest.raises(Crash):
        train(make_config(corpus, out, checkpoint_every=3), on_step=crash_after_step_4)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003"]
    resumed = train(make_config(corpus, out, checkpoint_every=3, resume="auto"))
    assert [log.step for log in resumed.logs] == [3, 4, 5]
    assert resumed.losses == straight[3:]  # bit for bit: model, AdamW moments, schedule, data position, RNG


def test_crash_mid_save_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = ckpt_module.dcp.save
    calls = []

    def dying_save(state, *, checkpoint_id, **kw):
        calls.append(checkpoint_id)
        if len(calls) == 2:  # the second save dies half way: some shards written, no rename
            Path(checkpoint_id, "__0_0.distcp").write_bytes(b"partial")
            raise Crash("disk full")
        return real_save(state, checkpoint_id=checkpoint_id, **kw)

    monkeypatch.setattr(ckpt_module.dcp, "save", dying_save)
    with pytest.raises(Crash):
        train(make_config(corpus, out, checkpoint_every=2))
    good = out / "checkpoints" / "step_00000002"
    assert list_checkpoints(out / "checkpoints") == [good]
    assert (out / "checkpoints" / ".step_00000004.tmp").exists()  # the wreck is ignored, not trusted
    before = {p.name: p.read_bytes() for p in good.rglob("*") if p.is_file()}
    monkeypatch.setattr(ckpt_module.dcp, "save", real_save)
    resumed = train(make_config(corpus, out, checkpoint_every=2, resume="auto"))
    assert resumed.logs[0].step == 2 and len(resumed.logs) == 4
    assert not (out / "checkpoints" / ".step_00000004.tmp").exists()
    assert before  # the good checkpoint was intact when resumed from (it may be pruned afterwards)
    straight = train(make_config(corpus, tmp_path / "ref")).losses
    assert resumed.losses == straight[2:]


# ---- bad input: clear errors before the first step ------------------------------------------------------------

def _never(log):
    raise AssertionError("training started")


def test_empty_and_non_utf8_files_are_refused(corpus, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("fine text", encoding="utf-8")
    (data / "b.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"b\.txt is empty"):
        train(make_config(corpus, tmp_path / "o", data=str(data)), on_step=_never)
    (data / "b.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"b\.txt is not UTF-8 text: byte 0xe9 at offset 3"):
        train(make_config(corpus, tmp_path / "o", data=str(data)), on_step=_never)
    (data / "b.txt").write_text("  \n\n ", encoding="utf-8")
    with pytest.raises(ValueError, match=r"b\.txt holds only whitespace"):
        train(make_config(corpus, tmp_path / "o", data=str(data)), on_step=_never)
    with pytest.raises(ValueError, match="fewer than one training window"):
        train(make_config(corpus, tmp_path / "o", data=str(data / "a.txt")), on_step=_never)


def test_sequence_longer_than_context_is_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="seq_len 512 is above the model's context of 256"):
        train(make_config(corpus, tmp_path, seq_len=512), on_step=_never)


def test_global_batch_must_divide(corpus, tmp_path):
    with pytest.raises(ValueError, match="global batch 6 does not divide across 1 data-parallel rank"):
        train(make_config(corpus, tmp_path, global_batch_size=6, micro_batch_size=4), on_step=_never)
    cfg = make_config(corpus, tmp_path, global_batch_size=6, micro_batch_size=1)
    assert cfg.accumulation_steps(2) == 3
    with pytest.raises(ValueError, match=r"global batch 6 does not divide across 4 .*multiple of 4"):
        cfg.accumulation_steps(4)


def test_resume_from_a_different_shape_is_refused(corpus, tmp_path):
    train(make_config(corpus, tmp_path, max_steps=1))
    bigger = make_config(corpus, tmp_path, max_steps=2, resume="auto", config_overrides={"intermediate_size": 128})
    with pytest.raises(ValueError, match=r"different shape \(intermediate_size: checkpoint 176, model 128\)"):
        train(bigger, on_step=_never)
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        train(make_config(corpus, tmp_path, resume=str(tmp_path)), on_step=_never)
    with pytest.raises(ValueError, match="already holds checkpoints of a run: pass --resume auto"):
        train(make_config(corpus, tmp_path), on_step=_never)


def test_tokenizer_larger_than_vocab_is_refused(corpus, tmp_path):
    cfg = make_config(corpus, tmp_path, config_overrides={"vocab_size": 100})
    with pytest.raises(ValueError, match="tokenizer has 192 ids but the model's vocabulary is 100"):
        train(cfg, on_step=_never)


# ---- command line --------------------------------------------------------------------------------------------

def test_cli_train_and_errors(corpus, tmp_path, capsys):
    data, tok = corpus
    args = ["train", "--preset", "tiny", "--data", str(data), "--tokenizer", str(tok), "--doc-separator", "\n\n",
            "--output-dir", str(tmp_path), "--seq-len", "32", "--global-batch-size", "2", "--micro-batch-size", "1",
            "--max-steps", "2", "--no-progress", "--set", "rms_norm_eps=1e-6"]
    assert cli_main(args) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rms_norm_eps"] == 1e-6
    assert cli_main([*args, "--seq-len", "300", "--output-dir", str(tmp_path / "other")]) == 2
    assert "seq_len 300 is above the model's context" in capsys.readouterr().err
