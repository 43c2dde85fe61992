"""The llama-core command line: the README's main job runs, and bad input is a clear error (exit 2)."""

from __future__ import annotations

import argparse
import io
import signal
import subprocess
import sys

import pytest
import torch

from checkpoints_convert import llama2c_to_hf
from llama_core import LlamaForCausalLM, Tokenizer
from llama_core.cli import main
from tests.conftest import REPO, assets_dir, small_config


def test_summary_of_a_preset(capsys):
    assert main(["summary", "--preset", "tiny", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "2 layers, hidden 64, heads 4 (kv 2, head_dim 16)" in out
    assert "logits (1, 16, 256), finite: True" in out


def test_summary_of_a_checkpoint(tmp_path, capsys):
    LlamaForCausalLM(small_config(tie_word_embeddings=True)).save_pretrained(tmp_path)
    assert main(["summary", "--model", str(tmp_path), "--seq-len", "8", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "tied embeddings" in out and "logits (2, 8, 128)" in out


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["summary", "--model", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err


def test_console_script_is_installed_or_module_runs():
    """The entry point the README uses (run as a module, so the test does not depend on PATH)."""
    result = subprocess.run([sys.executable, "-m", "llama_core.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("llama-core ")


STORIES = assets_dir() / "stories260K"
needs_stories = pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(),
                                   reason=f"stories260K assets not found under {STORIES}")


@pytest.fixture(scope="module")
def stories_hf(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "stories"
    llama2c_to_hf(STORIES / "stories260K.bin", out, tokenizer=STORIES / "tok512.model", progress=False)
    return out


@needs_stories
def test_generate_tells_the_story_and_reports_speed(stories_hf, capsys):
    assert main(["generate", "--model", str(stories_hf), "--prompt", "", "--max-new-tokens", "40"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time, there was a little girl named Lily.")
    assert "prompt: 1 tokens" in err and "decode: 39 tokens" in err and "tokens/s" in err
    assert "compile" not in err  # 40 new tokens: below the CPU default's threshold, eager


@needs_stories
def test_generate_compiled_tells_the_same_story(stories_hf, capsys):
    """--compile on a CPU: the one-row reduction path, same text as eager, compile time reported apart."""
    args = ["generate", "--model", str(stories_hf), "--prompt", "Once upon a time", "--max-new-tokens", "30"]
    assert main([*args, "--no-compile"]) == 0
    eager = capsys.readouterr().out
    assert main([*args, "--compile"]) == 0
    out, err = capsys.readouterr()
    assert out == eager and "compile: " in err and "compiling the decode step" in err


@needs_stories
@pytest.mark.parametrize("mode", ["int8", "int8-weight-only"])
def test_generate_quantized_tells_the_story(stories_hf, capsys, mode):
    assert main(["generate", "--model", str(stories_hf), "--prompt", "", "--max-new-tokens", "40",
                 "--quantize", mode]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time, there was a little girl named Lily.")


@pytest.mark.parametrize(("flags", "dtype"), [(["--compile"], "float32"), (["--no-compile"], "auto"),
                                              (["--max-new-tokens", "40"], "auto"), ([], "float32"),
                                              (["--compile", "--dtype", "bfloat16"], "bfloat16")])
def test_int8_weight_only_on_a_cpu_computes_in_fp32_when_compiled(flags, dtype, monkeypatch):
    """Compiled, inductor's int8 reduction runs at full speed beside fp32 activations only; eagerly PyTorch's
    int8 kernel is the slow one with fp32, so the checkpoint's dtype stays; an explicit --dtype always wins."""
    import argparse

    from llama_core.cli import generation_options
    from llama_core.cli.generate import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["generate", "--model", "org/m", "--tokenizer", "t", "--prompt", "x", "--device", "cpu",
                              "--quantize", "int8-weight-only", *flags])
    seen = {}
    monkeypatch.setattr(Tokenizer, "from_pretrained", lambda source: None)
    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained",
                        lambda path, **kw: seen.update(kw))
    generation_options.load_model_and_tokenizer(args)
    assert seen["dtype"] == dtype and seen["quantize"] == "int8-weight-only"


@needs_stories
def test_generate_with_sampling_is_reproducible(stories_hf, capsys):
    argv = ["generate", "--model", str(stories_hf), "--prompt", "Tom", "--max-new-tokens", "30",
            "--temperature", "0.9", "--top-p", "0.95", "--seed", "7"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and len(first) > 20


@needs_stories
def test_chat_keeps_its_cache_across_turns(stories_hf, capsys, monkeypatch):
    """Two turns; the second reuses the cache for the prefix the re-rendered template shares with what was
    already fed, so it feeds far fewer tokens than the whole conversation."""
    fed: list[int] = []
    original = LlamaForCausalLM.forward

    def spy(self, input_ids=None, *args, **kwargs):
        fed.append(input_ids.shape[1])
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nTell me more\n"))
    assert main(["chat", "--model", str(stories_hf), "--max-new-tokens", "8", "--chat-template", "llama2"]) == 0
    replies = capsys.readouterr().out.split("> ")
    assert len([r for r in replies if r.strip()]) == 2
    prefills = [n for n in fed if n > 1]
    assert len(prefills) == 2
    tok = Tokenizer.from_pretrained(stories_hf)
    first_prompt = tok.apply_chat_template([{"role": "user", "content": "Hello there"}])
    assert prefills[0] == len(first_prompt)
    reply = next(r for r in replies if r.strip()).rstrip("\n")
    second = tok.apply_chat_template([{"role": "user", "content": "Hello there"},
                                      {"role": "assistant", "content": reply},
                                      {"role": "user", "content": "Tell me more"}])
    assert prefills[1] < len(second) - 5, (prefills, len(second))  # the shared prefix came from the cache


@needs_stories
def test_chat_compiled_gives_the_eager_replies(stories_hf, capsys, monkeypatch):
    """--compile in chat: a static cache and the compiled step (inductor on the CPU), same two replies."""
    replies = {}
    for flag in ("--no-compile", "--compile"):
        monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nTell me more\n"))
        assert main(["chat", "--model", str(stories_hf), "--max-new-tokens", "12", "--chat-template", "llama2", flag]) == 0
        out, err = capsys.readouterr()
        replies[flag] = out
        assert ("compiles at the first reply" in err) == (flag == "--compile")
    assert replies["--compile"] == replies["--no-compile"] and len(replies["--compile"]) > 20


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "--model", "/nonexistent/model", "--prompt", "x"], "no such"),
    (["generate", "--model", ".", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["generate", "--model", ".", "--prompt", "x", "--temperature", "-1"], "--temperature"),
])
def test_generate_errors_are_short(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ------------------------------------------------------------------------- what a newcomer meets at the prompt

def test_abbreviations_are_refused_and_defaults_shown(capsys):
    """`--max-new-token 5` is an error (argparse would silently take it for --max-new-tokens); help shows
    defaults."""
    from llama_core.cli.main import build_parser

    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", "m", "--prompt", "x", "--max-new-token", "5"])
    assert exc.value.code == 2 and "unrecognized arguments: --max-new-token" in capsys.readouterr().err
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["generate"].format_help()
    assert "(default: 256)" in text and "(default: None)" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch without CUDA")
def test_unavailable_device_is_one_line(capsys):
    assert main(["generate", "--model", "m", "--prompt", "x", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama-core: error: --device cuda: CUDA is not available") and "Traceback" not in err


@pytest.mark.parametrize("model", ["stories-typo", "./some/dir", "/nonexistent/x/y"])
def test_a_misspelt_model_path_is_named(model, capsys):
    assert main(["generate", "--model", model, "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"--model {model}: no such file or directory" in err and "tokenizer" not in err


@needs_stories
def test_generate_refuses_to_run_past_the_context(stories_hf, capsys):
    assert main(["generate", "--model", str(stories_hf), "--prompt", "Tom", "--max-new-tokens", "600"]) == 2
    assert "does not fit the model's 512 positions" in capsys.readouterr().err


@needs_stories
def test_ctrl_c_stops_generate_with_its_speed_line(stories_hf):
    """A real SIGINT to a running `llama-core generate`: exit 130, the partial text and speed, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "llama_core.cli", "generate", "--model", str(stories_hf),
                             "--prompt", "", "--max-new-tokens", "500", "--no-compile"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        first = proc.stdout.read(20)  # the story has started streaming
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert first.startswith("Once upon a time") and rest.endswith("\n") and proc.returncode == 130, err
    assert "interrupted" in err and "decode:" in err and "Traceback" not in err


def _chat(stories_hf, monkeypatch, capsys, lines, *flags):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = main(["chat", "--model", str(stories_hf), "--max-new-tokens", "12", "--no-compile", "--chat-template",
                 "llama2", *flags])
    out, err = capsys.readouterr()
    return code, out, err


@needs_stories
def test_chat_reset_exit_and_speed(stories_hf, monkeypatch, capsys):
    """/reset forgets the conversation (the same question gets the first answer again), /exit leaves before
    the next line, and each reply reports its tokens/s."""
    code, out, err = _chat(stories_hf, monkeypatch, capsys, ["Hello there", "Hello there", "/reset", "Hello there",
                                                             "/exit", "never read"])
    replies = [r for r in out.split("> ") if r.strip()]
    assert code == 0 and len(replies) == 3, out
    assert replies[2] == replies[0]  # after /reset: the first turn again, not a continuation
    assert err.count("tokens/s]") == 3 and "(new conversation)" in err


@needs_stories
def test_chat_ctrl_c_stops_the_reply_and_returns_to_the_prompt(stories_hf, monkeypatch, capsys):
    from llama_core.generation.session import Session

    pushes = {"n": 0}
    original = Session.push

    def interrupted(self, token):
        pushes["n"] += 1
        if pushes["n"] == 3:  # mid-way through the first reply
            raise KeyboardInterrupt
        return original(self, token)

    monkeypatch.setattr(Session, "push", interrupted)
    code, out, err = _chat(stories_hf, monkeypatch, capsys, ["Hello there", "Tell me more"])
    assert code == 0 and "[stopped]" in err and err.count("tokens/s]") == 2
    assert len([r for r in out.split("> ") if r.strip()]) == 2  # the second message was still answered

    def at_the_prompt(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", at_the_prompt)
    assert main(["chat", "--model", str(stories_hf), "--max-new-tokens", "12", "--no-compile", "--chat-template",
                 "llama2"]) == 0


@needs_stories
def test_chat_drops_the_oldest_turns_when_the_context_is_full(stories_hf, monkeypatch, capsys):
    """stories260K has 512 positions: three long messages cannot all stay; the oldest goes, the chat goes
    on; a single message too long for the context is refused without ending the session."""
    long = " ".join(["the cat sat on the mat"] * 25)  # ~150 tokens
    code, out, err = _chat(stories_hf, monkeypatch, capsys, [long, long, long, " ".join([long] * 4), "Hi"],
                           "--max-new-tokens", "100")
    assert code == 0 and "the oldest turn was dropped" in err
    assert "this message alone does not fit" in err
    assert len([r for r in out.split("> ") if r.strip()]) == 4  # three long ones and "Hi" were answered


@needs_stories
def test_a_completion_keeps_its_leading_space(stories_hf, capsys):
    """The completion is decoded after the prompt's tokens, so prompt + completion is the decoded whole
    ("The cat" + " was ...", not "The catwas"); --echo prints exactly that whole."""
    from llama_core.generation import generate

    tok = Tokenizer.from_pretrained(stories_hf)
    model = LlamaForCausalLM.from_pretrained(stories_hf)
    ids = tok.encode("The cat")
    new = generate(model, torch.tensor([ids]), max_new_tokens=12, eos_token_id=[])[0, len(ids):].tolist()
    whole = tok.decode(ids + new, skip_special_tokens=True)
    argv = ["generate", "--model", str(stories_hf), "--prompt", "The cat", "--max-new-tokens", "12", "--no-compile"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out[0] == " " and tok.decode(ids, skip_special_tokens=True) + out.rstrip("\n") == whole
    assert main([*argv, "--echo"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == whole


@needs_stories
def test_chat_without_a_template_is_refused_unless_a_format_is_named(stories_hf, capsys, tmp_path, monkeypatch):
    """stories260K's tokenizer has no chat template and no Llama 3 headers: chat refuses to guess; a named
    built-in format or a Jinja file is used as asked; impossible choices are named."""
    from llama_core.cli.chat_format import choose_chat_format
    from llama_core.tokenizer.chat_template import CHATML_TEMPLATE

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", "--model", str(stories_hf), "--max-new-tokens", "4"]) == 2
    assert "has no chat template; pass --chat-template" in capsys.readouterr().err
    assert main(["generate", "--model", str(stories_hf), "--chat", "--prompt", "x"]) == 2
    assert "has no chat template" in capsys.readouterr().err
    tok = Tokenizer.from_pretrained(stories_hf)
    choose_chat_format(tok, "chatml", "m")
    assert tok.chat_template == CHATML_TEMPLATE
    assert "<|im_start|>user\nHi<|im_end|>" in tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                                      tokenize=False)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    choose_chat_format(tok, str(template), "m")
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == "<Hi>"
    choose_chat_format(tok, "llama2", "m")
    assert tok.chat_template is None and "[INST]" in tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                                             tokenize=False)
    with pytest.raises(ValueError, match="lacks Llama 3's header tokens"):
        choose_chat_format(tok, "llama3", "m")
    with pytest.raises(FileNotFoundError, match="neither a built-in format"):
        choose_chat_format(tok, "vicuna", "m")


def test_every_command_shows_examples_and_defaults():
    """Each command's --help ends with runnable examples (kept line by line) and shows its defaults."""
    from llama_core.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        text = parser.format_help()
        examples = text[text.index("examples:"):].splitlines()[1:]
        assert examples and all(line.startswith("  ") for line in examples if line), (name, examples)
        assert any(f"llama-core {name} " in line for line in examples), name
        if name != "convert":  # convert's options are per conversion (its sub-commands show theirs)
            assert "(default: " in text, name
