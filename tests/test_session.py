"""generation.session: one sequence fed across calls with its cache kept (what `llama-core chat` runs on).

Greedy continuations through a session equal ``generate`` on the whole sequence; a later turn feeds only
what it does not share with the earlier ones; compiled (static cache in buckets, through inductor) gives the
eager tokens, also when the conversation outgrows its bucket and the cache is rebuilt."""

from __future__ import annotations

import pytest
import torch

from llama_core.generation import generate
from llama_core.generation import session as session_module
from llama_core.generation.session import Session, bucketed_length
from llama_core.modeling.cache import StaticCache
from tests.conftest import random_model, small_config


def greedy(session: Session, ids: list[int], n: int) -> list[int]:
    logits, out = session.feed(ids, room=n), []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = session.push(out[-1])
    return out


def test_bucketed_length():
    assert bucketed_length(1, 4096) == 512 and bucketed_length(512, 4096) == 512
    assert bucketed_length(513, 4096) == 1024
    assert bucketed_length(300, 256) == 300  # more than the model's positions: exactly what is needed
    assert bucketed_length(200, 256) == 256


def test_turns_equal_generate_and_reuse_the_prefix(monkeypatch):
    model = random_model(small_config(vocab_size=256, max_position_embeddings=128))
    session = Session(model)
    first = [5, 9, 17, 3, 44]
    reply = greedy(session, first, 6)
    expected = generate(model, torch.tensor([first]), max_new_tokens=6, eos_token_id=[])[0, len(first):]
    assert reply == expected.tolist()
    fed: list[int] = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda ids, **kw: fed.append(ids.shape[1]) or original(ids, **kw))
    second = [*first, *reply, 77, 78, 79]
    reply2 = greedy(session, second, 5)
    assert fed[0] == 3  # only the new user tokens: the first turn and its reply were already in the cache
    assert reply2 == generate(model, torch.tensor([second]), max_new_tokens=5,
                              eos_token_id=[])[0, len(second):].tolist()
    # an edited history is fed from where it differs
    fed.clear()
    greedy(session, [*first[:2], 100, 101], 1)
    assert fed[0] == 2


def test_compiled_session_equals_eager_across_a_bucket_change(monkeypatch):
    """Bucket of 16 slots: the second turn no longer fits the first cache, gets a bigger one (fed again from
    the start, compiled for its shape) and still gives the eager tokens."""
    monkeypatch.setattr(session_module, "CACHE_BUCKET", 16)
    model = random_model(small_config(vocab_size=256, max_position_embeddings=128))
    eager, compiled = Session(model), Session(model, compile=True)
    turn1 = [5, 9, 17, 3, 44]
    assert greedy(compiled, turn1, 6) == greedy(eager, turn1, 6)
    assert isinstance(compiled.cache, StaticCache) and compiled.cache.max_cache_len == 16
    first_cache = compiled.cache
    turn2 = [*compiled.fed, 60, 61, 62, 63]
    assert greedy(compiled, turn2, 8) == greedy(eager, turn2, 8)
    assert compiled.cache is not first_cache and compiled.cache.max_cache_len == 32
    # an edited history that fits: the static cache is cropped in place, its stale slots hidden
    turn3 = [*turn2[:10], 90]
    assert greedy(compiled, turn3, 3) == greedy(eager, turn3, 3)
    assert compiled.cache.max_cache_len == 32 and compiled.cache.get_seq_length() == len(turn3) + 3


def test_feed_and_push_check_their_input():
    session = Session(random_model())
    with pytest.raises(ValueError, match="push follows a feed"):
        session.push(1)
    with pytest.raises(ValueError, match="at least one token"):
        session.feed([])
