"""llama_core.bench: the machinery runs end to end on `tiny` (one repeat, no timed assertions: speed targets
live in the recorded results), the transformers and llama.cpp sides run the same model (llama.cpp where its
binding imports), real checkpoints (HF directory, GGUF) go through --model, and records (old ones too) render."""

from __future__ import annotations

import json

import pytest
import torch

from llama_core import LlamaForCausalLM
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
from llama_core.bench.llamacpp import unavailable_reason
from llama_core.bench.prompts import Prompts
from llama_core.bench.report import target_lines
from llama_core.bench.setup import build_pair, same_weights_check
from llama_core.bench.targets import evaluate
from llama_core.bench.timing import PeakMemory, interleaved, quantiles, spread
from llama_core.cli import main
from tests.conftest import REPO

HAS_LLAMA_CPP = unavailable_reason("cpu") is None
IMPLS = ("llama_core", "transformers", "llama_cpp") if HAS_LLAMA_CPP else ("llama_core", "transformers")
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason=f"llama.cpp: {unavailable_reason('cpu')}")


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


def test_every_benchmark_has_every_side(record):
    model = record["models"][0]
    prefill = {(r["tokens"], r["impl"]) for r in model["prefill"]}
    assert prefill == {(n, impl) for n in (8, 24) for impl in IMPLS}
    decode = {(r["batch"], r["impl"]) for r in model["decode"]}
    # llama.cpp's generate decodes one sequence: batch 1 only
    assert decode == {(b, impl) for b in (1, 2) for impl in IMPLS if impl != "llama_cpp" or b == 1}
    for r in model["prefill"]:
        assert r["median_s"] > 0 and r["tok_s"] > 0 and r["vs_transformers"] > 0 and r["tflops"] > 0
        assert r["first_call_s"] > 0 and len(r["vs_transformers_spread"]) == 2
    for r in model["decode"]:  # one repeat of a tiny model: the decode time may drown in noise (flagged)
        assert r["new_tokens"] == 4 and r["generate_s"] > 0
        assert r["reliable"] == (r["p20_s"] > 0 and r["median_s"] > 0)
        if r["median_s"] > 0:
            assert r["tok_s"] > 0 and r["frac_copy_bw"] > 0 and r["gb_s"] > 0
        assert r["first_call_s"] > 0 and r["compile_s"] >= 0
    assert tuple(r["impl"] for r in model["load"]) == IMPLS
    ours = model["load"][0]
    assert ours["median_s"] > 0 and ours["peak_rss_bytes"] > 0 and ours["added_rss_bytes"] is not None
    assert "rss_ratio_vs_transformers" in ours
    assert all(r["median_s"] > 0 and r["file"] for r in model["load"])


@needs_llama_cpp
def test_llama_cpp_ran_the_same_weights(record):
    """A preset has no tokenizer: llama.cpp gets a GGUF of the same random weights with a placeholder
    vocabulary; fp32 logits agree and greedy tokens are compared (and on `tiny`, equal)."""
    model = record["models"][0]
    (info,) = model["llama_cpp"]["files"]
    assert info["mode"] == "f32" and info["written_for_run"] and info["kv_cache"] == "f32"
    assert info["threads"] == torch.get_num_threads() and model["llama_cpp"]["version"]
    check = model["sanity"]["llama_cpp"]["f32"]
    assert check["same_argmax"] and check["max_abs_logit_diff"] <= 1e-4
    (cpp,) = [r for r in model["decode"] if r["impl"] == "llama_cpp"]
    assert cpp["mode"] == "f32" and cpp["same_tokens_as_transformers"] is True
    for r in model["decode"] + model["prefill"]:
        if r["impl"] == "llama_core" and r["batch"] == 1:
            assert r["vs_llama_cpp"] is None or r["vs_llama_cpp"] > 0
            assert "vs_llama_cpp_spread" in r
    for r in (r for r in model["decode"] if r["impl"] == "llama_core" and r["batch"] == 1):
        assert r["same_tokens_as_llama_cpp"] is True and r["common_prefix_with_llama_cpp"] == r["new_tokens"]


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
    assert "prompts: uniformly random token ids" in md
    if HAS_LLAMA_CPP:
        assert "| 24 | llama_cpp f32 |" in md and "speed vs llama.cpp" in md and "same tokens as llama.cpp" in md
        assert "llama-cpp-python" in md and "llama_cpp f32" in table


COMMITTED_RECORDS = sorted((REPO / "benchmarks" / "results").glob("bench-*.json"))


@pytest.mark.parametrize("path", COMMITTED_RECORDS, ids=lambda p: p.name)
def test_committed_records_still_render(path):
    """Every committed record renders as markdown and as the table; one written before llama.cpp and --model
    existed renders with its old columns."""
    record = load_record(path)
    md = render_markdown(record)
    name = record["models"][0]["settings"].get("name") or record["models"][0]["settings"]["preset"]
    assert f"**{name}" in md and "| batch | implementation | per step | tok/s |" in md
    assert name in format_table(record)
    if not any("llama_cpp" in m for m in record["models"]):
        assert "llama.cpp" not in md and "| batch | implementation | per step | tok/s | GB/s (of copy bw) | " \
            "added memory | speed vs transformers | same tokens |" in md


def test_an_old_format_record_is_committed():
    """The rendering of records older than llama.cpp and --model stays tested only while one is committed."""
    assert any(not any("llama_cpp" in m for m in load_record(p)["models"]) for p in COMMITTED_RECORDS)


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
    # the series come from the rows: a third library is a third series (llama.cpp's at batch 1 only)
    from llama_core.bench import plot

    class Axes:
        def __init__(self):
            self.labels = []

        def get_legend_handles_labels(self):
            return [], self.labels

        def __getattr__(self, name):
            return lambda *a, **k: self.labels.append(k["label"]) if "label" in k else None

    class Plt:
        def subplots(self, *a, **k):
            self.axes = [Axes(), Axes()]
            return Axes(), self.axes

    fake = Plt()
    plot._decode(fake, record["models"][0]["decode"])
    assert set(fake.axes[0].labels) == {f"{impl} eager" if impl != "llama_cpp" else "llama_cpp f32" for impl in IMPLS}


def test_different_weights_are_refused(tmp_path):
    pytest.importorskip("transformers")
    pair = build_pair(tiny_settings(), tmp_path)
    with torch.no_grad():
        pair.theirs.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="disagree"):
        same_weights_check(pair.ours, pair.theirs, tiny_settings())


def test_cli_bench_llama_core_only(tmp_path, capsys, monkeypatch):
    """Without --output the record goes to bench-results/ in the current directory (git-ignored), never into
    the repository's committed records."""
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--no-transformers", "--no-llama-cpp", "--no-load",
            "--repeats", "1", "--prompt-lens", "8", "--batch-sizes", "1", "--decode-tokens", "3",
            "--decode-prompt-len", "4", "--no-plot"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "llama_core eager" in out and "transformers eager" not in out and "llama_cpp" not in out
    assert "llama.cpp: not measured (not requested (--no-llama-cpp))" in out
    (path,) = (tmp_path / "bench-results").glob("bench-tiny-*.json")
    assert f"record: {path.relative_to(tmp_path)}" in out
    assert "/bench-results/" in (REPO / ".gitignore").read_text().splitlines()
    rec = load_record(path)
    assert {k: v for k, v in rec["models"][0]["sanity"].items() if k != "prompts"} == {"compared": False}
    assert {r["impl"] for r in rec["models"][0]["decode"] + rec["models"][0]["prefill"]} == {"llama_core"}
    assert all(r["vs_transformers"] is None for r in rec["models"][0]["decode"] + rec["models"][0]["prefill"])


def _model_args(path, tmp_path, *extra):
    return ["bench", "--model", str(path), "--device", "cpu", "--repeats", "1", "--prompt-lens", "8",
            "--batch-sizes", "1", "--decode-tokens", "4", "--decode-prompt-len", "6", "--no-load", "--no-plot",
            "--output", str(tmp_path / "out"), *extra]


def test_model_flag_benchmarks_an_hf_checkpoint(tmp_path, capsys):
    """--model DIR: real weights instead of a preset, checked against transformers; bf16 gets its own record
    name, and llama.cpp a bf16 GGUF written from the checkpoint (no tokenizer: random prompt ids)."""
    pytest.importorskip("transformers")
    torch.manual_seed(3)
    LlamaForCausalLM.from_preset("tiny").save_pretrained(tmp_path / "tiny-hf")
    assert main(_model_args(tmp_path / "tiny-hf", tmp_path, "--dtype", "bfloat16", "--no-int8")) == 0
    (path,) = (tmp_path / "out").glob("bench-*.json")
    assert path.name.startswith("bench-tiny-hf-bfloat16-")
    (model,) = load_record(path)["models"]
    assert model["settings"]["name"] == "tiny-hf" and model["settings"]["preset"] is None
    assert model["weights"] == {"kind": "checkpoint", "name": "tiny-hf", "path": str(tmp_path / "tiny-hf"),
                                "format": "hf"}
    assert model["params"] == LlamaForCausalLM.from_preset("tiny").num_parameters()
    assert model["sanity"]["compared"] and model["sanity"]["ok"]
    assert "== tiny-hf (HF): " in capsys.readouterr().out
    impls = {r["impl"] for r in model["decode"]}
    assert impls == set(IMPLS)
    if HAS_LLAMA_CPP:
        (info,) = model["llama_cpp"]["files"]
        assert (info["mode"], info["kv_cache"], info["written_for_run"]) == ("bf16", "bf16", True)
        assert model["sanity"]["llama_cpp"]["bf16"]["same_argmax"] is not None
    assert (tmp_path / "tiny-hf" / "config.json").is_file()  # the user's checkpoint is left alone


def test_model_flag_benchmarks_a_gguf_with_int8_and_q8_0(tmp_path):
    """--model FILE.gguf: an f32 GGUF is llama.cpp's file as it is; --int8 adds llama_core int8-weight-only
    and llama.cpp Q8_0 (written for the run), compared with each other; the GGUF's vocabulary makes the
    prompts real text."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from checkpoints_convert.gguf_write import write_gguf
    from checkpoints_convert.hf import read_hf
    from llama_core.bench.llamacpp import minimal_vocab
    from llama_core.tokenizer.gguf_export import add_tokenizer_metadata

    torch.manual_seed(4)
    LlamaForCausalLM.from_preset("tiny").save_pretrained(tmp_path / "hf")
    gguf = tmp_path / "tiny-f32.gguf"
    write_gguf(read_hf(tmp_path / "hf"), gguf, "f32", progress=False,
               add_metadata=lambda w: add_tokenizer_metadata(w, minimal_vocab(256)))
    assert main(_model_args(gguf, tmp_path, "--int8")) == 0
    (path,) = (tmp_path / "out").glob("bench-*.json")
    assert path.name.startswith("bench-tiny-f32-") and "float32" not in path.name
    (model,) = load_record(path)["models"]
    assert model["weights"]["format"] == "gguf" and model["weights"]["gguf_file_type"] == "f32"
    assert model["sanity"]["compared"] and model["sanity"]["prompts"].startswith("a fixed English text")
    modes = {(r["impl"], r["mode"]) for r in model["decode"]}
    assert ("llama_core", "int8-weight-only") in modes
    if not HAS_LLAMA_CPP:
        return
    files = {f["mode"]: f for f in model["llama_cpp"]["files"]}
    assert not files["f32"]["written_for_run"] and files["f32"]["file"] == gguf.name
    assert files["q8_0"]["written_for_run"]
    assert {("llama_cpp", "f32"), ("llama_cpp", "q8_0")} <= modes
    (int8,) = [r for r in model["decode"] if r["mode"] == "int8-weight-only"]
    assert int8["same_tokens_as_llama_cpp"] is not None
    assert int8["vs_llama_cpp"] is None or int8["vs_llama_cpp"] > 0  # one repeat of a tiny model may drown in noise
    targets = {t["target"].split(",")[0]: t for t in model["targets"]}
    assert "decode tok/s of int8-weight-only vs llama.cpp Q8_0" in targets and "decode tok/s vs llama.cpp" in targets
    assert all("within_noise" in t for t in model["targets"] if t["unit"] == "x")


def test_llama_cpp_is_skipped_with_a_reason(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if the binding were not installed
    assert "does not import" in unavailable_reason("cpu")
    assert unavailable_reason("cuda") == "llama.cpp is measured on a CPU only"
    assert unavailable_reason("cpu", wanted=False).startswith("not requested")


def test_prompts_are_text_or_random():
    class Bytes:  # a tokenizer of the text's UTF-8 bytes
        def encode(self, text):
            return list(text.encode())

    g = torch.Generator().manual_seed(0)
    text = Prompts(256, Bytes())
    ids = text.ids(3, 40, g)
    assert text.source == "text" and ids.shape == (3, 40) and bytes(ids[0].tolist()).startswith(b"The lighthouse")
    assert not torch.equal(ids[0], ids[1]) and torch.equal(ids, text.ids(3, 40, g))
    assert text.ids(1, 5000, g).shape == (1, 5000)  # repeated to length
    random = Prompts(100, None)
    assert random.source == "random" and random.ids(2, 7, torch.Generator().manual_seed(0)).max() < 100
    assert torch.equal(random.ids(2, 7, torch.Generator().manual_seed(0)),
                       torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0)))


def test_interleaved_rotates_and_pairs_ratios():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    cmp = interleaved(fns, "cpu", repeats=3, warmup=1)
    assert calls[:3] == list("abc")  # warm-up
    assert calls[3:] == list("abc") + list("bca") + list("cab")  # each goes first once
    cmp.times = {"a": [2.0, 4.0, 6.0], "b": [1.0, 1.0, 3.0], "c": [1.0, 1.0, 1.0]}
    assert cmp.ratio("a", "b") == 2.0 and cmp.median("a") == 4.0
    assert cmp.ratios("a", "b") == [2.0, 4.0, 2.0] and spread(cmp.ratios("a", "b")) == [2.0, 4.0]
    assert spread([-1.0, 0.5]) == [0.5, 0.5] and spread([]) is None
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


def test_llama_cpp_targets_carry_their_noise():
    model = {"settings": {"preset": None, "name": "m.gguf", "dtype": "bfloat16"},
             "prefill": [{"impl": "llama_core", "mode": "eager", "vs_transformers": 1.02,
                          "vs_transformers_spread": [0.97, 1.06]},
                         {"impl": "llama_cpp", "mode": "bf16", "vs_transformers": 3.0}],
             "decode": [{"impl": "llama_core", "mode": "eager", "batch": 1, "vs_llama_cpp": 0.6,
                         "vs_llama_cpp_spread": [0.55, 0.7]},
                        {"impl": "llama_core", "mode": "compiled", "batch": 1, "vs_llama_cpp": 0.98,
                         "vs_llama_cpp_spread": [0.9, 1.05]},
                        {"impl": "llama_core", "mode": "int8-weight-only", "batch": 1, "vs_llama_cpp": 0.85,
                         "vs_llama_cpp_spread": [0.82, 0.9]},
                        {"impl": "llama_cpp", "mode": "bf16", "batch": 1}]}
    prefill, decode, int8 = evaluate(model, "cpu")
    assert (prefill["ok"], prefill["within_noise"], prefill["spread"]) == (True, True, [0.97, 1.06])
    assert "compiled" in decode["target"] and (decode["ok"], decode["within_noise"]) == (False, True)
    assert (int8["ok"], int8["within_noise"], int8["limit"]) == (True, False, 0.8)
    assert evaluate({**model, "decode": model["decode"][:3], "prefill": model["prefill"][:1]}, "cpu") == []
    lines = target_lines({"models": [{**model, "targets": [decode]}]})
    assert lines == ["[MISSED, within noise] decode tok/s vs llama.cpp, batch 1, bfloat16, best llama_core candidate "
                     "(compiled): 0.98 x (repeats 0.9-1.05) (target 1 x)"]


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


@pytest.mark.parametrize("tied", [False, True])
def test_weight_bytes_counts_what_a_decode_step_reads(tied):
    """An untied input embedding is only looked up (not counted); a tied one is the lm_head and read in full;
    int8-weight-only gives a tied model its own int8 head, so the fp embedding is not read any more."""
    from llama_core.bench.decode import weight_bytes
    from llama_core.quant import quantize

    model = LlamaForCausalLM.from_preset("tiny", tie_word_embeddings=tied)
    emb = model.get_input_embeddings().weight
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes(model) == (every if tied else every - emb.numel() * emb.element_size())
    quantize(model, "int8-weight-only")
    head = model.get_output_embeddings()
    assert head.weight is not emb
    int8 = [b for name, b in model.named_buffers() if name.endswith(("weight", "weight_scale"))]
    stored = sum(t.numel() * t.element_size() for t in [*model.parameters(), *int8])
    assert weight_bytes(model) == stored - emb.numel() * emb.element_size()


def _synthetic(repeats, spread_=(0.9, 1.3), value=1.1):
    row = {"impl": "llama_core", "mode": "eager", "batch": 1, "vs_transformers": value,
           "vs_transformers_spread": list(spread_) if spread_ else None}
    return {"settings": {"preset": "synthetic-100m", "dtype": "float32", "repeats": repeats},
            "prefill": [row], "decode": [row]}


def test_verdicts_carry_their_spread_or_say_why_there_is_none():
    """A ratio's verdict prints its [min, max] over repeats and "within noise" when the target lies inside;
    measured once, it gets no verdict and the line says why (a met/MISSED from one repeat flips between runs)."""
    (prefill, decode) = evaluate(_synthetic(3), "cpu")
    lines = target_lines({"models": [{"targets": [prefill, decode]}]})
    assert lines[0].startswith("[met, within noise] prefill speed vs transformers")
    assert lines[0].endswith(": 1.1 x (repeats 0.9-1.3) (target 1 x)")
    assert lines[1].startswith("[MISSED] decode tok/s vs transformers") and "(repeats 0.9-1.3)" in lines[1]
    (clear,) = target_lines({"models": [{"targets": evaluate(_synthetic(5, (1.6, 1.9), 1.7), "cpu")[1:]}]})
    assert clear.startswith("[met] decode") and "within noise" not in clear and "(repeats 1.6-1.9)" in clear
    once = evaluate(_synthetic(1, (1.1, 1.1)), "cpu")
    assert [(t["ok"], t["within_noise"]) for t in once] == [(None, None)] * 2
    for line in target_lines({"models": [{"targets": once}]}):
        assert line.startswith("[no verdict: 1 repeat, no spread to tell it from noise (needs 2+)]")
        assert "met" not in line and "MISSED" not in line and ": 1.1 x (target 1" in line


def test_load_rss_verdict_has_a_spread_over_rounds():
    from llama_core.bench.loading import _added_ratios

    ours = [{"base_rss": 100, "peak_rss": 300}, {"base_rss": 100, "peak_rss": 260}]
    theirs = [{"base_rss": 50, "peak_rss": 250}, {"base_rss": 50, "peak_rss": 210}]
    assert _added_ratios(ours, theirs) == [1.0, 1.0]
    assert _added_ratios(ours[:1], [{"base_rss": None, "peak_rss": 1}]) == []
    load = [{"impl": "llama_core", "rss_ratio_vs_transformers": 0.9, "rss_ratio_vs_transformers_spread": [0.8, 1.05],
             "repeats": 3}]
    (rss,) = evaluate({"settings": {"preset": "synthetic-100m", "dtype": "float32"}, "load": load}, "cpu")
    assert (rss["ok"], rss["within_noise"], rss["spread"]) == (True, True, [0.8, 1.05])
    (once,) = evaluate({"settings": {"preset": "synthetic-100m", "dtype": "float32"},
                        "load": [{**load[0], "repeats": 1, "rss_ratio_vs_transformers_spread": [0.9, 0.9]}]}, "cpu")
    assert once["ok"] is None and "1 repeat" in once["no_verdict"]


def test_stage_lines_on_a_non_terminal_stderr(capsys):
    """Where no bar can be drawn (CI log, pipe), each stage is one line on stderr with its number, the elapsed
    time and, once a stage is done, the time left; the stdout table stays clean."""
    s = tiny_settings(prompt_lens=[8], batch_sizes=[1, 2], transformers=False, llama_cpp=False, load=False)
    run_bench([s], quick=True)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    stages = [line for line in lines if line.startswith("[")]
    assert [line.split(" (elapsed")[0] for line in stages[:-1]] == [
        "[1/5] copy bandwidth", "[2/5] build: tiny (llama_core)", "[3/5] prefill: tiny, prompts 8",
        "[4/5] decode: tiny, batch 1", "[5/5] decode: tiny, batch 2"]
    assert " s left" not in stages[0] and all(" s left)" in line for line in stages[1:-1])
    assert stages[-1].startswith("[done] bench finished in ") and len(stages) == len(lines)
    assert captured.out == ""


def test_stage_bar_on_a_terminal_shows_the_stage_and_time_left():
    import io

    from llama_core.bench.progress import Stage, StageProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = StageProgress([Stage("copy bandwidth", 1.0), Stage("decode: m, batch 1", 3.0)], stream=stream)
    progress.start("copy bandwidth")
    progress.start("decode: m, batch 1")
    progress.note("timing")
    with pytest.raises(RuntimeError, match="'prefill: m' started where the plan has"):
        progress.start("prefill: m")
    progress.close()
    out = stream.getvalue()
    assert "[2/2] decode: m, batch 1" in out and " 25%|" in out and "<" in out and "timing" in out
    assert "(elapsed" not in out  # a bar, not the stage lines


def test_quick_cpu_settings_measure_the_targets_with_a_spread():
    """--quick on a CPU: synthetic-100m fp32 (the targets' model), one prompt length, batch-1 decode only, no
    compile, one load round, and enough repeats for every speed verdict to carry a spread; planned well under
    the 2 minutes it promises. The full run keeps its sizes."""
    from llama_core.bench import default_settings
    from llama_core.bench.progress import plan
    from llama_core.bench.targets import MIN_REPEATS

    (quick,) = default_settings("cpu", quick=True)
    assert (quick.preset, quick.dtype, quick.layers, quick.quick) == ("synthetic-100m", "float32", None, True)
    assert (quick.prompt_lens, quick.batch_sizes, quick.decode_tokens, quick.compile) == ([128], [1], 17, False)
    assert quick.repeats >= max(MIN_REPEATS, 5) and quick.load and quick.transformers
    assert sum(stage.weight for stage in plan([quick], kernels=False)) < 60
    (full,) = default_settings("cpu", quick=False)
    assert (full.prompt_lens, full.batch_sizes, full.repeats, full.compile) == ([128, 512, 1024], [1, 8], 5, True)


def test_llama_cpp_token_agreement_shows_when_its_speed_ratio_drowned_in_noise():
    """On a busy machine a tiny decode's differential time can come out <= 0: no speed ratio, but whether the
    tokens agree with llama.cpp is still known and its column stays (this made the round-trip test flaky)."""
    from llama_core.bench.report import decode_rows

    row = {"batch": 1, "impl": "llama_core", "mode": "eager", "ms_per_step": -0.1, "tok_s": None, "gb_s": None,
           "added_mem_bytes": 0, "vs_transformers": None, "same_tokens_as_transformers": True,
           "vs_llama_cpp": None, "vs_llama_cpp_spread": None, "same_tokens_as_llama_cpp": True}
    head, (cells,) = decode_rows({"decode": [row]})
    assert "same tokens as llama.cpp" in head and cells[head.index("same tokens as llama.cpp")] == "yes"
