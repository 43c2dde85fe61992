"""Generation: greedy, processors and beam search token for token against transformers' ``generate``;
padded batches against each row alone; sampling warpers against transformers' warpers and sampled
frequencies against the processed distribution; EOS, stop strings and streaming on the real stories260K
model; the static-cache and compiled decode paths; argument checks before any forward."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

from llama_core import LlamaForCausalLM, StaticCache
from llama_core.generation import GenerationOutput, decode_loop, generate, stream_generate
from llama_core.generation.sampling import (
    LogitsSettings,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
    warp,
)
from tests.conftest import assets_dir, random_model, small_config

STORIES = assets_dir() / "stories260K"


def left_padded(lengths: list[int], seed: int = 0, low: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(low, 128, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return random_model()


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """transformers' LlamaForCausalLM on the same weights."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    path = tmp_path_factory.mktemp("gen") / "model"
    model.save_pretrained(path)
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def skip_unless_padding_aware_penalty(processors: dict) -> None:
    """Left padding is not part of the prompt: transformers 5.23 leaves it out of the repetition penalty
    (``prompt_ignore_length``), as we do; older 5.x (e.g. 5.17) penalises the pad id too."""
    import transformers

    if processors.get("repetition_penalty", 1.0) != 1.0 and "prompt_ignore_length" not in inspect.getsource(
            transformers.GenerationMixin._get_logits_processor):
        pytest.skip(f"transformers {transformers.__version__} penalises left-padding tokens")


@pytest.fixture(scope="module")
def batch_and_eos(model):
    """A left-padded batch and two EOS ids that end rows 0 and 1 early (at different steps), not row 2."""
    ids, mask = left_padded([7, 3, 5])
    new = generate(model, ids, mask, max_new_tokens=20, eos_token_id=[])[:, ids.shape[1]:].tolist()

    def first_end(row: list[int], eos: list[int]) -> int:
        return next((i for i, t in enumerate(row) if t in eos), len(row))

    for a in new[0][2:]:
        for b in new[1][2:]:
            eos = [a, b]
            ends = [first_end(row, eos) for row in new]
            if ends[2] == 20 and 2 <= min(ends[:2]) < max(ends[:2]) < 16:
                return ids, mask, eos
    raise AssertionError("no EOS pair ends rows 0 and 1 early but not row 2")


# ------------------------------------------------------------------------------------ parity with transformers

@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_single_row_matches_transformers(model, reference, cache):
    ids = torch.randint(3, 128, (1, 9))
    ours = generate(model, ids, max_new_tokens=24, eos_token_id=[], cache=cache)
    theirs = reference.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.shape == (1, 33)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("processors", [{}, {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2},
                                        {"repetition_penalty": 0.7, "no_repeat_ngram_size": 3}])
def test_greedy_padded_batch_matches_transformers(model, reference, batch_and_eos, cache, processors):
    skip_unless_padding_aware_penalty(processors)
    ids, mask, eos = batch_and_eos
    ours = generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=5, cache=cache,
                    **processors)
    theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                eos_token_id=eos, pad_token_id=5, **processors)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beam", [dict(num_beams=3, num_return_sequences=2, length_penalty=1.0),
                                  dict(num_beams=3, num_return_sequences=2, length_penalty=0.5),
                                  dict(num_beams=3, num_return_sequences=3, early_stopping=True),
                                  dict(num_beams=4, num_return_sequences=2, early_stopping="never",
                                       length_penalty=1.5, repetition_penalty=1.2, no_repeat_ngram_size=2)])
def test_beam_search_matches_transformers(model, reference, batch_and_eos, seed, beam):
    """Same sequences and the same sequences_scores (to float rounding). The algorithm is transformers' own,
    so any difference would be an algorithmic one, not a tie: logits agree bit for bit on CPU."""
    skip_unless_padding_aware_penalty(beam)
    ids, mask, eos = batch_and_eos
    ids, mask = left_padded([6, 2, 4], seed=seed) if seed else (ids, mask)
    ours = generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=5,
                    output_logprobs=True, **beam)
    theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                                pad_token_id=5, return_dict_in_generate=True, output_scores=True, **beam)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-5, rtol=0)
    # The per-token logprobs add up to the scores.
    new_len = (ours.logprobs != 0).sum(-1)  # logprobs are 0 after a hypothesis ended
    lp = beam.get("length_penalty", 1.0)
    torch.testing.assert_close(ours.logprobs.sum(-1) / new_len**lp, ours.sequences_scores, atol=1e-4, rtol=0)


def test_beam_search_static_cache_equals_dynamic(model, batch_and_eos):
    ids, mask, eos = batch_and_eos
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=10, eos_token_id=eos, output_logprobs=True)
    a, b = generate(model, ids, mask, cache="static", **kw), generate(model, ids, mask, **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ batches, EOS, padding

@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_padded_batch_rows_equal_each_row_alone(model, batch_and_eos, cache):
    ids, mask, eos = batch_and_eos
    batched = generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=5, cache=cache)
    width = ids.shape[1]
    finished_early = 0
    for i in range(len(ids)):
        n = int(mask[i].sum())
        alone = generate(model, ids[i:i + 1, width - n:], max_new_tokens=20, eos_token_id=eos, cache=cache)[0]
        new_alone = alone[n:]
        new_batched = batched[i, width:]
        assert torch.equal(new_batched[:len(new_alone)], new_alone)
        # After its EOS a row holds only padding.
        assert (new_batched[len(new_alone):] == 5).all()
        finished_early += len(new_alone) < 20
    assert finished_early == 2


def test_multiple_eos_ids_pad_after_eos_and_stop_when_all_done(model, batch_and_eos):
    ids, mask, eos = batch_and_eos
    free = generate(model, ids, mask, max_new_tokens=20, eos_token_id=[])[:, ids.shape[1]:]
    # End every row: add the token row 2 emits at step 5 as a third EOS id.
    eos_all = [*eos, int(free[2, 5])]
    out = generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos_all, pad_token_id=7)
    new = out[:, ids.shape[1]:]
    ends = [int(torch.isin(row, torch.tensor(eos_all)).nonzero()[0]) for row in free]
    assert new.shape[1] == max(ends) + 1 < 20  # stopped as soon as the last row ended
    for row, end in zip(new, ends, strict=True):
        assert int(row[end]) in eos_all and (row[end + 1:] == 7).all()
        assert not torch.isin(row[:end], torch.tensor(eos_all)).any()
    # The default pad is the first EOS; a single int works.
    single = generate(model, ids[:1], mask[:1], max_new_tokens=20, eos_token_id=eos[0])
    end = free[0].tolist().index(eos[0])
    assert single.shape[1] == ids.shape[1] + end + 1 and int(single[0, -1]) == eos[0]


@pytest.mark.parametrize("check_every", [1, 3, 64])
def test_deferred_finished_check_does_not_change_the_output(model, batch_and_eos, check_every):
    ids, mask, eos = batch_and_eos
    eos_all = [*eos, int(generate(model, ids[2:], mask[2:], max_new_tokens=8, eos_token_id=[])[0, -1])]
    want = generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos_all, output_logprobs=True, check_every=1)
    got = generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos_all, output_logprobs=True,
                   check_every=check_every)
    assert want.sequences.shape[1] < ids.shape[1] + 20
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.logprobs, want.logprobs)


def test_logprobs_are_log_softmax_of_full_forward(model):
    ids = torch.randint(3, 128, (2, 6))
    out = generate(model, ids, max_new_tokens=10, eos_token_id=[], output_logprobs=True)
    assert isinstance(out, GenerationOutput) and out.logprobs.shape == (2, 10)
    with torch.no_grad():
        logits = model(out.sequences).logits[:, 5:-1]  # the positions that predicted the new tokens
    want = logits.log_softmax(-1).gather(-1, out.sequences[:, 6:, None])[..., 0]
    torch.testing.assert_close(out.logprobs, want, atol=1e-5, rtol=0)


def test_max_new_tokens_zero_returns_the_prompt_without_a_forward(model):
    calls = _Counter(model)
    ids = torch.randint(3, 128, (2, 4))
    try:
        assert torch.equal(generate(model, ids, max_new_tokens=0), ids)
        assert generate(model, ids, max_new_tokens=0, num_beams=2, num_return_sequences=2).shape == (4, 4)
    finally:
        calls.remove()
    assert calls.count == 0


# ------------------------------------------------------------------------------------ sampling

def test_sampling_reproducible_with_seed_and_generator(model):
    ids, mask = left_padded([5, 2])
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, eos_token_id=[])
    a = generate(model, ids, mask, seed=11, **kw)
    assert torch.equal(a, generate(model, ids, mask, seed=11, **kw))
    assert not torch.equal(a, generate(model, ids, mask, seed=12, **kw))
    # A generator continues its stream: two runs from one generator equal two runs from the same seed state.
    g = torch.Generator().manual_seed(11)
    assert torch.equal(generate(model, ids, mask, generator=g, **kw), a)
    assert not torch.equal(generate(model, ids, mask, generator=g, **kw), a)
    # The global RNG is neither used nor advanced.
    state = torch.get_rng_state()
    generate(model, ids, mask, seed=3, **kw)
    assert torch.equal(torch.get_rng_state(), state)


def test_top_k_1_and_temperature_0_equal_greedy(model, batch_and_eos):
    ids, mask, eos = batch_and_eos
    greedy = generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, do_sample=True,
                                top_k=1, temperature=3.0, seed=0), greedy)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, do_sample=True,
                                temperature=0.0), greedy)


def test_num_return_sequences_sampling(model):
    ids = torch.randint(3, 128, (2, 4))
    out = generate(model, ids, max_new_tokens=8, do_sample=True, num_return_sequences=3, seed=0, eos_token_id=[])
    assert out.shape == (6, 12)
    assert torch.equal(out[:3, :4], ids[:1].expand(3, 4)) and torch.equal(out[3:, :4], ids[1:].expand(3, 4))
    assert len({tuple(r) for r in out[:3, 4:].tolist()}) > 1


@pytest.mark.parametrize("min_keep", [1, 3])
def test_warpers_match_transformers(min_keep):
    tf = pytest.importorskip("transformers")
    logits = torch.randn(6, 50) * 3
    logits[0, :10] = 4.0  # ties at the cut
    cases = [
        (top_k_filter(logits, 5, min_keep), tf.TopKLogitsWarper(5, min_tokens_to_keep=min_keep)),
        (top_k_filter(logits, 1, min_keep), tf.TopKLogitsWarper(1, min_tokens_to_keep=min_keep)),
        (top_p_filter(logits, 0.8, min_keep), tf.TopPLogitsWarper(0.8, min_tokens_to_keep=min_keep)),
        (top_p_filter(logits, 0.01, min_keep), tf.TopPLogitsWarper(0.01, min_tokens_to_keep=min_keep)),
        (min_p_filter(logits, 0.1, min_keep), tf.MinPLogitsWarper(0.1, min_tokens_to_keep=min_keep)),
        (min_p_filter(logits, 1.0, min_keep), tf.MinPLogitsWarper(1.0, min_tokens_to_keep=min_keep)),
    ]
    for ours, warper in cases:
        assert torch.equal(ours, warper(None, logits.clone())), type(warper).__name__
    settings = LogitsSettings(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05,
                              min_tokens_to_keep=min_keep)
    chain = tf.LogitsProcessorList([tf.TemperatureLogitsWarper(0.7),
                                    tf.TopKLogitsWarper(20, min_tokens_to_keep=min_keep),
                                    tf.TopPLogitsWarper(0.9, min_tokens_to_keep=min_keep),
                                    tf.MinPLogitsWarper(0.05, min_tokens_to_keep=min_keep)])
    assert torch.equal(warp(logits, settings), chain(None, logits.clone()))


def test_sampler_frequencies_match_probabilities():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    n = 40_000
    draws = sample(probs.expand(n, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[-1] == 0
    chi2 = ((counts[:5] - n * probs[:5]) ** 2 / (n * probs[:5])).sum()
    assert chi2 < 18.5  # chi-square, 4 degrees of freedom, p = 0.001


def test_generated_frequencies_match_processed_distribution(model):
    """End to end: 4000 one-token samples of one prompt follow softmax of the warped logits (only the kept
    tokens appear; chi-square over them at p = 0.001)."""
    ids = torch.randint(3, 128, (1, 5))
    settings = LogitsSettings(do_sample=True, temperature=0.5, top_k=8, top_p=0.95, min_p=0.02)
    with torch.no_grad():
        probs = warp(model(ids).logits[0, -1], settings).softmax(-1)
    n = 4000
    out = generate(model, ids, max_new_tokens=1, do_sample=True, temperature=0.5, top_k=8, top_p=0.95,
                   min_p=0.02, num_return_sequences=n, seed=0)
    counts = torch.bincount(out[:, -1], minlength=probs.numel()).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0 and 2 <= int(kept.sum()) <= 8
    expected = n * probs[kept].double()
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    critical = {1: 10.8, 2: 13.8, 3: 16.3, 4: 18.5, 5: 20.5, 6: 22.5, 7: 24.3}[int(kept.sum()) - 1]
    assert chi2 < critical


def test_beam_sampling_is_reproducible(model):
    ids = torch.randint(3, 128, (2, 4))
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=True, top_k=10, eos_token_id=[])
    a = generate(model, ids, seed=5, **kw)
    assert a.shape == (4, 12) and torch.equal(a, generate(model, ids, seed=5, **kw))


# ------------------------------------------------------------------------------------ speed path

def test_user_static_cache_is_reset_and_reused(model, batch_and_eos):
    ids, mask, eos = batch_and_eos
    want = generate(model, ids, mask, max_new_tokens=10, eos_token_id=eos)
    cache = StaticCache(model.config, max_batch_size=4, max_cache_len=40)
    for _ in range(2):
        assert torch.equal(generate(model, ids, mask, max_new_tokens=10, eos_token_id=eos, cache=cache), want)


def test_compiled_decode_step_is_one_graph_and_equals_eager(model, batch_and_eos, monkeypatch):
    """The compiled path with the eager dynamo backend (inductor takes ~30 s to compile on a 2-core CPU;
    test_compiled_generation_cuda runs the real options): fullgraph traces, one graph serves every step
    and a second call with a new cache, and the tokens equal the uncompiled ones."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(decode_loop, "COMPILE_OPTIONS", {"backend": "eager", "fullgraph": True})
    torch._dynamo.reset()
    counters.clear()
    ids, mask, eos = batch_and_eos
    want = generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos)
    for _ in range(2):
        assert torch.equal(generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, compile=True), want)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_generation_cuda(batch_and_eos):
    """compile=True with COMPILE_OPTIONS (reduce-overhead: CUDA graphs) on a GPU: same tokens as eager
    greedy, a second call (new cache) compiles nothing new, and sampling is reproducible."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = random_model(small_config(hidden_size=256, intermediate_size=512, num_attention_heads=8)).cuda()
    ids, mask = (t.cuda() for t in batch_and_eos[:2])
    want = generate(model, ids, mask, max_new_tokens=24, eos_token_id=[])
    assert torch.equal(generate(model, ids, mask, max_new_tokens=24, eos_token_id=[], compile=True), want)
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(generate(model, ids, mask, max_new_tokens=24, eos_token_id=[], compile=True), want)
    assert counters["stats"]["unique_graphs"] == graphs
    kw = dict(max_new_tokens=24, do_sample=True, top_p=0.9, seed=1, compile=True)
    assert torch.equal(generate(model, ids, mask, **kw), generate(model, ids, mask, **kw))


# ------------------------------------------------------------------------------------ real data: stories260K

@pytest.fixture(scope="module")
def stories():
    spm = pytest.importorskip("sentencepiece")
    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip(f"stories260K assets not found under {STORIES} (set LLAMA_CORE_ASSETS)")
    model = LlamaForCausalLM.from_pretrained(STORIES / "stories260K.bin").eval()
    return model, spm.SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))


BOS = torch.tensor([[1]])


def test_stories_greedy_tells_the_known_story(stories):
    model, sp = stories
    out = model.generate(BOS, max_new_tokens=40)
    assert out.shape == (1, 41)
    assert sp.decode(out[0].tolist()).startswith("Once upon a time, there was a little girl named Lily.")


def test_stop_strings_end_on_the_completing_token(stories):
    model, sp = stories
    out = generate(model, BOS, max_new_tokens=40, stop_strings=["Lily"], tokenizer=sp)
    assert sp.decode(out[0].tolist()) == "Once upon a time, there was a little girl named Lily"
    assert sp.id_to_piece(int(out[0, -1])) == "▁Lily"
    # A left-padded batch: the row that completes a string ("tim", inside "time") stops and is padded after
    # it; the other runs on.
    prompt = [1, *sp.encode("Once upon a time")]
    ids = torch.tensor([[0] * (len(prompt) - 1) + [1], prompt])
    mask = (ids != 0).long()
    out = generate(model, ids, mask, max_new_tokens=12, stop_strings=["tim", "xyz"], tokenizer=sp, pad_token_id=0)
    new = out[:, len(prompt):]
    assert new.shape == (2, 12)
    assert sp.decode(new[0, :4].tolist()) == "Once upon a time" and (new[0, 4:] == 0).all()
    assert sp.decode(new[1].tolist()).startswith(", there was a little girl named Lily.")
    # A stop string inside the prompt does not count.
    prompt = torch.tensor([sp.encode("Lily")])
    out = generate(model, torch.cat([BOS, prompt], 1), max_new_tokens=5, stop_strings=["Lily"], tokenizer=sp)
    assert out.shape[1] == 1 + prompt.shape[1] + 5


def test_streamed_pieces_concatenate_to_the_completion(stories):
    model, sp = stories
    pieces: list[str] = []
    out = generate(model, BOS, max_new_tokens=60, do_sample=True, temperature=1.3, seed=3, streamer=pieces.append,
                   tokenizer=sp)
    assert len(pieces) > 10 and "".join(pieces) == sp.decode(out[0, 1:].tolist())
    it = stream_generate(model, BOS, max_new_tokens=30, tokenizer=sp)
    streamed = []
    while True:
        try:
            streamed.append(next(it))
        except StopIteration as stop:
            final = stop.value
            break
    assert "".join(streamed) == sp.decode(final[0, 1:].tolist())
    assert "".join(streamed).startswith("Once upon a time")
    # Without a tokenizer: the new token ids, one per row, at every step.
    ids = list(stream_generate(model, BOS.expand(2, 1), max_new_tokens=5, eos_token_id=[]))
    assert torch.equal(torch.tensor(ids).T, generate(model, BOS.expand(2, 1), max_new_tokens=5, eos_token_id=[])[:, 1:])


def test_incremental_text_never_splits_a_character(stories):
    """Byte-fallback tokens: "é" is two byte tokens and "€" three; decoding one token at a time would emit
    U+FFFD, the incremental decoder holds them back until the character is complete."""
    _, sp = stories
    ids = sp.encode("café €5 naïve")
    assert any(sp.id_to_piece(i).startswith("<0x") for i in ids)
    text = decode_loop._IncrementalText(sp)
    pieces = [text.push([i]) for i in ids] + [text.flush()]
    assert "".join(pieces) == sp.decode(ids) == "café €5 naïve"
    assert not any("\ufffd" in p for p in pieces)


# ------------------------------------------------------------------------------------ argument checks

class _Counter:
    """Counts forward calls of a model (a pre-hook), to prove that a check ran before any forward."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1

    def remove(self):
        self.handle.remove()


class _Decoder:
    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


INVALID = [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"), (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(stop_strings=["x"]), "tokenizer"), (dict(stop_strings=[""], tokenizer=_Decoder()), "stop_strings"),
    (dict(eos_token_id=128), "eos_token_id"), (dict(pad_token_id=-1), "pad_token_id"),
    (dict(seed=1, generator=torch.Generator()), "seed or generator"), (dict(cache="paged"), "cache"),
    (dict(cache="dynamic", compile=True), "static cache"), (dict(num_beams=2, stop_strings=["a"], tokenizer=_Decoder()),
                                                            "beam search"),
    (dict(cache=StaticCache(small_config(), 1, 6)), "too small"), (dict(check_every=0), "check_every"),
    (dict(attention_mask=torch.tensor([[1, 0, 1]])), "left-padded"),
    (dict(attention_mask=torch.ones(1, 4)), "shape"), (dict(input_ids=torch.tensor([1, 2, 3])), "input_ids"),
    (dict(input_ids=torch.tensor([[1, 2, 128]])), "input_ids"),
    (dict(input_ids=torch.randint(3, 128, (1, 65))), "max_position_embeddings"),
]


@pytest.mark.parametrize(("kwargs", "match"), INVALID, ids=[m + str(i) for i, (_, m) in enumerate(INVALID)])
def test_invalid_arguments_raise_before_any_forward(model, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    ids = kwargs.pop("input_ids", torch.tensor([[5, 6, 7]]))
    calls = _Counter(model)
    try:
        with pytest.raises(ValueError, match=match):
            generate(model, ids, **kwargs)
        with pytest.raises(ValueError, match=match):  # the iterator form checks when called, not at next()
            stream_generate(model, ids, **kwargs)
    finally:
        calls.remove()
    assert calls.count == 0


def test_text_streaming_needs_a_single_sequence(model):
    with pytest.raises(ValueError, match="single sequence"):
        stream_generate(model, torch.tensor([[5], [6]]), tokenizer=_Decoder())


def test_generation_past_the_trained_length_warns(model, caplog):
    with caplog.at_level(logging.WARNING, logger="llama_core.generation"):
        out = generate(model, torch.randint(3, 128, (1, 60)), max_new_tokens=6, eos_token_id=[])
    assert out.shape == (1, 66) and "max_position_embeddings" in caplog.text
