"""llama_core.bench: the machinery runs end to end on `tiny` (one repeat, no timed assertions: speed targets
live in the recorded results), the transformers side is the same model, and the record renders."""

from __future__ import annotations

import json

import pytest
import torch

from llama_core.bench import (
    KERNEL_BENCHMARKS,
    BenchSettings,
    format_table,
    load_record,
    render_markdown,
    run_bench,
    write_record,
)
from llama_core.bench.kernels import rms_norm_rows, rope_rows
from llama_core.bench.setup import build_pair, same_weights_check
from llama_core.bench.targets import evaluate
from llama_core.bench.timing import PeakMemory, interleaved, quantiles
from llama_core.cli import main


def tiny_settings(**overrides) -> BenchSettings:
    base = dict(prompt_lens=[8, 24], decode_prompt_len=6, decode_tokens=4, batch_sizes=[1, 2], repeats=1,
                quick=True)
    return BenchSettings("tiny", "cpu", "float32", **{**base, **overrides})


@pytest.fixture(scope="module")
def record():
    pytest.importorskip("transformers")
    return run_bench([tiny_settings()], quick=True, show_progress=False)


def test_record_names_the_environment_and_settings(record):
    env = record["environment"]
    for key in ("device", "torch", "triton", "transformers", "git_sha", "date", "cpu_count", "torch_threads"):
        assert key in env
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__
    assert record["copy_bandwidth_gb_s"] > 0
    (model,) = record["models"]
    assert model["settings"]["preset"] == "tiny" and model["settings"]["repeats"] == 1
    assert model["params"] == sum(p.numel() for p in torch.nn.Module.parameters(
        __import__("llama_core").LlamaForCausalLM.from_preset("tiny")))


def test_transformers_ran_on_the_same_weights(record):
    sanity = record["models"][0]["sanity"]
    assert sanity["compared"] and sanity["ok"]
    assert sanity["max_abs_logit_diff"] <= 1e-4 and sanity["argmax_agreement"] == 1.0
    decode = record["models"][0]["decode"]
    assert all(r["same_tokens_as_transformers"] for r in decode)  # greedy fp32: token for token


def test_every_benchmark_has_both_sides(record):
    model = record["models"][0]
    prefill = {(r["tokens"], r["impl"], r["mode"]) for r in model["prefill"]}
    assert prefill == {(n, impl, "eager") for n in (8, 24) for impl in ("llama_core", "transformers")}
    decode = {(r["batch"], r["impl"]) for r in model["decode"]}
    assert decode == {(b, impl) for b in (1, 2) for impl in ("llama_core", "transformers")}
    for r in model["prefill"]:
        assert r["median_s"] > 0 and r["tok_s"] > 0 and r["vs_transformers"] > 0 and r["tflops"] > 0
    for r in model["decode"]:  # one repeat of a tiny model: the decode time may drown in noise (flagged)
        assert r["new_tokens"] == 4 and r["generate_s"] > 0
        assert r["reliable"] == (r["p20_s"] > 0 and r["median_s"] > 0)
        if r["median_s"] > 0:
            assert r["tok_s"] > 0 and r["frac_copy_bw"] > 0 and r["gb_s"] > 0
    ours, theirs = model["load"]
    assert (ours["impl"], theirs["impl"]) == ("llama_core", "transformers")
    assert ours["median_s"] > 0 and ours["peak_rss_bytes"] > 0 and ours["added_rss_bytes"] is not None
    assert "rss_ratio_vs_transformers" in ours


def test_record_round_trips_and_renders(record, tmp_path):
    path = write_record(record, tmp_path)
    assert path.name.startswith("bench-tiny-") and path.name.endswith("-quick.json")
    assert load_record(path) == json.loads(json.dumps(record))
    table = format_table(record)
    assert "prefill" in table and "llama_core eager" in table and "transformers eager" in table
    assert record["environment"]["device"] in table
    md = render_markdown(record)
    assert record["environment"]["device"] in md and record["environment"]["git_sha"] in md
    assert "| prompt | implementation |" in md and "| batch | implementation |" in md
    assert md.count("\n| 24 | llama_core eager |") == 1


def test_markdown_cli_renders_a_record(record, tmp_path, capsys):
    path = write_record(record, tmp_path)
    assert main(["bench", "--markdown", str(path)]) == 0
    assert capsys.readouterr().out == render_markdown(record)
    (tmp_path / "bad.json").write_text("[]")
    assert main(["bench", "--markdown", str(tmp_path / "bad.json")]) == 2


def test_plots_are_written(record, tmp_path):
    pytest.importorskip("matplotlib")
    from llama_core.bench.plot import plot_record

    pngs = plot_record(record, write_record(record, tmp_path))
    assert {p.name.rsplit("-", 1)[1] for p in pngs} == {"prefill.png", "decode.png", "load.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)


def test_different_weights_are_refused(tmp_path):
    pytest.importorskip("transformers")
    pair = build_pair(tiny_settings(), tmp_path)
    with torch.no_grad():
        pair.theirs.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="disagree"):
        same_weights_check(pair.ours, pair.theirs, tiny_settings())


def test_cli_bench_llama_core_only(tmp_path, capsys):
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--no-transformers", "--no-load", "--repeats", "1",
            "--prompt-lens", "8", "--batch-sizes", "1", "--decode-tokens", "3", "--decode-prompt-len", "4",
            "--no-plot", "--output", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "llama_core eager" in out and "transformers eager" not in out
    (path,) = tmp_path.glob("bench-tiny-*.json")
    rec = load_record(path)
    assert rec["models"][0]["sanity"] == {"compared": False}
    assert all(r["vs_transformers"] is None for r in rec["models"][0]["decode"] + rec["models"][0]["prefill"])


def test_interleaved_rotates_and_pairs_ratios():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    cmp = interleaved(fns, "cpu", repeats=3, warmup=1)
    assert calls[:3] == list("abc")  # warm-up
    assert calls[3:] == list("abc") + list("bca") + list("cab")  # each goes first once
    cmp.times = {"a": [2.0, 4.0, 6.0], "b": [1.0, 1.0, 3.0], "c": [1.0, 1.0, 1.0]}
    assert cmp.ratio("a", "b") == 2.0 and cmp.median("a") == 4.0
    assert quantiles([1.0]) == {"median_s": 1.0, "p20_s": 1.0, "p80_s": 1.0}


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as mem:
        x = torch.ones(16 * 2**20)  # 64 MB, touched
        del x
    if mem.peak is None:
        pytest.skip("no /proc/self/status")
    assert mem.added >= 48 * 2**20


def test_targets_are_evaluated_from_the_rows():
    model = {"settings": {"preset": "synthetic-100m", "dtype": "float32"},
             "prefill": [{"impl": "llama_core", "mode": "eager", "vs_transformers": v} for v in (1.1, 0.97)],
             "decode": [{"impl": "llama_core", "mode": "eager", "batch": 1, "vs_transformers": 1.6}],
             "load": [{"impl": "llama_core", "rss_ratio_vs_transformers": 1.2}]}
    results = {t["target"].split(" ")[0] + t["target"].split(",")[-1]: t["ok"] for t in evaluate(model, "cpu")}
    assert list(results.values()) == [False, True, False]
    assert evaluate(model, "cuda") == []


def test_kernel_registry_rows_have_the_common_fields():
    assert {"rms_norm", "rope", "int8_matmul"} <= set(KERNEL_BENCHMARKS)
    rows = rms_norm_rows("cpu", dtype="float32", hidden=(64,), tokens=(3,), compile=False, repeats=1)
    rows += rope_rows("cpu", dtype="float32", tokens=(5,), heads=4, kv_heads=2, head_dim=16, compile=False,
                      repeats=1)
    assert {(r["op"], r["impl"]) for r in rows} == {("rms_norm", "triton"), ("rms_norm", "eager"),
                                                    ("rope", "triton"), ("rope", "torch_eager")}
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in rows)


def test_frozen_compile_is_checked_and_plumbed(monkeypatch):
    """compile="frozen" takes its own options and its own compiled function (a frozen graph must never
    serve a plain compile=True call); traced here with the eager backend, the real one is the slow test."""
    from llama_core.generation import decode_loop, generate

    model = __import__("llama_core").LlamaForCausalLM.from_preset("tiny").eval()
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match="compile must be"):
        generate(model, ids, max_new_tokens=2, compile="fast")
    monkeypatch.setattr(decode_loop, "FROZEN_COMPILE_OPTIONS", {"backend": "eager", "fullgraph": True})
    monkeypatch.setattr(decode_loop, "_compiled_steps", {})
    want = generate(model, ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(generate(model, ids, max_new_tokens=6, eos_token_id=[], compile="frozen"), want)
    (fn,) = decode_loop._compiled_steps.values()
    assert fn._torchdynamo_orig_callable is decode_loop._frozen_step


@pytest.mark.slow
def test_frozen_compile_gives_the_eager_tokens():
    from llama_core.generation import generate

    torch._dynamo.reset()
    model = __import__("llama_core").LlamaForCausalLM.from_preset("tiny").eval()
    ids = torch.randint(0, 256, (2, 5))
    want = generate(model, ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(generate(model, ids, max_new_tokens=8, eos_token_id=[], compile="frozen"), want)
