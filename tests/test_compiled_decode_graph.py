"""The one-token decode step that ``generate(..., cache="static", compile=True)`` compiles must be one graph:
no graph breaks and no host syncs, or the CUDA graph the GPU path records (mode="reduce-overhead") splits or
is skipped, and every step waits for the host.

On a CPU the sync debug mode of CUDA cannot run; instead dynamo's ``explain`` traces the exact step function
with the exact arguments the decode loop passes, and any ``.item()``, ``.tolist()``, ``bool(tensor)`` or
data-dependent Python branch would show up as a graph break with its reason. Done for every model variant the
GPU check decodes: Triton kernels on (their custom ops in the graph) and off, W8A8 int8, int8 weight-only, a
left-padded batch (the mask path).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from llama_core.generation import decode_loop, generate
from llama_core.modeling.cache import StaticCache
from llama_core.quant import quantize
from tests.conftest import random_model, small_config


def _step_args(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple:
    """The arguments of the decode loop's first one-token step (static cache, after the prefill), captured from
    a real ``generate`` call."""
    seen = []
    real = decode_loop.run_step

    def spy(step_fn, args, compiled, skip_guards):
        seen.append(args)
        return real(step_fn, args, compiled, skip_guards)

    decode_loop.run_step = spy
    try:
        generate(model, ids, attention_mask=mask, max_new_tokens=3, cache="static", eos_token_id=[])
    finally:
        decode_loop.run_step = real
    assert len(seen) == 2  # three new tokens: the prefill's, then two steps
    return seen[0]


def _compile_recording(args: tuple) -> list:
    """The graphs of ``_decode_step`` compiled with fullgraph=True; each runs with the Triton ops' CPU path."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*a):
            saved = os.environ.pop("TRITON_INTERPRET", None)
            try:
                return gm(*a)
            finally:
                if saved is not None:
                    os.environ["TRITON_INTERPRET"] = saved
        return run

    torch._dynamo.reset()
    torch.compile(decode_loop._decode_step, backend=backend, fullgraph=True, dynamic=False)(*args)
    return graphs


def _explain(args: tuple):
    torch._dynamo.reset()
    return torch._dynamo.explain(decode_loop._decode_step)(*args)


@pytest.mark.slow  # 2-7 s each on 2 busy cores: dynamo traces the whole model
@pytest.mark.parametrize("variant", ["kernels-torch", "kernels-triton", "int8", "int8-weight-only", "padded"])
def test_compiled_decode_step_is_one_graph_without_host_syncs(variant, monkeypatch):
    model = random_model(small_config(num_hidden_layers=2))
    if variant.startswith("int8"):
        model = quantize(copy.deepcopy(model), variant)
    model.set_kernels("torch" if variant == "kernels-torch" else "auto")
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    mask = None
    if variant == "padded":
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # row 0 left-padded
    args = _step_args(model, ids, mask)
    if variant == "kernels-triton":
        # The Triton ops as a GPU graph holds them (opaque custom ops), not their CPU fallbacks: traced with
        # TRITON_INTERPRET=1, run without it (Triton's interpreter can fail to run a kernel once dynamo has
        # traced a model in the same process). fullgraph=True: a graph break raises, naming its reason.
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        model.set_kernels("triton")
        graphs = _compile_recording(args)
        assert len(graphs) == 1
    else:
        explanation = _explain(args)
        reasons = [str(b.reason) for b in explanation.break_reasons]
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons
        graphs = explanation.graphs
    assert isinstance(args[1], StaticCache)
    # What a host sync would look like in the graph had dynamo captured it (capture_scalar_outputs): none.
    ops = {str(n.target) for g in graphs for n in g.graph.nodes}
    if variant == "kernels-triton":
        assert {"llama_core.rms_norm.default", "llama_core.rope.default"} <= ops
    if variant == "int8":
        assert {"llama_core.int8_matmul.default", "llama_core.int8_quantize_rows.default"} <= ops
    syncing = {"item", "tolist", "nonzero", "__bool__"}  # call_method targets; aten's scalar read by name
    assert not {o for o in ops if o in syncing or "_local_scalar_dense" in o or "nonzero" in o}


def test_a_host_sync_in_the_step_would_be_caught(monkeypatch):
    """The check above can fail: a ``.item()`` slipped into the forward shows up as a graph break."""
    model = random_model(small_config(num_hidden_layers=1))
    args = _step_args(model, torch.randint(3, 100, (1, 4)), None)
    forward = type(model.model.norm).forward

    def syncing(self, x, *a, **kw):
        if x.abs().max().item() > 1e9:  # a data-dependent host read
            x = x * 0
        return forward(self, x, *a, **kw)

    monkeypatch.setattr(type(model.model.norm), "forward", syncing)
    explanation = _explain(args)
    assert explanation.graph_break_count >= 1
    assert any("item" in str(b.reason).lower() or "scalar" in str(b.reason).lower()
               for b in explanation.break_reasons)


def test_fullgraph_compiled_step_gives_the_eager_logits():
    """The step under fullgraph=True (what COMPILE_OPTIONS asks for) compiles and matches eager, with the
    aot_eager backend (no C++ toolchain needed): the traced graph computes what the eager step does."""
    model = random_model(small_config(num_hidden_layers=2))
    args = _step_args(model, torch.randint(3, 100, (2, 5)), None)
    assert decode_loop.COMPILE_OPTIONS["fullgraph"] is True
    eager = decode_loop._decode_step(*args)
    # the eager call wrote this step's K/V into the cache; the compiled one rewrites the same slot, same values
    torch._dynamo.reset()
    compiled = torch.compile(decode_loop._decode_step, backend="aot_eager", fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(*args), eager, rtol=1e-5, atol=1e-5)
