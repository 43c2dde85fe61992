"""generate's arguments of the wrong type are a TypeError naming the argument, before any forward; sampling
without seed or generator follows torch.manual_seed, as in transformers (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama_core.generation import generate, stream_generate
from tests.conftest import random_model

WRONG_TYPES = [
    (dict(temperature="0.7", do_sample=True), "temperature"), (dict(top_p="x", do_sample=True), "top_p"),
    (dict(max_new_tokens="5"), "max_new_tokens"), (dict(max_new_tokens=5.0), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"), (dict(top_k=True), "top_k"), (dict(min_p=None), "min_p"),
    (dict(num_beams=2.0), "num_beams"), (dict(repetition_penalty="1.1"), "repetition_penalty"),
    (dict(length_penalty=[1.0]), "length_penalty"), (dict(seed="1", do_sample=True), "seed"),
    (dict(check_every=1.5), "check_every"),
]


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.mark.parametrize(("kwargs", "name"), WRONG_TYPES, ids=[n + str(i) for i, (_, n) in enumerate(WRONG_TYPES)])
def test_wrong_argument_types_name_the_argument(model, kwargs, name):
    ids = torch.tensor([[5, 6, 7]])
    for call in (generate, stream_generate):
        with pytest.raises(TypeError, match=f"^{name} must be"):
            call(model, ids, **{"max_new_tokens": 2, **kwargs})


def test_numpy_and_python_numbers_are_accepted(model):
    ids = torch.tensor([[5, 6, 7]])
    a = generate(model, ids, max_new_tokens=np.int64(3), temperature=np.float32(0.5), top_k=2, do_sample=True, seed=1)
    assert torch.equal(a, generate(model, ids, max_new_tokens=3, temperature=0.5, top_k=2, do_sample=True, seed=1))
    with pytest.raises(ValueError, match="temperature must be finite"):
        generate(model, ids, temperature=float("nan"), do_sample=True)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_sampling_follows_torch_manual_seed(model, num_beams):
    # A flat distribution (temperature 50 on a random model) over 128 ids: two different seeds giving the same
    # 12 tokens is about 128^-12 likely.
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    kw = dict(max_new_tokens=12, do_sample=True, temperature=50.0, eos_token_id=[], num_beams=num_beams)
    torch.manual_seed(3)
    a = generate(model, ids, **kw)
    torch.manual_seed(3)
    assert torch.equal(generate(model, ids, **kw), a)
    torch.manual_seed(4)
    assert not torch.equal(generate(model, ids, **kw), a)
    # An explicit seed still uses its own generator and leaves the global one alone.
    state = torch.get_rng_state()
    generate(model, ids, seed=3, **kw)
    assert torch.equal(torch.get_rng_state(), state)
