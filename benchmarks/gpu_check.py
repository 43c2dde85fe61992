"""The GPU check of issues 18 (kernels) and 19 (end to end): everything a short GPU lease must measure, in one
call, inside a time budget, with every result in at most a handful of files.

    python benchmarks/gpu_check.py --output OUT                  # CUDA: all stages, ~9 minutes at most
    python benchmarks/gpu_check.py --output OUT --part kernels   # or e2e
    python benchmarks/gpu_check.py --output OUT --dry-run        # CPU: every stage at tiny shapes (CI)

    python benchmarks/gpu_check.py --output OUT --stage e2e_1b --stage train   # a rerun of some stages

Stages (benchmarks/gpu_stages.py), each in its own process with its share of ``--budget-s`` (time one leaves
unused passes on): the ``gpu``-marked tests, RMSNorm, RoPE, int8 GEMMs, each beside a copy-bandwidth
measurement (part ``kernels``); ``llama-core bench``'s prefill/decode of the 8B and 1B shapes, compiled-decode
variants and a short training run (part ``e2e``). A stage that outruns its share is stopped and reported with the rows it had written; a
stage that would get under ``MIN_STAGE_S`` is skipped. The run always ends by writing, in ``--output``:

    gpu-check.json    every row of every stage, stage outcomes, target verdicts, environment (device, versions, sha)
    summary.txt       one screen: each target PASS / MISS / NOT RUN with its number (also printed)
    pytest-gpu.xml    junit of the gpu-marked tests
    stages.log        each stage's output (stdout and stderr) tail
    gpu-check.png     kernel GB/s vs copy, int8 speedups by M, decode tok/s (where matplotlib imports)

Exit codes: 0 the check ran (whatever the verdicts; read summary.txt), 3 no CUDA device and no --dry-run
(nothing checked: prints "no CUDA device: nothing to check"), 2 bad arguments.
On a copied tree without .git, set LLAMA_CORE_GIT_SHA so the record names the commit.

The dry run also passes under the GPU image's versions (torch 2.11.0, triton 3.6.0, transformers 5.17.0; checked
on CPU), where Triton 3.6's interpreter, which only the dry run uses, needs numpy < 2.4.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

NO_CUDA_EXIT = 3
MIN_STAGE_S = 20.0  # a stage given less cannot even import torch, build a model and compile: skip it
RESERVE_S = 10.0  # kept back from the stages for writing the outputs
PARTS = ("kernels", "e2e")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from gpu_stages import STAGES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True, help="folder for the (at most 8) output files")
    p.add_argument("--part", choices=[*PARTS, "all"], default="all")
    p.add_argument("--stage", action="append", choices=list(STAGES), help="only these stages (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter: plumbing only")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole check")
    p.add_argument("--run-stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    p.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    args.output = args.output.resolve()  # the stages (and pytest) run with other working directories
    return args


def selected_stages(args: argparse.Namespace) -> list[str]:
    from gpu_stages import STAGES

    parts = PARTS if args.part == "all" else (args.part,)
    return [name for name, (part, _, _) in STAGES.items()
            if part in parts and (args.stage is None or name in args.stage)]


def stage_main(args: argparse.Namespace) -> int:
    """Child process: run one stage, appending each row to ``--rows`` as one JSON line (flushed at once)."""
    from gpu_stages import run_stage

    with args.rows.open("a") as f:
        def emit(row: dict[str, Any]) -> None:
            row = {"kind": row.get("kind") or row.get("op"), "stage": args.run_stage, **row}
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()

        run_stage(args.run_stage, "cpu" if args.dry_run else "cuda", args.dry_run, args.output, emit)
    return 0


def run_stages(names: list[str], args: argparse.Namespace, log: Any) -> tuple[list[dict], list[dict]]:
    """Run each stage in a child process within its share of the budget; (outcomes, rows)."""
    from gpu_stages import STAGES

    deadline = time.monotonic() + args.budget_s - RESERVE_S
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"  # before the child imports triton
    outcomes, rows = [], []
    for i, name in enumerate(names):
        left = deadline - time.monotonic()
        shares = [STAGES[n][1] for n in names[i:]]
        allowed = left * shares[0] / sum(shares)
        if allowed < MIN_STAGE_S and not args.dry_run:
            outcomes.append({"stage": name, "status": "skipped", "why": f"budget: {allowed:.0f} s left for it"})
            continue
        rows_file = args.output / f".rows-{name}.jsonl"
        rows_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-stage", name, "--rows", str(rows_file),
               "--output", str(args.output)] + (["--dry-run"] if args.dry_run else [])
        print(f"gpu_check: stage {name} (up to {allowed:.0f} s)", flush=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)  # its own group: a stop ends its children too
        try:
            out, _ = proc.communicate(timeout=max(allowed, 1.0))
            status = "ok" if proc.returncode == 0 else "failed"
            why = "" if status == "ok" else f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            status, why = "stopped", f"outran its {allowed:.0f} s share of the budget"
        seconds = time.monotonic() - t0
        stage_rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
        rows_file.unlink(missing_ok=True)
        rows += stage_rows
        outcomes.append({"stage": name, "status": status, "why": why, "seconds": round(seconds, 1),
                         "rows": len(stage_rows)})
        log.write(f"==== {name}: {status} {why} ({seconds:.1f} s, {len(stage_rows)} rows)\n{(out or '')[-6000:]}\n")
        log.flush()
        print(f"gpu_check: stage {name}: {status} {why} ({seconds:.0f} s, {len(stage_rows)} rows)", flush=True)
    return outcomes, rows


def summary_text(env: dict[str, Any], outcomes: list[dict], targets: list[Any], choices: list[str], dry: bool) -> str:
    head = (f"GPU check{' (DRY RUN: CPU plumbing, numbers mean nothing)' if dry else ''} on {env['device']}, "
            f"torch {env['torch']}, triton {env['triton']}, git {env['git_sha']}, {env['date']}")
    stages = "stages: " + ", ".join(f"{o['stage']} {o['status']}" + (f" ({o.get('seconds', 0):.0f}s)")
                                    for o in outcomes)
    problems = [f"  {o['stage']}: {o['status']}: {o['why']}" for o in outcomes if o["status"] != "ok"]
    return "\n".join([head, stages, *problems, *(t.line() for t in targets), *choices]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_stage:
        return stage_main(args)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --dry-run for the CPU plumbing run)")
        return NO_CUDA_EXIT
    from gpu_targets import decisions, evaluate

    from llama_core.bench.environment import environment

    args.output.mkdir(parents=True, exist_ok=True)
    names = selected_stages(args)
    started = time.monotonic()
    with (args.output / "stages.log").open("w") as log:
        outcomes, rows = run_stages(names, args, log)
    from gpu_stages import STAGES

    parts = sorted({STAGES[name][0] for name in names})  # the targets of what was asked for
    targets = evaluate(rows, parts)
    choices = decisions(rows)
    env = environment("cpu" if args.dry_run else "cuda")
    record = {"environment": env, "dry_run": args.dry_run, "part": args.part, "budget_s": args.budget_s,
              "seconds": round(time.monotonic() - started, 1), "stages": outcomes,
              "targets": [t.to_dict() for t in targets], "decisions": choices, "rows": rows}
    (args.output / "gpu-check.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    text = summary_text(env, outcomes, targets, choices, args.dry_run)
    (args.output / "summary.txt").write_text(text)
    print(text, end="")
    try:  # a picture is a nicety: never let it cost the record
        from gpu_plot import plot

        plot(rows, args.output / "gpu-check.png", text.splitlines()[0])
    except Exception as e:
        print(f"gpu_check: no plot: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
