"""Chat fine-tuning data: the loss is on the assistant replies only, located through the model's own chat
template (real templates: SmolLM2's ChatML from its GGUF, Meta's Llama 3 from tokenizer_config.json, the
built-in Llama 2 / Llama 3 formats), packed like text, trained end to end; bad files are refused by line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama_core import Tokenizer
from llama_core.cli import main as cli_main
from llama_core.train import TrainConfig, pack_windows, train
from llama_core.train.chat_data import conversation_tokens, load_chat_stream, resolve_data_format
from llama_core.train.data import IGNORE_INDEX, PackedWindows
from tests.conftest import assets_dir
from tests.train_corpus import NAMES, story

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid."},
]

REAL_TOKENIZERS = {
    "smollm2-chatml": "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "llama3-hf-template": "llama3-hf",
    "llama3-builtin": "llama3-tiktoken/tokenizer.model",
    "llama2-builtin": "llama2-tokenizer/tokenizer.model",
}


def spans(ids: list[int], trained: list[bool]) -> list[tuple[int, int]]:
    """[start, end) runs of trained tokens."""
    out, start = [], None
    for i, t in enumerate([*trained, False]):
        if t and start is None:
            start = i
        elif not t and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("name", sorted(REAL_TOKENIZERS))
def test_trained_tokens_are_exactly_the_replies(name):
    path = assets_dir() / REAL_TOKENIZERS[name]
    if not path.exists():
        pytest.skip(f"{path} not found (set LLAMA_CORE_ASSETS)")
    tok = Tokenizer.from_pretrained(path)
    ids, trained = conversation_tokens(CONVERSATION, tok)
    assert ids == tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    replies = [k for k, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
    runs = spans(ids, trained)
    assert len(runs) == len(replies)
    for (start, end), k in zip(runs, replies, strict=True):
        # what precedes a reply is exactly the prompt the model is given at inference
        assert ids[:start] == tok.apply_chat_template(CONVERSATION[:k], add_generation_prompt=True)
        # the reply is its content, then one stop token, which ends it
        assert ids[end - 1] in tok.stop_ids
        assert not any(i in tok.stop_ids for i in ids[start:end - 1])
        assert tok.decode(ids[start:end - 1]).strip() == CONVERSATION[k]["content"]
    assert sum(trained) == sum(end - start for start, end in runs)


def test_pack_windows_trains_only_trainable_targets():
    tokens = torch.tensor([[1, 10, 11, 12, 2, 1, 20, 21, 2]])
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1]])
    trainable = torch.tensor([[False, False, False, True, True, False, False, True, True]])
    b = pack_windows(tokens, docs, trainable)
    assert b.targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 12, 2, IGNORE_INDEX, IGNORE_INDEX, 21, 2]]
    assert pack_windows(tokens, docs).targets.tolist() == [[10, 11, 12, 2, IGNORE_INDEX, 20, 21, 2]]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, corpus) -> tuple[Path, Path]:
    """A JSONL of story requests answered with stories, and the synthetic corpus's tokenizer (no Jinja
    template: the built-in Llama 2 [INST] format)."""
    import random

    root = tmp_path_factory.mktemp("chat")
    tok = corpus[1]
    rng = random.Random(0)
    lines = []
    for _ in range(60):
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"Tell me a story about {rng.choice(NAMES)}."},
            {"role": "assistant", "content": story(rng)},
        ]}))
    data = root / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data, tok


def test_packed_chat_windows_target_only_replies(chat_run):
    data, tok_dir = chat_run
    tok = Tokenizer.from_pretrained(tok_dir)
    stream = load_chat_stream(data, tok)
    assert stream.trainable is not None and 0 < int(stream.trainable.sum()) < len(stream)
    windows = PackedWindows(stream, seq_len=64)
    for w in range(windows.num_windows):
        start = windows._window_index(w) * 64
        b = windows.windows(w, 1)
        kept = b.targets[0] != IGNORE_INDEX
        # every trained target is a reply token of the same conversation as its input position
        expected = stream.trainable[start + 1:start + 65] & (stream.doc_ids[start + 1:start + 65]
                                                              == stream.doc_ids[start:start + 64])
        assert torch.equal(kept, expected)


def test_chat_training_runs_and_learns(chat_run, tmp_path):
    data, tok = chat_run
    cfg = TrainConfig(data=str(data), tokenizer=str(tok), preset="tiny", output_dir=str(tmp_path), seq_len=64,
                      global_batch_size=4, micro_batch_size=2, max_steps=8, lr=3e-3, warmup_steps=2, progress=False,
                      export_hf=False, seed=0)
    assert resolve_data_format(cfg.data, cfg.data_format) == "chat"
    losses = train(cfg).losses
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("lines", "message"), [
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "{oops"],
     r"line 2: not valid JSON"),
    (['{"conversation": []}'], r"line 1: expected \{\"messages\""),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "line 1: the conversation has no assistant message"),
    (['{"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "yo"}]}'],
     "line 1: message 0 must have a string 'role' and a string 'content'"),
    (["", "  "], "holds no conversations"),
])
def test_bad_chat_files_are_refused_by_line(chat_run, tmp_path, lines, message):
    tok = Tokenizer.from_pretrained(chat_run[1])
    bad = write_lines(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(ValueError, match=message) as e:
        load_chat_stream(bad, tok)
    assert str(bad) in str(e.value)


def test_template_that_rewrites_earlier_turns_is_refused(chat_run):
    tok = Tokenizer.from_pretrained(chat_run[1])
    # renders the conversation newest first: an earlier prompt is not a prefix of the whole conversation
    tok.chat_template = ("{% for m in messages | reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="does not render assistant message 2 as a continuation"):
        conversation_tokens(CONVERSATION, tok, "chat.jsonl line 1")


def test_data_format_resolution_and_cli(chat_run, tmp_path, capsys):
    data, tok = chat_run
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text(data.read_text())
    assert resolve_data_format(tmp_path / "mixed", "auto") == "chat"
    (tmp_path / "mixed" / "b.txt").write_text("text")
    assert resolve_data_format(tmp_path / "mixed", "auto") == "text"
    assert resolve_data_format(tmp_path / "mixed", "chat") == "chat"
    args = ["train", "--preset", "tiny", "--data", str(tmp_path / "mixed"), "--format", "chat", "--tokenizer",
            str(tok), "--output-dir", str(tmp_path / "run"), "--seq-len", "32", "--global-batch-size", "2",
            "--micro-batch-size", "1", "--max-steps", "1", "--no-progress", "--no-export-hf"]
    assert cli_main(args) == 0
    assert cli_main([*args[:-4], "--doc-separator", "\n\n", "--output-dir", str(tmp_path / "other"),
                     "--no-progress"]) == 2
    assert "doc_separator does not apply" in capsys.readouterr().err
