"""benchmarks/gpu_check.py: the no-CUDA exit, the target verdicts, the time budget, and a CPU dry run of
every stage that writes the same files a GPU run does (the plumbing a GPU lease must not debug)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up there
    module = sys.modules[name]
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output", str(tmp_path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads((tmp_path / "gpu-check.json").read_text())


def test_without_cuda_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    gpu_check = _module("gpu_check")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_check.main(["--output", str(tmp_path / "out")]) == gpu_check.NO_CUDA_EXIT == 3
    assert capsys.readouterr().out.startswith("no CUDA device: nothing to check")
    assert not (tmp_path / "out").exists()


def test_bad_budget_is_an_argument_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        _module("gpu_check").main(["--output", str(tmp_path), "--budget-s", "0"])
    assert e.value.code == 2


def test_targets_pass_miss_and_not_run():
    targets = _module("gpu_targets")
    rows = [{"kind": "copy_bandwidth", "gb_s": 4000.0},
            {"kind": "rms_norm", "impl": "triton", "mode": "fwd", "tokens": 8, "gbps": 3600.0, "ms": 1.0},
            {"kind": "rms_norm", "impl": "compile", "mode": "fwd", "tokens": 8, "gbps": 3000.0, "ms": 1.2},
            {"kind": "rms_norm", "impl": "triton", "mode": "bwd", "tokens": 8, "gbps": 2000.0, "ms": 2.0},
            {"kind": "rms_norm", "impl": "compile", "mode": "bwd", "tokens": 8, "gbps": 2100.0, "ms": 1.9},
            {"kind": "int8_matmul", "impl": "weight_only", "m": 1, "k": 4, "n": 4, "speedup_vs_dense": 1.7},
            {"kind": "int8_matmul", "impl": "weight_only", "m": 16, "k": 4, "n": 4, "speedup_vs_dense": 1.2},
            {"kind": "int8_matmul", "impl": "weight_only", "m": 512, "k": 4, "n": 4, "speedup_vs_dense": 0.5}]
    got = {t.name: t for t in targets.kernel_targets(rows)}
    fwd, bwd = got["RMSNorm fwd >= 85% of copy bandwidth"], got["RMSNorm bwd >= 70% of copy bandwidth"]
    assert (fwd.status, fwd.value) == ("PASS", pytest.approx(0.9))
    assert (bwd.status, bwd.value) == ("MISS", pytest.approx(0.5))
    vs_compile = got["rms_norm: Triton faster than torch.compile of the reference (worst mode)"]
    assert vs_compile.status == "MISS" and vs_compile.value == pytest.approx(1.9 / 2.0)  # bwd is the worst
    wo = got["int8 weight-only >= 1.6x cuBLAS bf16 at M <= 16"]
    assert (wo.status, wo.value) == ("MISS", 1.2) and "M=16" in wo.detail  # M=512 is not judged
    assert got["RoPE fwd >= 80% of copy bandwidth"].status == "NOT RUN"
    assert "NOT RUN" in got["W8A8 linear >= 1.5x cuBLAS bf16 at M >= 512"].line()


def test_e2e_targets_read_the_bench_rows():
    targets = _module("gpu_targets")

    def decode(mode, impl="llama_core", **kw):
        return {"kind": "e2e_decode", "preset": "llama3-8b", "batch": 1, "impl": impl, "mode": mode, **kw}

    rows = [{"kind": "e2e_model", "preset": "llama3-8b", "layers": 8},
            decode("compiled", tok_s=400.0, frac_copy_bw=0.8, gb_s=3000.0),
            decode("int8-weight-only-compiled", tok_s=520.0),
            decode("eager", vs_transformers=0.9),
            {"kind": "e2e_prefill", "preset": "llama3-8b", "tokens": 2048, "impl": "llama_core", "mode": "compiled",
             "tflops": 500.0, "vs_transformers": 1.3},
            {"kind": "e2e_prefill", "preset": "llama3-8b", "tokens": 2048, "impl": "llama_core", "mode": "eager",
             "tflops": 430.0, "vs_transformers": 1.1}]
    got = {t.name.removeprefix("llama3-8b (8 layers): "): t for t in targets.e2e_targets(rows)}
    assert all(t.name.startswith("llama3-8b (8 layers): ") for t in targets.e2e_targets(rows)[:-1])
    assert got["compiled decode >= 75% of the bandwidth floor, batch 1"].status == "PASS"
    int8 = got["int8 weight-only compiled decode >= 1.5x bf16 compiled, batch 1"]
    assert (int8.status, int8.value) == ("MISS", pytest.approx(1.3))
    assert got["eager decode >= transformers eager, batch 1"].status == "MISS"
    prefill = got["prefill 2048 tokens >= 450 TFLOP/s"]
    assert (prefill.status, prefill.value, prefill.detail) == ("PASS", 500.0, "compiled")  # the best mode


def test_training_mfu_ignores_the_compiling_steps():
    targets = _module("gpu_targets")
    rows = [{"kind": "train_step", "mfu": m, "tokens_per_s": 1.0} for m in (0.9, 0.9, 0.3, 0.35)]
    (mfu,) = [t for t in targets.e2e_targets(rows) if "MFU" in t.name]
    assert (mfu.status, mfu.value) == ("MISS", 0.35)


def test_variant_decisions_follow_the_measurements():
    targets = _module("gpu_targets")

    def row(impl, m, ms):
        return {"kind": "int8_matmul", "impl": impl, "m": m, "k": 8, "n": 8, "ms": ms}

    split_wins = [row("weight_only", 1, 1.0), row("weight_only_plain", 1, 1.5), row("weight_only", 16, 1.0),
                  row("weight_only_plain", 16, 1.2), row("weight_only", 512, 9.0), row("weight_only_plain", 512, 1.0)]
    (line,) = targets.decisions(split_wins)
    assert "2/2 points" in line and "keep split-K" in line  # M=512 is not a split-K point
    split_loses = [row("weight_only", 1, 2.0), row("weight_only_plain", 1, 1.0)]
    assert "set SPLIT_K_MAX_M = 0" in targets.decisions(split_loses)[0]
    cheap_branch = [row("w8a8_linear", 512, 1.02), row("w8a8_linear_t0", 512, 1.0)]
    assert "keep threshold 6" in targets.decisions(cheap_branch)[0]


def test_e2e_phases_cover_the_issue_and_put_the_targets_first():
    """Issue 19's measurements: prefill at 512 and 2048, decode at batch 1 and 8, eager and compiled, int8
    weight-only compiled, transformers beside each; batch-1 decode (the bandwidth targets) first."""
    phases = _module("gpu_stages").E2E_PHASES
    assert {(what, size) for what, size, _ in phases} == {("prefill", 512), ("prefill", 2048), ("decode", 1),
                                                          ("decode", 8)}
    assert phases[0][:2] == ("decode", 1)
    assert {"llama_core/compiled", "llama_core/int8-weight-only-compiled"} <= set(phases[0][2])
    assert all("transformers/eager" in only and "llama_core/eager" in only for _, _, only in phases)


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                   '<testcase classname="a" name="bad"><failure message="x"/></testcase>'
                   '<testcase classname="a" name="s"><skipped/></testcase></testsuite></testsuites>')
    counts = _module("gpu_stages").junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["failures"]) == (1, 1, 1, ["a::bad"])


@pytest.mark.slow  # ~6 s: two stage processes started and stopped
def test_overrunning_stages_are_stopped_and_outputs_still_written(tmp_path):
    # 12 s of budget, 10 s of it reserved for the outputs: each stage gets about a second, too little to
    # import torch, so each is stopped; the record and summary must still be there, the targets NOT RUN.
    proc, record = _run(tmp_path, "--dry-run", "--stage", "rope", "--stage", "int8_gemm", "--budget-s", "12")
    assert [(o["stage"], o["status"]) for o in record["stages"]] == [("rope", "stopped"), ("int8_gemm", "stopped")]
    summary = (tmp_path / "summary.txt").read_text()
    assert "int8_gemm: stopped: outran its" in summary and summary in proc.stdout
    assert all(t["status"] == "NOT RUN" for t in record["targets"] if "W8A8" in t["name"])
    assert not any("#19" in line for line in summary.splitlines())  # only the asked-for part's targets


@pytest.mark.slow
def test_dry_run_kernels_part(tmp_path):
    proc, record = _run(tmp_path, "--dry-run", "--part", "kernels")
    assert {o["stage"]: o["status"] for o in record["stages"]} == dict.fromkeys(
        ["pytest", "rms_norm", "rope", "int8_gemm"], "ok")
    kinds = {r["kind"] for r in record["rows"]}
    assert {"copy_bandwidth", "pytest", "rms_norm", "rope", "int8_matmul", "int8_exact"} <= kinds
    assert {r["mode"] for r in record["rows"] if r["kind"] == "rms_norm"} == {"fwd", "bwd", "fwd+bwd"}
    assert all(r["exact"] for r in record["rows"] if r["kind"] == "int8_exact")
    env = record["environment"]
    assert env["device"] and env["torch"] and env["git_sha"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gpu-check.json", "gpu-check.png", "pytest-gpu.xml", "stages.log", "summary.txt"]  # <= 8
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("GPU check (DRY RUN")
    assert summary[0] in proc.stdout
    decide = [line for line in summary if line.startswith("DECIDE")]  # split-K and the outlier branch, measured
    assert len(decide) == 3 and "weight_only split-K" in decide[0] and "w8a8_gemm split-K" in decide[1]
    assert "outlier branch" in decide[2]
    assert len(summary) <= 30 and sum(line.split()[0] in ("PASS", "MISS", "NOT") for line in summary) == 10


@pytest.mark.slow
def test_dry_run_e2e_part(tmp_path):
    _, record = _run(tmp_path, "--dry-run", "--part", "e2e")
    assert {o["stage"]: o["status"] for o in record["stages"]} == dict.fromkeys(
        ["e2e_1b", "e2e_8b", "e2e_variants", "train"], "ok")
    rows = record["rows"]
    decode = {(r["impl"], r["mode"]) for r in rows if r["kind"] == "e2e_decode"}
    assert {("llama_core", "eager"), ("transformers", "eager")} <= decode
    assert {r["variant"] for r in rows if r["kind"] == "e2e_variant"} == {
        "kernels-auto", "kernels-torch", "int8", "int8-weight-only"}
    assert [r["step"] for r in rows if r["kind"] == "train_step"] == [0, 1]
    # A speed verdict on a CPU means nothing (a 3-step decode of a tiny model can even time <= 0 on a busy
    # machine, leaving no ratio), but the rows must be named as the targets read them.
    assert "tiny: eager decode >= transformers eager, batch 1" in {t["name"] for t in record["targets"]}
    assert all("vs_transformers" in r for r in rows if r["kind"] == "e2e_decode" and r["impl"] == "llama_core")
