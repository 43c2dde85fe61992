"""Where a benchmark run is: its named stages, each weighted by its expected cost so that the estimate of
what is left means something (a decode stage costs many times a copy-bandwidth one). On a terminal a tqdm
bar with the current stage, step and time left; elsewhere (CI logs, a pipe) one line per stage on stderr,
``[3/6] decode: synthetic-100m, batch 1 (elapsed 41 s, about 30 s left)``, which a bar cannot give there."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from tqdm.auto import tqdm

from . import llamacpp
from .loading import load_rounds
from .setup import BenchSettings

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    label: str
    weight: float  # expected cost, in rough seconds of an idle 2-core CPU on synthetic-100m; only ratios matter


def plan(settings: list[BenchSettings], kernels: bool) -> list[Stage]:
    """The stages of a run of ``settings``, in the order :func:`llama_core.bench.run.run_bench` runs them."""
    stages = [Stage("copy bandwidth", 0.5)]
    for s in settings:
        stages += model_stages(s)
    if kernels:
        stages.append(Stage("kernels", 60.0))
    return stages


def _forward_s(tokens: int) -> float:
    """A forward over ``tokens`` tokens (all rows together) of synthetic-100m in fp32 on an idle 2-core CPU: a
    fixed cost (reading the weights, per-call overhead) and ~0.2 GFLOP per token."""
    return 0.025 + 0.0035 * tokens


def model_stages(s: BenchSettings) -> list[Stage]:
    """One model's stages. The weights model what dominates each: the forwards of every candidate's warm-up,
    memory and timed calls for prefill and decode, and a process start per library and round for load."""
    cpp = llamacpp.unavailable_reason(s.device, s.llama_cpp) is None
    ours = (1 + s.int8) * (1 + s.compile)  # llama_core's candidates (the CPU's frozen compile aside)
    compile_s = 40.0 if s.compile else 0.0  # a compiled candidate's first call, per shape
    built = "llama_core" + ", transformers" * s.transformers + ", llama.cpp GGUF" * cpp
    stages = [Stage(f"build: {s.name} ({built})", 3.0 + 2.0 * (1 + s.transformers + cpp) + 3.0 * s.int8)]
    if s.prompt_lens:
        candidates = ours + s.transformers + cpp * (1 + s.int8)
        cost = sum(candidates * (s.repeats + 2) * _forward_s(n) + compile_s for n in s.prompt_lens)
        stages.append(Stage(f"prefill: {s.name}, prompts {','.join(map(str, s.prompt_lens))}", cost))
    for batch in s.batch_sizes:
        candidates = ours + s.transformers + (cpp * (1 + s.int8) if batch == 1 else 0)  # llama.cpp: batch 1 only
        one = _forward_s(batch * s.decode_prompt_len)  # generate(ids, 1): the prefill alone
        full = one + (s.decode_tokens - 1) * _forward_s(batch)
        cost = candidates * ((s.repeats + 2) * full + (s.repeats + 1) * one) + compile_s
        stages.append(Stage(f"decode: {s.name}, batch {batch}", cost))
    if s.load:
        stages.append(Stage(f"load: {s.name} (a fresh process per library and round)",
                            3.0 * (1 + s.transformers + cpp) * load_rounds(s)))
    return stages


class StageProgress:
    """Stages started one after the other with :meth:`start`; :meth:`note` reports a step within a stage.

    ``show``: True, a bar; False, nothing (logging only); None, a bar on a terminal and stage lines otherwise.
    """

    def __init__(self, stages: list[Stage], show: bool | None = None, stream: TextIO | None = None):
        self.stages = stages
        self.stream = stream if stream is not None else sys.stderr
        terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.lines = show is None and not terminal
        self.bar = tqdm(total=sum(s.weight for s in stages), desc="bench", file=self.stream, leave=False,
                        disable=not (show or (show is None and terminal)), dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
        self.index = -1  # the stage running
        self.counted = 0  # stages whose weight is in done_weight
        self.done_weight = 0.0
        self.started = time.perf_counter()

    def start(self, label: str) -> None:
        """Begin the next stage, which must be ``label`` (the plan and the run must not drift apart)."""
        following = self.index + 1
        if following >= len(self.stages) or self.stages[following].label != label:
            expected = self.stages[following].label if following < len(self.stages) else "(none left)"
            raise RuntimeError(f"bench progress: stage {label!r} started where the plan has {expected!r}")
        self._finish_current()
        self.index = following
        where = f"[{self.index + 1}/{len(self.stages)}] {label}"
        self.bar.set_description_str(where, refresh=True)
        logger.info(where)
        if self.lines:
            print(f"{where} ({self._times()})", file=self.stream, flush=True)

    def note(self, message: str) -> None:
        self.bar.set_postfix_str(message, refresh=True)
        logger.info(message)

    def close(self) -> None:
        """End the run: the last stage counts as done; a line says how long the whole run took."""
        complete = self.index == len(self.stages) - 1
        self._finish_current()
        self.bar.close()
        if self.lines and complete:
            print(f"[done] bench finished in {self._elapsed():.0f} s", file=self.stream, flush=True)

    def _finish_current(self) -> None:
        if self.index >= 0 and self.counted == self.index:  # once, even if closed twice
            weight = self.stages[self.index].weight
            self.done_weight += weight
            self.bar.update(weight)
            self.counted += 1

    def _elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _times(self) -> str:
        """Elapsed time, and what is left at the pace of the stages done so far (none before the first ends)."""
        elapsed = self._elapsed()
        left = sum(s.weight for s in self.stages[self.index:])
        if self.done_weight <= 0:
            return f"elapsed {elapsed:.0f} s"
        return f"elapsed {elapsed:.0f} s, about {elapsed / self.done_weight * left:.0f} s left"
