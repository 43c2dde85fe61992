"""The llama-core command line: the README's main job runs, and bad input is a clear error (exit 2)."""

from __future__ import annotations

import subprocess
import sys

from llama_core import LlamaForCausalLM
from llama_core.cli import main
from tests.conftest import small_config


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
